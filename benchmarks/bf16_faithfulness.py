"""Why self-speculative and plain greedy decoding diverge in bf16, measured, with the knobs that move it.

Three suspects, each tested on its own:
1. the cache dtype: run with a float32 KV cache (values cast back for attention);
   and the logits' dtype: the head's matmul in float32 at the serving depth (bf16 logits round to 1/8 near 20);
2. the verification batch shape: verify the drafted positions one at a time (q = 1, the kernels plain
   decoding runs) instead of as one block of k;
3. the accumulation order inside the kernels: on CUDA, forbid cuBLAS's reduced-precision (bf16) split-K
   reductions, and per op compare a k-row call with k one-row calls on identical inputs.

Per variant it prints the prompts whose speculative output equals plain greedy and the mean fraction
of tokens before the first difference, then per op type where a block of k and k single rows first differ
(bitwise) and by how much. Float32 is run as the control (it must match on every prompt).

    python benchmarks/bf16_faithfulness.py --ckpt /root/quality/manyinone --prompts /root/data/alpaca_2000.json
    python benchmarks/bf16_faithfulness.py --tiny        # CPU, a random SmolLM2-wide model, bf16 on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import smoke_checkpoint  # noqa: E402  (same folder)
from speculative import agreement, open_runtime  # noqa: E402

from manyinone.runtime.cache import StaticKVCache  # noqa: E402
from manyinone.runtime.tune import instruction_prompts  # noqa: E402


class SequentialVerify:
    """Wraps a SegmentRunner: a verify call (start > 0) on q > 1 positions becomes q calls on one position
    each, in order, so layers n..depth see exactly the shapes plain decoding gives them."""

    def __init__(self, runner):
        self.runner = runner

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def __call__(self, start, end, inputs, slots, pad, head=True, **options):
        """`options`: the runner's own keywords (slots_end, plan), passed through unchanged."""
        if start == 0 or inputs.shape[1] == 1:
            return self.runner(start, end, inputs, slots, pad, head, **options)
        hs, ls = [], []
        for i in range(inputs.shape[1]):
            h, logits = self.runner(start, end, inputs[:, i: i + 1], slots[..., i: i + 1], pad, head, **options)
            hs.append(h.clone())
            ls.append(logits.clone())
        return torch.cat(hs, 1), torch.cat(ls, 1)


@contextlib.contextmanager
def sequential_verify(rt):
    original = rt.runner

    def runner(batch):
        return SequentialVerify(original(batch))

    rt.runner = runner
    try:
        yield
    finally:
        rt.runner = original


class Float32Cache(StaticKVCache):
    """A KV cache stored in float32; attention gets the model's dtype back (the exact bf16 values stored)."""

    def __init__(self, num_layers, batch, kv_heads, max_len, head_dim, dtype, device):
        super().__init__(num_layers, batch, kv_heads, max_len, head_dim, torch.float32, device)
        self.compute_dtype = dtype

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx)
        return keys.to(self.compute_dtype), values.to(self.compute_dtype)


@contextlib.contextmanager
def stack_swapped(rt, name: str, value):
    """Inside: `rt.stack.<name>` is `value`; the runtime's cached runners (and graphs) are dropped on the
    way in and out, so each variant records its own."""
    original = getattr(rt.stack, name)
    setattr(rt.stack, name, value)
    rt._runners.clear()
    try:
        yield
    finally:
        setattr(rt.stack, name, original)
        rt._runners.clear()


def float32_cache(rt):
    stack = rt.stack
    return stack_swapped(rt, "new_cache", lambda batch, max_len: Float32Cache(
        stack.cache_layers, batch, stack.kv_heads, max_len, stack.head_dim, stack.dtype, stack.device))


@contextlib.contextmanager
def no_reduced_precision_reduction():
    m = torch.backends.cuda.matmul
    saved = (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction)
    m.allow_bf16_reduced_precision_reduction = m.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = saved


def float32_logits(rt, adapter):
    """Logits at the serving depth from the final norm's output times the head weight in float32 (plain and
    speculative alike), instead of a bf16 matmul whose output is rounded to bf16 before the argmax; at logits
    near 20 a bf16 step is 0.125, so two candidates that close tie or swap on a 1-ulp change."""
    head = adapter.linear_head()
    stack = rt.stack
    depth = rt.depth_for(None)
    original = stack.exit_logits

    def exit_logits(end, hidden):
        if end == depth:
            return torch.nn.functional.linear(head.norm(hidden).float(), head.weight.float())
        return original(end, hidden) if original is not None else stack.parts.head(hidden)

    return stack_swapped(rt, "exit_logits", exit_logits)


def first_divergence_gaps(rt, prompts, plain, spec) -> list[float]:
    """Where a speculative output first differs: the plain path's logit gap between its token and the
    speculative one (recomputed by one prefill of the plain prefix), in units of the top logit's bf16 step."""
    gaps = []
    run = rt.runner(1)
    pad = torch.zeros(1, dtype=torch.long, device=rt.device)
    for p, a, b in zip(prompts, plain, spec):
        j = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), None)
        if j is None:
            continue
        with torch.no_grad():
            logits = run.prefill(rt.depth_for(None), torch.tensor([p + a[:j]], device=rt.device), pad)[0, -1]
        top = logits[a[j]]
        step = float(torch.finfo(torch.bfloat16).eps) * 2 ** float(torch.floor(torch.log2(top.abs().clamp(min=1e-30))))
        gaps.append(float(top - logits[b[j]]) / step)
    return gaps


