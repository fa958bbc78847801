"""`--report-to tensorboard|wandb`: each step's metrics reach the tracker (metrics.jsonl stays), and
`manyinone train --help` lists every config key with its default."""

from __future__ import annotations

import json
import sys
import types

import pytest

from manyinone.core.errors import ManyinoneError
from manyinone.train.config import TrainConfig, load_config
from manyinone.train.loop import train

FAST = dict(data="demo", rows="0:8", batch_size=2, max_length=200, lr=1e-3, max_steps=3, exits=[2, 4])


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_gets_every_step(tiny_llama, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(TrainConfig(model=str(tiny_llama), output=str(tmp_path / "run"), report_to=["tensorboard"], **FAST),
                show_progress=False)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    lines = metrics(run)
    for key in ("ce/depth=2", "ce/depth=4", "loss", "lr"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert got == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in lines], key


def test_wandb_gets_every_step_and_the_config(tiny_llama, tmp_path, monkeypatch):
    """wandb itself is not installed here: a stand-in module records what the loop hands it."""
    calls = {"init": [], "log": [], "finish": 0}

    class FakeRun:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = train(TrainConfig(model=str(tiny_llama), output=str(tmp_path / "run"), report_to=["wandb"], **FAST),
                show_progress=False)
    [init] = calls["init"]
    assert init["config"]["lr"] == 1e-3 and init["resume"] == "allow" and init["dir"] == str(run)
    lines = metrics(run)
    assert [s for s, _ in calls["log"]] == [r["step"] for r in lines]
    assert all(v["ce/depth=4"] == r["ce/depth=4"] for (_, v), r in zip(calls["log"], lines))
    assert calls["finish"] == 1


def test_report_to_parsing_and_errors(tiny_llama, tmp_path, monkeypatch):
    assert load_config(None, ["report_to=tensorboard,wandb"]).report_to == ["tensorboard", "wandb"]
    with pytest.raises(ManyinoneError, match="report_to"):
        load_config(None, ["report_to=mlflow"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: import fails
    with pytest.raises(ManyinoneError, match=r"pip install 'manyinone\[wandb\]'"):
        train(TrainConfig(model=str(tiny_llama), output=str(tmp_path / "run"), report_to=["wandb"], **FAST),
              show_progress=False)


def test_train_help_lists_every_config_key_with_its_default():
    from typer.testing import CliRunner

    from manyinone.cli.main import app

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # rich wraps and pads; compare words
    for name in TrainConfig.model_fields:
        assert f"{name} = " in text, name
    assert "lr = 5e-05" in text and "template = 'auto'" in text and "packing = False" in text
    assert "data_columns = None" in text and "report_to = []" in text


def test_serve_help_shows_the_extra_intact():
    from typer.testing import CliRunner

    from manyinone.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200)
    assert "pip install 'manyinone[serve]'" in " ".join(result.output.split())
