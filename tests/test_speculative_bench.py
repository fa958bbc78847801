"""benchmarks/speculative.py's timing helper: batch 1 over several prompts, each decoded alone."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from decode import smoke_checkpoint  # noqa: E402
from speculative import batch_rate  # noqa: E402

from manyinone.io.api import open_checkpoint
from manyinone.runtime import Runtime


@torch.no_grad()
def test_serial_rate_decodes_each_prompt_alone_and_sums_their_statistics():
    nested = open_checkpoint(smoke_checkpoint(Path(tempfile.mkdtemp()) / "tiny"), device="cpu")
    rt = Runtime.from_nested(nested, max_len=64)
    rows = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    settings = {"speculative": True, "draft_depth": 2, "draft_tokens": 3}
    alone = [rt.generate([r], max_new_tokens=10, stop_ids=set(), **settings) for r in rows]
    out = batch_rate(rt, rows, 10, serial=True, **settings)
    assert out["tokens"] == [g.tokens[0] for g in alone]  # one row each, in order
    drafted = sum(g.stats["drafted"] for g in alone)
    assert drafted > 0 and out["acceptance"] == sum(g.stats["accepted"] for g in alone) / drafted
    steps = sum(g.stats["rounds"] + g.stats.get("plain_steps", 0) for g in alone)
    assert out["tokens_per_round"] == 3 * 9 / steps  # 9 decoded tokens a prompt (the first is the prefill's)
    assert out["tok_s"] > 0 and out["timed_compiles"] == 0
    together = batch_rate(rt, rows[:2], 10)  # not serial: one batch of two rows
    assert len(together["tokens"]) == 2
