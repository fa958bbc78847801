"""Latency lookup table: pricing plans by hand, budgets in ms, a real (tiny) measurement, file round trip."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from manyinone.core.errors import ManyinoneError
from manyinone.elastic.latency import load_table, measure_latency, option_table, plan_ms, relative_budget, save_table
from manyinone_flextron import LlamaFlextronAdapter

TABLE = {"layer_ms": {"64,2": 1.0, "128,4": 3.0}, "rest_ms": 2.0, "num_layers": 4}


def test_plan_ms_and_ms_budgets_by_hand():
    assert plan_ms(TABLE, [(128, 4)] * 4) == 14.0
    assert plan_ms(TABLE, [(64, 2), (128, 4)]) == 6.0
    assert relative_budget(TABLE, [(128, 4)] * 4, 7.0) == 0.5
    assert relative_budget(TABLE, [(128, 4)] * 4, 100.0) == 1.0
    table, rest = option_table(TABLE, [(64, 2), (128, 4)], 4, [(128, 4)] * 4)  # [layers, options]
    assert table.shape == (4, 2) and table[0].tolist() == pytest.approx([1 / 14, 3 / 14]) and rest == pytest.approx(2 / 14)
    with pytest.raises(ManyinoneError, match=r"no entry for options \['32,2'\]"):
        plan_ms(TABLE, [(32, 2)])
    with pytest.raises(ManyinoneError, match="latency budget -1 ms out of range"):
        relative_budget(TABLE, [(128, 4)] * 4, -1)


def test_measured_table_round_trips(tiny_llama, tmp_path):
    adapter = LlamaFlextronAdapter(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    table = measure_latency(adapter, [(32, 2), (128, 4)], batch=2, seq=16, repeats=2, warmup=1)
    assert set(table["layer_ms"]) == {"32,2", "128,4"} and table["rest_ms"] >= 0 and table["num_layers"] == 4
    assert all(v >= 0 for v in table["layer_ms"].values())
    assert load_table(save_table(table, tmp_path / "latency.json")) == table
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ManyinoneError, match="lacks layer_ms"):
        load_table(tmp_path / "bad.json")


def test_table_without_layer_count_or_with_bad_keys_is_refused(tmp_path):
    """`export --budget-ms` reads num_layers and 'width,heads' keys: a table lacking them fails on load."""
    path = tmp_path / "t.json"
    for table in ({"layer_ms": {"32,2": 0.1}, "rest_ms": 0.5},
                  {"layer_ms": {"wide": 0.1}, "rest_ms": 0.5, "num_layers": 4}):
        path.write_text(json.dumps(table))
        with pytest.raises(ManyinoneError, match="lacks layer_ms"):
            load_table(path)


def test_measured_layer_time_is_the_depth_difference(tiny_llama, monkeypatch):
    """measure_latency's arithmetic on a fake clock (real timings clamp at 0, so >= 0 proves nothing):
    a plan of L layers at width w takes 2 + L * w / 32 ms, so one layer is w / 32 ms and the rest 2 ms."""
    import manyinone.elastic.latency as latency

    adapter = LlamaFlextronAdapter(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    last = {}
    real_forward = adapter.forward_plan

    def forward_plan(ids, mask, plan):
        last["plan"] = plan
        return real_forward(ids, mask, plan)

    def fake_ms(fn, device, repeats, warmup):
        fn()
        plan = last["plan"]
        return 2.0 + len(plan) * plan[0]["width"] / 32

    monkeypatch.setattr(adapter, "forward_plan", forward_plan)
    monkeypatch.setattr(latency, "_timed_ms", fake_ms)
    table = measure_latency(adapter, [(32, 2), (128, 4)], batch=1, seq=4)
    assert table["layer_ms"] == {"32,2": pytest.approx(1.0), "128,4": pytest.approx(4.0)}
    assert table["rest_ms"] == pytest.approx(2.0)
