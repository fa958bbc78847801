"""Self-speculative decoding sweeps on one checkpoint, side by side in one run:

- tokens/s against draft exit and draft length (batch 1), acceptance and tokens per round per exit;
- the tuned policy (fixed pair, confidence threshold or the adaptive per-round policy: `runtime.tune`);
- speed-up over the runtime's own plain decoding at batch 1, 4 and 16 (each row at its own position);
- HF `generate(assistant_early_exit=n)` beside HF's own plain generate;
- output equality with plain greedy: in the run's dtype and in float32.

The policy is tuned on `--tune-prompts` prompts and timed on the next ones, never on those it was tuned
on: batch 1 on `--eval-prompts` prompts, each decoded alone (total tokens over total decode seconds),
batch b on b of them together.

Greedy, every generation forced to `--new-tokens` (EOS does not stop it); decode time excludes prefill and
is measured after an identical untimed run of the same setting (every step compiled and its CUDA graph
recorded), with device synchronisation. Compile / warm-up seconds are reported apart from decode speed,
and so are compiles during timed runs (0 unless something recompiled).

Runtime kind (`--fused/--no-fused`, default fused): the plain baseline and every speculative row run
the same kind. Fused on CUDA: `Runtime(fused=True)` (each decode step compiled whole by torch.compile /
Inductor and recorded as one CUDA graph); every verify pass is padded to one width (`Runtime.verify_width`:
the longest draft tried), so each exit compiles one draft and one verify step, whatever the lengths swept.
Fused on CPU (`--tiny`): the same steps traced by torch.compile's aot_eager backend (no code generation).
--no-fused: CUDA graphs of eager steps (CUDA), plain eager steps (CPU).

Prints a markdown table last, writes a PNG plot and a JSON file.

    python benchmarks/speculative.py --ckpt /root/quality/manyinone --prompts /root/data/alpaca_2000.json  # GPU
    python benchmarks/speculative.py --ckpt /root/smollm2-hf --exits 6,12,18,24 --prompts /root/data/alpaca_2000.json
    python benchmarks/speculative.py --tiny                                                       # CPU, tiny model
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from manyinone.core.kinds import EXIT_HEAD_KINDS
from manyinone.io.checkpoint import build_index, is_checkpoint
from manyinone.runtime import Runtime
from manyinone.runtime.draft_policy import best_length
from manyinone.runtime.stack import compile_step
from manyinone.runtime.tune import autotune, instruction_prompts, store_choice

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import DTYPES, smoke_checkpoint, sync  # noqa: E402  (same folder: the plain decode benchmark)


def compile_fn_for(fused: bool, device: str):
    """The runtime's step compiler: Inductor (what fused=True uses) on CUDA, aot_eager on CPU (traces the
    same steps without generating code), None unfused."""
    if not fused:
        return None
    if device == "cuda":
        return compile_step
    return lambda fn: compile_step(fn, backend="aot_eager")


def kind_of(fused: bool, device: str, graphs: bool) -> str:
    if fused:
        return ("fused: torch.compile (Inductor) + CUDA graphs" if device == "cuda"
                else "fused: torch.compile aot_eager trace (no codegen; CPU)")
    return "unfused: CUDA graphs of eager steps" if graphs else "unfused: eager steps"


def open_runtime(path: str, exits: str | None, dtype: torch.dtype, device: str, max_len: int, graphs: bool,
                 compile_fn=None):
    """(Runtime, HF model, is a manyinone checkpoint): a checkpoint with its exits (and exit heads), or a
    plain HF folder given exits to draft from (shared norm and head, the same index a checkpoint has).
    `compile_fn`: see `compile_fn_for` (None: unfused)."""
    if is_checkpoint(Path(path)):
        from manyinone.io.api import open_checkpoint

        nested = open_checkpoint(path, dtype=dtype, device=device)
        return Runtime.from_nested(nested, max_len=max_len, graphs=graphs, compile_fn=compile_fn), nested.model, True
    from manyinone.core.registry import adapter_for
    from manyinone.io.loading import load_pretrained

    model, tokenizer = load_pretrained(path, dtype=dtype)
    model = model.to(device).eval()
    adapter = adapter_for(model)
    layers = model.config.num_hidden_layers
    depths = sorted({int(e) for e in (exits or "").split(",") if e.strip()} | {layers}) if exits else \
        sorted(set(range(layers // 5 or 1, layers + 1, layers // 5 or 1)) | {layers})
    index = build_index(adapter, adapter.space({"depth": depths}), train={"template": "alpaca"})
    return (Runtime(model, tokenizer, index, max_len=max_len, graphs=graphs, adapter=adapter, compile_fn=compile_fn),
            model, False)


def batch_rate(rt: Runtime, rows: list[list[int]], new: int, serial: bool = False, **kwargs) -> dict:
    """Decode tokens/s of all rows together, or with `serial` of each row alone at batch 1, one after
    another (total tokens over total decode seconds); each after an identical untimed run, whose seconds
    and compile seconds are reported apart. Plus speculation stats and compiles during the timed runs
    (should be 0)."""
    groups = [[row] for row in rows] if serial else [rows]
    log = rt.compile_log
    compile_s, start = log.seconds, time.perf_counter()
    for group in groups:
        rt.generate(group, max_new_tokens=new, stop_ids=set(), **kwargs)
    warmup_s, compile_s = time.perf_counter() - start, log.seconds - compile_s
    before = log.compiles
    runs = [rt.generate(group, max_new_tokens=new, stop_ids=set(), **kwargs) for group in groups]
    decoded = [sum(len(t) - 1 for t in g.tokens) for g in runs]  # the first token comes from the prefill
    seconds = sum(n / g.decode_tokens_per_s for n, g in zip(decoded, runs) if g.decode_tokens_per_s)
    out = {"tok_s": sum(decoded) / seconds if seconds else 0.0, "tokens": [t for g in runs for t in g.tokens],
           "warmup_s": warmup_s, "compile_s": compile_s, "timed_compiles": log.compiles - before}
    if kwargs.get("speculative"):
        total = {key: sum(g.stats.get(key, 0) for g in runs) for key in ("accepted", "drafted", "rounds", "plain_steps")}
        out["acceptance"] = total["accepted"] / max(total["drafted"], 1)
        steps = total["rounds"] + total["plain_steps"]  # a plain step is a round of one token
        out["tokens_per_round"] = sum(decoded) / max(steps, 1) / len(groups[0])
        out["plain_steps"] = total["plain_steps"] / max(steps, 1)
        exits: dict = {}
        for g in runs:
            for e, v in (g.stats.get("exits") or {}).items():
                exits[e] = [a + b for a, b in zip(exits.get(e, [0, 0, 0]), v)]
        out["exits"] = exits
    return out


def hf_rate(model, prompt: list[int], new: int, **kwargs) -> float:
    """HF generate decode tokens/s at batch 1: (new - 1) / (time(new tokens) - time(1 token))."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)

    def timed(n):
        sync(device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs)
        sync(device)
        return time.perf_counter() - start

    timed(4)  # warm-up
    one, many = timed(1), timed(new)
    return (new - 1) / max(many - one, 1e-9)


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, float]:
    """(rows identical, mean fraction of tokens before the first difference)."""
    prefix = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y))) / max(len(x), 1)
              for x, y in zip(a, b)]
    return sum(x == y for x, y in zip(a, b)), sum(prefix) / max(len(prefix), 1)


