"""The typed budget index (core/index.py): one parser, one writer, one-line errors naming the field."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open

import manyinone
from manyinone.core.errors import ManyinoneError
from manyinone.core.index import BudgetIndex, dumps_index, parse_index
from manyinone.io.api import open_checkpoint
from manyinone.io.checkpoint import INDEX_FILE, WEIGHTS_FILE, read_index, rewrite_index, save_checkpoint
from manyinone.io.durable import write_checksums
from manyinone.runtime.tune import store_choice


def _metadata_index(folder) -> dict:
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        return json.loads(f.metadata()["manyinone"])


def _copy(run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run, ckpt, ignore=shutil.ignore_patterns("checkpoints"))
    return ckpt


def _edit(index: dict, path: str, value) -> dict:
    """Set index[path] for a dotted path with [i] list steps, e.g. "specs[0].relative.flops"."""
    index = json.loads(json.dumps(index))
    keys = [int(k) if k.isdigit() else k for k in path.replace("[", ".").replace("]", "").split(".")]
    target = index
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return index


BAD = [  # (field set, value, the field the error must name, a word of the reason)
    ("specs[0].relative.flops", "half", "specs[0].relative.flops", "valid number"),
    ("specs[0].spec.depth", "two", "specs[0].spec.depth", "valid integer"),
    ("specs[0].spec.depth", 999, "specs[0].spec.depth", "out of range"),
    ("specs[0].relative.flops", 1.5, "specs[0]", "out of range"),
    ("specs[0].relative.flops", 0.0, "specs[0]", "out of range"),
    # exit 2 dearer than exit 4, which contains it (the test also lowers exit 4 to 0.5):
    ("specs[0].relative.flops", 0.99999, "specs[0].relative.flops", "costs must grow"),
    ("train", "x", "train", "valid dictionary"),
    ("routed", {"0.5": "junk"}, "routed", "valid list"),
    ("metric", "watts", "metric", "'flops' or 'params'"),
    ("space.depth.choices", [2, 9], "space.depth", "out of range"),
    ("surprise", 1, "surprise", "unknown field"),
]


@pytest.mark.parametrize("field,value,named,reason", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_a_bad_index_is_one_line_naming_the_field(trained_run, tmp_path, field, value, named, reason):
    ckpt = _copy(trained_run, tmp_path)
    index = read_index(ckpt)
    if reason == "costs must grow":
        assert [e["spec"] for e in index["specs"]] == [{"depth": 2}, {"depth": 4}]
        index["specs"][1]["relative"]["flops"] = 0.5
    (ckpt / INDEX_FILE).write_text(json.dumps(_edit(index, field, value)))
    with pytest.raises(ManyinoneError) as err:
        read_index(ckpt)
    message = str(err.value)
    assert "\n" not in message and f"checkpoint '{ckpt}' is corrupt: budget index field {named}" in message, message
    assert reason in message, message


def test_space_larger_than_the_model_is_refused_at_open(trained_run, tmp_path):
    ckpt = _copy(trained_run, tmp_path)
    index = read_index(ckpt)
    (ckpt / INDEX_FILE).write_text(json.dumps(_edit(index, "space.depth.total", 999)))
    write_checksums(ckpt)  # consistent checksums: only the model check can catch it
    read_index(ckpt)  # the index alone is self-consistent (specs within 999 layers)
    with pytest.raises(ManyinoneError, match=r"budget index field space.depth.total: 999 exceeds the model's 4 layers"):
        open_checkpoint(ckpt)


def test_round_trip_and_the_writer_refuses_what_the_reader_would(trained_run, tmp_path):
    index = read_index(trained_run)
    typed = parse_index(index)
    assert isinstance(typed, BudgetIndex) and typed.to_dict() == index
    assert json.loads(dumps_index(index)) == index
    nested = open_checkpoint(trained_run)
    with pytest.raises(ManyinoneError, match="budget index field specs"):
        save_checkpoint(nested.model, nested.tokenizer, _edit(index, "specs[0].spec.depth", "two"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_json_and_safetensors_copies_cannot_diverge(trained_run_tied, tmp_path):
    """store_choice (tune-speculative) changes both copies together; the checkpoint still verifies."""
    ckpt = _copy(trained_run_tied, tmp_path)
    assert _metadata_index(ckpt) == json.loads((ckpt / INDEX_FILE).read_text())
    choice = {"depth": 4, "draft_depth": 2, "draft_tokens": 3, "speedup": 1.5, "trials": [{"ignored": True}]}
    store_choice(ckpt, choice)
    on_disk = json.loads((ckpt / INDEX_FILE).read_text())
    assert on_disk["runtime"]["speculative"] == {"depth": 4, "draft_depth": 2, "draft_tokens": 3, "speedup": 1.5}
    assert _metadata_index(ckpt) == on_disk
    (ckpt / INDEX_FILE).unlink()  # the metadata copy alone now tells the same
    assert read_index(ckpt) == on_disk
    shutil.rmtree(ckpt)
    ckpt = _copy(trained_run_tied, tmp_path)
    rewrite_index(ckpt, lambda index: {**index, "runtime": {"speculative": {"draft_depth": 1}}})
    reopened = open_checkpoint(ckpt)  # checksums renewed, weights intact
    assert reopened.index["runtime"] == {"speculative": {"draft_depth": 1}} == _metadata_index(ckpt)["runtime"]
    assert reopened.model.config.num_hidden_layers == 4


def test_old_checkpoints_still_open(trained_run, tmp_path):
    """An index as the first manyinone/1 releases wrote it: no context, no train record, no json file."""
    ckpt = _copy(trained_run, tmp_path)
    old = {k: v for k, v in read_index(ckpt).items() if k not in ("context", "train")}
    ckpt2 = tmp_path / "old"
    nested = open_checkpoint(ckpt)
    save_checkpoint(nested.model, nested.tokenizer, old, ckpt2)
    (ckpt2 / INDEX_FILE).unlink()
    # Older checkpoints carried no checksums either; those are refused now (a manyinone checkpoint must list
    # its files: tests/reliability/test_integrity.py), so this one's files are re-listed as a user would.
    write_checksums(ckpt2)
    sub = manyinone.load(ckpt2, budget=0.6)
    assert sub.config.num_hidden_layers == 2
