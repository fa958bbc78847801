"""The command line through typer's CliRunner: the happy path and every bad input.

A bad input must end with exit code 2 and one `error: ...` line naming the bad value, no traceback,
and nothing half-written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from manyinone.checkpoint import read_index
from manyinone.cli import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The one `error:` line of a failed command (transformers' progress bars may precede it)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0]  # nothing after it
    return errors[0]


@pytest.fixture(scope="module")
def cli_run(tiny_llama, tmp_path_factory):
    """The user's command shape, on the tiny model."""
    out = tmp_path_factory.mktemp("cli") / "run"
    result = invoke("train", "--model", tiny_llama, "--axes", "depth", "--exits", "2,4", "--data", "demo",
                    "--output", out, "--max-steps", "2", "--quiet")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "checkpoint written to" in result.stdout
    return out


def budgets(ckpt: Path) -> dict[int, float]:
    return {e["spec"]["depth"]: e["relative"]["flops"] for e in read_index(ckpt)["specs"]}


# --- happy path -----------------------------------------------------------------------------------------
def test_train_writes_a_checkpoint(cli_run):
    assert (cli_run / "model.safetensors").is_file() and (cli_run / "manyinone.json").is_file()
    lines = (cli_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert [e["spec"] for e in read_index(cli_run)["specs"]] == [{"depth": 2}, {"depth": 4}]


def test_train_with_yaml_config_and_overrides(tiny_llama, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_llama}\nexits: [1, 4]\nmax_steps: 5\nbatch_size: 2\nmax_length: 200\n")
    out = tmp_path / "run"
    # --set beats the file; a flag beats both.
    result = invoke("train", "--config", cfg, "--set", "max_steps=3", "--set", "exits=[2,4]", "--max-steps", "1",
                    "--output", out)  # with the progress display
    assert "checkpoint written to" in result.stdout
    assert result.exit_code == 0, result.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert [e["spec"]["depth"] for e in read_index(out)["specs"]] == [2, 4]


def test_info_lists_specs_and_costs(cli_run):
    result = invoke("info", cli_run)
    assert result.exit_code == 0, result.output
    assert "depth=2" in result.stdout and "depth=4" in result.stdout
    assert "74,048" in result.stdout and "148,032" in result.stdout  # parameters of 2 and 4 layers
    assert f"{budgets(cli_run)[2]:.3f}" in result.stdout and "1.000" in result.stdout


def test_budget_printed_by_info_selects_its_row(tmp_path):
    """Only the index is needed: costs of a SmolLM2-shaped model (30 layers) built on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from manyinone.checkpoint import INDEX_FILE, build_index, resolve
    from manyinone.registry import adapter_for

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        adapter = adapter_for(LlamaForCausalLM(config))
    index = build_index(adapter, adapter.space({"depth": [6, 12, 18, 24, 30]}))
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    result = invoke("info", tmp_path)
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[1:-1] for line in result.stdout.splitlines() if "depth=" in line]
    printed = {cells[0].strip(): float(cells[-1]) for cells in rows}  # spec -> rel. FLOPs as shown
    assert len(printed) == 5
    assert {label: resolve(index, budget).label for label, budget in printed.items()} == {
        label: label for label in printed}


def test_export_budget(cli_run, tmp_path):
    out = tmp_path / "exported"
    result = invoke("export", cli_run, "--budget", f"{budgets(cli_run)[2]:.4f}", "--output", out)
    assert result.exit_code == 0, result.output
    assert "exported to" in result.stdout
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert read_index(out)["exported"]["spec"] == {"depth": 2}


def test_export_all(cli_run, tmp_path):
    out = tmp_path / "all"
    result = invoke("export", cli_run, "--all", "-o", out)
    assert result.exit_code == 0, result.output
    assert read_index(out) == read_index(cli_run)


def test_eval_writes_report(cli_run, tmp_path):
    out = tmp_path / "eval"
    result = invoke("eval", cli_run, "--data", "demo", "--rows", "390:400", "--batch-size", "5", "--output", out)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "eval.json").read_text())
    assert [r["spec"] for r in rows] == ["depth=2", "depth=4"]
    full = rows[1]
    assert full["relative_cost"] == 1.0 and full["top1_agreement"] == 1.0 and full["kl_to_full"] == pytest.approx(0, abs=1e-6)
    assert rows[0]["relative_cost"] == pytest.approx(budgets(cli_run)[2])
    assert all(r["perplexity"] == pytest.approx(2.718281828 ** r["loss"], rel=1e-6) for r in rows)
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "depth=2" in result.stdout and "eval.json" in result.stdout


def test_eval_defaults_to_the_checkpoint_folder(cli_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(cli_run, ckpt)
    result = invoke("eval", ckpt, "--data", "demo", "--rows", "0:4")
    assert result.exit_code == 0, result.output
    assert (ckpt / "eval.json").is_file() and (ckpt / "eval.png").is_file()
    assert (ckpt / "model.safetensors").is_file()  # merged beside the checkpoint, not replacing it


def test_eval_of_a_plain_model_folder_at_given_exits(tiny_llama, tmp_path):
    out = tmp_path / "eval"
    result = invoke("eval", tiny_llama, "--exits", "1,2", "--data", "demo", "--rows", "0:4", "--output", out)
    assert result.exit_code == 0, result.output
    assert [r["spec"] for r in json.loads((out / "eval.json").read_text())] == ["depth=1", "depth=2", "depth=4"]


@pytest.mark.parametrize("budget, label", [(None, "depth=4"), ("0.6", "depth=2")])
def test_generate(cli_run, budget, label):
    args = ["generate", cli_run, "--prompt", "What is 2 plus 2?", "--max-new-tokens", "6"]
    result = invoke(*args, *(["--budget", budget] if budget else []))
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"({label})" in result.stdout
    again = invoke(*args, *(["--budget", budget] if budget else []))
    assert again.stdout == result.stdout  # greedy decoding is deterministic


def test_generate_sampling_is_seeded(cli_run):
    args = ["generate", cli_run, "--prompt", "Spell the word backwards.", "--max-new-tokens", "8",
            "--temperature", "1.0", "--top-p", "1.0", "--seed", "3"]
    first, second = invoke(*args), invoke(*args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout


def test_no_arguments_prints_help():
    result = invoke()
    assert "train" in result.output and "export" in result.output


# --- bad input: train ------------------------------------------------------------------------------------
def _train_error(*args, output: Path) -> str:
    data = () if "--data" in args else ("--data", "demo")
    line = error_line(invoke("train", *args, *data, "--output", output, "--max-steps", "1", "--quiet"))
    assert not output.exists(), "a failed train must not create its output folder"
    return line


def test_unknown_model_type(tiny_gpt2, tmp_path):
    line = _train_error("--model", tiny_gpt2, output=tmp_path / "out")
    assert "unknown model type 'gpt2'" in line and "'llama'" in line


def test_missing_model_path(tmp_path):
    missing = tmp_path / "no-such-model"
    line = _train_error("--model", missing, output=tmp_path / "out")
    assert str(missing) in line


def test_missing_gguf(tmp_path):
    line = _train_error("--model", tmp_path / "model.gguf", output=tmp_path / "out")
    assert "GGUF file" in line and "model.gguf" in line and "not found" in line


def test_folder_without_config(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    line = _train_error("--model", folder, output=tmp_path / "out")
    assert "has no config.json" in line


def test_unsupported_axis(tiny_llama, tmp_path):
    line = _train_error("--model", tiny_llama, "--axes", "depth,experts", output=tmp_path / "out")
    assert "axes ['depth', 'experts'] not supported" in line and "'llama-flextron' ['depth', 'width', 'heads']" in line


@pytest.mark.parametrize("exits, needle", [
    ("4,2", "exits [4, 2] must be non-empty and strictly increasing"),
    ("2,2,4", "strictly increasing"),
    ("2,9", "[9] out of range; allowed 1..4"),
    ("0,2", "[0] out of range; allowed 1..4"),
    ("2,x", "exits '2,x' malformed"),
    ("2;4", "exits '2;4' malformed"),
    ("", "exits [] must be non-empty"),
])
def test_bad_exits(tiny_llama, tmp_path, exits, needle):
    line = _train_error("--model", tiny_llama, "--exits", exits, output=tmp_path / "out")
    assert needle in line


def test_malformed_data_row(tiny_llama, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    line = _train_error("--model", tiny_llama, "--data", data, output=tmp_path / "out")
    assert "row 1 field 'output' is missing" in line and str(data) in line


@pytest.mark.parametrize("override, needle", [
    ("bogus=1", "config field 'bogus': Extra inputs are not permitted"),
    ("lr", "override 'lr' malformed; expected key=value"),
    ("=3", "override '=3' malformed"),
    ("lr=fast", "config field 'lr'"),
    ("sampler=greedy", "config field 'sampler'"),
    ("batch_size=0", "config field 'batch_size'"),
])
def test_bad_set_override(tiny_llama, tmp_path, override, needle):
    line = _train_error("--model", tiny_llama, "--set", override, output=tmp_path / "out")
    assert needle in line


def test_unknown_key_lists_allowed_keys(tiny_llama, tmp_path):
    line = _train_error("--model", tiny_llama, "--set", "learning_rate=1e-3", output=tmp_path / "out")
    assert "'learning_rate'" in line and "allowed keys:" in line and "lr" in line


def test_missing_and_bad_config_file(tiny_llama, tmp_path):
    assert "not found" in _train_error("--config", tmp_path / "nope.yaml", output=tmp_path / "out")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    assert "must hold a mapping" in _train_error("--config", bad, output=tmp_path / "out")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    assert "not valid YAML" in _train_error("--config", broken, output=tmp_path / "out")


def test_set_rows_slice(tiny_llama, tmp_path):
    out = tmp_path / "out"
    result = invoke("train", "--model", tiny_llama, "--set", "rows=10:20", "--set", "batch_size=2",
                    "--set", "max_length=200", "--output", out, "--max-steps", "1", "--quiet")
    assert result.exit_code == 0, result.stderr


# --- bad input: export / info / generate / eval ----------------------------------------------------------
@pytest.mark.parametrize("budget", ["0", "-1", "1.5", "nan"])
def test_export_out_of_range_budget(cli_run, tmp_path, budget):
    out = tmp_path / "out"
    line = error_line(invoke("export", cli_run, "--budget", budget, "--output", out))
    assert f"budget {float(budget)!r} out of range; allowed 0 < budget <= 1" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_budget_below_smallest(cli_run, tmp_path):
    out = tmp_path / "out"
    line = error_line(invoke("export", cli_run, "--budget=0.05", "--output", out))
    assert "budget 0.05 is below the smallest sub-model (depth=2" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_needs_budget_xor_all(cli_run, tmp_path):
    assert "exactly one of --budget B or --all" in error_line(invoke("export", cli_run, "-o", tmp_path / "o"))
    assert "exactly one" in error_line(invoke("export", cli_run, "--all", "--budget", "1", "-o", tmp_path / "o"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [
    lambda ckpt, out: ("export", ckpt, "--budget", "1", "--output", out),
    lambda ckpt, out: ("export", ckpt, "--all", "--output", out),
    lambda ckpt, out: ("info", ckpt),
    lambda ckpt, out: ("generate", ckpt, "--prompt", "hi"),
], ids=["export-budget", "export-all", "info", "generate"])
def test_missing_checkpoint(tmp_path, command):
    missing = tmp_path / "no-such-run"
    line = error_line(invoke(*command(missing, tmp_path / "out")))
    assert f"checkpoint '{missing}' not found" in line
    assert not (tmp_path / "out").exists()


@pytest.fixture
def truncated(cli_run, tmp_path):
    """A copy of the run whose weights file is cut short (its manyinone.json is intact)."""
    ckpt = tmp_path / "truncated"
    shutil.copytree(cli_run, ckpt, ignore=shutil.ignore_patterns("checkpoints"))
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    return ckpt


@pytest.fixture
def garbled(cli_run, tmp_path):
    """A copy of the run whose manyinone.json is not JSON."""
    ckpt = tmp_path / "garbled"
    shutil.copytree(cli_run, ckpt, ignore=shutil.ignore_patterns("checkpoints"))
    (ckpt / "manyinone.json").write_text('{"format": "manyinone/1", "specs": [')
    return ckpt


@pytest.mark.parametrize("command", [
    lambda ckpt, out: ("export", ckpt, "--budget", "1", "--output", out),
    lambda ckpt, out: ("export", ckpt, "--all", "--output", out),
    lambda ckpt, out: ("generate", ckpt, "--prompt", "hi"),
    lambda ckpt, out: ("eval", ckpt, "--data", "demo", "--rows", "0:4", "--output", out),
], ids=["export-budget", "export-all", "generate", "eval"])
@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_corrupt_checkpoint(request, tmp_path, command, damage):
    ckpt = request.getfixturevalue(damage)
    out = tmp_path / "out"
    line = error_line(invoke(*command(ckpt, out)))
    assert f"checkpoint '{ckpt}' is corrupt" in line
    assert not out.exists()
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


def test_info_on_garbled_index(garbled):
    assert "is corrupt: cannot read its budget index" in error_line(invoke("info", garbled))


def test_generate_bad_budget_fails_before_loading(cli_run):
    assert "below the smallest" in error_line(invoke("generate", cli_run, "--prompt", "hi", "--budget", "0.1"))
    assert "out of range" in error_line(invoke("generate", cli_run, "--prompt", "hi", "--budget", "2"))


def test_eval_malformed_data(cli_run, tmp_path):
    data = tmp_path / "held_out.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"output": "no instruction"}]))
    line = error_line(invoke("eval", cli_run, "--data", data, "--output", tmp_path / "out"))
    assert "row 1 field 'instruction' is missing" in line
    assert not (tmp_path / "out").exists()


def test_eval_unknown_template(cli_run, tmp_path):
    line = error_line(invoke("eval", cli_run, "--data", "demo", "--rows", "0:2", "--template", "vicuna",
                             "--output", tmp_path / "out"))
    assert "template 'vicuna' unknown" in line


def test_eval_of_a_plain_model_folder_never_writes_into_it(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tiny_llama.iterdir())
    result = invoke("eval", tiny_llama, "--exits", "2", "--data", "demo", "--rows", "0:2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tiny_llama.iterdir()) == before
    assert (tmp_path / "runs" / "eval" / "eval.json").is_file()


# --- bad input that once escaped as a traceback (regression tests) ----------------------------------------
def _expect_usage_error(result, needle):
    """Like error_line, but when an exception escapes, the failure shows it rather than a missing line."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert needle in error_line(result)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_chat_template_missing(cli_run, tiny_llama, tmp_path, command):
    out = tmp_path / "out"
    if command == "train":
        result = invoke("train", "--model", tiny_llama, "--set", "template=chat", "--data", "demo",
                        "--output", out, "--max-steps", "1", "--quiet")
    else:
        result = invoke("eval", cli_run, "--data", "demo", "--rows", "0:2", "--template", "chat", "--output", out)
    _expect_usage_error(result, "chat")
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (("eval", "{ckpt}", "--data", "demo", "--rows", "0:2", "--batch-size", "0", "--output", "{out}"),
     "--batch-size 0 out of range; allowed 1 to 1048576"),
    (("eval", "{ckpt}", "--data", "demo", "--rows", "0:2", "--max-length", "4", "--output", "{out}"),
     "--max-length 4 out of range"),
    (("generate", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "0"), "--max-new-tokens 0 out of range"),
], ids=["eval-batch-size-0", "eval-max-length-4", "generate-max-new-tokens-0"])
def test_non_positive_counts(cli_run, tmp_path, args, needle):
    result = invoke(*(a.format(ckpt=cli_run, out=tmp_path / "out") for a in args))
    _expect_usage_error(result, needle)
    assert not (tmp_path / "out").exists()


