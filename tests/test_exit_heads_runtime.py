"""A checkpoint's exit heads (every registered kind) in the decode runtime, eager and fused (compiled):
the same logits as the checkpoint's own exits, the same greedy tokens, and speculation whose drafts exit
through the heads giving plain greedy's tokens in float32.

The heads are resolved into modules once, when the runtime is built (`runtime.exit_logits`): a compiled
step that built a `LinearHead` inside its trace failed under torch 2.11's dynamo ("'LinearHead' object has
no attribute 'norm'"). On CPU `compile_step(fn, "aot_eager", fullgraph=True)` traces each step as
`Runtime(fused=True)` does, refusing any graph break."""

from __future__ import annotations

import pytest
import torch

from manyinone.core.kinds import EXIT_HEAD_KINDS
from manyinone.core.space import SubnetSpec
from manyinone.io.api import open_checkpoint
from manyinone.runtime import Runtime
from manyinone.runtime.stack import compile_step
from manyinone.runtime.tune import measure_step_costs
from manyinone.train.exit_heads import ExitHeads, for_adapter, has_layers
from test_runtime import random_prompts

# The position-wise kinds: an exit with a decoder layer of its own ("layer") reads its logits after that
# layer, not from the stack's hidden state; it has tests of its own at the end.
KINDS = [k for k in EXIT_HEAD_KINDS.names() if not has_layers(k)]


def whole_step(fn):
    return compile_step(fn, "aot_eager", fullgraph=True)  # what fused=True compiles, traced only, no graph breaks


def with_heads(folder, kind: str, device: str = "cpu"):
    """The float32 checkpoint (exits 1, 2, 3 of 4 layers) with fresh `kind` exit heads moved well away from
    their initialisation (the shared norm and head), so an exit that ignored them would give other logits."""
    nested = open_checkpoint(folder, device=device)
    heads = for_adapter(nested.adapter, kind, nested.space)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.1)
    nested.exit_heads = heads.eval()
    return nested


def runtimes(nested) -> tuple[Runtime, Runtime]:
    return Runtime.from_nested(nested, max_len=96), Runtime.from_nested(nested, max_len=96, compile_fn=whole_step)


