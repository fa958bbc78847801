"""Samplers, exit-head kinds and cost metrics come from one registry each: the config's allowed values,
`train --help` and the loop's lookup read it, and `sampler_k` (the old shared option) still reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from manyinone.cli.train import config_keys_help
from manyinone.core.cost import Cost
from manyinone.core.errors import ManyinoneError
from manyinone.core.registry import COST_METRICS, EXIT_HEAD_KINDS, SAMPLERS
from manyinone.core.space import DepthDim, NestedSpace
from manyinone.train.config import TrainConfig, load_config
from manyinone.train.samplers import RandomK, Sandwich, sampler_for


def test_config_values_are_the_registered_ones():
    assert SAMPLERS.names() == ("all", "random-k", "sandwich")
    assert EXIT_HEAD_KINDS.names() == ("translator", "head", "block", "layer")
    assert COST_METRICS.names() == ("flops", "params")
    for key, bad, allowed in [("sampler", "greedy", "['all', 'random-k', 'sandwich']"),
                              ("exit_heads", "lens", "['none', 'translator', 'head', 'block', 'layer']"),
                              ("cost_metric", "watts", "['flops', 'params']")]:
        with pytest.raises(ManyinoneError) as err:
            load_config(None, [f"{key}={bad}"])
        assert f"config field {key!r}" in str(err.value) and repr(bad) in str(err.value)
        assert allowed in str(err.value)


def test_help_lists_every_registered_choice():
    text = config_keys_help()
    for name in (*SAMPLERS.names(), *EXIT_HEAD_KINDS.names(), *COST_METRICS.names()):
        assert f"{name} (" in text, name
    assert "random_k = 2" in text and "sandwich_random = 2" in text and "sampler_k" not in text


@pytest.mark.parametrize("sampler, field, cls, arg", [("random-k", "random_k", RandomK, "k"),
                                                      ("sandwich", "sandwich_random", Sandwich, "n_random")])
def test_each_sampler_reads_its_own_option(sampler, field, cls, arg):
    space = NestedSpace([DepthDim(total=6, choices=(1, 2, 3, 4, 5))])
    cfg = load_config(None, [f"sampler={sampler}", f"{field}=3", "seed=7"])
    built = sampler_for(cfg, space)
    assert isinstance(built, cls) and getattr(built, arg) == 3
    assert [built.sample(s) for s in range(5)] == [cls(space, seed=7, **{arg: 3}).sample(s) for s in range(5)]


@pytest.mark.parametrize("sampler, field", [("random-k", "random_k"), ("sandwich", "sandwich_random")])
def test_sampler_k_still_reads_as_the_chosen_samplers_option(sampler, field, capsys):
    old = load_config(None, [f"sampler={sampler}", "sampler_k=3"])
    assert old == load_config(None, [f"sampler={sampler}", f"{field}=3"])
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "sampler_k is deprecated" in warning[0] and f"{field}=3" in warning[0]
    # A run saved before the rename (sampler_k in its train_config.yaml) reads back as the same run.
    saved = {**old.model_dump(), "sampler_k": 3}
    del saved[field]
    assert TrainConfig(**saved) == old


def test_sampler_k_beside_its_new_name_or_not_positive_is_refused():
    with pytest.raises(ManyinoneError, match="sampler_k and random_k are both set; keep random_k"):
        load_config(None, ["sampler=random-k", "sampler_k=2", "random_k=3"])
    with pytest.raises(ManyinoneError, match="sampler_k 0 must be a positive whole number"):
        load_config(None, ["sampler_k=0"])


def test_a_sampler_registered_once_trains(tiny_llama, tmp_path, monkeypatch):
    """One registration (with the config field it reads) is all a new sampler needs to train."""
    from manyinone.train.loop import train

    class SmallestPlusFull:
        """The smallest spec and the full one, every step."""

        config_options = {"repeat": "random_k"}

        def __init__(self, space, seed=0, repeat=1):
            self.specs, self.repeat = [space.smallest(), space.full()], repeat

        def sample(self, step):
            return self.specs

    monkeypatch.setitem(SAMPLERS._entries, "smallest-full", SmallestPlusFull)
    cfg = TrainConfig(model=str(tiny_llama), exits=[1, 2, 3], data="demo", batch_size=2, max_length=200, max_steps=2,
                      sampler="smallest-full", output=str(tmp_path / "run"))
    run = train(cfg, show_progress=False)
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        assert sorted(k for k in json.loads(line) if k.startswith("ce/")) == ["ce/depth=1", "ce/depth=4"]


def test_a_registered_cost_metric_is_in_every_relative_cost(monkeypatch):
    monkeypatch.setitem(COST_METRICS._entries, "layers", lambda cost: cost.params / 10)
    assert Cost(10, 4.0).relative_to(Cost(40, 8.0)) == {"flops": 0.5, "params": 0.25, "layers": 0.25}


def test_a_registered_exit_head_kind_is_built_by_exit_heads(monkeypatch):
    import torch
    from torch import nn

    from manyinone.core.space import SubnetSpec
    from manyinone.train.exit_heads import ExitHeads, OwnHead

    class ZeroHead(OwnHead):
        """own norm + an LM head that starts at zero"""

        @staticmethod
        def initial_map(head_weight):
            return torch.zeros_like(head_weight)

    monkeypatch.setitem(EXIT_HEAD_KINDS._entries, "zero", ZeroHead)
    heads = ExitHeads("zero", [SubnetSpec(depth=1)], nn.LayerNorm(4), torch.ones(8, 4))
    assert torch.equal(heads.linear_head(SubnetSpec(depth=1)).weight, torch.zeros(8, 4))
    with pytest.raises(ManyinoneError, match=r"exit_heads 'lens' unknown; allowed \['translator', 'head', 'block', 'layer', 'zero'\]"):
        ExitHeads("lens", [SubnetSpec(depth=1)], nn.LayerNorm(4), torch.ones(8, 4))
