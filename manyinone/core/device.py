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
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ManyinoneError(f"device {name!r} requested but MPS is not available here; use cpu or auto")
        return device
    if device.type not in ("cpu", "cuda"):  # meta, xpu, ... hold no data or are not supported
        raise ManyinoneError(f"device {name!r} cannot run a model; allowed auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ManyinoneError(f"device {name!r} requested but CUDA is not available; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ManyinoneError(f"device {name!r} not present; this machine has {torch.cuda.device_count()} CUDA "
                             "device(s)")
    return device
