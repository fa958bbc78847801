"""The one device helper: a `--device` value -> torch.device, for training, eval, the runtime and serve."""

from __future__ import annotations

import torch

from manyinone.core.errors import ManyinoneError


def pick_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cpu", "cuda", "cuda:N" checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ManyinoneError(f"device {name!r} unknown; allowed auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ManyinoneError(f"device {name!r} requested but CUDA is not available; use cpu or auto")
    return device
