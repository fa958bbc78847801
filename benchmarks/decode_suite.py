"""The decode runtime against the baselines a user would pick, side by side in one run (issue 13).

Rows, batch 1 unless said, greedy, every generation forced to --new-tokens, decode tokens/s only
(prefill excluded; the first token's forward is the start of the clock for every method):
- SmolLM2 (--model, an HF folder): manyinone runtime eager (the model's modules, CUDA graphs), runtime
  fused (the whole step compiled, one CUDA graph), HF generate with a static cache + torch.compile,
  HF default generate;
- the LLaMA-2-7B shape with random bf16 weights: the same four, then half width (ffn/2, heads/2) and
  half depth served inside the runtime as sliced views of the full weights, the exported half-width
  model, and batches 16 and 64;
- kernels per decoder layer of one decode step (torch profiler: CUDA kernel launches / layers), eager
  and fused; fused vs eager greedy agreement.
HF rows are timed with a logits processor that synchronises at every step (HF's own loop already
syncs per step to check for stops). Rows run in priority order; once --time-budget seconds have
passed the rest are listed as skipped, so the run ends on time (--only "SmolLM2,b16" runs just the
rows whose "model bBATCH method" contains one of the words). The table is printed last.

    python benchmarks/decode.py --suite runtime --model /root/smollm2-hf          # H200, ~5 min
    python benchmarks/decode.py --suite runtime --tiny --device cpu               # CPU check of the script
"""

from __future__ import annotations

import collections
import gc
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

from manyinone.runtime import Runtime
from manyinone.runtime.stack import AUTOTUNE_GEMMS, compile_step

BANDWIDTH = 4.3e12  # bytes/s the H200 streams weights at in practice (the bound: 13.5 GB -> ~319 tok/s)
SEVEN_B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY_SEVEN_B = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
TINY_SMOL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_model(shape: dict, dtype: torch.dtype, device: torch.device):
    """A LLaMA of `shape` with random weights, built on the device (no host copy of 13 GB)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype)
    return model.eval()


def param_bytes(model) -> float:
    return float(sum(p.numel() * p.element_size() for p in model.parameters()))


class StepTimer:
    """A logits processor that records the time (device synchronised) at each generation step."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores

    def rate(self, batch: int) -> float:
        return batch * (len(self.times) - 1) / (self.times[-1] - self.times[0])


