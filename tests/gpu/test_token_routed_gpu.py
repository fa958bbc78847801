"""CUDA: token-routed decoding under CUDA graphs (and the fused, compiled step) gives the same tokens
as its eager steps, for one row and for rows on different plans. Skipped without CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from manyinone.runtime import Runtime, Sampling
from manyinone.runtime.token_routed import token_routed_stream

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def decode(rt, routing, prompts, new=24):
    stats: dict = {}
    rows = [[] for _ in prompts]
    for step in token_routed_stream(rt, prompts, routing, new, Sampling(), set(), stats):
        for r, t in enumerate(step):
            rows[r] += t
    return rows, stats


@pytest.mark.parametrize("fused", [False, True])
def test_token_routing_under_graphs_equals_eager(fused):
    from token_decode import build, routing_of

    model, adapter = build("tiny", torch.device("cuda"), torch.float32)
    routing = routing_of(adapter, 32, 96, model.config.vocab_size)
    eager = Runtime(model, adapter=adapter, max_len=128, graphs=False)
    graphed = Runtime(model, adapter=adapter, max_len=128, graphs=True, fused=fused)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 300, (n,), generator=g).tolist() for n in (5, 11, 17)]
    for p in prompts:
        assert decode(graphed, routing, [p])[0] == decode(eager, routing, [p])[0]
    rows, stats = decode(graphed, routing, prompts)
    assert stats["mixed_steps"] > 0
    assert rows == decode(eager, routing, prompts)[0]