def prefix_agreement(rt, prompts, new, n, k, gaps: list | None = None) -> tuple[int, float]:
    plain = [rt.generate([p], max_new_tokens=new, stop_ids=set()).tokens[0] for p in prompts]
    spec = [rt.generate([p], max_new_tokens=new, stop_ids=set(), speculative=True, draft_depth=n,
                        draft_tokens=k).tokens[0] for p in prompts]
    if gaps is not None:
        gaps.extend(first_divergence_gaps(rt, prompts, plain, spec))
    return agreement(spec, plain)


def op_differences(rt, prompt, n, k) -> dict[str, tuple[float, float, int]]:
    """Per op kind (module path inside a layer, e.g. self_attn.q_proj; `attention` = o_proj's input), over
    layers n..depth-1: (fraction of elements that differ bitwise, max |diff| relative to max |value|, first
    layer that differs) between one call on k positions and k calls on one position, same inputs."""
    depth = rt.depth_for(None)
    run = rt.runner(1)
    device = rt.device
    layers = rt.stack.parts.layers
    pad = torch.zeros(1, dtype=torch.long, device=device)
    records: dict[tuple[int, str], list[torch.Tensor]] = defaultdict(list)
    hooks = []
    for li in range(n, depth):
        for name, module in layers[li].named_modules():
            if name.endswith("o_proj"):
                hooks.append(module.register_forward_pre_hook(
                    lambda m, args, li=li: records[(li, "attention (o_proj input)")].append(args[0].detach().float())))
            if len(list(module.children())) == 0 and name:
                hooks.append(module.register_forward_hook(
                    lambda m, args, out, li=li, name=name: records[(li, name)].append(out.detach().float())))
        hooks.append(layers[li].register_forward_hook(
            lambda m, args, out, li=li: records[(li, "layer output")].append(
                (out[0] if isinstance(out, tuple) else out).detach().float())))
    with torch.no_grad():
        ids = torch.tensor([prompt], device=device)
        token = run.prefill(depth, ids, pad)[0, -1].argmax()
        base = len(prompt)
        tokens = [token]
        for i in range(k - 1):  # the plain continuation: the positions a fully accepted draft would verify
            _, logits = run(0, depth, tokens[-1].view(1, 1), rt._slots[base + i: base + i + 1], pad)
            tokens.append(logits[0, -1].argmax())
        hidden = []
        for i, t in enumerate(tokens):  # layers 0..n-1 per position, as the draft runs them
            h, _ = run(0, n, t.view(1, 1), rt._slots[base + i: base + i + 1], pad, head=False)
            hidden.append(h.clone())
        records.clear()
        for i in range(k):  # k one-row calls
            run(n, depth, hidden[i], rt._slots[base + i: base + i + 1], pad)
        single = {key: torch.cat(v, 1) for key, v in records.items()}
        records.clear()
        run(n, depth, torch.cat(hidden, 1), rt._slots[base: base + k], pad)  # one k-row call
        block = {key: v[0] for key, v in records.items()}
    for h in hooks:
        h.remove()
    summary: dict[str, list] = {}
    for (li, name), a in single.items():
        b = block[(li, name)]
        if a.shape != b.shape:
            continue
        differ = float((a != b).float().mean())
        rel = float((a - b).abs().max() / a.abs().max().clamp(min=1e-30))
        entry = summary.setdefault(name, [0.0, 0.0, None, 0])
        entry[0] += differ
        entry[1] = max(entry[1], rel)
        entry[3] += 1
        if differ > 0 and entry[2] is None:
            entry[2] = li
    return {name: (e[0] / e[3], e[1], e[2]) for name, e in summary.items()}