DEADLINE = [float("inf")]  # perf_counter() after which the remaining sections are skipped (--time-budget)


class Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): the section running is given up, the rest skipped, the tables print.
    A BaseException, as KeyboardInterrupt is, so that no library's `except Exception` swallows it."""


def interrupt(signum, frame):
    DEADLINE[0] = float("-inf")
    raise Interrupted(f"interrupted by signal {signum}")


def guarded(name: str, fn, results: dict, errors: dict, always: bool = False):
    """Run one measurement; a failure is recorded and reported instead of ending the benchmark, and past
    the time budget a section is skipped (unless `always`), so the tables always print."""
    stopped = DEADLINE[0] == float("-inf")  # interrupted: nothing more runs
    if (stopped or not always) and time.perf_counter() > DEADLINE[0]:
        errors[name] = "skipped: interrupted" if stopped else "skipped: over --time-budget"
        return None
    try:
        results[name] = fn()
    except (Exception, Interrupted) as exc:  # report and go on: one broken section must not hide the others
        errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        traceback.print_exc(limit=4)
    return results.get(name)


def settings_of(choice: dict) -> dict:
    """`Runtime.generate` keywords that replay a tuned choice."""
    if choice.get("adaptive"):
        return {"adaptive_draft": True, "draft_tokens": choice["draft_tokens"], "draft_threshold": choice.get("threshold")}
    return {"draft_depth": choice["draft_depth"], "draft_tokens": choice["draft_tokens"],
            "draft_threshold": choice.get("threshold")}


