"""Saved files that the declared transformers floor (4.56) reads the same as transformers 5 does.

transformers 5 writes RoPE settings only as `rope_parameters` and names fast tokenizers
`TokenizersBackend`; 4.x reads `rope_theta` / `rope_scaling` (silently defaulting to 10000 without
them) and knows no such tokenizer class. The 4.x spellings are added beside the 5.x ones, which
5.x ignores or reads the same, so one export loads identically under both.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG, TOKENIZER_CONFIG = "config.json", "tokenizer_config.json"
FOUR_X_TOKENIZER = "PreTrainedTokenizerFast"  # loads tokenizer.json in 4.x and 5.x alike


def _rewrite(path: Path, change) -> None:
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    changed = change(data)
    if changed:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _config(data: dict) -> bool:
    before = json.dumps(data, sort_keys=True)
    rope = data.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        data.setdefault("rope_theta", rope["rope_theta"])
        if (rope.get("rope_type") or "default") != "default":
            data.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    if "dtype" in data and "torch_dtype" not in data:
        data["torch_dtype"] = data["dtype"]
    for sub in ("text_config",):  # nested configs carry their own rope settings
        if isinstance(data.get(sub), dict):
            _config(data[sub])
    return json.dumps(data, sort_keys=True) != before


def _tokenizer(data: dict) -> bool:
    if data.get("tokenizer_class") == "TokenizersBackend":
        data["tokenizer_class"] = FOUR_X_TOKENIZER
        return True
    return False


def make_floor_compatible(folder: str | Path) -> None:
    """Add the transformers-4.x spellings to a saved HF folder's config and tokenizer config."""
    folder = Path(folder)
    _rewrite(folder / CONFIG, _config)
    _rewrite(folder / TOKENIZER_CONFIG, _tokenizer)