def hf_rate(model, prompts: list[list[int]], new: int, static: bool, compile_ok: bool) -> dict:
    """Decode tokens/s of HF generate (default dynamic cache, or a static cache + its torch.compile)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    device = next(model.parameters()).device

    class Timer(StepTimer, LogitsProcessor):
        pass

    ids = torch.tensor(prompts, device=device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if static:
        kw.update(cache_implementation="static")
        if not compile_ok:  # CPU: HF compiles on accelerators only unless told; keep the check quick
            kw.update(disable_compile=True)
    start = time.perf_counter()
    for _ in range(2 if static else 1):  # compile, then record its CUDA graphs
        model.generate(ids, logits_processor=LogitsProcessorList([Timer(device)]), **kw)
    warm = time.perf_counter() - start
    rates = []
    for _ in range(2):
        timer = Timer(device)
        model.generate(ids, logits_processor=LogitsProcessorList([timer]), **kw)
        rates.append(timer.rate(len(prompts)))
    return {"tok_s": max(rates), "warmup_s": warm}


def runtime_rate(rt: Runtime, prompts: list[list[int]], new: int, spec=None, repeats: int = 2) -> dict:
    """Decode tokens/s of `rt.generate` (all rows) after one warm-up that compiles and records every graph."""
    start = time.perf_counter()
    # A short warm-up compiles and records the step: every timed step reads the same live bucket
    # (the suite's cache is shorter than one bucket), so nothing is left to record later.
    rt.generate(prompts, max_new_tokens=min(new, 4), stop_ids=set(), spec=spec)
    sync(rt.device)
    warm = time.perf_counter() - start
    rates, tokens = [], None
    for _ in range(repeats):
        g = rt.generate(prompts, max_new_tokens=new, stop_ids=set(), spec=spec)
        rates.append(g.decode_tokens_per_s)
        tokens = g.tokens
    return {"tok_s": max(rates), "warmup_s": warm, "tokens": tokens}


def kernels_per_layer(rt: Runtime, prompt: list[int], spec=None) -> dict:
    """Kernel launches of one decode step divided by its layers (the step's compiled form if fused, run
    outside its CUDA graph so the profiler sees each kernel). On CPU: top-level aten ops instead."""
    from torch.profiler import ProfilerActivity, profile

    depth, plan = rt.target(None, spec)
    run = rt.runner(1)
    ids = torch.tensor([prompt], device=rt.device)
    pad = torch.zeros(1, dtype=torch.long, device=rt.device)
    with torch.no_grad():
        token = run.prefill(depth, ids, pad, plan).argmax(-1)  # [1, 1]
        slot = len(prompt)
        fn = run.step_fn(0, depth, True, run.live_for(slot + 1))
        args = (token, rt._slots[slot: slot + 1], pad)
        with rt.stack.sliced(plan):
            fn(*args)  # compiled already by the timed rows (same key); eager: warms caches
            sync(rt.device)
            cuda = rt.device.type == "cuda"
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                fn(*args)
                sync(rt.device)
    times: collections.Counter = collections.Counter()  # kernel -> device µs in the step (CUDA only)
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith(("Memcpy", "Memset"))]
        names = [e.name for e in kernels]
        for e in kernels:
            times[e.name[:60]] += e.time_range.elapsed_us()
    else:
        def top_level(e) -> bool:  # an aten op not called by another aten op
            parent = e.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            return parent is None

        names = [e.name for e in prof.events() if e.name.startswith("aten::") and top_level(e)]
    top = collections.Counter(n[:60] for n in names).most_common(8)
    # Where the step's device time goes: what a sliced plan spends that its exported model does not.
    return {"per_layer": len(names) / depth, "total": len(names), "unit": "CUDA kernels" if cuda else "aten ops",
            "top": top, "time_top": [(n, round(us, 1)) for n, us in times.most_common(8)],
            "device_us": round(sum(times.values()), 1)}


def mixed_batch_rate(rt: Runtime, requests: int, rows: int, new: int, prompt_len: int, fractions=(0.3, 0.5, 1.0)) -> dict:
    """Tokens/s of `requests` prompts at mixed depths (fractions of the layers) through one continuous batch
    of `rows` rows, against the same requests served one at a time; and how many answers are equal."""
    from manyinone.runtime.batching import Batcher, collect

    g = torch.Generator().manual_seed(7)
    vocab = rt.model.config.vocab_size
    prompts = [torch.randint(10, vocab - 1, (prompt_len - (i % 7),), generator=g).tolist() for i in range(requests)]
    specs = [{"depth": max(1, round(fractions[i % len(fractions)] * rt.num_layers))} for i in range(requests)]
    batcher = Batcher(rt, rows)
    warm = [batcher.submit(p, spec=s, max_new_tokens=4, stop_ids=set()) for p, s in zip(prompts[:rows], specs)]
    batcher.run_all()  # records the batch's graphs
    for p, s in zip(prompts[:3], specs):
        rt.generate([p], spec=s, max_new_tokens=4, stop_ids=set())
    sync(rt.device)
    start = time.perf_counter()
    reqs = [batcher.submit(p, spec=s, max_new_tokens=new, stop_ids=set()) for p, s in zip(prompts, specs)]
    batcher.run_all()
    sync(rt.device)
    batched_s = time.perf_counter() - start
    got = [collect(r)[0] for r in reqs]
    start = time.perf_counter()
    alone = [rt.generate([p], spec=s, max_new_tokens=new, stop_ids=set()).tokens[0] for p, s in zip(prompts, specs)]
    sync(rt.device)
    serial_s = time.perf_counter() - start
    del warm
    tokens = requests * new
    return {"tok_s": tokens / batched_s, "serial_tok_s": tokens / serial_s, "speedup": serial_s / batched_s,
            "equal": sum(a == b for a, b in zip(got, alone)), "requests": requests, "steps": batcher.steps}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of tokens before the first difference."""
    out = []
    for x, y in zip(a, b):
        n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        out.append(n / max(len(x), 1))
    return sum(out) / len(out)


