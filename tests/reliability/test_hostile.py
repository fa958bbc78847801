"""The hostile suite (issue 11): inputs a new user or an attacker would try, through the real CLI, by
class: numbers that overflow, paths of the wrong kind, unusable devices, crafted or truncated file
headers, data nested past the recursion limit, nonsense sampling settings, YAML duplicate keys, a
generation longer than the context, and resource errors that must not be reported as corruption.

Each input must end with exit code 2 and one `error: ...` line that holds the expected words (the
bad value, or what is allowed); the suite counts inputs tried, clean errors, raw tracebacks and
misleading errors (a wrong verdict, or nonsense silently accepted) for docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from manyinone.cli import app
from manyinone.io.durable import write_checksums

COUNTS = Counter()
DEEP = 100_000  # nesting levels: far past Python's recursion limit


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    if os.environ.get("MANYINONE_RELIABILITY_REPORT"):
        with open(os.environ["MANYINONE_RELIABILITY_REPORT"], "a") as f:
            f.write(json.dumps({"hostile": dict(COUNTS)}) + "\n")


@dataclass
class Ctx:
    ckpt: Path  # a writable copy of a trained checkpoint
    model: Path  # the tiny base model
    tmp: Path

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        return path

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir()
        return path

    def model_with(self, name: str, weights: bytes) -> Path:
        """A copy of the base model whose model.safetensors is `weights` (no checksums: a plain HF folder)."""
        folder = Path(shutil.copytree(self.model, self.tmp / name))
        (folder / "model.safetensors").write_bytes(weights)
        return folder

    def ckpt_with(self, name: str, content: str | bytes) -> Path:
        """The checkpoint with file `name` replaced and its checksums regenerated (a forger's edit)."""
        (self.ckpt / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        write_checksums(self.ckpt)
        return self.ckpt

    def ckpt_index_only_in(self, weights: bytes) -> Path:
        """The checkpoint without manyinone.json (the index then comes from the weights' header), weights forged."""
        (self.ckpt / "manyinone.json").unlink()
        return self.ckpt_with("model.safetensors", weights)

    def ckpt_listing(self, text: str) -> Path:
        (self.ckpt / "checksums.json").write_text(text)
        return self.ckpt


def gguf_header(tensors: int, kvs: int, version: int = 3, magic: bytes = b"GGUF") -> bytes:
    return magic + struct.pack("<IQQ", version, tensors, kvs)


def truncated_gguf(size: int) -> bytes:
    from manyinone.io.loading import smollm2_path

    with open(smollm2_path(), "rb") as f:
        return f.read(size)


def safetensors_header(length: int, body: bytes = b"") -> bytes:
    return struct.pack("<Q", length) + body


TRAIN = ["train", "--max-steps", "1", "--batch-size", "2", "--quiet", "--exits", "2,4"]
GEN = ["--prompt", "hi", "--max-new-tokens", "2"]
EVAL = ["--data", "demo", "--rows", "0:4"]


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    args: Callable[[Ctx], list]
    expect: str  # words the error line must hold

    def __str__(self) -> str:
        return self.id


def train_on(c: Ctx, *extra) -> list:
    return [*TRAIN, "--model", c.model, "--output", c.tmp / "run", *extra]


CASES = [
    # numbers that overflow
    Case("train-seed-1e15", "overflow", lambda c: train_on(c, "--set", "seed=1000000000000000"),
         "'seed': Input should be less than or equal to 4294967295"),
    Case("train-seed-negative", "overflow", lambda c: train_on(c, "--set", "seed=-1"),
         "'seed': Input should be greater than or equal to 0"),
    Case("generate-seed-2**64+1", "overflow", lambda c: ["generate", c.ckpt, *GEN, "--seed", "18446744073709551617"],
         "--seed 18446744073709551617 out of range; allowed 0 to 18446744073709551615"),
    Case("generate-max-new-tokens-1e30", "overflow",
         lambda c: ["generate", c.ckpt, "--prompt", "hi", "--max-new-tokens", str(10**30)], "exceeds the context limit"),
    Case("eval-max-length-1e20", "overflow", lambda c: ["eval", c.ckpt, *EVAL, "--max-length", str(10**20)],
         "--max-length 100000000000000000000 out of range"),
    Case("eval-batch-size-1e20", "overflow", lambda c: ["eval", c.ckpt, *EVAL, "--batch-size", str(10**20)],
         "--batch-size 100000000000000000000 out of range; allowed 1 to 1048576"),
    Case("train-max-length-1e30", "overflow", lambda c: train_on(c, "--set", f"max_length={10**30}"),
         "'max_length': Input should be less than or equal to"),
    Case("train-grad-accum-1e30", "overflow", lambda c: train_on(c, "--set", f"grad_accum={10**30}"),
         "lower the batch size"),
    Case("serve-port-99999", "overflow", lambda c: ["serve", c.ckpt, "--port", "99999"],
         "--port 99999 out of range; allowed 1 to 65535"),
    Case("budget-1e400", "overflow", lambda c: ["export", c.ckpt, "--budget", "1e400", "-o", c.tmp / "out"],
         "budget inf out of range"),
    Case("data-5000-digit-int", "overflow", lambda c: train_on(c, "--data", c.file(
        "big.json", '[{"instruction": ' + "9" * 5000 + ', "output": "x"}]')), "big.json"),
    # paths of the wrong kind
    Case("config-is-a-folder", "path", lambda c: train_on(c, "--config", c.folder("cfgdir")),
         "config file"),
    Case("data-is-a-folder", "path", lambda c: train_on(c, "--data", c.folder("data.json")), "data.json' is a folder"),
    Case("eval-text-is-a-folder", "path", lambda c: ["eval", c.ckpt, *EVAL, "--text", c.folder("text")],
         "is a folder"),
    Case("eval-qa-is-a-folder", "path", lambda c: ["eval", c.ckpt, *EVAL, "--qa", c.folder("qa.jsonl")],
         "is a folder"),
    Case("latency-is-a-folder", "path", lambda c: ["export", c.ckpt, "--budget-ms", "5", "--latency",
                                                   c.folder("lat.json"), "-o", c.tmp / "out"], "is a folder"),
    Case("info-on-a-file", "path", lambda c: ["info", c.file("notes.txt", "x")], "is a file; expected a folder"),
    Case("generate-on-a-file", "path", lambda c: ["generate", c.file("notes.txt", "x"), *GEN],
         "is a file; expected a folder"),
    Case("export-from-a-file", "path", lambda c: ["export", c.file("notes.txt", "x"), "--all", "-o", c.tmp / "o"],
         "is a file; expected a folder"),
    Case("model-is-a-plain-file", "path", lambda c: [*TRAIN, "--model", c.file("weights.bin", "x"),
                                                     "--output", c.tmp / "run"], "is not an HF folder"),
    Case("model-gguf-is-a-folder", "path", lambda c: [*TRAIN, "--model", c.folder("m.gguf"),
                                                      "--output", c.tmp / "run"], "m.gguf' is a folder"),
    Case("eval-output-is-a-file", "path", lambda c: ["eval", c.ckpt, *EVAL, "--output", c.file("report", "x")],
         "cannot write"),
    # devices that cannot be used
    Case("train-device-meta", "device", lambda c: train_on(c, "--set", "device=meta"),
         "device 'meta' cannot run a model; allowed auto, cpu, cuda, cuda:N"),
    Case("train-device-mps", "device", lambda c: train_on(c, "--set", "device=mps"), "device 'mps'"),
    Case("train-device-bogus", "device", lambda c: train_on(c, "--set", "device=tpu9"), "device 'tpu9'"),
    Case("eval-device-meta", "device", lambda c: ["eval", c.ckpt, *EVAL, "--device", "meta"], "device 'meta'"),
    Case("eval-device-cuda-7", "device", lambda c: ["eval", c.ckpt, *EVAL, "--device", "cuda:7"], "device 'cuda:7'"),
    Case("tune-device-meta", "device", lambda c: ["tune-speculative", c.ckpt, "--device", "meta"], "device 'meta'"),
    # crafted or truncated file headers
    Case("gguf-truncated-64B", "header", lambda c: [*TRAIN, "--model", c.file("t64.gguf", truncated_gguf(64)),
                                                    "--output", c.tmp / "run"], "t64.gguf"),
    Case("gguf-truncated-1MiB", "header", lambda c: [*TRAIN, "--model", c.file("t1m.gguf", truncated_gguf(2**20)),
                                                     "--output", c.tmp / "run"], "t1m.gguf"),
    Case("gguf-huge-counts", "header", lambda c: [*TRAIN, "--model", c.file("huge.gguf", gguf_header(2**62, 2**62)),
                                                  "--output", c.tmp / "run"], "huge.gguf"),
    Case("gguf-bad-magic", "header", lambda c: [*TRAIN, "--model", c.file("magic.gguf", gguf_header(1, 1, magic=b"GGUX")),
                                                "--output", c.tmp / "run"], "magic.gguf"),
    Case("gguf-empty", "header", lambda c: [*TRAIN, "--model", c.file("empty.gguf", b""), "--output", c.tmp / "run"],
         "empty.gguf"),
    Case("safetensors-huge-header-length", "header",
         lambda c: [*TRAIN, "--model", c.model_with("m1", safetensors_header(2**62)), "--output", c.tmp / "run"],
         "cannot load model"),
    Case("safetensors-header-not-json", "header",
         lambda c: [*TRAIN, "--model", c.model_with("m2", safetensors_header(8, b"{{{{{{{{")), "--output", c.tmp / "run"],
         "cannot load model"),
    Case("safetensors-truncated", "header",
         lambda c: [*TRAIN, "--model", c.model_with("m3", (c.model / "model.safetensors").read_bytes()[:3000]),
                    "--output", c.tmp / "run"], "cannot load model"),
    Case("checkpoint-weights-header-forged", "header",
         lambda c: ["info", c.ckpt_index_only_in(safetensors_header(2**40))],
         "model.safetensors unreadable"),
    # data nested past the recursion limit
    Case("yaml-config-deep", "nesting", lambda c: train_on(c, "--config", c.file("deep.yaml", "a: " + "[" * DEEP)),
         "deep.yaml"),
    Case("set-override-deep", "nesting", lambda c: train_on(c, "--set", "widths=" + "[" * DEEP + "]" * DEEP),
         "'widths'"),
    Case("data-json-deep", "nesting", lambda c: train_on(c, "--data", c.file("deep.json", "[" * DEEP + "]" * DEEP)),
         "deep.json"),
    Case("data-jsonl-deep", "nesting", lambda c: train_on(c, "--data", c.file("deep.jsonl", "[" * DEEP + "]" * DEEP)),
         "deep.jsonl"),
    Case("qa-deep", "nesting", lambda c: ["eval", c.ckpt, *EVAL, "--qa", c.file("qa.jsonl", "[" * DEEP + "]" * DEEP)],
         "qa.jsonl"),
    Case("latency-deep", "nesting", lambda c: ["export", c.ckpt, "--budget-ms", "5", "--latency",
                                               c.file("lat.json", "[" * DEEP + "]" * DEEP), "-o", c.tmp / "out"],
         "lat.json"),
    Case("index-deep", "nesting", lambda c: ["info", c.ckpt_with("manyinone.json", "[" * DEEP + "]" * DEEP)],
         "cannot read its budget index (RecursionError)"),
    Case("checksums-deep", "nesting", lambda c: ["generate", c.ckpt_listing("[" * DEEP + "]" * DEEP), *GEN],
         "checksums.json is unreadable"),
    # nonsense sampling settings
    Case("temperature-nan", "sampling", lambda c: ["generate", c.ckpt, *GEN, "--temperature", "nan"],
         "--temperature nan out of range; allowed a finite number >= 0"),
    Case("temperature-negative", "sampling", lambda c: ["generate", c.ckpt, *GEN, "--temperature", "-1"],
         "--temperature -1.0 out of range"),
    Case("temperature-inf", "sampling", lambda c: ["generate", c.ckpt, *GEN, "--temperature", "inf"],
         "--temperature inf out of range"),
    Case("top-p-zero", "sampling", lambda c: ["generate", c.ckpt, *GEN, "--top-p", "0"],
         "--top-p 0.0 out of range; allowed 0 < top_p <= 1"),
    Case("top-p-above-one", "sampling", lambda c: ["generate", c.ckpt, *GEN, "--top-p", "1.5"], "--top-p 1.5"),
    Case("top-p-nan", "sampling", lambda c: ["generate", c.ckpt, *GEN, "--top-p", "nan"], "--top-p nan"),
    Case("budget-nan", "sampling", lambda c: ["generate", c.ckpt, *GEN, "--budget", "nan"], "budget nan"),
    # YAML duplicate keys
    Case("yaml-duplicate-key", "yaml", lambda c: train_on(c, "--config", c.file("dup.yaml", "lr: 1e-3\nlr: 5\n")),
         "sets 'lr' twice"),
    Case("yaml-duplicate-nested-key", "yaml",
         lambda c: train_on(c, "--config", c.file("dup2.yaml", "exits: [2, 4]\nseed: 1\nexits: [4]\n")),
         "sets 'exits' twice"),
    # a generation longer than the context
    Case("generate-past-context", "context", lambda c: ["generate", c.ckpt, "--prompt", "hi", "--max-new-tokens", "5000"],
         "exceeds the context limit of 1024 tokens"),
    Case("generate-prompt-past-context", "context",
         lambda c: ["generate", c.ckpt, "--prompt", "x" * 3000, "--max-new-tokens", "2"], "exceeds the context limit"),
]


@pytest.fixture
def ctx(trained_run, tiny_llama, tmp_path) -> Ctx:
    return Ctx(Path(shutil.copytree(trained_run, tmp_path / "ckpt")), tiny_llama, tmp_path)


def outcome(result, expect: str) -> tuple[str, str]:
    """clean / traceback / misleading (wrong or missing words, or the nonsense was accepted), and the line."""
    text = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit) or "Traceback" in text:
        return "traceback", f"{type(result.exception).__name__}: {result.exception}"
    lines = result.stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    if result.exit_code != 2 or not last.startswith("error: ") or sum(x.startswith("error: ") for x in lines) != 1:
        return "misleading", f"exit {result.exit_code}: {last or text[-300:]}"
    return ("clean" if expect in last else "misleading"), last


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_cli_input(case: Case, ctx: Ctx, monkeypatch):
    monkeypatch.chdir(ctx.tmp)
    result = CliRunner().invoke(app, [str(a) for a in case.args(ctx)])
    kind, line = outcome(result, case.expect)
    COUNTS["inputs"] += 1
    COUNTS[kind] += 1
    COUNTS[f"{case.kind}:{kind}"] += 1
    assert kind == "clean", f"{case.id}: {line} (expected the error to say {case.expect!r})"
    assert not (ctx.tmp / "run").exists() and not (ctx.tmp / "out").exists()  # a refused run writes nothing


# --- resource errors are not verdicts on the user's files --------------------------------------
def _oom(*_args, **_kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _host_oom(*_args, **_kwargs):
    raise MemoryError()


@pytest.mark.parametrize("where", ["exit-heads", "weights", "base-model", "resume-state"])
@pytest.mark.parametrize("error", [_oom, _host_oom], ids=["cuda-oom", "host-oom"])
def test_out_of_memory_is_not_reported_as_corruption(where, error, trained_run, tiny_llama, tmp_path, monkeypatch):
    import manyinone.train.exit_heads as exit_heads
    import manyinone.train.loop as train_module
    import transformers

    from manyinone.train.config import TrainConfig

    ckpt = Path(shutil.copytree(trained_run, tmp_path / "ckpt"))
    if where == "exit-heads":
        run = train_module.train(TrainConfig(model=str(tiny_llama), exits=[2, 4], max_steps=1, batch_size=2,
                                             exit_heads="translator", output=str(tmp_path / "heads")), show_progress=False)
        monkeypatch.setattr(exit_heads, "load_file", error)
        args = ["generate", run, *GEN]
    elif where == "weights":
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", error)
        args = ["generate", ckpt, *GEN]
    elif where == "base-model":
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", error)
        args = [*TRAIN, "--model", tiny_llama, "--output", tmp_path / "run"]
    else:
        import manyinone.train.state as state_module  # the resumable state's reader

        monkeypatch.setattr(state_module, "load_model", error)
        # the conftest run's own settings, one step further: it resumes from its last state
        args = ["train", "--model", tiny_llama, "--output", ckpt, "--exits", "2,4", "--data", "demo", "--max-steps", "5",
                "--batch-size", "4", "--lr", "1e-3", "--quiet"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    kind, line = outcome(result, "out of memory")
    COUNTS["inputs"] += 1
    COUNTS[kind] += 1
    COUNTS[f"resource:{kind}"] += 1
    assert kind == "clean", line
    assert "corrupt" not in line and "incomplete" not in line, line


# --- the long part (-m slow): many damaged headers ------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("seed", range(40))
def test_randomly_damaged_headers(seed, tiny_llama, tmp_path, request):
    """A real GGUF cut at a random point, and the tiny model's safetensors header with random bytes
    overwritten: each is loaded (config, then weights) and must load or fail with one clean line."""
    import random

    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("80 damaged headers run with -m slow")

    from manyinone.core.errors import ManyinoneError
    from manyinone.io.loading import load_pretrained

    rng = random.Random(seed)
    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(truncated_gguf(rng.randint(0, 8 * 2**20)))
    folder = Path(shutil.copytree(tiny_llama, tmp_path / "m"))
    weights = bytearray((folder / "model.safetensors").read_bytes())
    header_end = 8 + struct.unpack("<Q", bytes(weights[:8]))[0]
    for _ in range(rng.randint(1, 8)):
        weights[rng.randrange(header_end)] = rng.randrange(256)
    (folder / "model.safetensors").write_bytes(bytes(weights))
    for source in (str(gguf), str(folder)):
        COUNTS["inputs"] += 1
        try:
            load_pretrained(source)
        except ManyinoneError as exc:
            assert "\n" not in str(exc) and str(source) in str(exc)
        COUNTS["clean"] += 1  # loaded, or a one-line error naming the source; anything else fails the test
        COUNTS["header:clean"] += 1
