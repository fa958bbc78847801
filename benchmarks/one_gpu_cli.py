"""The issue-15 commands, run as a user types them, on a LLaMA-2-13B-shaped model on one GPU.

Real LLaMA-2-13B weights cannot be fetched here, so this builds a model of its shape (40 layers,
hidden 5120, MLP 13824, 40 heads) with random bf16 weights, saved as a sharded HF folder with the
SmolLM2 tokenizer (vocab_size set to the tokenizer's), then runs, as subprocesses:

    manyinone train --model BASE --axes depth --lora 16 --data ALPACA ...
    manyinone export RUN --budget 0.5 --dtype bfloat16 -o EXPORT
    manyinone serve EXPORT --dtype bfloat16        (one /v1/completions request, then stopped)

It checks free disk before every step (the base folder is deleted once training is done: base,
merged run and export together would not fit 64 GiB), times each step, records its peak memory
(GPU: the training allocator's own peak from metrics.jsonl, nvidia-smi's reading for the step's
process and for the whole device, polled; CPU: the process's resident memory), prints each training
step's loss and grad_norm (and the first non-finite metric of a failed run), and a markdown table
last. Every command line it runs is printed as run.

    python benchmarks/one_gpu_cli.py --tokenizer /root/smollm2-hf --data /root/data/alpaca_2000.json \\
        --workdir /root/one_gpu_cli --json $OUT/one_gpu_cli.json            # one H200, ~6 minutes
    python benchmarks/one_gpu_cli.py --tiny --device cpu --tokenizer TOKENIZER_FOLDER \\
        --data ../shared/assets/data/alpaca_2000.json --workdir /tmp/one_gpu_cli   # CPU, a minute
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

GIB = 2**30
# LLaMA-2-13B (its config.json), except vocab_size, which follows the tokenizer.
SHAPE_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                 num_key_value_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
# Small, but with layers outweighing the 49152-word head (as at 13B), so that budget 0.5 holds an exit.
SHAPE_TINY = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=24, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)


def param_count(shape: dict, vocab: int) -> int:
    """Parameters of a LLaMA of this shape (untied head, no biases): the bytes the folders will take."""
    h, f, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h  # q,o + k,v + gate,up,down + two norms
    return layers * per_layer + 2 * vocab * h + h  # + embeddings, head, final norm


# ---------------------------------------------------------------- step 1, run in its own process
def build_base(folder: Path, tokenizer_dir: str, tiny: bool, device: str, max_shard_size: str) -> None:
    """Random bf16 weights of the shape, created directly in bf16 on `device` (no float32 copy ever
    exists), saved as a sharded safetensors HF folder; written beside and renamed when complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tokenizer)
    shape = SHAPE_TINY if tiny else SHAPE_13B
    config = LlamaConfig(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    print(f"shape: {'tiny' if tiny else 'LLaMA-2-13B'} {shape}; vocab_size={vocab} (the tokenizer's, "
          f"from {tokenizer_dir}; LLaMA-2 has 32000)", flush=True)
    torch.manual_seed(0)
    with torch.device(device):  # parameters are allocated in bf16 where they live: no fp32 copy
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    draw_padding_row(model, config.initializer_range)
    dtypes = {str(p.dtype) for p in model.parameters()}
    n = sum(p.numel() for p in model.parameters())
    print(f"built {n / 1e9:.3f}B parameters on {device}, dtypes {sorted(dtypes)}", flush=True)
    if dtypes != {"torch.bfloat16"}:
        raise SystemExit(f"expected only bfloat16 parameters, got {sorted(dtypes)}")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    print(f"saved {folder}: {len(files)} safetensors file(s), {folder_gib(folder):.2f} GiB", flush=True)


def draw_padding_row(model, std: float) -> None:
    """Draw the embedding's padding row like every other row. transformers zeroes a fresh model's
    padding_idx row; a pretrained checkpoint has no such row, and where the pad token also begins
    every training row (SmolLM2's tokenizer as converted on the GPU machine) step 1's gradient
    overflows to NaN (manyinone.train.nonfinite.zero_embedding_starts says why)."""
    import torch

    pad = getattr(model.get_input_embeddings(), "padding_idx", None)
    if pad is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight[pad].normal_(0.0, std)


# ---------------------------------------------------------------- measuring
def folder_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / GIB if path.exists() else 0.0


def size(path: Path) -> str:
    value = folder_gib(path)
    return f"{value:.1f} GiB" if value >= 1 else f"{value * 1024:.0f} MiB"


def free_gib(path: Path) -> float:
    return shutil.disk_usage(path).free / GIB


class PeakMemory:
    """Polls, in a thread, the GPU memory (nvidia-smi) or on CPU the resident memory of process `pid`.

    `peak_gib`: the largest reading of the whole GPU (every process on it, ours or not) or of the CPU
    process; `process_peak_gib`: on a GPU, the largest of what nvidia-smi lists for `pid` itself (its
    CUDA context and the allocator's reserve: above torch's own allocated peak), None when nvidia-smi
    does not list that pid (another PID namespace) or nothing could be read."""

    def __init__(self, device: str, pid: int | None = None, every_s: float = 0.25):
        self.device, self.pid, self.every_s = device, pid, every_s
        self.peak_gib: float | None = None
        self.process_peak_gib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _smi(self, *query: str) -> str | None:
        try:
            out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=10)
            return out.stdout if out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            return None

    def _read(self) -> tuple[float | None, float | None]:
        if self.device.startswith("cuda"):
            index = self.device.split(":")[1] if ":" in self.device else "0"
            whole = self._smi("--query-gpu=memory.used", "-i", index)
            apps = self._smi("--query-compute-apps=pid,used_memory", "-i", index) if self.pid else None
            try:
                device_gib = float(whole.strip().splitlines()[0]) / 1024 if whole else None
            except (ValueError, IndexError):
                device_gib = None
            return device_gib, process_gib(apps, self.pid) if apps else None
        if self.pid is None:
            return None, None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / GIB, None
        except (OSError, ValueError):
            return None, None
        return None, None

    def _poll(self) -> None:
        while True:
            value, own = self._read()
            if value is not None:
                self.peak_gib = value if self.peak_gib is None else max(self.peak_gib, value)
            if own is not None:
                self.process_peak_gib = own if self.process_peak_gib is None else max(self.process_peak_gib, own)
            if self._stop.wait(self.every_s):
                return


