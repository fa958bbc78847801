"""Training precision and optimizers: which dtype the weights train in, and what updates them.

Memory per trained parameter (weights + gradients + optimizer moments):
    float32 + adamw          4 + 4 + 8   = 16 B   (13B: 194 GiB; does not fit one GPU)
    bfloat16 + adamw8bit     2 + 2 + 2   =  6 B   (13B:  73 GiB; stochastic rounding keeps small updates)
    bfloat16 + adamw-bf16sr  2 + 2 + 4   =  8 B
    lora on a bf16 base      2 B per frozen weight, 16 B per adapter weight (float32 master)

bf16 weights updated by plain AdamW lose every update below bf16's resolution (lr 2e-5 times a
unit step is below 1/256 of most weights), so full fine-tunes in bf16 need stochastic rounding.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from manyinone.core.errors import ManyinoneError

OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit", "adamw-bf16sr")
_TORCHAO = {"adamw8bit": "AdamW8bit", "adamw4bit": "AdamW4bit", "adamw-bf16sr": "_AdamW"}


def training_dtype(name: str, device: torch.device, lora: bool) -> torch.dtype:
    """The dtype the model's weights are loaded and kept in while training.

    "auto" is bfloat16 for a LoRA run on CUDA (the base is frozen: no update to lose, half the
    memory) and float32 otherwise (full fine-tunes keep float32 master weights under bf16 autocast,
    the recipe every measured result used). A dtype the device cannot train in is refused."""
    if name == "auto":
        name = "bfloat16" if lora and device.type == "cuda" else "float32"
    if name not in ("float32", "bfloat16"):
        raise ManyinoneError(f"dtype {name!r} cannot train; allowed auto, float32, bfloat16")
    dtype = getattr(torch, name)
    if dtype == torch.bfloat16 and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        raise ManyinoneError(f"dtype bfloat16 cannot train on {torch.cuda.get_device_name(device)} (compute "
                             "capability below 8.0: no bf16 matmuls); allowed here: float32")
    if dtype == torch.bfloat16 and device.type == "mps":
        raise ManyinoneError("dtype bfloat16 cannot train on mps here; allowed: float32")
    return dtype


def check_precision(dtype: torch.dtype, optimizer: str, lora: bool) -> None:
    """Refuse bf16 weights that plain AdamW would update (updates below bf16's resolution vanish)."""
    if dtype == torch.bfloat16 and not lora and optimizer == "adamw":
        raise ManyinoneError("dtype=bfloat16 with a full fine-tune and optimizer=adamw would round away small "
                             "updates; allowed: optimizer=adamw8bit, adamw4bit or adamw-bf16sr (stochastic "
                             "rounding), lora, or dtype=float32")


def make_optimizer(name: str, groups: list[dict], lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `name` over param groups `groups` (each may carry its own weight_decay); its
    state_dict round-trips through torch.save / torch.load(weights_only=True) (torchao registers its
    state tensors as safe), so resumes stay pickle-free."""
    if name not in OPTIMIZERS:
        raise ManyinoneError(f"optimizer {name!r} unknown; allowed {', '.join(OPTIMIZERS)}")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
    # torchao's optimizers compile their update step (torch.compile): tens of seconds on the first
    # step, on CPU too (measured: AdamW8bit and bf16 stochastic rounding run there, slowly).
    try:
        import torchao.optim as ao
    except ImportError:
        raise ManyinoneError(f"optimizer {name!r} needs torchao; install it with `pip install 'manyinone[lowmem]'`") \
            from None
    bf16 = any(p.dtype == torch.bfloat16 for p in _params(groups))
    if name == "adamw-bf16sr" and not bf16:
        raise ManyinoneError("optimizer 'adamw-bf16sr' updates bfloat16 weights; set dtype=bfloat16 "
                             "(or use optimizer=adamw for float32 weights)")
    # Stochastic rounding of bf16 weights: each update lands on a neighbouring bf16 value with the
    # probability that keeps it unbiased, so updates below bf16's resolution still add up.
    return getattr(ao, _TORCHAO[name])(groups, lr=lr, weight_decay=weight_decay, bf16_stochastic_round=bf16)


def set_lr(group: dict, lr: float) -> None:
    """Set a param group's learning rate; torchao keeps it as a tensor (a float would recompile its
    compiled step, so torchao refuses one) and it is filled in place."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def _params(groups: Iterable[dict]) -> Iterable[torch.Tensor]:
    for group in groups:
        yield from group["params"]
