"""Where a width plan's 12% goes (issue 13): each projection of one decoder layer at half width, as the
runtime serves it today (views of the full weights) and in the layouts that would make a width prefix one
contiguous block, against the dense exported sub-model's weights, timed side by side in one run.

On 2026-12-03 the 7B shape at half width decoded at 286.5 tok/s through sliced views and 325.0 as an
exported dense model (0.88x). Whether the gap is the batched GEMM over gate/up (`bmm` over a [2, keep,
hidden] view), the column-prefix views of down_proj / o_proj (row stride = the full width) or neither,
decides which layout the fused step should store: this script says which, per projection.

    python benchmarks/width_layouts.py                       # CUDA: LLaMA-2-7B shape, bf16, batch 1
    python benchmarks/width_layouts.py --tiny --device cpu   # a smoke run (what tests/test_width_layouts.py runs)

Every variant of a projection must give the dense variant's output (checked before timing: same values,
up to float rounding in a different GEMM kernel). Only each variant's GEMM is timed, as a CUDA graph of
`--repeats` calls, so launch overhead is out of the figure, as it is in the runtime's graphed decode step.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

SHAPES = {"7b": (4096, 11008, 32, 32, 128), "tiny": (64, 160, 4, 4, 16)}  # hidden, ffn, heads, kv heads, head_dim


# A variant is (the GEMM the fused step would launch, what turns its output into the dense layout). Only
# the GEMM is timed: in the compiled step the de-interleaving is a strided read inside the kernel that
# applies the activation, not a kernel of its own.
Variant = tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def _same(out: torch.Tensor) -> torch.Tensor:
    return out


def _deinterleave(t: int, keep: int, sections: int, unit: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """[t, keep/unit * sections * unit] in per-unit order (section rows of one neuron or head together)
    -> [t, sections * keep] as (section 0 | section 1 | ...)."""
    def back(out: torch.Tensor) -> torch.Tensor:
        out = out.reshape(t, keep // unit, sections, unit)
        return torch.cat([out[:, :, i].reshape(t, keep) for i in range(sections)], -1)
    return back


def _sections_to_columns(out: torch.Tensor) -> torch.Tensor:  # [sections, t, keep] -> [t, sections * keep]
    return torch.cat(list(out), -1)


def gate_up_variants(x, gate, up, keep) -> dict[str, Variant]:
    """x [t, hidden]; gate/up [ffn, hidden]. In the dense layout the output is [t, 2 * keep] = (gate | up)."""
    ffn, hidden = gate.shape
    stacked = torch.cat([gate, up])  # [2 ffn, hidden]: the fused step's buffer today
    dense = torch.cat([gate[:keep], up[:keep]]).contiguous()  # the exported sub-model's fused weight
    interleaved = torch.stack([gate, up], 1).reshape(2 * ffn, hidden)  # rows g0, u0, g1, u1, ...
    by_neuron_t = interleaved.t().contiguous()  # [hidden, 2 ffn]
    sections = stacked.view(2, ffn, hidden)[:, :keep]  # [2, keep, hidden], a view
    xs = x[None].expand(2, -1, -1)
    back = _deinterleave(x.shape[0], keep, 2)
    return {
        "dense (exported)": (lambda: F.linear(x, dense), _same),
        "sliced: bmm over [2, keep] view (today)": (lambda: torch.bmm(xs, sections.transpose(1, 2)), _sections_to_columns),
        "sliced: two GEMMs on row prefixes": (lambda: torch.stack([F.linear(x, gate[:keep]), F.linear(x, up[:keep])]),
                                              _sections_to_columns),
        "interleaved per neuron: one GEMM on a row prefix": (lambda: F.linear(x, interleaved[: 2 * keep]), back),
        "interleaved, stored transposed": (lambda: x @ by_neuron_t[:, : 2 * keep], back),
    }


def down_variants(inner, down, keep) -> dict[str, Variant]:
    """inner [t, keep]; down [hidden, full]: the columns the plan keeps are a prefix along dim 1."""
    dense = down[:, :keep].contiguous()
    transposed = down.t().contiguous()  # [full, hidden]: the kept columns become a row prefix
    return {
        "dense (exported)": (lambda: F.linear(inner, dense), _same),
        "sliced: column-prefix view (today)": (lambda: F.linear(inner, down[:, :keep]), _same),
        "stored transposed: row prefix": (lambda: inner @ transposed[:keep], _same),
    }


def qkv_variants(x, q, k, v, keep_rows, head_dim) -> dict[str, Variant]:
    """Multi-head attention (q, k, v each [rows, hidden]) under a heads plan keeping `keep_rows` rows of each."""
    rows, hidden = q.shape
    stacked = torch.cat([q, k, v])
    dense = torch.cat([q[:keep_rows], k[:keep_rows], v[:keep_rows]]).contiguous()
    # rows q_h0, k_h0, v_h0, q_h1, ...: a heads prefix is one row prefix
    per_head = torch.stack([t.view(-1, head_dim, hidden) for t in (q, k, v)], 1).reshape(3 * rows, hidden)
    sections = stacked.view(3, rows, hidden)[:, :keep_rows]
    xs = x[None].expand(3, -1, -1)
    return {
        "dense (exported)": (lambda: F.linear(x, dense), _same),
        "sliced: bmm over [3, keep] view (today)": (lambda: torch.bmm(xs, sections.transpose(1, 2)), _sections_to_columns),
        "interleaved per head: one GEMM on a row prefix": (lambda: F.linear(x, per_head[: 3 * keep_rows]),
                                                           _deinterleave(x.shape[0], keep_rows, 3, head_dim)),
    }


def timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    """Microseconds per call: a CUDA graph of `repeats` calls (no launch overhead), or a plain loop on CPU."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeats):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) * 1e3 / repeats)
        return best
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) * 1e6 / repeats