def gemm_invariance(model, k: int, pad_to: int = 16) -> list[tuple[str, float, float]]:
    """Per weight shape of layer 0 (and the LM head): the fraction of output elements that differ bitwise
    between row i computed alone (M = 1) and inside a k-row call, and the same with both calls padded to
    `pad_to` rows (one M for every call, so the library picks one kernel): whether fixed-M decoding would
    make plain and verification GEMMs agree bit for bit."""
    rows = []
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    first = [(n, m) for n, m in named if ".0." in n] + [named[-1]]
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, lin in first:
            w = lin.weight
            x = torch.randn(k, w.shape[1], generator=g).to(w.device, w.dtype)  # [k, in]
            single = torch.cat([torch.nn.functional.linear(x[i: i + 1], w) for i in range(k)])  # [k, out]
            block = torch.nn.functional.linear(x, w)  # [k, out]
            padded = torch.zeros(pad_to, w.shape[1], device=w.device, dtype=w.dtype)  # [pad_to, in]
            alone = []
            for i in range(k):
                padded.zero_()
                padded[0] = x[i]
                alone.append(torch.nn.functional.linear(padded, w)[0:1])
            padded.zero_()
            padded[:k] = x
            together = torch.nn.functional.linear(padded, w)[:k]
            rows.append((name.split(".", 3)[-1] if ".0." in name else name, float((single != block).float().mean()),
                         float((torch.cat(alone) != together).float().mean())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt")
    parser.add_argument("--exits", default=None, help="draft exits of a plain HF model")
    parser.add_argument("--prompts")
    parser.add_argument("--rows", default="1800:2000")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--draft-exit", type=int, default=None, help="default: a third of the depth")
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        # SmolLM2's widths and two threads: CPU bf16 GEMMs then split their reductions like GPU kernels do
        # (one thread and tiny widths are batch-invariant on CPU, and nothing would diverge).
        torch.set_num_threads(2)
        args.ckpt = str(smoke_checkpoint(Path(tempfile.mkdtemp()) / "tiny", hidden=576, intermediate=1536))
        args.prompts, args.rows, args.count, args.new_tokens = "demo", None, 2, 24
    device = "cuda" if torch.cuda.is_available() else "cpu"
    graphs = device == "cuda"
    probe, _, _ = open_runtime(args.ckpt, args.exits, torch.float32, "cpu", 8, False)
    prompts = instruction_prompts(probe, args.prompts, args.rows, args.count)
    max_len = max(map(len, prompts)) + args.new_tokens + 32
    rows, gaps = [], []
    for dtype in (torch.float32, torch.bfloat16):
        rt, _, _ = open_runtime(args.ckpt, args.exits, dtype, device, max_len, graphs)
        depth = rt.depth_for(None)
        n = args.draft_exit or min([e for e in rt.exits() if e < depth] or [depth // 3],
                                   key=lambda e: abs(e - depth / 3))
        name = str(dtype).replace("torch.", "")
        rows.append((name, "block verify (default)", prefix_agreement(rt, prompts, args.new_tokens, n, args.draft_tokens,
                                                                      gaps if dtype == torch.bfloat16 else None)))
        if dtype == torch.float32:
            continue
        from manyinone.core.registry import adapter_for

        adapter = adapter_for(rt.model)
        with float32_logits(rt, adapter):
            rows.append((name, "float32 logits at the serving depth",
                         prefix_agreement(rt, prompts, args.new_tokens, n, args.draft_tokens)))
            if device == "cuda":
                with no_reduced_precision_reduction():
                    rt._runners.clear()
                    rows.append((name, "float32 logits + no reduced-precision GEMM reduction",
                                 prefix_agreement(rt, prompts, args.new_tokens, n, args.draft_tokens)))
        with sequential_verify(rt):
            rows.append((name, "verify one position at a time", prefix_agreement(rt, prompts, args.new_tokens, n,
                                                                                 args.draft_tokens)))
        with float32_cache(rt):
            rows.append((name, "float32 KV cache", prefix_agreement(rt, prompts, args.new_tokens, n, args.draft_tokens)))
        if device == "cuda":
            with no_reduced_precision_reduction():
                rt._runners.clear()
                rows.append((name, "no reduced-precision GEMM reduction",
                             prefix_agreement(rt, prompts, args.new_tokens, n, args.draft_tokens)))
            rt._runners.clear()
        eager, _, _ = open_runtime(args.ckpt, args.exits, dtype, device, max_len, False)
        ops = op_differences(eager, prompts[0], n, args.draft_tokens)
        gemms = gemm_invariance(eager.model, args.draft_tokens)
    print(f"\n{args.ckpt}: draft exit {n} of {depth}, {args.draft_tokens} drafted tokens, {len(prompts)} prompts x "
          f"{args.new_tokens} tokens, {device}\n")
    print("| dtype | variant | prompts identical to plain greedy | mean matched prefix |\n| --- | --- | --- | --- |")
    for dtype, variant, (same, prefix) in rows:
        print(f"| {dtype} | {variant} | {same}/{len(prompts)} | {prefix:.3f} |")
    if gaps:
        print(f"\nbf16 block verify, first divergences: plain's logit margin over the speculative token = "
              f"{', '.join(f'{g:.1f}' for g in gaps)} bf16 steps of the top logit (0-1: a near-tie a 1-ulp change flips)")
    print(f"\nbf16, layers {n}..{depth - 1}: one call on {args.draft_tokens} positions vs {args.draft_tokens} calls "
          "on one position, identical inputs\n")
    print("| op | elements differing (mean over layers) | max relative diff | first layer differing |\n"
          "| --- | --- | --- | --- |")
    for op, (differ, rel, first) in ops.items():
        print(f"| {op} | {differ:.4f} | {rel:.2e} | {first if first is not None else '-'} |")
    print(f"\nbf16 GEMMs on random rows: elements differing between a row alone and inside {args.draft_tokens} rows\n")
    print("| weight | M=1 vs M=k | both padded to M=16 |\n| --- | --- | --- |")
    for name, plain_m, padded_m in gemms:
        print(f"| {name} | {plain_m:.4f} | {padded_m:.4f} |")


if __name__ == "__main__":
    main()
