"""LoRA-nested tuning through peft: adapters on the frozen base, shared by every exit.

peft injects its LoRA layers in place into the HF model, so the adapter keeps driving the same
`model` object: exit n is then the first n base layers *with their adapters*, nested like the
layers themselves. At the end of training `merge` folds the adapters into the base weights
(peft's `merge_and_unload`) and the checkpoint is a plain HF model: export, `manyinone.load`
and the runtime need nothing LoRA-specific.

Example:
    >>> tuned = apply_lora(model, LoraSettings(r=16))    # model now trains only its adapters
    >>> plain = merge(tuned)                             # the same object, adapters folded in
"""

from __future__ import annotations

from torch import nn

from manyinone.core.errors import ManyinoneError, first_line
from manyinone.train.config import LoraSettings


def _peft():
    try:
        import peft
    except ImportError:
        raise ManyinoneError("lora needs peft; install it with `pip install 'manyinone[lora]'`") from None
    return peft


def linear_names(model: nn.Module) -> list[str]:
    """The distinct leaf names of the Linear modules inside `model` (what lora.targets may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and name})


def apply_lora(model: nn.Module, settings: LoraSettings):
    """Inject LoRA adapters (peft) into `model` in place and freeze every base weight; returns peft's
    wrapper, whose `.base_model.model` is `model` itself. Targets naming no module are refused."""
    peft = _peft()
    if isinstance(settings.targets, list):
        known = linear_names(model)
        unknown = [t for t in settings.targets if t not in known]
        if unknown:
            raise ManyinoneError(f"lora.targets {unknown} name no Linear module of {type(model).__name__}; "
                                 f"allowed: all-linear or any of {known}")
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.scale_alpha, lora_dropout=settings.dropout,
                             target_modules=settings.targets, bias="none", task_type="CAUSAL_LM")
    try:
        # autocast_adapter_dtype (peft's default): adapters are float32 even on a bf16 base, the only
        # float32 copies an optimizer needs; the base stays in its loaded dtype and frozen.
        return peft.get_peft_model(model, config)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise ManyinoneError(f"lora.targets {settings.targets!r} cannot adapt {type(model).__name__}: "
                             f"{first_line(exc)}") from None


def is_lora(model: nn.Module) -> bool:
    """Whether peft's LoRA layers sit inside `model`."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return any(isinstance(m, LoraLayer) for m in model.modules())


def merge(tuned) -> nn.Module:
    """Fold the adapters into the base weights (W + scale * B @ A) and drop them: the plain HF model
    that peft wrapped, with the merged weights (same object, no copy of the base)."""
    try:
        return tuned.merge_and_unload(progressbar=False, safe_merge=True)  # safe_merge: refuses NaN/inf results
    except ValueError as exc:  # peft: "NaNs detected in the merged weights. The adapter ... seems to be broken"
        raise ManyinoneError(f"merging the LoRA adapters into the base gave non-finite weights ({first_line(exc)}); "
                             "the merged checkpoint was not written") from None


def trainable_state(model: nn.Module) -> dict:
    """{name: tensor} of the parameters that train (adapters, exit modules): a LoRA run's resumable
    weights, since the frozen base is reloaded bit for bit from its source."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def describe(settings: LoraSettings) -> str:
    """One line for the budget index: how the checkpoint was tuned."""
    targets = settings.targets if isinstance(settings.targets, str) else ",".join(settings.targets)
    return f"lora r={settings.r} alpha={settings.scale_alpha:g} dropout={settings.dropout:g} targets={targets}, merged"
