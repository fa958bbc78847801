"""benchmarks/width_layouts.py: every layout it times computes the dense sub-model's projection."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import width_layouts  # noqa: E402


def test_every_layout_gives_the_dense_projections_output():
    rows = width_layouts.run("tiny", torch.device("cpu"), torch.float32, tokens=3, repeats=1)
    by_projection = {}
    for projection, variant, us, ratio, diff in rows:
        by_projection.setdefault(projection, []).append(variant)
        assert diff < 1e-5 and us > 0 and ratio > 0, (projection, variant, diff)
    assert set(by_projection) == {"gate/up", "down", "q/k/v (MHA)", "o_proj"}
    assert all(v[0] == "dense (exported)" and len(v) >= 3 for v in by_projection.values())


def test_a_layout_that_computes_something_else_is_refused(monkeypatch):
    def wrong(x, gate, up, keep):  # gate and up swapped: the same numbers in the wrong columns
        return {"dense (exported)": (lambda: torch.cat([x @ gate[:keep].t(), x @ up[:keep].t()], -1), lambda o: o),
                "swapped": (lambda: torch.cat([x @ up[:keep].t(), x @ gate[:keep].t()], -1), lambda o: o)}

    monkeypatch.setattr(width_layouts, "gate_up_variants", wrong)
    with pytest.raises(AssertionError, match="gate/up / swapped: differs from the dense weights"):
        width_layouts.run("tiny", torch.device("cpu"), torch.float32, tokens=2, repeats=1)
