"""GGUF out: a plain HF causal LM (an exported sub-model) as one .gguf file llama.cpp runs.

Written with the `gguf` package the way llama.cpp's convert_hf_to_gguf.py writes a LLaMA: its tensor
names (from gguf's own HF-name map), its `llama.*` metadata, the query/key rows permuted to the
rotary layout llama.cpp expects, 1-D tensors (norms) in float32, and the tokenizer (GPT-2 style
BPE or a LLaMA byte-fallback BPE) with its merges, special ids and chat template.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from manyinone.core.errors import ManyinoneError, first_line

# HF model_type -> (llama.cpp architecture, whether q/k rows are permuted as convert_hf_to_gguf does)
ARCHES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True)}
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half rows -> llama.cpp's interleaved rotary rows (what its converter does)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _array(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, object]:
    import gguf

    if t.ndim == 1 or dtype == "F32":  # llama.cpp keeps norms (1-D) in float32
        return t.float().numpy(), None
    if dtype == "F16":
        return t.half().numpy(), None
    # numpy has no bfloat16: hand the raw 16-bit words over with their GGML type
    return t.bfloat16().view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16


def _add_tokenizer(writer, tokenizer, vocab_rows: int) -> None:
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        vocab = None
        for kind in (BpeVocab, LlamaHfVocab):
            try:
                vocab = kind(Path(folder))
                break
            except (FileNotFoundError, KeyError, ValueError, TypeError):
                continue
        if vocab is None:
            raise ManyinoneError(f"GGUF export needs a GPT-2 style BPE or a LLaMA (byte-fallback BPE) tokenizer; "
                                 f"{type(tokenizer).__name__} is neither")
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        if tokenizer.all_special_ids:
            for i in tokenizer.all_special_ids:
                if i < len(types) and types[i] == gguf.TokenType.NORMAL:
                    types[i] = gguf.TokenType.CONTROL
        while len(tokens) < vocab_rows:  # embedding rows past the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
        # the tokenizer object knows its special ids even where its saved files spell them in ways
        # SpecialVocab does not read (transformers 5 writes no special_tokens_map.json)
        for kind in ("bos", "eos", "unk", "pad"):
            token_id = getattr(tokenizer, f"{kind}_token_id", None)
            if token_id is not None:
                special.special_token_ids[kind] = token_id
        special.add_to_gguf(writer)


def write_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Write `model` (an HF causal LM of a supported type) and its tokenizer to the GGUF file `path`.
    Matrices in `dtype` (float32, float16 or bfloat16); written to a temporary name, then renamed."""
    import gguf

    from manyinone.io.durable import write_file_durably

    config = model.config
    if config.model_type not in ARCHES:
        raise ManyinoneError(f"GGUF export supports model types {sorted(ARCHES)}; got {config.model_type!r}")
    if dtype not in DTYPES:
        raise ManyinoneError(f"GGUF export dtype {dtype} unsupported; allowed float32, float16, bfloat16")
    arch_name, permute = ARCHES[config.model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    # transformers 5 keeps RoPE settings in rope_parameters, 4.x in rope_theta / rope_scaling
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        raise ManyinoneError(f"GGUF export writes plain RoPE only; this model's config scales it ({rope})")
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    vocab_rows = model.get_input_embeddings().weight.shape[0]

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        writer.add_name(getattr(config, "_name_or_path", None) or "manyinone export")
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(theta))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(vocab_rows)
        writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                              "BF16": gguf.LlamaFileType.MOSTLY_BF16}[DTYPES[dtype]])
        _add_tokenizer(writer, tokenizer, vocab_rows)
        seen = set()
        for hf_name, tensor in state.items():
            if "rotary" in hf_name or hf_name.endswith("inv_freq"):
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ManyinoneError(f"GGUF export: tensor {hf_name!r} has no llama.cpp name; model unsupported")
            if name == "output.weight" and tied:
                continue  # llama.cpp reuses token_embd when output is absent
            if name in seen:
                continue
            seen.add(name)
            t = tensor.detach().cpu()
            if permute and ".attn_q." in name:
                t = _permute(t, heads)
            elif permute and ".attn_k." in name:
                t = _permute(t, kv_heads)
            array, raw = _array(t, DTYPES[dtype])
            if raw is None:
                writer.add_tensor(name, array)
            else:
                writer.add_tensor(name, array, raw_shape=array.shape, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    try:
        write_file_durably(Path(path), write)
        return Path(path)
    except ManyinoneError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise ManyinoneError(f"GGUF export to {str(path)!r} failed: {first_line(exc)}") from None
