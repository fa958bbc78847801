"""A short soak (benchmarks/soak.py runs the long one): memory, live tensors and hooks stay flat over
many steps with periodic checkpoints, and metrics/progress/checkpoints stay exact. A planted leak
(every step's loss kept with its autograd graph) must be caught, or the check proves nothing."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


@pytest.fixture(scope="module")
def soak_module():
    spec = importlib.util.spec_from_file_location("manyinone_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_soak_is_flat_and_exact(soak_module, tiny_llama, tmp_path):
    result = soak_module.soak(tiny_llama, tmp_path / "run", steps=60, save_every=10, sample_every=6)
    samples = result.pop("samples")
    assert len(samples) == 10
    assert result["metrics_ok"] and result["checkpoints_ok"] and result["progress_ok"]
    assert len(result["live_tensors"]) == 1 and len(result["hooks"]) == 1, result
    assert result["rss_growth_mib"] < 20, result
    assert result["passed"]
    if os.environ.get("MANYINONE_RELIABILITY_REPORT"):
        with open(os.environ["MANYINONE_RELIABILITY_REPORT"], "a") as f:
            f.write(json.dumps({"soak": result}) + "\n")


def test_soak_catches_a_planted_leak(soak_module, tiny_llama, tmp_path, monkeypatch):
    import manyinone.train.step_parts as train_module  # where the loop's exit losses are computed

    kept = []
    real = train_module.nested_loss

    def leaky(*args, **kwargs):
        out = real(*args, **kwargs)
        kept.append(out.total)  # holds the step's whole autograd graph
        return out

    monkeypatch.setattr(train_module, "nested_loss", leaky)
    result = soak_module.soak(tiny_llama, tmp_path / "run", steps=20, save_every=10, sample_every=5)
    counts = [s["live_tensors"] for s in result["samples"]]
    assert counts == sorted(counts) and counts[-1] > counts[0]
    assert not result["passed"]