def label_of_trial(t: dict) -> str:
    """A skipped sweep setting (autotune's trial keywords or an adaptive policy) in a few words."""
    if t.get("adaptive"):
        return f"adaptive, k<={t.get('draft_tokens')}" + (f", threshold {t['threshold']}" if t.get("threshold") else "")
    return f"exit {t['draft_depth']}, k={t['draft_tokens']}" + (
        f", threshold {t['draft_threshold']}" if t.get("draft_threshold") else "")


def label_of(settings: dict) -> str:
    if settings.get("adaptive_draft"):
        head = "adaptive"
    else:
        head = f"exit {settings['draft_depth']}"
    t = settings.get("draft_threshold")
    return f"{head}, k<={settings['draft_tokens']}" + (f", threshold {t}" if t else "")


def with_policy(rt: Runtime, choice: dict):
    """Let `rt` serve `choice` as if the checkpoint stored it (the adaptive policy reads its exit stats there)."""
    import copy

    index = copy.deepcopy(rt.index)
    index.setdefault("runtime", {})["speculative"] = {k: v for k, v in choice.items() if k != "trials"}
    rt.index = index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="manyinone checkpoint folder, or a plain HF folder (then give --exits)")
    parser.add_argument("--exits", default=None, help="draft exits of a plain HF model, e.g. 6,12,18,24")
    parser.add_argument("--prompts", help="Alpaca-style .json of instructions")
    parser.add_argument("--rows", default="1800:2000", help="held-out record slice")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--tune-prompts", type=int, default=2, help="prompts per batch-1 sweep setting")
    parser.add_argument("--eval-prompts", type=int, default=8,
                        help="prompts timed at batch 1, each alone, after the tune prompts (never tuned on)")
    parser.add_argument("--lengths", default="1,2,3,4",
                        help="draft lengths swept (thresholds and the adaptive policy draft up to twice the longest)")
    parser.add_argument("--thresholds", default="0.4,0.7", help="confidence thresholds tried with a longer draft")
    parser.add_argument("--batches", default="1,4", help="batch sizes (each one compiles its own fused steps)")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                        help="compiled decode steps for the plain baseline and every speculative row (default; "
                             "aot_eager on CPU); --no-fused: CUDA graphs of eager steps")
    parser.add_argument("--sweep-share", type=float, default=0.55,
                        help="share of --time-budget the batch-1 sweep may start settings in (compiles dominate)")
    parser.add_argument("--float32-kind", choices=["unfused", "same"], default="unfused",
                        help="runtime of the float32 equality check: unfused (quick) or the run's own kind "
                             "(fused: compiles every step again in float32)")
    parser.add_argument("--hf-exits", default=None, help="HF assistant_early_exit values (default: tuned exit, +6)")
    parser.add_argument("--hf-tokens", type=int, default=64, help="new tokens for the slow HF baselines; 0 skips them")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--no-float32-check", action="store_true")
    parser.add_argument("--store", action="store_true", help="write the tuned policy into the checkpoint's index")
    parser.add_argument("--no-graphs", action="store_true", help="eager decode steps (no CUDA graphs)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model on CPU, few tokens: checks the script")
    parser.add_argument("--tiny-exit-heads", default=None, choices=list(EXIT_HEAD_KINDS.names()),
                        help="with --tiny: the tiny checkpoint gets per-exit heads of this kind (drafts exit through them)")
    parser.add_argument("--out", default="speculative_sweep", help="prefix of the .json and .png written")
    parser.add_argument("--time-budget", type=float, default=200.0,
                        help="seconds after loading; sections not started by then are skipped (tables still print)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, interrupt)

    if args.tiny:
        torch.set_num_threads(1)
        args.ckpt = str(smoke_checkpoint(Path(tempfile.mkdtemp()) / "tiny", exit_heads=args.tiny_exit_heads))
        args.prompts, args.rows, args.new_tokens, args.hf_tokens = "demo", None, 16, 8
        args.lengths, args.thresholds, args.batches, args.dtype = "1,2,4", "0.05", "1,4", "float32"
    if not args.ckpt or not args.prompts:
        parser.error("--ckpt and --prompts are required (or --tiny)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    graphs = device == "cuda" and not args.no_graphs
    compile_fn = compile_fn_for(args.fused, device)
    kind = kind_of(args.fused, device, graphs)
    longest = min(max(int(x) for x in args.lengths.split(",")) * 2, 16)
    dtype = DTYPES[args.dtype]
    lengths = tuple(int(x) for x in args.lengths.split(","))
    thresholds = tuple(float(x) for x in args.thresholds.split(",") if x.strip())
    batches = [int(x) for x in args.batches.split(",")]
    results: dict = {}
    errors: dict = {}

    probe, _, _ = open_runtime(args.ckpt, args.exits, torch.float32, "cpu", 8, False)  # for the prompts only
    # The policy is tuned on the first prompts and timed on the ones after them, so no figure is
    # measured on a prompt it was chosen on.
    prompts = instruction_prompts(probe, args.prompts, args.rows,
                                  args.tune_prompts + max(batches + [args.eval_prompts, 4]))
    tune_prompts, prompts = prompts[: args.tune_prompts], prompts[args.tune_prompts:]
    while len(prompts) < max(batches + [args.eval_prompts]):  # a small data slice: reuse prompts to fill it
        prompts = prompts + prompts
    del probe
    max_len = max(len(p) for p in tune_prompts + prompts) + args.new_tokens + 32
    rt, hf_model, checkpoint = open_runtime(args.ckpt, args.exits, dtype, device, max_len, graphs, compile_fn)
    if args.fused:  # one compiled verify step per exit serves every draft length, thresholds and adaptive
        rt.verify_width = longest
    depth = rt.depth_for(None)
    results["runtime"] = {"kind": kind, "fused": args.fused, "verify_width": rt.verify_width}
    print(f"{args.ckpt}: {rt.num_layers} layers, exits {rt.exits()}, {'checkpoint' if checkpoint else 'plain HF'}"
          f"{' with exit heads' if rt.stack.exit_logits else ''}; {args.dtype} on "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; runtime {kind}"
          f"{f', verify width {rt.verify_width}' if rt.verify_width else ''}; {args.new_tokens} new tokens", flush=True)

    started = time.perf_counter()
    DEADLINE[0] = started + args.time_budget
    sweep_deadline = started + args.sweep_share * args.time_budget
    progress: list[dict] = []  # what the sweep timed so far: printed if it is interrupted
    choice = guarded("sweep", lambda: autotune(rt, tune_prompts, args.new_tokens,
                                               draft_lengths=lengths, thresholds=thresholds,
                                               deadline=sweep_deadline, progress=progress), results, errors)
    if choice is None and progress:
        results["sweep (partial)"] = progress
    print(f"sweep done in {time.perf_counter() - started:.0f} s ({rt.compile_log.compiles} compiled steps, "
          f"{rt.compile_log.seconds:.0f} s compiling)", flush=True)
    if choice and args.store and checkpoint:
        guarded("store", lambda: str(store_choice(args.ckpt, choice)), results, errors)
    policies = {}
    if choice:
        with_policy(rt, choice)  # the adaptive policy starts from the measured per-exit costs and acceptance
        fixed = [t for t in choice["trials"] if not t.get("adaptive") and "draft_threshold" not in t]
        best_fixed = max(fixed, key=lambda t: t["tokens_per_s"])
        policies["best fixed"] = {"draft_depth": best_fixed["draft_depth"], "draft_tokens": best_fixed["draft_tokens"]}
        policies["tuned"] = settings_of(choice)
        if len(choice["exits"]) > 1 and not choice.get("adaptive"):
            policies["adaptive"] = {"adaptive_draft": True, "draft_tokens": longest}

    def float32_equality():
        same = args.float32_kind == "same"
        rt32, _, _ = open_runtime(args.ckpt, args.exits, torch.float32, device, max_len, graphs,
                                  compile_fn if same else None)
        rt32.verify_width = rt.verify_width if same else None
        with_policy(rt32, choice)
        rows = prompts[:4]
        plain = [rt32.generate([p], max_new_tokens=args.new_tokens, stop_ids=set()).tokens[0] for p in rows]
        out = {}
        for name, settings in policies.items():
            one = [rt32.generate([p], max_new_tokens=args.new_tokens, stop_ids=set(), speculative=True,
                                 **settings).tokens[0] for p in rows]
            batched = rt32.generate(rows, max_new_tokens=args.new_tokens, stop_ids=set(), speculative=True,
                                    **settings).tokens
            out[name] = {"batch 1": agreement(one, plain), f"batch {len(rows)}": agreement(batched, plain)}
        return out

    want_f32 = bool(choice) and dtype != torch.float32 and not args.no_float32_check

    def check_float32() -> None:  # quick when unfused: before the larger batches' compiles, else after them
        if want_f32 and "float32 equality" not in results and "float32 equality" not in errors:
            guarded("float32 equality", float32_equality, results, errors)

    ready: dict[int, set] = {}  # batch -> draft exits whose steps that batch has compiled

    def steps_needed(b: int, settings: dict | None) -> int:
        """Compiled steps a section at a new batch size needs: plain 1, a fixed draft 2 (draft, verify; 0
        if an earlier section compiled its exit), the adaptive policy a draft and a verify step per exit
        not compiled yet, plus a plain one."""
        if settings is None:
            return 1
        if settings.get("adaptive_draft"):
            return 2 * len({e["exit"] for e in choice["exits"]} - ready.get(b, set())) + 1
        return 0 if settings["draft_depth"] in ready.get(b, set()) else 2

    def too_long(b: int, name: str, settings: dict | None) -> bool:
        """Whether a larger batch's section would compile past --time-budget, at the mean compile time so
        far (a section started in time may still take minutes of compiling; better to skip it)."""
        log = rt.compile_log
        if not args.fused or not log.compiles:
            return False
        estimate = steps_needed(b, settings) * log.seconds / log.compiles
        if time.perf_counter() + estimate <= DEADLINE[0]:
            return False
        errors[name] = f"skipped: about {estimate:.0f} s of compiling would end past --time-budget"
        return True

    for b in batches:
        if b > 1 and args.float32_kind == "unfused":
            check_float32()
        rows = prompts[: args.eval_prompts] if b == 1 else prompts[:b]  # batch 1: each of them alone
        if b > 1 and too_long(b, f"plain b{b}", None):
            continue
        # Batch 1 reuses the sweep's compiled steps (seconds of decoding): it runs even past the budget.
        plain = guarded(f"plain b{b}", lambda: batch_rate(rt, rows, args.new_tokens, serial=b == 1), results, errors,
                        b == 1)
        for name, settings in policies.items():
            if b > 1 and name == "adaptive":  # its own compiles at every batch size: batch 1 shows it
                continue
            if b > 1 and too_long(b, f"{name} b{b}", settings):
                continue
            ready.setdefault(b, set()).update({e["exit"] for e in choice["exits"]} if settings.get("adaptive_draft")
                                              else {settings["draft_depth"]})
            spec = guarded(f"{name} b{b}", lambda s=settings: batch_rate(rt, rows, args.new_tokens, serial=b == 1,
                                                                        speculative=True, **s), results, errors, b == 1)
            if spec and plain:
                spec["speedup"] = spec["tok_s"] / plain["tok_s"] if plain["tok_s"] else 0.0
                spec["same"] = agreement(spec["tokens"], plain["tokens"])
        print(f"batch {b} done at {time.perf_counter() - started:.0f} s", flush=True)

    check_float32()

    if args.hf_tokens and choice:
        tuned_exit = choice["draft_depth"]
        hf_exits = [int(x) for x in args.hf_exits.split(",")] if args.hf_exits else \
            sorted({tuned_exit, min(tuned_exit + 6, depth - 1)})
        p0 = prompts[0]
        guarded("HF generate", lambda: hf_rate(hf_model, p0, args.hf_tokens), results, errors)
        for n in hf_exits:
            guarded(f"HF assistant_early_exit={n}", lambda n=n: hf_rate(hf_model, p0, args.hf_tokens,
                                                                       assistant_early_exit=n), results, errors)
    print(f"all done in {time.perf_counter() - started:.0f} s", flush=True)

    results["compiles"] = {"steps": rt.compile_log.compiles, "seconds": rt.compile_log.seconds}
    report = {"args": vars(args), "results": results, "errors": errors, "policies": policies}
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=1, default=str))
    try:  # never skipped: the plot shows whatever was measured
        plot(results, policies, batches, f"{args.out}.png", args)
    except Exception as exc:
        errors["plot"] = f"{type(exc).__name__}: {exc}"
    print_tables(results, errors, policies, batches, args)


