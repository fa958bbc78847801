"""benchmarks/nan_grad_probe.py on CPU: its blame hooks name the module whose backward made the NaN, and
the step it rebuilds is the CLI's (finite gradients on the tiny model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from manyinone.io.loading import load_pretrained

from helpers import sample_batch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("nan_grad_probe", ROOT / "benchmarks" / "nan_grad_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


class _NanBackward(torch.autograd.Function):
    """Identity forward; a NaN gradient backward: an op whose backward is broken."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


@pytest.mark.parametrize("where", ["self_attn", "mlp"])
def test_blame_names_the_module_whose_backward_made_the_nan(tiny_llama, where):
    model, _ = load_pretrained(str(tiny_llama))
    layers = model.model.layers
    target = getattr(layers[2], where)
    # Registered before the probe's hooks, so they see the poisoned op as part of the module.
    target.register_forward_hook(lambda _m, _a, out: (_NanBackward.apply(out[0]), *out[1:])
                                 if isinstance(out, tuple) else _NanBackward.apply(out))
    blame = probe.Blame({**{f"layers.{i}.self_attn": l.self_attn for i, l in enumerate(layers)},
                         **{f"layers.{i}.mlp": l.mlp for i, l in enumerate(layers)},
                         **{f"layers.{i}": l for i, l in enumerate(layers)}})
    ids, mask = sample_batch()
    model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
    blame.close()
    assert blame.culprit() == f"layers.2.{where} (its output grad finite)"


def test_blame_finds_nothing_in_a_clean_backward(tiny_llama):
    model, _ = load_pretrained(str(tiny_llama))
    blame = probe.Blame({f"layers.{i}": l for i, l in enumerate(model.model.layers)})
    ids, mask = sample_batch()
    model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
    assert blame.culprit() == "-" and blame.events  # hooks fired, none non-finite
