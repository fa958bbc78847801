"""Packing on a real model: per-example losses packed vs unpacked (must agree) and training throughput.

Side by side in one run, on the same examples: (1) the largest difference of each example's summed
CE at every exit between packed rows and one-example-per-row batches, in float32; (2) forward+backward
tokens/s of padded batches vs packed rows (bf16 autocast on CUDA), and the share of padding each
carries. A table last; exit code 1 if the losses differ.

    python benchmarks/packing.py --model /root/smollm2-hf --data /root/data/alpaca_2000.json      # GPU, ~1-2 min
    python benchmarks/packing.py --device cpu --tiny                                               # CPU smoke check
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "adapters")]

from manyinone.core.registry import adapter_for  # noqa: E402
from manyinone.train.data import IGNORE, batch_tokens, collate, load_records, pack, resolve_template, tokenize_records  # noqa: E402


def tiny_model(folder: Path) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import build_tiny_model

    return str(build_tiny_model(folder))


def per_example_ce(adapter, batch, specs) -> dict[tuple[int, int], float]:
    """{(depth, example): summed CE} for a collated batch; examples numbered in row-major order."""
    extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    hidden = adapter.forward_nested(batch["input_ids"], batch.get("attention_mask"), specs, **extra)
    out = {}
    for spec in specs:
        logits = adapter.exit_logits(hidden[spec]).float()  # [batch, seq, vocab]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                reduction="none", ignore_index=IGNORE)  # [batch, seq-1]
        n = 0
        for row in range(nll.shape[0]):
            if "position_ids" in batch:
                starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [nll.shape[1] + 1]
            else:
                starts = [0, nll.shape[1] + 1]
            for a, b in zip(starts, starts[1:]):
                if (batch["labels"][row, a:b] != IGNORE).any():
                    out[(spec["depth"], n)] = float(nll[row, a:b - 1].sum())
                    n += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/root/smollm2-hf")
    ap.add_argument("--data", default="/root/data/alpaca_2000.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model and the demo data (CPU smoke check)")
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16, help="examples per padded batch")
    ap.add_argument("--steps", type=int, default=10, help="timed forward+backward passes per layout")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.tiny:
        import tempfile

        args.model, args.data = tiny_model(Path(tempfile.mkdtemp())), "demo"
        args.examples, args.max_length, args.batch_size, args.steps = min(args.examples, 32), 512, 4, 2
    device = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").to(device)
    adapter = adapter_for(model, ["depth"])
    layers = adapter.num_layers
    space = adapter.space({"depth": sorted({max(1, layers // 5), layers // 2, layers})})
    specs = space.specs()
    records = load_records(args.data, f"0:{args.examples}")
    template = resolve_template("auto", tok)
    examples = tokenize_records(records, tok, args.max_length, template)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # (1) agreement, float32, eval mode, a slice of examples each way
    model.eval()
    probe = examples[:64]
    with torch.no_grad():
        alone = {}
        for i, e in enumerate(probe):
            got = per_example_ce(adapter, {k: v.to(device) for k, v in collate([e], pad).items()}, specs)
            alone.update({(d, i): v for (d, _), v in got.items()})
        rows = pack(probe, args.max_length)
        # pack() orders by decreasing length: map packed examples back by their token ids
        order = sorted(range(len(probe)), key=lambda i: -len(probe[i].input_ids))
        packed = per_example_ce(adapter, {k: v.to(device) for k, v in collate(rows, pad).items()}, specs)
    firsts = {tuple(probe[i].input_ids): i for i in order}
    flat = [firsts[tuple(r.input_ids[a:b])] for r in rows
            for a, b in zip(*(lambda s: (s, s[1:] + [len(r.input_ids)]))([j for j, p in enumerate(r.positions) if p == 0]))]
    worst = max(abs(packed[(d, n)] - alone[(d, flat[n])]) / max(1.0, abs(alone[(d, flat[n])]))
                for (d, n) in packed)

    # (2) throughput: forward + backward of the nested loss's inputs, same examples both ways
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    padded = [collate(examples[i:i + args.batch_size], pad) for i in range(0, len(examples), args.batch_size)]
    packed_rows = pack(examples, args.max_length)
    per_row = max(1, round(sum(len(e.input_ids) for e in examples) / len(padded) / args.max_length))
    packed_batches = [collate(packed_rows[i:i + per_row], pad) for i in range(0, len(packed_rows), per_row)]

    def timed(batches) -> tuple[float, float]:
        real = total = 0
        for b in batches[:1]:  # warm-up
            run_step(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for b in batches[:args.steps]:
            run_step(b)
            total += b["input_ids"].numel()
            real += batch_tokens(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        return real / elapsed, 1 - real / total

    def run_step(b) -> None:
        b = {k: v.to(device) for k, v in b.items()}
        extra = {"position_ids": b["position_ids"]} if "position_ids" in b else {}
        with autocast:
            hidden = adapter.forward_nested(b["input_ids"], b.get("attention_mask"), specs, **extra)
            loss = sum(adapter.exit_logits(h[b["labels"] != IGNORE]).float().logsumexp(-1).mean()
                       for h in hidden.values())
        loss.backward()
        model.zero_grad(set_to_none=True)

    pad_tps, pad_waste = timed(padded)
    pack_tps, pack_waste = timed(packed_batches)
    print(f"model {args.model}, {len(examples)} examples, max_length {args.max_length}, device {device}")
    print("| check | padded | packed | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| worst relative per-example CE difference (float32, {len(probe)} examples x {len(specs)} exits) | - | "
          f"{worst:.2e} | - |")
    print(f"| real (non-padding) tokens/s (fwd+bwd, {'bf16 autocast' if device.type == 'cuda' else 'float32'}) | "
          f"{pad_tps:.0f} | {pack_tps:.0f} | {pack_tps / pad_tps:.2f} |")
    print(f"| share of positions that are padding | {pad_waste:.2f} | {pack_waste:.2f} | - |")
    ok = worst < 1e-3
    print("PASS: packed losses equal unpacked" if ok else "FAIL: packed losses differ from unpacked")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
