"""benchmarks/decode_suite.py stays runnable: its quick rows on tiny CPU models end without an error row
(the GPU run gets one attempt, so the script is checked here)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from decode_suite import run_suite  # noqa: E402


def test_quick_rows_run_and_report(tmp_path, capsys):
    out = tmp_path / "suite.json"
    args = argparse.Namespace(device="cpu", tiny=True, new_tokens=None, prompt_len=16, time_budget=120.0,
                              only="tiny-smol b1 runtime eager,tiny-smol b1 kernels,tiny-smol b1 HF default,"
                                   "mixed depths", model=None, out=str(out))
    run_suite(args)
    rows = json.loads(out.read_text())
    assert {r["method"] for r in rows} == {"runtime eager", "kernels", "HF default generate",
                                           "continuous batch, mixed depths 0.3/0.5/1.0"}
    assert not [r for r in rows if "error" in r], rows
    kernels = next(r for r in rows if r["method"] == "kernels")
    assert kernels["eager"]["per_layer"] > 0 and kernels["fused"]["per_layer"] > 0
    mixed = next(r for r in rows if "mixed" in r["method"])
    assert mixed["equal"] == mixed["requests"]  # float32: every batched answer equals serving alone
    assert "| tiny-smol | 1 | runtime eager |" in capsys.readouterr().out