def plot(results: dict, policies: dict, batches: list[int], path: str, args) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    sweep = results.get("sweep") or {}
    fixed = [t for t in sweep.get("trials", []) if not t.get("adaptive") and "draft_threshold" not in t]
    ax = axes[0]
    for n in sorted({t["draft_depth"] for t in fixed}):
        mine = sorted((t for t in fixed if t["draft_depth"] == n), key=lambda t: t["draft_tokens"])
        ax.plot([t["draft_tokens"] for t in mine], [t["tokens_per_s"] for t in mine], marker="o", label=f"exit {n}")
    if sweep.get("baseline_tokens_per_s"):
        ax.axhline(sweep["baseline_tokens_per_s"], color="k", ls="--", label="plain")
    ax.set(xlabel="draft length k", ylabel="decode tokens/s (batch 1)", title="tokens/s vs draft exit and length")
    ax.legend(fontsize=8)
    ax = axes[1]
    exits = sweep.get("exits", [])
    ax.bar([str(e["exit"]) for e in exits], [e["acceptance"] for e in exits], color="tab:green")
    for i, e in enumerate(exits):
        ax.text(i, e["acceptance"], f"c={e['cost']:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set(xlabel="draft exit", ylabel="per-token acceptance alpha", title="acceptance per exit (c: measured step cost)",
           ylim=(0, 1))
    ax = axes[2]
    width = 0.8 / max(len(policies), 1)
    for j, name in enumerate(policies):
        vals = [(results.get(f"{name} b{b}") or {}).get("speedup", 0) for b in batches]
        ax.bar([i + j * width for i in range(len(batches))], vals, width, label=name)
    hf = results.get("HF generate")
    if hf:
        for name, value in results.items():
            if name.startswith("HF assistant_early_exit") and value:
                ax.axhline(value / hf, ls=":", color="tab:red", label=f"{name.replace('HF ', 'HF ')} (vs HF)")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + width * (len(policies) - 1) / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set(ylabel="speed-up over plain decoding", title="self-speculation speed-up")
    ax.legend(fontsize=8)
    fig.suptitle(f"{Path(args.ckpt).name}: {args.dtype}, {args.new_tokens} new tokens, "
                 f"{(results.get('runtime') or {}).get('kind', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def runtime_line(results: dict) -> str:
    info = results.get("runtime") or {}
    width = f"; every verify pass padded to {info['verify_width']} tokens" if info.get("verify_width") else ""
    return f"runtime {info.get('kind', '?')} (plain and speculative alike){width}"


def print_tables(results: dict, errors: dict, policies: dict, batches: list[int], args) -> None:
    sweep = results.get("sweep") or {}
    print(f"\n{runtime_line(results)}")
    if sweep:
        base = sweep["baseline_tokens_per_s"]
        warm = sweep.get("baseline_warmup") or {}
        print(f"\nBatch-1 sweep, {runtime_line(results)} (plain greedy {base:.1f} tok/s; its warm-up "
              f"{warm.get('warmup_s', 0):.1f} s, {warm.get('compile_s', 0):.1f} s of it compiling):\n")
        print("| policy | tok/s | vs plain | accepted / drafted | tokens/round | warm-up s (compiling) | "
              "compiles while timed |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for t in sweep["trials"]:
            name = "adaptive" if t.get("adaptive") else f"exit {t['draft_depth']}"
            name += f", k={t['draft_tokens']}" + (f", threshold {t['draft_threshold']}" if t.get("draft_threshold") else "")
            print(f"| {name} | {t['tokens_per_s']:.1f} | {t['tokens_per_s'] / base:.2f}x | {t['acceptance']:.3f} | "
                  f"{t['tokens_per_round']:.2f} | {t.get('warmup_s', 0):.1f} ({t.get('compile_s', 0):.1f}) | "
                  f"{t.get('timed_compiles', 0)} |")
        if sweep.get("skipped"):
            print(f"\nskipped past the sweep's share of --time-budget: {len(sweep['skipped'])} settings "
                  f"({', '.join(label_of_trial(t) for t in sweep['skipped'])})")
        print("\n| exit | measured step cost c | per-token acceptance alpha (kept / (kept + rejections)) | "
              "best expected speed-up, k |\n| --- | --- | --- | --- |")
        for e in sweep["exits"]:
            k, gain = best_length(e["acceptance"], e["cost"], 16)
            print(f"| {e['exit']} | {e['cost']:.3f} | {e['acceptance']:.3f} | {gain:.2f}x, k={k} |")
        print(f"\ntuned: {label_of(settings_of(sweep))} ({sweep['speedup']:.2f}x when tuned); stored={args.store}")
    print(f"\n{runtime_line(results)}; {args.dtype}, {args.new_tokens} new tokens\n")
    print("| batch | policy | tok/s (all rows) | speed-up | accepted / drafted | tokens/round/row | plain steps | "
          "same as plain (rows, prefix) | warm-up s (compiling) | compiles while timed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def cost(r: dict) -> str:
        return f"{r.get('warmup_s', 0):.1f} ({r.get('compile_s', 0):.1f}) | {r.get('timed_compiles', 0)}"

    for b in batches:
        plain = results.get(f"plain b{b}")
        batch = f"1 ({len(plain['tokens'])} prompts, each alone)" if plain and b == 1 else str(b)
        if plain:
            print(f"| {batch} | plain | {plain['tok_s']:.1f} | 1.00x | | | | | {cost(plain)} |")
        for name, settings in policies.items():
            r = results.get(f"{name} b{b}")
            if r and "speedup" in r:
                same, prefix = r["same"]
                print(f"| {batch} | {name}: {label_of(settings)} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | "
                      f"{r['acceptance']:.3f} | {r['tokens_per_round']:.2f} | {r['plain_steps']:.0%} | "
                      f"{same}/{len(r['tokens'])}, {prefix:.3f} | {cost(r)} |")
    f32 = results.get("float32 equality")
    if f32:
        for name, rows in f32.items():
            text = "; ".join(f"{k}: {same} identical, prefix {prefix:.3f}" for k, (same, prefix) in rows.items())
            print(f"| float32 ({args.float32_kind} runtime) | {name} | | | | | | {text} | | |")
    total = results.get("compiles") or {}
    print(f"\ncompiled steps in all: {total.get('steps', 0)}, {total.get('seconds', 0):.1f} s of first calls "
          "(compile + CUDA-graph capture), not in any tok/s above")
    hf = results.get("HF generate")
    if hf:
        print(f"\n| HF baseline (batch 1, {args.hf_tokens} tokens) | tok/s | vs HF generate |\n| --- | --- | --- |")
        print(f"| HF generate | {hf:.1f} | 1.00x |")
        for name, value in results.items():
            if name.startswith("HF assistant_early_exit") and value:
                print(f"| {name} | {value:.1f} | {value / hf:.2f}x |")
    partial = results.get("sweep (partial)")
    if partial:
        print("\nThe sweep did not finish; what it timed (batch 1):\n\n| setting | tok/s | accepted / drafted | "
              "warm-up s (compiling) |\n| --- | --- | --- | --- |")
        for t in partial:
            name = "plain" if t.get("plain") else label_of_trial(t)
            print(f"| {name} | {t['tokens_per_s']:.1f} | {t.get('acceptance', 0):.3f} | {t.get('warmup_s', 0):.1f} "
                  f"({t.get('compile_s', 0):.1f}) |")
    for name, err in errors.items():
        print(f"| {name} | {'SKIPPED' if err.startswith('skipped') else 'FAILED'} | {err} |")
    print(f"\nwrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
