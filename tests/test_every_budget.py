"""`manyinone generate --every-budget`: the quickstart's last step, one answer and its speed per budget."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from manyinone.cli.main import app
from manyinone.eval.session import answers_at_every_budget, generate_text


def test_every_budget_answers_match_single_budget_generation(trained_run):
    rows = answers_at_every_budget(trained_run, "What is 12 plus 30?", 6, device="cpu")
    index = json.loads((trained_run / "manyinone.json").read_text())
    assert [r["spec"] for r in rows] == ["depth=2", "depth=4"] and len(rows) == len(index["specs"])
    assert rows[0]["relative_cost"] < rows[1]["relative_cost"] == 1.0
    for r in rows:
        assert r["tokens"] >= 1 and r["tokens_per_s"] > 0
        text, spec = generate_text(trained_run, "What is 12 plus 30?", r["relative_cost"], 6, 0.0, 1.0, None, 0)
        assert spec.label == r["spec"] and text == r["text"]  # the same greedy answer as `generate --budget`


def test_every_budget_cli_prints_a_table(trained_run):
    result = CliRunner().invoke(app, ["generate", str(trained_run), "--prompt", "Name [a] colour.", "--every-budget",
                                      "--max-new-tokens", "3"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output and "depth=2" in result.output and "depth=4" in result.output
    assert "Name [a] colour." in result.output  # rich markup escaped
    refused = CliRunner().invoke(app, ["generate", str(trained_run), "--prompt", "x", "--every-budget", "--budget", "1"])
    assert refused.exit_code == 2 and "leave out --budget" in refused.output
