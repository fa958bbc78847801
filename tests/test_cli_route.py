"""`manyinone route` and `manyinone latency`: the happy paths and their bad inputs, one line each."""

from __future__ import annotations

import json

import pytest

from manyinone.io.checkpoint import read_index
from test_cli import error_line, invoke


@pytest.fixture(scope="module")
def width_cli_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_route") / "width"
    result = invoke("train", "--model", tiny_llama, "--axes", "width,heads", "--set", "widths=[32,64,128]",
                    "--set", "sampler=sandwich", "--data", "demo", "--output", out, "--max-steps", "2", "--quiet")
    assert result.exit_code == 0, (result.output, result.exception)
    return out


def test_route_token_writes_a_checkpoint_that_export_refuses(width_cli_run, tmp_path):
    out = tmp_path / "token"
    result = invoke("route", width_cli_run, "--mode", "token", "--budgets", "1.0", "--steps", "2", "--plans", "3",
                    "--rows", "0:16", "--batch-size", "4", "--device", "cpu", "-o", out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "average cost" in result.stdout and "routed (token)" in result.stdout
    index = read_index(out)
    assert len(index["token_routed"]) == 1 and len(index["token_routed"][0]["plans"]) == 3
    info = invoke("info", out)
    assert info.exit_code == 0 and "token-routed budget: average cost" in info.stdout
    line = error_line(invoke("export", out, "--budget", "1.0", "-o", tmp_path / "plain"))
    assert "is token-routed" in line and "a plain HF model holds one plan" in line
    assert not (tmp_path / "plain").exists()


def test_route_static_stores_plans_within_their_budgets(width_cli_run, tmp_path):
    out = tmp_path / "static"
    result = invoke("route", width_cli_run, "--mode", "static", "--budgets", "1.0", "--steps", "2",
                    "--rows", "0:16", "--device", "cpu", "-o", out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert all(r["relative"] <= r["budget"] + 1e-3 for r in read_index(out)["routed"])


def test_route_bad_inputs(width_cli_run, trained_run, tmp_path):
    line = error_line(invoke("route", trained_run, "--mode", "token", "--budgets", "0.5", "-o", tmp_path / "a"))
    assert "token routing needs a checkpoint trained with elastic width" in line
    line = error_line(invoke("route", width_cli_run, "--budgets", "0.5,abc", "-o", tmp_path / "b"))
    assert "budgets '0.5,abc' malformed" in line
    line = error_line(invoke("route", width_cli_run, "--budgets", "0.5", "--mode", "layer", "-o", tmp_path / "c"))
    assert "route mode 'layer' unknown; allowed static, adaptive, token" in line
    # A budget no plan of this (barely trained) router fits: refused, nothing written.
    line = error_line(invoke("route", width_cli_run, "--budgets", "0.05", "--steps", "1", "--rows", "0:8",
                             "--device", "cpu", "-o", tmp_path / "d"))
    assert "for budget 0.05 costs" in line and "over its budget" in line
    assert not (tmp_path / "d").exists()


def test_latency_writes_the_table_export_reads(width_cli_run, trained_run, tmp_path):
    table = tmp_path / "latency.json"
    result = invoke("latency", width_cli_run, "--seq", "8", "--repeats", "1", "--device", "cpu", "-o", table)
    assert result.exit_code == 0, (result.output, result.exception)
    data = json.loads(table.read_text())
    assert set(data["layer_ms"]) == {f"{w},{h}" for w in (32, 64, 128) for h in (2, 4)}
    line = error_line(invoke("latency", trained_run, "--device", "cpu", "-o", tmp_path / "t.json"))
    assert "a latency table times (width, heads) options" in line
