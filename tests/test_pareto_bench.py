"""benchmarks/pareto.py and pareto_variants.py (issue 19, item 6): one training signal reaches every
variant's TrainConfig, `--set` means what it means for `manyinone train`, and the half-cost summary
chooses on dev only."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from manyinone.core.errors import ManyinoneError
from manyinone.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ("depth", "width", "depth+width")


@pytest.fixture(scope="module")
def pareto():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # pareto.py imports router_points beside it
    spec = importlib.util.spec_from_file_location("pareto", ROOT / "benchmarks" / "pareto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def configs(pareto, tmp_path, argv, variants=("depth", "width", "depth+width", "routed")):
    """What pareto.py's main trains for this command line (its own parser, its own config builder)."""
    args = pareto.build_parser().parse_args(["--model", "m", "--data", "demo", *argv])
    return pareto.variant_configs(args, pareto.flags_given(args), list(variants), tmp_path)


SIGNAL = ["--epochs", "2", "--set", "teacher=runs/sft", "--set", "mix_data=runs/gen6/data.jsonl",
          "--set", "mix_ratio=0.75", "--set", "teacher_full_weight=3", "--set", "distill_weight=1"]


def test_teacher_and_generated_data_reach_every_variant(pareto, tmp_path):
    got = configs(pareto, tmp_path, [*SIGNAL, "--variant-set", "depth:exit_heads=translator"])
    assert list(got) == list(TRAINED)  # routed trains nothing of its own: it routes the width run
    for name, cfg in got.items():
        assert (cfg.teacher, cfg.mix_data, cfg.mix_ratio, cfg.teacher_full_weight, cfg.epochs) == \
            ("runs/sft", "runs/gen6/data.jsonl", 0.75, 3.0, 2.0), name
        assert cfg.distill_weight == 1.0, name  # the width variants' own default (0.5) gave way to --set
        assert cfg.output == str(tmp_path / name)
        assert cfg.template == "alpaca"  # what evaluation tokenizes with
    assert [got[n].axes for n in TRAINED] == [["depth"], ["width", "heads"], ["depth", "width", "heads"]]
    assert [got[n].exit_heads for n in TRAINED] == ["translator", "none", "none"]  # --variant-set: one variant


def test_a_router_variant_alone_still_trains_the_width_run_with_the_signal(pareto, tmp_path):
    got = configs(pareto, tmp_path, SIGNAL, variants=["routed"])
    assert list(got) == ["width"] and got["width"].teacher == "runs/sft"


@pytest.mark.parametrize("sets, flags", [
    (["lr=3e-4"], {}),  # pareto's own default lr (1e-4) gives way, as a recipe's does in `manyinone train`
    (["lr=3e-4"], {"lr": 1e-3}),  # a flag given wins over --set
    (["batch_size=8", "epochs=3"], {"epochs": 2.0}),
])
def test_set_means_what_it_means_for_manyinone_train(pareto, tmp_path, sets, flags):
    argv = [a for s in sets for a in ("--set", s)] + [a for k, v in flags.items() for a in (f"--{k}", str(v))]
    train = load_config(None, sets, **flags)  # `manyinone train --set ... --lr ...` reads them so
    named = {s.partition("=")[0] for s in sets} | set(flags)
    for cfg in configs(pareto, tmp_path, argv).values():
        assert {k: getattr(cfg, k) for k in named} == {k: getattr(train, k) for k in named}


def test_variant_set_wins_for_its_variant_only(pareto, tmp_path):
    got = configs(pareto, tmp_path, ["--lr", "1e-3", "--set", "lr=5e-4", "--variant-set", "width:lr=2e-4"])
    assert [got[n].lr for n in TRAINED] == [1e-3, 2e-4, 1e-3]


@pytest.mark.parametrize("argv, message", [
    (["--set", "axes=[width]"], "axes is the variant's own"),
    (["--variant-set", "width:output=x"], "output is the variant's own"),
    (["--variant-set", "routed:lr=1"], re.escape("NAME one of depth, width, depth+width")),
    (["--variant-set", "lr=1"], "expected NAME:KEY=VALUE"),
    (["--set", "mix_ratio=1.5"], "mix_ratio"),  # manyinone's own validation, before any training
])
def test_bad_overrides_are_refused_before_training(pareto, tmp_path, argv, message):
    with pytest.raises(ManyinoneError, match=message):
        configs(pareto, tmp_path, argv)


def test_config_file_reads_back_as_the_same_config(pareto, tmp_path):
    """--jobs > 1 trains from `manyinone train --config <variant>.yaml`: it must be the same run."""
    import pareto_variants  # beside pareto.py, on the path the fixture set

    for cfg in configs(pareto, tmp_path, [*SIGNAL, "--variant-set", "depth:exit_heads=translator"]).values():
        assert load_config(pareto_variants.config_file(cfg)) == cfg


def point(spec, dev, holdout, params, ms_rel):
    return {"spec": spec, "loss": dev, "holdout_loss": holdout, "params": params, "flops": params, "ms_rel": ms_rel}


def test_half_cost_choice_is_made_on_dev_only(pareto):
    points = [
        point("full", 1.80, 1.81, 1.000, 1.00),
        point("cheap", 3.00, 2.50, 0.300, 0.30),  # the best held-out loss: must not decide anything
        point("half", 2.90, 2.95, 0.5004, 0.70),  # 0.500 at 3 decimals: within half the params
        point("over", 2.10, 2.12, 0.5006, 0.52),  # 0.501: just over half the params and the ms
        point("fast", 2.95, 2.97, 0.600, 0.45),  # fast but not small
    ]
    summary = pareto.summarise({"width": {"points": points}, "none": {"points": [points[0]]}})
    assert summary["width"]["params"] == {"spec": "half", "loss": 2.90, "holdout_loss": 2.95, "params": 0.5004}
    assert summary["width"]["ms_rel"]["spec"] == "fast"
    assert summary["width"]["ms_rel"]["holdout_loss"] == 2.97
    assert summary["none"]["params"] is None
    assert pareto.summary_cell(summary["width"]["params"]) == "2.900 / 2.950 (half)"
    assert pareto.summary_cell(summary["none"]["ms_rel"]) == "—"
    assert pareto.summary_cell({"spec": "router@0.5", "loss": 3.0, "holdout_loss": None}) == "3.000 / — (router@0.5)"