def process_gib(csv_text: str, pid: int) -> float | None:
    """GiB that `nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits` lists
    for `pid` (MiB per line), None when the pid is not listed."""
    total = None
    for line in csv_text.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            try:
                total = (total or 0.0) + float(parts[1]) / 1024
            except ValueError:
                continue
    return total


def step_lines(metrics: list[dict]) -> list[str]:
    """One line per training step from metrics.jsonl: loss, grad_norm, each exit's ce, the torch peak."""
    lines = []
    for m in metrics:
        ces = " ".join(f"{k.split('/', 1)[1]}:{m[k]:.3f}" for k in m if k.startswith("ce/"))
        peak = f", torch peak {m['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in m else ""
        lines.append(f"STEP {m.get('step')}: loss {m.get('loss', float('nan')):.4f}, "
                     f"grad_norm {m.get('grad_norm', float('nan')):.4g}; ce {ces}{peak}"
                     + (" (SKIPPED: non-finite)" if "nonfinite" in m else ""))
    return lines


def first_nonfinite(metrics: list[dict]) -> str | None:
    """The first step's first NaN/inf metric (with the trainer's own account of it when it wrote one)."""
    import math

    for m in metrics:
        bad = [k for k, v in m.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            return m.get("nonfinite") or f"step {m.get('step')}: non-finite {', '.join(f'{k}={m[k]}' for k in bad)}"
    return None


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


# ---------------------------------------------------------------- the driver
class Driver:
    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        self.commands: list[str] = []
        self.workdir = Path(args.workdir).resolve()
        self.logs = self.workdir / "logs"
        exe = shutil.which("manyinone")
        self.cli = [exe] if exe else [sys.executable, "-m", "manyinone"]
        if not exe:
            print(f"note: no `manyinone` on PATH; running `{sys.executable} -m manyinone` instead", flush=True)

    def display(self, cmd: list[str]) -> str:
        """The command as a user types it (`manyinone ...`, not the script's absolute path)."""
        shown = ["manyinone"] + cmd[len(self.cli):] if cmd[:len(self.cli)] == self.cli else cmd
        return shlex.join(shown)

    def record(self, step: str, command: str, wall: float | None, peak: PeakMemory | None, result: str, ok: bool,
               torch_peak_gib: float | None = None, **extra) -> None:
        """One table row. Memory: the step's own torch allocator peak (train: from its metrics), what
        nvidia-smi lists for its process, and the whole device (other processes on the GPU included)."""
        row = {"step": step, "command": command, "wall_s": wall, "result": result, "ok": ok,
               "torch_peak_gib": torch_peak_gib, "process_peak_gib": peak.process_peak_gib if peak else None,
               "device_peak_gib": peak.peak_gib if peak else None, **extra}
        self.rows.append(row)
        print(f"ROW | {step} | {'-' if wall is None else f'{wall:.1f}'} s | {self.memory(row)} | {result}", flush=True)
        if self.args.json:  # written after every step: a run cut short still leaves what it measured
            Path(self.args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.json).write_text(json.dumps({"args": vars(self.args), "commands": self.commands,
                                                        "rows": self.rows}, indent=2))

    def disk_ok(self, step: str, needs_gib: float) -> bool:
        free = free_gib(self.workdir)
        verdict = "ok" if free >= needs_gib * 1.05 + 0.5 else "NOT ENOUGH"
        print(f"disk before {step}: {free:.1f} GiB free at {self.workdir}; this step writes about "
              f"{needs_gib:.1f} GiB: {verdict}", flush=True)
        if verdict != "ok":
            self.record(step, "-", None, None, f"not run: {free:.1f} GiB free at {self.workdir}, needs about "
                        f"{needs_gib:.1f} GiB (free space or pass --workdir on a larger disk)", False)
        return verdict == "ok"

    def run(self, step: str, cmd: list[str], timeout: float,
            shown: str | None = None) -> tuple[bool, float, PeakMemory, str]:
        """One foreground command; its output goes to logs/<step>.log (tail printed on failure)."""
        shown = shown or self.display(cmd)
        self.commands.append(shown)
        print(f"\n$ {shown}", flush=True)
        log = self.logs / f"{step}.log"
        started = time.perf_counter()
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env())
            with PeakMemory(self.args.device, proc.pid) as peak:
                try:
                    rc = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    rc = None
                except BaseException:  # stopped ourselves (SIGTERM, Ctrl-C): stop the command we started too
                    proc.kill()
                    proc.wait()
                    raise
        wall = time.perf_counter() - started
        text = log.read_text(errors="replace")
        tail = "\n".join(line for line in text.splitlines()[-12:])
        why = "" if rc == 0 else (f"timed out after {timeout:.0f} s" if rc is None else f"exit {rc}")
        if rc != 0:
            print(f"FAILED ({why}); last lines of {log}:\n{tail}", flush=True)
        else:
            print(tail if step == "build" else "\n".join(text.splitlines()[-3:]), flush=True)
        return rc == 0, wall, peak, why

    def env(self) -> dict:
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        return env

    # ------------------------------------------------------------ the steps
    def main(self) -> int:
        """The steps in order; a SIGTERM (an outer `timeout`) still ends with the table of what ran."""
        def stop(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, stop)
        try:
            return self.steps()
        except KeyboardInterrupt as e:
            print(f"\nstopped ({e or 'Ctrl-C'}) after {len(self.rows)} step(s)", flush=True)
            self.table()
            return 130

    def steps(self) -> int:
        a = self.args
        from importlib.util import find_spec

        missing = [m for m in ("peft", "fastapi", "uvicorn") if find_spec(m) is None]
        if "peft" in missing:
            print("error: peft is not installed here; `--lora` needs it: pip install 'manyinone[lora]'", flush=True)
            return 2
        for path, what in ((a.tokenizer, "--tokenizer"), (a.data, "--data")):
            if not Path(path).exists():
                print(f"error: {what} {path!r} does not exist", flush=True)
                return 2
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        base, run, export = self.workdir / "base", self.workdir / "run", self.workdir / "export-0.5"
        for stale in (base, base.with_name("base.partial"), run, export):  # this script's own folders only
            shutil.rmtree(stale, ignore_errors=True)
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(a.tokenizer))
        shape = SHAPE_TINY if a.tiny else SHAPE_13B
        n = param_count(shape, vocab)
        bf16_gib = 2 * n / GIB
        print(f"model: {'tiny LLaMA' if a.tiny else 'LLaMA-2-13B shape'}, {n / 1e9:.3f}B parameters, "
              f"vocab_size {vocab} (the tokenizer's; LLaMA-2's own is 32000); bf16 weights {bf16_gib:.2f} GiB",
              flush=True)

        # 1. the base folder
        ok = self.disk_ok("build", bf16_gib)
        if ok:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--build-only", str(base), "--tokenizer", a.tokenizer,
                   "--device", a.device, "--max-shard-size", a.max_shard_size] + (["--tiny"] if a.tiny else [])
            ok, wall, peak, why = self.run("build", cmd, a.timeout_build, shown=shlex.join(
                ["python", "benchmarks/one_gpu_cli.py"] + cmd[2:]))
            shards = len(list(base.glob("*.safetensors")))
            self.record("build", self.commands[-1], wall, peak, f"{shards} shard(s), {size(base)}"
                        if ok else f"failed: {why}", ok)

        # 2. train (LoRA, depth exits), then drop the base
        if ok:
            run_gib = bf16_gib * (1 if a.device.startswith("cuda") else 2)  # merged run: bf16 on CUDA, fp32 on CPU
            ok = self.disk_ok("train", run_gib)
        if ok:
            cmd = self.cli + ["train", "--model", str(base), "--axes", "depth", "--lora", str(a.lora),
                              "--data", a.data, "--output", str(run), "--max-steps", str(a.steps),
                              "--batch-size", str(a.batch_size), "--set", f"max_length={a.max_length}", "--quiet"]
            cmd += ["--exits", a.exits] if a.exits else []
            cmd += ["--set", f"device={a.device}"] if a.device != "cuda" else []  # the CLI picks cuda itself
            ok, wall, peak, why = self.run("train", cmd, a.timeout_train)
            metrics = self.metrics(run)
            for line in step_lines(metrics):  # per step, so that a bad step shows where it went wrong
                print(line, flush=True)
            bad = first_nonfinite(metrics)
            if bad:
                print(f"FIRST NON-FINITE: {bad}", flush=True)
            torch_peak = max((m.get("peak_mem_gib", 0.0) for m in metrics), default=None) if metrics else None
            full = max((k for k in (metrics[0] if metrics else {}) if k.startswith("ce/depth=")),
                       key=lambda k: int(k.split("=")[1]), default="loss")
            losses = [m.get(full) for m in metrics]
            if bad:
                result = f"failed: {bad}"[:400]
            elif ok and metrics and None not in losses:
                result = f"{len(metrics)} steps, {full} {losses[0]:.3f} -> {losses[-1]:.3f}, run {size(run)}"
            else:
                result = f"failed: {why if not ok else 'no metrics.jsonl'}"
            ok = ok and bool(metrics) and not bad
            self.record("train", self.commands[-1], wall, peak, result, ok, torch_peak_gib=torch_peak, steps=metrics)
        if base.exists() and (ok or not a.keep_base):
            freed = folder_gib(base)
            shutil.rmtree(base)  # the merged run holds every weight now; the base is not needed again
            print(f"deleted the base folder {base} ({freed:.1f} GiB) after training, to leave disk for the export; "
                  f"{free_gib(self.workdir):.1f} GiB free now", flush=True)

        # 3. export budget 0.5 in bf16
        if ok:
            ok = self.disk_ok("export", bf16_gib * 0.6)
        if ok:
            cmd = self.cli + ["export", str(run), "--budget", "0.5", "--dtype", "bfloat16", "-o", str(export)]
            ok, wall, peak, why = self.run("export", cmd, a.timeout_export)
            spec = self.exported_spec(export)
            self.record("export", self.commands[-1], wall, peak, f"{spec}, {size(export)}"
                        if ok else f"failed: {why}", ok)

        # 4. serve it and ask once
        if ok and {"fastapi", "uvicorn"} & set(missing):
            self.record("serve", "-", None, None, f"not run: {', '.join(sorted(set(missing) - {'peft'}))} missing "
                        "(pip install 'manyinone[serve]')", False)
            ok = False
        if ok:
            ok = self.serve(export)
        self.table()
        return 0 if ok and all(r["ok"] for r in self.rows) else 1

    def serve(self, export: Path) -> bool:
        a = self.args
        port = free_port()
        cmd = self.cli + ["serve", str(export), "--dtype", "bfloat16", "--port", str(port)]
        cmd += ["--device", a.device] if a.device != "cuda" else []
        shown = self.display(cmd)
        self.commands.append(shown)
        print(f"\n$ {shown} &", flush=True)
        log = self.logs / "serve.log"
        started = time.perf_counter()
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env())
        ok, reply, ready_s, request_s, why = False, None, None, None, ""
        try:
            with PeakMemory(a.device, proc.pid) as peak:
                ready_s, why = wait_ready(proc, port, a.timeout_serve, started)
                if ready_s is not None:
                    body = {"model": export.name, "prompt": a.prompt, "max_tokens": a.max_tokens, "temperature": 0.0}
                    sent = time.perf_counter()
                    reply, why = post_json(f"http://127.0.0.1:{port}/v1/completions", body, a.timeout_request)
                    request_s = time.perf_counter() - sent
                    text = ((reply or {}).get("choices") or [{}])[0].get("text")
                    ok = isinstance(text, str) and text.strip() != ""
                    if reply is not None and not ok:
                        why = f"reply has no text: {json.dumps(reply)[:300]}"
                    if ok:
                        print(f"reply ({reply['usage']['completion_tokens']} tokens, finish_reason "
                              f"{reply['choices'][0]['finish_reason']}): {text!r}", flush=True)
        finally:
            stop_server(proc)
        wall = time.perf_counter() - started
        if not ok:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-12:])
            print(f"serve FAILED: {why}; last lines of {log}:\n{tail}", flush=True)
        result = (f"ready in {ready_s:.1f} s; 1 completion in {request_s:.1f} s, "
                  f"{reply['usage']['completion_tokens']} tokens, text {reply['choices'][0]['text'][:40]!r}; stopped"
                  if ok else f"failed: {why}")
        self.record("serve", shown + " &  (+ POST /v1/completions)", wall, peak, result, ok,
                    ready_s=ready_s, request_s=request_s, reply=reply)
        return ok

    @staticmethod
    def metrics(run: Path) -> list[dict]:
        path = run / "metrics.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if "loss" in r]

    @staticmethod
    def exported_spec(export: Path) -> str:
        """What budget 0.5 picked, from the export's index: its spec and share of the source's FLOPs."""
        try:
            spec = json.loads((export / "manyinone.json").read_text())["specs"][-1]
            label = ",".join(f"{k}={v}" for k, v in spec["spec"].items())
            return f"{label}, {spec['relative_to_source']['flops']:.2f} of the full FLOPs"
        except (OSError, ValueError, KeyError, IndexError):
            return "spec unknown (no readable manyinone.json)"

    def table(self) -> None:
        print("\ncommands run:")
        for c in self.commands:
            print(f"  {c}")
        title = "tiny LLaMA, CPU" if self.args.tiny else "LLaMA-2-13B shape, random bf16 weights, one GPU"
        gpu = self.args.device.startswith("cuda")
        print(f"\n### issue 15 commands: {title}\n")
        if gpu:
            print("memory GiB: torch = the step's own allocator peak (train: max_memory_allocated, from its metrics); "
                  "proc = what nvidia-smi lists for the step's process (context and allocator reserve included); "
                  "GPU = the whole device, other processes on it included\n")
        print(f"| step | command | wall s | {'torch / proc / GPU GiB' if gpu else 'resident GiB'} | result |")
        print("| --- | --- | --- | --- | --- |")
        for r in self.rows:
            wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.1f}"
            print(f"| {r['step']} | `{r['command']}` | {wall} | {self.memory(r)} | {r['result']} |")

    def memory(self, row: dict) -> str:
        if not self.args.device.startswith("cuda"):
            return gib(row.get("device_peak_gib"))
        return " / ".join(gib(row.get(k)) for k in ("torch_peak_gib", "process_peak_gib", "device_peak_gib"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, port: int, timeout: float, started: float) -> tuple[float | None, str]:
    """Seconds until GET /health answers, or None and why (the server exited, or the time ran out)."""
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            return None, f"the server exited with {proc.returncode} before answering /health"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - started, ""
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return None, f"no answer from /health within {timeout:.0f} s"


def post_json(url: str, body: dict, timeout: float) -> tuple[dict | None, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read()), ""
    except urllib.error.HTTPError as e:
        return None, f"HTTP {e.code}: {e.read()[:300]!r}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return None, f"request failed: {e}"


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server we started (by its own pid), SIGKILL it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print(f"server stopped (exit {proc.returncode})", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny LLaMA instead of the 13B shape (CPU check)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (adds --device cpu to the commands)")
    p.add_argument("--tokenizer", default="/root/smollm2-hf", help="HF folder whose tokenizer the model gets")
    p.add_argument("--data", default="/root/data/alpaca_2000.json")
    p.add_argument("--workdir", default="/root/one_gpu_cli", help="where base, run and export folders go")
    p.add_argument("--json", help="also write the rows here (after every step)")
    p.add_argument("--lora", type=int, default=16)
    p.add_argument("--exits", help="--exits for train (default: the CLI's own, 5 evenly spaced)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 6; --tiny 3)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8; --tiny 2")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-shard-size", default=None,
                   help="of the base folder (default 5GB; --tiny 4MB, so that it is sharded too)")
    p.add_argument("--prompt", default="Give three tips for staying healthy.")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--keep-base", action="store_true", help="keep the base folder when training fails")
    p.add_argument("--timeout-build", type=float, default=240)
    p.add_argument("--timeout-train", type=float, default=300)
    p.add_argument("--timeout-export", type=float, default=200)
    p.add_argument("--timeout-serve", type=float, default=150, help="seconds until /health answers")
    p.add_argument("--timeout-request", type=float, default=120)
    p.add_argument("--build-only", metavar="FOLDER", help=argparse.SUPPRESS)  # step 1's own process
    args = p.parse_args(argv)
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device {args.device!r}: allowed cpu, cuda or cuda:N")
    args.steps = args.steps or (3 if args.tiny else 6)
    args.batch_size = args.batch_size or (2 if args.tiny else 8)
    args.max_shard_size = args.max_shard_size or ("4MB" if args.tiny else "5GB")
    return args


if __name__ == "__main__":
    args = parse_args()
    if args.build_only:
        build_base(Path(args.build_only), args.tokenizer, args.tiny, args.device, args.max_shard_size)
        sys.exit(0)
    sys.exit(Driver(args).main())