def test_option_of_the_wrong_type_is_a_usage_error(tiny_llama, tmp_path):
    """typer's own type errors: exit code 2 and the option named, before any work starts."""
    out = tmp_path / "out"
    result = invoke("train", "--model", tiny_llama, "--max-steps", "many", "--output", out)
    assert result.exit_code == 2 and "--max-steps" in result.output
    assert not out.exists()


def test_corrupt_model_folder(tiny_llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    out = tmp_path / "out"
    result = invoke("train", "--model", model, "--data", "demo", "--output", out, "--max-steps", "1", "--quiet")
    _expect_usage_error(result, str(model))
    assert not out.exists()


@pytest.mark.parametrize("command", ["info", "export"])
def test_index_missing_fields(cli_run, tmp_path, command):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(cli_run, ckpt, ignore=shutil.ignore_patterns("checkpoints"))
    (ckpt / "manyinone.json").write_text(json.dumps({"format": "manyinone/1", "specs": [{"spec": {"depth": 2}}]}))
    args = ("info", ckpt) if command == "info" else ("export", ckpt, "--budget", "1", "-o", tmp_path / "out")
    _expect_usage_error(invoke(*args), "corrupt")
    assert not (tmp_path / "out").exists()


def test_export_onto_its_own_checkpoint_is_refused(cli_run, tmp_path):
    ckpt = tmp_path / "run"
    shutil.copytree(cli_run, ckpt)
    result = invoke("export", ckpt, "--all", "--output", ckpt)
    names = {p.name for p in ckpt.iterdir()}
    assert {"metrics.jsonl", "train_config.yaml", "checkpoints"} <= names, sorted(names)
    assert "--output" in error_line(result)