def run(shape: str, device: torch.device, dtype: torch.dtype, tokens: int, repeats: int,
        fraction: float = 0.5) -> list[tuple[str, str, float, float, float]]:
    """(projection, variant, µs, vs dense, max |difference| from dense) for every variant."""
    hidden, ffn, heads, _, head_dim = SHAPES[shape]
    g = torch.Generator().manual_seed(0)

    def weight(*s):
        return (torch.randn(*s, generator=g) * s[-1] ** -0.5).to(device, dtype)

    x = weight(tokens, hidden)
    keep_ffn, keep_rows = int(ffn * fraction), int(heads * fraction) * head_dim
    groups = {
        "gate/up": gate_up_variants(x, weight(ffn, hidden), weight(ffn, hidden), keep_ffn),
        "down": down_variants(weight(tokens, keep_ffn), weight(hidden, ffn), keep_ffn),
        "q/k/v (MHA)": qkv_variants(x, weight(heads * head_dim, hidden), weight(heads * head_dim, hidden),
                                    weight(heads * head_dim, hidden), keep_rows, head_dim),
        "o_proj": down_variants(weight(tokens, keep_rows), weight(hidden, heads * head_dim), keep_rows),
    }
    rows = []
    for name, variants in groups.items():
        reference = variants["dense (exported)"][0]().float()
        base = None
        for variant, (fn, back) in variants.items():
            diff = (back(fn()).float() - reference).abs().max().item()
            scale = reference.abs().max().item()
            if diff > 1e-2 * scale + 1e-5:  # a layout that computes something else must not be timed
                raise AssertionError(f"{name} / {variant}: differs from the dense weights by {diff:.3g}")
            us = timed(fn, device, repeats)
            base = us if base is None else base
            rows.append((name, variant, us, base / us, diff))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape (smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=1, help="rows of x: the decode batch")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = "tiny" if args.tiny else "7b"
    print(f"{shape} shape {SHAPES[shape]}, {args.dtype}, {args.tokens} token(s), half width, {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print("| projection | variant | µs per call | speed vs dense | max abs diff |\n| --- | --- | --- | --- | --- |")
    for name, variant, us, ratio, diff in run(shape, device, dtype, args.tokens, args.repeats):
        print(f"| {name} | {variant} | {us:.2f} | {ratio:.2f}x | {diff:.2g} |")


if __name__ == "__main__":
    main()
