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


class _RewrittenBackward(torch.autograd.Function):
    """Identity forward; backward passes on rewrite(grad): a planted fault in one op's backward."""

    @staticmethod
    def forward(ctx, x, rewrite):
        ctx.rewrite = rewrite
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.rewrite(grad), None


def _nan_backward(x):
    """An op whose backward is broken: its input gradient is all NaN."""
    return _RewrittenBackward.apply(x, lambda g: torch.full_like(g, float("nan")))


def _exploding_backward(x):
    """A layer whose Jacobian explodes: its input gradient is 1e6 times its output gradient."""
    return _RewrittenBackward.apply(x, lambda g: g * 1e6)


@pytest.mark.parametrize("where", ["self_attn", "mlp"])
def test_blame_names_the_module_whose_backward_made_the_nan(tiny_llama, where):
    model, _ = load_pretrained(str(tiny_llama))
    layers = model.model.layers
    target = getattr(layers[2], where)
    # Registered before the probe's hooks, so they see the poisoned op as part of the module.
    target.register_forward_hook(lambda _m, _a, out: (_nan_backward(out[0]), *out[1:])
                                 if isinstance(out, tuple) else _nan_backward(out))
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


def test_trace_names_the_inner_op_whose_backward_made_the_nan(tiny_llama):
    model, _ = load_pretrained(str(tiny_llama))
    attn = model.model.layers[2].self_attn
    attn.o_proj.register_forward_hook(lambda _m, _a, out: _nan_backward(out))  # o_proj's backward is broken
    trace = probe.Trace(model.model.layers[2], "layers.2", None)
    ids, mask = sample_batch()
    model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
    trace.close()
    rows = trace.rows
    assert rows["layers.2.self_attn.o_proj"]["grad"]["finite"]  # its own output gradient is fine...
    assert not rows["layers.2.self_attn.v_proj"]["grad"]["finite"]  # ...what flows out of it below is not
    assert not rows["layers.2.input_layernorm"]["grad"]["finite"]
    assert rows["layers.2.mlp.down_proj"]["grad"]["finite"]  # above the broken op, in backward order
    assert any("self_attn.o_proj | True" in line for line in trace.table())


def test_trace_counts_non_finite_outputs_at_padded_positions(tiny_llama):
    model, _ = load_pretrained(str(tiny_llama))
    ids, mask = sample_batch()
    pad = mask == 0

    def poison_pad(_m, _a, out):
        return out.masked_fill(pad[..., None], float("nan"))

    model.model.layers[1].mlp.register_forward_hook(poison_pad)
    trace = probe.Trace(model.model.layers[1], "layers.1", pad)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    trace.close()
    out = trace.rows["layers.1.mlp"]["out"]
    assert not out["finite"] and out["bad_positions"] == out["at_pad"] == int(pad.sum()) > 0
    assert trace.rows["layers.1.mlp.down_proj"]["out"]["finite"]  # the NaN was planted after it


def test_grad_profile_shows_the_layer_where_the_gradient_jumps(tiny_llama):
    model, _ = load_pretrained(str(tiny_llama))
    layers = model.model.layers
    # On layer 2's input: its own output gradient stays normal, layer 1's (below it) is 1e6 times larger.
    layers[2].register_forward_pre_hook(lambda _m, args: (_exploding_backward(args[0]), *args[1:]))
    ids, mask = sample_batch()
    profile = probe.GradProfile(layers, mask == 0)
    model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
    profile.close()
    grad = {r["name"]: r["grad_max"] for r in profile.rows}
    assert list(grad) == [f"layers.{i}" for i in range(len(layers))]  # one row per call, forward order
    assert grad["layers.1"] > 1e4 * grad["layers.2"]
    assert grad["layers.2"] < 1e3 * grad["layers.3"]  # no jump above the exploding layer
    assert all(r["grad_nonfinite"] == 0 and r["min_rms"] > 0 for r in profile.rows)
    assert len(profile.table()) == 2 + len(layers)


def test_trace_keeps_a_row_per_call_of_a_module(tiny_llama):
    model, _ = load_pretrained(str(tiny_llama))
    layer = model.model.layers[1]
    trace = probe.Trace(layer, "layers.1", None)
    ids, mask = sample_batch()
    model(input_ids=ids, attention_mask=mask)
    model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()  # only the second call has a backward
    trace.close()
    assert "grad" not in trace.rows["layers.1.mlp"] and "grad" in trace.rows["layers.1.mlp (call 2)"]
