"""Short model names for `--model` (no torch import: the CLI's --help text lists them)."""

from __future__ import annotations

SMOLLM2_ALIAS = "smollm2"  # the embedded default (a GGUF inside a PyPI package), see io.loading

# Short names for the hub models users start from most (`--model llama2-13b`); `manyinone train --help`
# lists them. Gated repos (meta-llama, mistralai) need a logged-in account with access granted.
HUB_ALIASES: dict[str, str] = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama2-13b-chat": "meta-llama/Llama-2-13b-chat-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def alias_help() -> str:
    """The aliases as `name (hub name)` pairs, for --help texts."""
    return ", ".join([f"{SMOLLM2_ALIAS} (embedded GGUF)", *HUB_ALIASES])