def step_logits(rt: Runtime, prompt: list[int], depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, float32 logits [1, 1, vocab]) of one decode step ending at `depth` after a full-depth prefill."""
    run = rt.runner(1)
    ids, pad = torch.tensor([prompt], device=rt.device), torch.zeros(1, dtype=torch.long, device=rt.device)
    run.prefill(rt.num_layers, ids, pad)
    n = len(prompt)
    hidden, logits = run(0, depth, ids[:, -1:], rt._slots[n:n + 1], pad, slots_end=n + 1)
    return hidden.clone(), logits.clone()  # a recorded CUDA graph's outputs are overwritten by its next replay


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_exit_logits_through_heads_equal_the_checkpoints_eager_and_fused(trained_run_tied, kind):
    nested = with_heads(trained_run_tied, kind)
    eager, fused = runtimes(nested)
    prompt = random_prompts(1, seed=3)[0]
    for depth in (1, 2, 3, 4):
        hidden, logits = step_logits(eager, prompt, depth)
        spec = SubnetSpec(depth=depth)
        # The runtime's head is the checkpoint's own exit (bit for bit), and at exits the heads matter.
        assert torch.equal(logits, nested.exit_logits(spec, hidden).float())
        if depth < 4:
            assert spec in nested.exit_heads
            assert not torch.allclose(logits, nested.adapter.exit_logits(hidden).float(), atol=1e-3)
        fused_hidden, fused_logits = step_logits(fused, prompt, depth)
        torch.testing.assert_close(fused_hidden, hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=1e-5)
    # Greedy decoding served at an exit: the fused runtime gives the eager runtime's tokens.
    prompts = random_prompts(2, seed=4)
    plain = eager.generate(prompts, max_new_tokens=12, stop_ids=set(), spec={"depth": 2}).tokens
    assert fused.generate(prompts, max_new_tokens=12, stop_ids=set(), spec={"depth": 2}).tokens == plain


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_fused_speculation_drafting_through_heads_equals_plain_greedy(trained_run_tied, kind, monkeypatch):
    nested = with_heads(trained_run_tied, kind)
    eager, fused = runtimes(nested)
    # Resolved once, when the runtimes were built: no step (traced or eager) builds a LinearHead again.
    monkeypatch.setattr(ExitHeads, "linear_head", lambda self, spec: pytest.fail("a head was built while decoding"))
    prompts = random_prompts(2, seed=9)
    plain = [eager.generate([p], max_new_tokens=16, stop_ids=set()).tokens[0] for p in prompts]
    fixed = {"draft_depth": 2, "draft_tokens": 3}
    assert eager.generate(prompts, max_new_tokens=16, stop_ids=set(), speculative=True, **fixed).tokens == plain
    # Fused (policies at large: tests/test_speculative_fused.py): a fixed draft and an adaptive one, whose
    # exits all draft through their heads.
    for settings in (fixed, {"adaptive_draft": True, "draft_tokens": 3}):
        out = fused.generate(prompts, max_new_tokens=16, stop_ids=set(), speculative=True, **settings)
        assert out.tokens == plain and out.stats["rounds"] > 0, (kind, settings)
    # The call gpu_speculative.sh's sweep failed in: a draft step timed as compiled, its head included.
    costs = measure_step_costs(fused, 4, [1], steps=2)
    assert set(costs) == {1} and 0 < costs[1] <= 1


def test_trained_translator_checkpoint_drafts_through_its_heads_on_fused_steps(tiny_llama_tied, tmp_path):
    """The failing case end to end: a checkpoint trained with exit_heads=translator, opened by path."""
    from manyinone.train.config import TrainConfig
    from manyinone.train.loop import train

    cfg = TrainConfig(model=str(tiny_llama_tied), exits=[2, 4], data="demo", max_steps=2, batch_size=4, lr=1e-2,
                      exit_heads="translator", output=str(tmp_path / "translator"))
    run = train(cfg, show_progress=False)
    eager = Runtime.open(run, device="cpu", max_len=96)
    fused = Runtime.open(run, device="cpu", max_len=96, compile_fn=whole_step)
    prompts = random_prompts(2, seed=12)
    with torch.no_grad():
        plain = [eager.generate([p], max_new_tokens=16, stop_ids=set()).tokens[0] for p in prompts]
        spec = fused.generate(prompts, max_new_tokens=16, stop_ids=set(), speculative=True, draft_depth=2, draft_tokens=3)
    assert spec.tokens == plain and spec.stats["exits"].keys() == {2}


def test_a_head_whose_norm_is_not_a_module_is_refused_when_the_runtime_is_built():
    from manyinone.core.errors import ManyinoneError
    from manyinone.runtime.exit_logits import ExitLogits
    from manyinone.train.lean_loss import LinearHead

    with pytest.raises(ManyinoneError, match="exit head at depth 2 has a function norm; the runtime needs an nn.Module"):
        ExitLogits({2: LinearHead(norm=lambda h: h, weight=torch.ones(8, 4))}, shared=lambda h: h)


# --- exit_heads="layer": the exit's own decoder layer, with a KV-cache slot of its own -----------------
def forward_greedy(nested, prompt: list[int], depth: int, new: int) -> list[int]:
    """Greedy tokens of the exit at `depth` by full forwards, no cache: the exit layer over the whole sequence."""
    spec, ids = SubnetSpec(depth=depth), list(prompt)
    for _ in range(new):
        x = torch.tensor([ids])
        hidden = nested.forward_nested(x, torch.ones_like(x), [spec])[spec]
        ids.append(int(nested.exit_logits(spec, hidden[:, -1]).argmax(-1)))
    return ids[len(prompt):]


@torch.no_grad()
def test_exit_layers_serve_their_exit_with_a_cache_of_their_own(trained_run_tied):
    nested = with_heads(trained_run_tied, "layer")
    eager, fused = runtimes(nested)
    assert eager.stack.cache_layers == 4 + 3  # exits 1, 2, 3 each have a layer, and a cache slot
    prompts = random_prompts(2, seed=5)
    for depth in (1, 2, 3):
        want = [forward_greedy(nested, p, depth, 10) for p in prompts]
        for rt in (eager, fused):
            got = [rt.generate([p], max_new_tokens=10, stop_ids=set(), spec={"depth": depth}).tokens[0] for p in prompts]
            assert got == want, (depth, rt.fused)


@torch.no_grad()
def test_speculation_fills_the_exit_layers_caches_so_drafts_see_every_position(trained_run_tied):
    nested = with_heads(trained_run_tied, "layer")
    eager, _ = runtimes(nested)
    prompt = random_prompts(1, seed=3)[0]
    spec = SubnetSpec(depth=2)
    x = torch.tensor([prompt + prompt[-1:]])  # step_logits feeds the last prompt token again, one slot on
    want = nested.exit_logits(spec, nested.forward_nested(x, torch.ones_like(x), [spec])[spec][:, -1:]).float()
    # After a full-depth prefill, a draft step from exit 2 as speculation makes it: with the exit layers'
    # caches filled it equals the full forward; without, its layer reads empty slots and differs.
    run = eager.runner(1)
    run.fill_exits = frozenset({2})
    _, filled = step_logits(eager, prompt, 2)
    torch.testing.assert_close(filled, want, rtol=1e-5, atol=1e-5)
    fresh = Runtime.from_nested(nested, max_len=96)  # a cache of its own: nothing filled it before
    _, holes = step_logits(fresh, prompt, 2)
    assert not torch.allclose(holes, want, atol=1e-3)


@torch.no_grad()
def test_speculation_drafting_through_exit_layers_equals_plain_greedy(trained_run_tied):
    nested = with_heads(trained_run_tied, "layer")
    eager, fused = runtimes(nested)
    prompts = random_prompts(2, seed=9)
    plain = [eager.generate([p], max_new_tokens=16, stop_ids=set()).tokens[0] for p in prompts]
    for rt in (eager, fused):
        for settings in ({"draft_depth": 2, "draft_tokens": 3}, {"adaptive_draft": True, "draft_tokens": 3}):
            out = rt.generate(prompts, max_new_tokens=16, stop_ids=set(), speculative=True, **settings)
            assert out.tokens == plain and out.stats["rounds"] > 0, (rt.fused, settings)
            assert not rt.runner(2).fill_exits  # speculation turned the filling off again


@torch.no_grad()
def test_the_float32_cache_probe_has_a_buffer_for_every_exit_layer(trained_run_tied):
    # benchmarks/bf16_faithfulness.py swaps in a float32 KV cache; it was sized to the model's layers and
    # failed (IndexError) at the first exit layer of a round-8 checkpoint on the GPU.
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bf16_faithfulness import float32_cache

    eager, _ = runtimes(with_heads(trained_run_tied, "layer"))
    prompts = random_prompts(2, seed=4)
    plain = [eager.generate([p], max_new_tokens=8, stop_ids=set()).tokens[0] for p in prompts]
    with float32_cache(eager):
        assert len(eager.stack.new_cache(1, 96).layer_keys) == eager.stack.cache_layers
        spec = [eager.generate([p], max_new_tokens=8, stop_ids=set(), speculative=True, draft_depth=2,
                               draft_tokens=3).tokens[0] for p in prompts]
    assert spec == plain
