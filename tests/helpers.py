"""Test helpers: tiny models and a character tokenizer built from configs, sample batches, diffs.

Imported by conftest.py and by tests (`from helpers import ...`); no fixtures here.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]  # printable ASCII + newline: 96 symbols
VOCAB_SIZE = len(SPECIALS) + len(CHARS)  # 100
BOS_ID, EOS_ID, PAD_ID = 1, 2, 3

# A minimal chat template for the "chat" prompt format (the tiny tokenizer has none of its own).
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def make_char_tokenizer():
    """A character-level fast tokenizer: one id per printable ASCII char, decoding without spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        # Like real LLaMA-family tokenizers: no token_type_ids (generate() would reject them).
        model_input_names=["input_ids", "attention_mask"],
    )
    assert len(fast) == VOCAB_SIZE
    return fast


def tiny_config(kind: str = "llama", tie: bool = False):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                  bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, max_position_embeddings=1024)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "mistral":
        # A short sliding window, so the window actually masks something in a 12-token test input.
        return MistralConfig(**common, sliding_window=8)
    if kind == "qwen2":
        # Sliding attention from layer 2 on: mixed per-layer `layer_types` that truncation must cut.
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    if kind == "gpt2":
        return GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                          bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    raise ValueError(kind)


def build_tiny_model(folder: Path, kind: str = "llama", tie: bool = False) -> Path:
    """Save a randomly initialised (seed 0) tiny model and the char tokenizer as an HF folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, tie), dtype=torch.float32)
    model.save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    return folder


def sample_batch(seed: int = 0, batch: int = 3, seq: int = 12, pad_last: int = 4):
    """(input_ids, attention_mask) [batch, seq]: random char ids, the last row right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), VOCAB_SIZE, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last:
        ids[-1, -pad_last:] = PAD_ID
        mask[-1, -pad_last:] = 0
    return ids, mask


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Largest |a - b| over the positions `mask` keeps ([batch, seq]); all positions if None."""
    diff = (a.float() - b.float()).abs()  # [batch, seq, vocab]
    if mask is not None:
        diff = diff[mask.bool()]
    return float(diff.max())

