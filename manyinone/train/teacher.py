"""A frozen teacher for distillation: any HF causal LM that shares the student's tokenizer.

The teacher is loaded once, without gradients, in bf16 by default; training asks it for its final
hidden states (after its own final norm) and its LM head weight, and the nested loss turns those
into logits chunk by chunk (`lean_loss.FrozenTeacher`), so no [tokens, vocab] tensor is kept.

Example:
    >>> teacher = Teacher.load("runs/sft", tokenizer, output="runs/x", device=torch.device("cuda"))
    >>> hidden = teacher.hidden(input_ids, attention_mask)        # [batch, seq, teacher_hidden]
    >>> logits = hidden @ teacher.head_weight.T                    # [batch, seq, vocab]
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from manyinone.core.errors import ManyinoneError
from manyinone.io.checkpoint import verify_checkpoint
from manyinone.io.loading import load_pretrained, resolve_source


class Teacher:
    """A frozen causal LM: `hidden()` gives its normed last hidden states, `head_weight` its LM head."""

    def __init__(self, model: nn.Module, source: str) -> None:
        head = model.get_output_embeddings()
        # Logits must be exactly hidden @ weight.T for the chunked loss to rebuild them.
        if type(head) is not nn.Linear or head.bias is not None or getattr(model.config, "final_logit_softcapping", None) \
                or getattr(model.config, "logit_scale", None) not in (None, 1, 1.0):
            raise ManyinoneError(f"teacher {source!r}: its LM head is not a plain bias-free linear map "
                                 f"({type(head).__name__}); use a teacher whose logits are hidden @ lm_head.weight.T")
        self.model, self.source = model.eval().requires_grad_(False), source
        self.head_weight = head.weight  # [vocab, teacher_hidden]

    @classmethod
    def load(cls, source: str, tokenizer, output: str | None, device: torch.device,
             dtype: torch.dtype = torch.bfloat16) -> "Teacher":
        """Load `source` (HF folder, hub name, .gguf, alias or manyinone run folder) frozen on `device`.

        Refused with one line: the run's own output folder, a teacher whose tokenizer differs.
        """
        if output is not None and Path(source).expanduser().exists() \
                and Path(source).expanduser().resolve() == Path(output).expanduser().resolve():
            raise ManyinoneError(f"teacher {source!r} is this run's own output folder; a teacher must be a fixed "
                                 "model (e.g. the SFT run or the base model)")
        folder = Path(resolve_source(source).folder)
        if folder.is_dir():  # a manyinone run or export: never distil from a damaged copy (`verify_checkpoint`)
            verify_checkpoint(folder, "teacher checkpoint")
        model, teacher_tokenizer = load_pretrained(source, dtype=dtype, require_adapter=False)
        check_same_vocabulary(source, teacher_tokenizer, tokenizer, model.get_output_embeddings().weight.shape[0])
        return cls(model.to(device), source)

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, seq, teacher_hidden]: the input to the teacher's LM head (position_ids: packed rows)."""
        return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids).last_hidden_state


def check_same_vocabulary(source: str, teacher_tokenizer, tokenizer, teacher_rows: int) -> None:
    """The KL compares distributions token by token: both sides must number tokens identically."""
    mine, theirs = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if mine != theirs:
        differ = len(set(mine.items()) ^ set(theirs.items()))
        raise ManyinoneError(f"teacher {source!r} has a different tokenizer ({len(theirs)} tokens vs the student's "
                             f"{len(mine)}, {differ} entries differ); a teacher must share the student's tokenizer")
    if teacher_rows < len(mine):
        raise ManyinoneError(f"teacher {source!r} has {teacher_rows} LM-head rows for a vocabulary of {len(mine)} tokens")