class Suite:
    """Rows in priority order under one wall-clock budget; a failing row is recorded, never fatal."""

    def __init__(self, budget_s: float, only: str | None = None) -> None:
        self.start, self.budget_s = time.perf_counter(), budget_s
        self.only = [w.strip() for w in only.split(",")] if only else None
        self.rows: list[dict] = []

    def row(self, model: str, batch: int, method: str, fn, **extra) -> dict | None:
        row = {"model": model, "batch": batch, "method": method, **extra}
        if self.only and not any(w in f"{model} b{batch} {method}" for w in self.only):
            return None
        self.rows.append(row)
        if time.perf_counter() - self.start > self.budget_s:
            row["error"] = "skipped: time budget spent"
            return None
        try:
            row.update(fn())
        except Exception as exc:  # one broken row must not hide the others
            row["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
            traceback.print_exc(limit=4)
            return None
        print(f"[{time.perf_counter() - self.start:6.1f}s] {model} b{batch} {method}: "
              f"{row.get('tok_s', 0):.1f} tok/s (warm-up {row.get('warmup_s', 0):.1f}s)", flush=True)
        return row

    def get(self, model: str, batch: int, method: str) -> dict:
        return next((r for r in self.rows if (r["model"], r["batch"], r["method"]) == (model, batch, method)), {})


def run_suite(args) -> None:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = args.tiny
    new = 12 if tiny else args.new_tokens
    batches = (2, 4) if tiny else (16, 64)
    cuda = device.type == "cuda"
    # On CPU (a check of the script) the step is traced without code generation: seconds, not minutes.
    backend = "inductor" if cuda else "aot_eager"

    def fused_fn(fn, math_attention: bool = True, options: dict | None = None):
        return compile_step(fn, backend=backend, math_attention=math_attention, options=options)

    suite = Suite(args.time_budget, args.only)
    opts = dict(max_len=args.prompt_len + new + 16, max_cache_mib=1e6)
    print(f"decode suite on {torch.cuda.get_device_name() if cuda else 'cpu'}, {dtype}, torch {torch.__version__}, "
          f"{new} new tokens, prompts of {args.prompt_len} tokens", flush=True)

    def prompts_for(model, batch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(batch)
        vocab = model.config.vocab_size
        return torch.randint(10, vocab - 1, (batch, args.prompt_len), generator=g).tolist()

    class Subject:
        """One model with its eager and fused runtimes (one copy of the weights, the Flextron adapter)."""

        def __init__(self, name: str, model) -> None:
            from manyinone_flextron import LlamaFlextronAdapter

            self.name, self.model = name, model
            self.adapter = LlamaFlextronAdapter(model)
            self.eager = Runtime(model, adapter=self.adapter, graphs=cuda, **opts)
            self.fused = Runtime(model, adapter=self.adapter, graphs=cuda, compile_fn=fused_fn, **opts)
            self.p1 = prompts_for(model, 1)
            self.bound = BANDWIDTH / param_bytes(model) if cuda else None

        def core(self) -> None:
            """Fused and eager at batch 1, their kernels per layer, their greedy agreement."""
            fused = suite.row(self.name, 1, "runtime fused", lambda: runtime_rate(self.fused, self.p1, new),
                              bound_tok_s=self.bound)
            eager = suite.row(self.name, 1, "runtime eager", lambda: runtime_rate(self.eager, self.p1, new),
                              bound_tok_s=self.bound)
            suite.row(self.name, 1, "kernels", lambda: {"eager": kernels_per_layer(self.eager, self.p1[0]),
                                                       "fused": kernels_per_layer(self.fused, self.p1[0])})
            if fused and eager:
                fused["agreement_vs_eager"] = agreement(fused["tokens"], eager["tokens"])

        def sub(self, label: str, spec: dict) -> None:
            suite.row(self.name, 1, f"runtime fused {label}", lambda: runtime_rate(self.fused, self.p1, new, spec=spec))

        def sub_kernels(self, label: str, spec: dict) -> None:  # the sliced step's kernels and their device time
            suite.row(self.name, 1, f"{label} kernels", lambda: {"fused": kernels_per_layer(self.fused, self.p1[0], spec)})

        def on_exported(self, spec: dict, measure):
            """measure(runtime) on a fused runtime of the exported `spec` model, freed afterwards."""
            sub = self.adapter.extract(spec).eval()
            rt = Runtime(sub, graphs=cuda, compile_fn=fused_fn, **opts)
            try:
                return measure(rt)
            finally:
                del rt, sub
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()

        def exported(self, label: str, spec: dict) -> None:
            suite.row(self.name, 1, f"exported {label} fused",
                      lambda: self.on_exported(spec, lambda rt: runtime_rate(rt, self.p1, new)))

        def exported_kernels(self, label: str, spec: dict) -> None:
            suite.row(self.name, 1, f"exported {label} kernels",
                      lambda: self.on_exported(spec, lambda rt: {"fused": kernels_per_layer(rt, self.p1[0])}))

        def batch(self, batch: int, kind: str = "fused") -> None:
            pb = prompts_for(self.model, batch)
            rt = self.fused if kind == "fused" else self.eager
            suite.row(self.name, batch, f"runtime {kind}", lambda: runtime_rate(rt, pb, new, repeats=1 if kind == "eager" else 2))

        def hf(self) -> None:
            suite.row(self.name, 1, "HF static cache + torch.compile", lambda: hf_rate(self.model, self.p1, new, True, cuda))
            suite.row(self.name, 1, "HF default generate", lambda: hf_rate(self.model, self.p1, new, False, cuda))

        def mixed(self) -> None:  # the server's scheduler: requests at depths 0.3/0.5/1.0 in one batch
            count = 6 if tiny else 32
            suite.row(self.name, count, "continuous batch, mixed depths 0.3/0.5/1.0",
                      lambda: mixed_batch_rate(self.eager, count, count if not tiny else 3, min(new, 64), args.prompt_len))

        def autotuned(self) -> None:  # Inductor's Triton GEMMs where they measure faster than cuBLAS
            rt = Runtime(self.model, adapter=self.adapter, graphs=cuda, **opts,
                         compile_fn=lambda fn: fused_fn(fn, options=AUTOTUNE_GEMMS))
            row = suite.row(self.name, 1, "runtime fused, autotuned GEMMs", lambda: runtime_rate(rt, self.p1, new),
                            bound_tok_s=self.bound)
            suite.row(self.name, 1, "autotuned kernels", lambda: {"fused": kernels_per_layer(rt, self.p1[0])})
            eager = suite.get(self.name, 1, "runtime eager")
            if row and eager:
                row["agreement_vs_eager"] = agreement(row["tokens"], eager["tokens"])

        def sdpa(self) -> None:  # the attention choice, measured: SDPA's fused kernels instead of math codegen
            rt = Runtime(self.model, adapter=self.adapter, graphs=cuda, compile_fn=lambda fn: fused_fn(fn, False), **opts)
            suite.row(self.name, 1, "runtime fused, SDPA kernels", lambda: runtime_rate(rt, self.p1, new))

    # SmolLM2: the real model when given, else a tiny one of its layout; then the 7B shape, random weights.
    if args.model and not tiny:
        from transformers import AutoModelForCausalLM

        smol_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    else:
        smol_model = random_model(TINY_SMOL, dtype, device)
    smol = Subject("SmolLM2" if args.model and not tiny else "tiny-smol", smol_model)  # never a random model under the real name
    shape = TINY_SEVEN_B if tiny else SEVEN_B
    big = Subject("7B shape" if not tiny else "tiny-7b", random_model(shape, dtype, device))
    half_width = {"width": shape["intermediate_size"] // 2, "heads": shape["num_attention_heads"] // 2}
    # Most wanted first: the runtime rows, then the baselines (HF's torch.compile last of each kind, so its
    # CUDA-graph trees never precede our own captures), then the variants.
    smol.core()
    smol.hf()
    big.core()
    big.sub("half width", half_width)
    big.sub("half depth", {"depth": shape["num_hidden_layers"] // 2})
    smol.autotuned()
    big.autotuned()
    for b in batches:
        big.batch(b)
    big.exported("half width", half_width)
    big.sub_kernels("half width", half_width)
    big.exported_kernels("half width", half_width)
    smol.mixed()
    big.hf()
    smol.sdpa()
    big.sdpa()
    for b in batches:
        big.batch(b, "eager")
    print_suite(suite, args)


def print_suite(suite: Suite, args) -> None:
    for r in suite.rows:
        if r["method"].endswith("kernels") and "error" not in r:
            for kind in ("eager", "fused"):
                if kind in r:
                    print(f"{r['model']} {kind} step ({r['method']}), most launched: {r[kind]['top']}")
                    if r[kind].get("time_top"):
                        print(f"{r['model']} {kind} step ({r['method']}), {r[kind]['device_us']} µs on the device, "
                              f"most time: {r[kind]['time_top']}")
    print(f"\ntotal wall time {time.perf_counter() - suite.start:.0f}s\n")
    print("| model | batch | method | decode tok/s | vs HF static+compile | vs runtime full (same batch) | warm-up s | notes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in suite.rows:
        if r["method"].endswith("kernels"):
            continue
        hf = suite.get(r["model"], 1, "HF static cache + torch.compile").get("tok_s")
        base = suite.get(r["model"], r["batch"], "runtime fused").get("tok_s")
        if "error" in r:
            print(f"| {r['model']} | {r['batch']} | {r['method']} | - | - | - | - | {r['error']} |")
            continue
        rate = r["tok_s"]
        notes = []
        if r.get("bound_tok_s"):
            notes.append(f"{rate / r['bound_tok_s']:.0%} of the {BANDWIDTH / 1e12:.1f} TB/s weight-streaming bound "
                         f"({r['bound_tok_s']:.0f} tok/s)")
        if "agreement_vs_eager" in r:
            notes.append(f"greedy prefix agreement with eager {r['agreement_vs_eager']:.3f}")
        if "speedup" in r:
            notes.append(f"{r['speedup']:.2f}x of serving them one at a time ({r['serial_tok_s']:.0f} tok/s); "
                         f"{r['equal']}/{r['requests']} answers equal to serving alone; {r['steps']} batch steps")
        exported = suite.get(r["model"], 1, "exported half width fused").get("tok_s")
        if r["method"] == "runtime fused half width" and exported:
            notes.append(f"{rate / exported:.3f}x of the exported half-width model")
        vs_hf = f"{rate / hf:.2f}x" if hf and r["batch"] == 1 else "-"
        vs_full = f"{rate / base:.2f}x" if base else "-"
        print(f"| {r['model']} | {r['batch']} | {r['method']} | {rate:.1f} | {vs_hf} | {vs_full} | "
              f"{r.get('warmup_s', 0):.1f} | {'; '.join(notes)} |")
    for r in suite.rows:
        if not r["method"].endswith("kernels"):
            continue
        if "error" in r:
            print(f"| {r['model']} | 1 | {r['method']} per layer | - | - | - | - | {r['error']} |")
            continue
        f = r["fused"]
        if "eager" not in r:  # a variant's fused step alone
            print(f"| {r['model']} | 1 | {f['unit']} per layer, fused, {r['method'][: -len(' kernels')]} | "
                  f"{f['per_layer']:.1f} | | | | per step {f['total']}"
                  + (f", {f['device_us']:.0f} µs on the device" if f.get("time_top") else "") + " |")
            continue
        e = r["eager"]
        print(f"| {r['model']} | 1 | {e['unit']} per layer, eager -> fused | {e['per_layer']:.1f} -> {f['per_layer']:.1f} "
              f"| | | | per step {e['total']} -> {f['total']} |")
    if args.out:
        rows = [{k: v for k, v in r.items() if k != "tokens"} for r in suite.rows]
        Path(args.out).write_text(json.dumps(rows, indent=1, default=str))
