"""Where does step 1's NaN gradient come from? One forward/backward of `manyinone train --lora 16 --axes depth`
step 1, on a LLaMA-2-13B-width random bf16 model, under variants that each remove one suspect.

Measured on the H200 (issue 15): step 1 had every exit's loss finite (ce ~ 11.8) and grad_norm NaN. This
rebuilds that step through the training loop's own pieces (the run's first micro-batch from
`train.batches.MicroBatches`, peft adapters from `train.lora`, the adapter's nested forward and
`train.step_parts.exit_losses`, bf16 autocast on CUDA) and, per variant, prints whether every gradient is
finite, the deepest parameter whose gradient is not, and the first module (in backward order) whose
output gradient was finite but whose input gradient was not: the op that made the NaN.

Variants (each changes one thing from `cli`, the CLI's own step):
    sdpa-math / sdpa-efficient / sdpa-cudnn / sdpa-flash   SDPA forced to one backend
    no-cudnn       SDPA may pick any backend but cuDNN's (reported NaN in its backward on H100/H200 since torch 2.11)
    no-mask        attention_mask dropped (right padding + causal: the supervised positions see the same keys;
                   transformers then calls SDPA with is_causal=True and no mask tensor)
    eager          attn_implementation="eager" (no SDPA at all)
    plain-loss     loss_impl=plain instead of the lean fused loss
    full-exit      only the deepest exit's loss (no exits at 8..32)
    bf16-adapters  LoRA weights cast to bf16 (peft keeps them float32 by default)
    no-autocast    bf16 weights without autocast (what the loop does on CPU; every other row, on CPU too, runs
                   under bf16 autocast as the loop does on CUDA)
    float32        the base weights cast to float32 for the step, no autocast: is it bf16's range or rounding?

Then, when the `cli` row names a culprit layer, `cli` runs once more with every submodule of that layer
traced (`Trace`): per submodule, in forward order, whether its output and its output's gradient are
finite and their largest magnitudes, and how many non-finite elements sit at padded positions, so the
one op between a finite and a non-finite gradient is named (H200, session 2026-12-02: every row above
pointed at layers.23.self_attn, with eager and math attention alike).

The cause (H200 and CPU, 2026-12-03): the random model's embedding row for the token that begins every
row was the padding row, which transformers zeroes. Position 0 then stays exactly zero in every layer, and
RMSNorm's backward at zero multiplies its gradient by 1/sqrt(eps) per layer (`GradProfile`: min row RMS 0
at position 0 in all 40 layers, the gradient x600-1500 per layer). `--init padding-row` draws that row
as one_gpu_cli.build_base now does; `manyinone train` warns about such rows
(train.nonfinite.zero_embedding_starts).

    python benchmarks/nan_grad_probe.py --tokenizer /root/smollm2-hf --data /root/data/alpaca_2000.json   # H200
    python benchmarks/nan_grad_probe.py --device cpu --layers 2 --batch-size 2 --max-length 128 \\
        --tokenizer TOKENIZER_FOLDER --data ../shared/assets/data/alpaca_2000.json                          # CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "adapters"), str(ROOT / "benchmarks")]

from manyinone.core.registry import adapter_for  # noqa: E402
from manyinone.train import distributed, lora, step_parts  # noqa: E402
from manyinone.train.batches import MicroBatches, load_run_data  # noqa: E402
from manyinone.train.config import LoraSettings, TrainConfig  # noqa: E402
from manyinone.train.data import resolve_template  # noqa: E402
from manyinone.train.losses import exit_weights  # noqa: E402
from manyinone.train.nonfinite import nonfinite_grads  # noqa: E402

SHAPE_13B = dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
SHAPE_TINY = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=4,
                  max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)
VARIANTS = ("cli", "sdpa-math", "sdpa-efficient", "sdpa-cudnn", "sdpa-flash", "no-cudnn", "no-mask", "eager", "plain-loss",
            "full-exit", "bf16-adapters", "no-autocast", "float32")


def build(args, tokenizer):
    """The driver's random model (benchmarks/one_gpu_cli.py build_base: seed 0, bf16, where it lives) with `layers` layers."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = SHAPE_TINY if args.tiny else SHAPE_13B
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         num_hidden_layers=args.layers, **shape)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    if args.init == "explicit":
        explicit_init(model, config.initializer_range)
    elif args.init == "padding-row":  # what one_gpu_cli.build_base now builds
        from one_gpu_cli import draw_padding_row

        draw_padding_row(model, config.initializer_range)
    return model


@torch.no_grad()
def explicit_init(model, std: float) -> None:
    """Every weight drawn here, whatever from_config did: N(0, std) for linear and embedding weights (no
    zeroed padding row), ones for norms, zero biases. Tells a bad init apart from a bad step."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif "RMSNorm" in type(module).__name__:
            module.weight.fill_(1.0)


@torch.no_grad()
def weight_report(model) -> list[str]:
    """Per kind of weight (its name with the layer number dropped): std, largest magnitude, the share of
    exact zeros and the number of all-zero rows, over every layer. A model whose init did not run shows
    here as stds far from initializer_range, zeros or huge values."""
    kinds: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        kinds.setdefault(re.sub(r"\.\d+\.", ".N.", name), []).append(p.detach())
    lines = ["| weight | tensors | std | max abs | exact zeros | all-zero rows |", "| --- | --- | --- | --- | --- | --- |"]
    for kind, ps in kinds.items():
        n = sum(p.numel() for p in ps)
        mean = sum(float(p.float().sum()) for p in ps) / n
        var = sum(float((p.float() - mean).pow(2).sum()) for p in ps) / n
        zeros = sum(int((p == 0).sum()) for p in ps)
        rows = sum(int((p.reshape(p.shape[0], -1) == 0).all(-1).sum()) for p in ps if p.dim() >= 2)
        lines.append(f"| {kind} | {len(ps)} | {var ** 0.5:.4g} | {max(float(p.abs().max()) for p in ps):.4g} | "
                     f"{zeros / n:.3g} | {rows} |")
    return lines


class Hooks:
    """Module hooks that one probe registers (`handles`), all removed by `close()`."""

    handles: list

    def close(self):
        for h in self.handles:
            h.remove()


class Blame(Hooks):
    """Finds the first module, in backward order, whose output gradient is finite but whose input
    gradient is not: tensor hooks on each watched module's first input and its output."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.events: list[tuple[str, str, bool]] = []  # (module, "out"/"in", finite), in backward order
        self.handles = []
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post(name)))

    def _note(self, name, side):
        def hook(grad):
            self.events.append((name, side, bool(torch.isfinite(grad).all())))
        return hook

    def _pre(self, name):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(self._note(name, "in"))
        return hook

    def _post(self, name):
        def hook(_module, _args, output):
            y = output[0] if isinstance(output, tuple) else output
            if isinstance(y, torch.Tensor) and y.requires_grad:
                y.register_hook(self._note(name, "out"))
        return hook

    def culprit(self) -> str:
        finite_out = {}
        for name, side, finite in self.events:
            if side == "out":
                finite_out[name] = finite
            elif not finite:
                return f"{name} (its output grad {'finite' if finite_out.get(name) else 'already non-finite'})"
        return "-"


class Trace(Hooks):
    """Per submodule of one layer: its output and output gradient, finite or not, largest magnitude, and
    how many non-finite elements are at padded positions (`pad`: [batch, seq] bool)."""

    def __init__(self, layer: torch.nn.Module, prefix: str, pad: torch.Tensor | None):
        self.rows: dict[str, dict] = {}
        self.pad = pad
        self.handles = [m.register_forward_hook(self._post(f"{prefix}.{n}" if n else prefix))
                        for n, m in layer.named_modules()]

    def _stats(self, t: torch.Tensor) -> dict:
        bad = ~torch.isfinite(t)
        finite = t.detach().float().masked_fill(bad, 0)
        row = {"finite": not bool(bad.any()), "max_abs": float(finite.abs().max()) if t.numel() else 0.0}
        if bad.any() and self.pad is not None and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(self.pad.shape):
            per_pos = bad.reshape(*t.shape[:2], -1).any(-1)
            row["bad_positions"], row["at_pad"] = int(per_pos.sum()), int((per_pos & self.pad).sum())
        return row

    def _post(self, name):
        def hook(_module, _args, output):
            y = output[0] if isinstance(output, tuple) else output
            if not isinstance(y, torch.Tensor):
                return
            calls = sum(1 for key in self.rows if key.split(" (call ")[0] == name)
            row = self.rows[name if not calls else f"{name} (call {calls + 1})"] = {"out": self._stats(y)}
            if y.requires_grad:  # its own row: a module called twice must not mix the two calls' gradients
                y.register_hook(lambda g: row.__setitem__("grad", self._stats(g)))
        return hook

    def table(self) -> list[str]:
        lines = ["| module | output finite | max abs output | output grad finite | max abs output grad | non-finite at pad |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for name, r in self.rows.items():
            g = r.get("grad", {})
            at_pad = [f"{x['at_pad']}/{x['bad_positions']}" for x in (r["out"], g) if "bad_positions" in x]
            lines.append(f"| {name} | {r['out']['finite']} | {r['out']['max_abs']:.4g} | {g.get('finite', '-')} | "
                         f"{g.get('max_abs', float('nan')):.4g} | {', '.join(at_pad) or '-'} |")
        return lines


class GradProfile(Hooks):
    """Per decoder layer, the size of its output and of its output's gradient, and where that gradient
    peaks. The NaN is born as an overflow: a gradient that is finite but near bf16/float32's 3.4e38 turns
    into inf in the next op, so `Blame`'s first finite-to-non-finite op names the victim; the layer where
    the largest gradient jumps by orders of magnitude names the cause. One row per call of a layer."""

    def __init__(self, layers, pad: torch.Tensor | None):
        self.rows: list[dict] = []
        self.pad = pad
        self.handles = [layer.register_forward_hook(self._post(f"layers.{i}")) for i, layer in enumerate(layers)]

    def _post(self, name):
        def hook(_module, _args, output):
            y = output[0] if isinstance(output, tuple) else output
            if not isinstance(y, torch.Tensor) or y.dim() != 3:
                return
            with torch.no_grad():
                rms = y.float().pow(2).mean(-1).sqrt()  # [batch, seq]: a tiny row makes RMSNorm's backward big
            flat = int(rms.argmin())
            b, t = divmod(flat, rms.shape[1])
            at_pad = bool(self.pad[b, t]) if self.pad is not None and tuple(self.pad.shape) == tuple(rms.shape) else False
            row = {"name": name, "max_abs": float(y.detach().float().abs().max()), "min_rms": float(rms.min()),
                   "min_rms_at": f"{b},{t}" + (" (pad)" if at_pad else "")}
            self.rows.append(row)
            if y.requires_grad:
                y.register_hook(lambda g: row.update(self._grad_stats(g)))
        return hook

    def _grad_stats(self, g: torch.Tensor) -> dict:
        bad = ~torch.isfinite(g)
        per_pos = g.detach().float().masked_fill(bad, 0).abs().amax(-1)  # [batch, seq]
        flat = int(per_pos.argmax())
        b, t = divmod(flat, per_pos.shape[1])
        at_pad = bool(self.pad[b, t]) if self.pad is not None and tuple(self.pad.shape) == tuple(per_pos.shape) else None
        return {"grad_max": float(per_pos.max()), "grad_at": f"{b},{t}" + (" (pad)" if at_pad else ""),
                "grad_nonfinite": int(bad.sum())}

    def table(self) -> list[str]:
        lines = ["| layer | max abs output | min row rms | at (row, position) | max abs output grad | at (row, position) "
                 "| non-finite grad |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in self.rows:
            lines.append(f"| {r['name']} | {r['max_abs']:.4g} | {r['min_rms']:.3g} | {r['min_rms_at']} | "
                         f"{r.get('grad_max', float('nan')):.3g} | "
                         f"{r.get('grad_at', '-')} | {r.get('grad_nonfinite', '-')} |")
        return lines


def grad_size(g: torch.Tensor) -> float | str:
    """The largest magnitude of a gradient, or how many of its elements are not finite."""
    bad = int((~torch.isfinite(g)).sum())
    return f"{bad} non-finite" if bad else float(g.abs().max())


def set_attention(model, name: str) -> None:
    """Switch the attention implementation in place (transformers 5's own call where it has one)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def one_step(variant: str, model, adapter, space, cfg, batch, device, trace_layer: int | None = None) -> dict:
    """Step 1's forward and backward under `variant`; the gradients it left, summarised (with
    `trace_layer`, also that layer's Trace table under "trace")."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"sdpa-math": SDPBackend.MATH, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION}
    if variant == "no-cudnn":
        kernel = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    else:
        kernel = sdpa_kernel([backends[variant]]) if variant in backends else contextlib.nullcontext()
    # bf16 autocast as the loop has it on CUDA; on CPU too, so that a CPU run mirrors the CUDA step.
    use_autocast = variant not in ("no-autocast", "float32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
    run_cfg = cfg.model_copy(update={"loss_impl": "plain"}) if variant == "plain-loss" else cfg
    specs = [space.full()] if variant == "full-exit" else list(space.specs())
    weights = exit_weights(space.specs(), None)
    mask = None if variant == "no-mask" else batch.get("attention_mask")
    lora_params = [p for n, p in model.named_parameters() if p.requires_grad]
    saved = [p.data for p in lora_params]
    if variant == "bf16-adapters":
        for p in lora_params:
            p.data = p.data.to(torch.bfloat16)
    if variant == "eager":
        set_attention(model, "eager")
    low = [p for p in model.parameters() if p.dtype == torch.bfloat16]
    if variant == "float32":
        for p in low:  # exact both ways: every value came from bf16
            p.data = p.data.float()
    layers = adapter.decoder_stack().layers
    pad = batch["attention_mask"] == 0 if batch.get("attention_mask") is not None else None
    trace = Trace(layers[trace_layer], f"layers.{trace_layer}", pad) if trace_layer is not None else None
    profile = GradProfile(layers, pad) if trace_layer is not None else None
    blame = Blame({**{f"layers.{i}.self_attn": l.self_attn for i, l in enumerate(layers)},
                   **{f"layers.{i}.mlp": l.mlp for i, l in enumerate(layers)},
                   **{f"layers.{i}": l for i, l in enumerate(layers)}})
    model.zero_grad(set_to_none=True)
    torch.manual_seed(cfg.seed * 1_000_003)  # the loop's seed for step 0
    started = time.perf_counter()
    try:
        with kernel, autocast:
            hidden = adapter.forward_nested(batch["input_ids"], mask, specs)
            out = step_parts.exit_losses(run_cfg, adapter, space, None, weights, hidden, batch["labels"], None, 0, 0)
        feature_grads = {}
        for spec, h in hidden.items():
            h.register_hook(lambda g, s=spec: feature_grads.__setitem__(s.label, grad_size(g)))
        out.total.backward()
        grads = [p.grad for p in lora_params if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        bad = nonfinite_grads(model.named_parameters())
        result = {"variant": variant, "ok": True, "loss": float(out.total.detach()),
                  "ce": {s.label: round(float(v), 3) for s, v in out.ce.items()}, "grad_norm": norm,
                  "bad_params": len(bad), "of_params": len(grads), "deepest_bad": bad[-1] if bad else "-",
                  "first_bad_op": blame.culprit(),
                  "loss_grads_finite": all(isinstance(v, float) for v in feature_grads.values()) if feature_grads else None,
                  "loss_grads": feature_grads,
                  "max_abs_grad": max((float(g.abs().max()) for g in grads if torch.isfinite(g).all()), default=0.0)}
        if trace is not None:
            result["trace"] = trace.table()
        if profile is not None:
            result["profile"] = profile.table()
    except (RuntimeError, ValueError) as exc:  # a backend that cannot run these inputs; out of memory
        result = {"variant": variant, "ok": False, "error": str(exc).strip().splitlines()[0][:160]}
    finally:
        blame.close()
        if trace is not None:
            trace.close()
        if profile is not None:
            profile.close()
        if variant == "float32":
            for p in low:
                p.data = p.data.to(torch.bfloat16)
        if variant == "eager":
            set_attention(model, "sdpa")
        for p, data in zip(lora_params, saved):
            p.data = data
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next variant starts from the same memory
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=40, help="decoder layers (LLaMA-2-13B: 40)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="a 256-wide model instead of the 13B width")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--trace-layer", type=int, help="trace this layer after the variants (default: the cli row's culprit)")
    parser.add_argument("--init", choices=("from-config", "padding-row", "explicit"), default="from-config",
                        help="from-config: as transformers leaves it (padding row zeroed); padding-row: that row "
                             "drawn too (one_gpu_cli.build_base); explicit: every weight drawn again (explicit_init)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants {unknown} unknown; allowed {', '.join(VARIANTS)}")
    return args


def run_variants(argv=None) -> list[dict]:
    """Build the model and step-1 batch once, then run each variant; one result dict per variant."""
    args = parse_args(argv)
    from transformers import AutoTokenizer

    device = torch.device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          + (f", cudnn {torch.backends.cudnn.version()}" if device.type == "cuda" else ""), flush=True)
    model = build(args, tokenizer)
    print(f"weights after build (--init {args.init}):", *weight_report(model), sep="\n", flush=True)
    cfg = TrainConfig(model="probe", data=args.data, lora=LoraSettings(r=16), batch_size=args.batch_size,
                      max_length=args.max_length, output="/nonexistent")
    cfg = cfg.model_copy(update={"template": resolve_template(cfg.template, tokenizer)})
    lora.apply_lora(model, cfg.lora)
    model.train()
    adapter = adapter_for(model, cfg.axes)
    space = adapter.space(cfg.axis_choices())
    rt = distributed.Runtime.from_env()
    data = load_run_data(cfg, tokenizer, rt.world)
    batch = MicroBatches(data, cfg, rt, tokenizer.pad_token_id, tokenizer.eos_token_id, device)(0, 0)
    lengths = batch["attention_mask"].sum(-1).tolist()
    print(f"model: {args.layers} layers, {'tiny' if args.tiny else '13B'} width, exits "
          f"{[s.label for s in space.specs()]}; step-1 batch {tuple(batch['input_ids'].shape)}, row lengths {lengths} "
          f"(seq % 128 = {batch['input_ids'].shape[1] % 128}), template {cfg.template}", flush=True)
    results = []

    def save() -> None:  # after every row, so a probe cut short keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "lengths": lengths, "results": results}, indent=2))

    for variant in args.variants.split(","):
        r = one_step(variant, model, adapter, space, cfg, batch, device)
        results.append(r)
        print(f"{variant}: {json.dumps(r)}", flush=True)
        save()
    culprit = next((r["first_bad_op"] for r in results if r["variant"] == "cli" and r.get("ok")), "-")
    layer = args.trace_layer if args.trace_layer is not None else \
        int(culprit.split(".")[1]) if culprit.startswith("layers.") else None
    if layer is not None:
        traced = one_step("cli", model, adapter, space, cfg, batch, device, trace_layer=layer)
        print(f"\ncli again, layer {layer} traced (forward order):", *traced.get("trace", [traced.get("error")]),
              sep="\n", flush=True)
        print("\nthe same run, every layer's output and output gradient (forward order):",
              *traced.get("profile", [traced.get("error")]), sep="\n", flush=True)
        results.append({**traced, "variant": f"cli-trace-layer-{layer}"})
        save()
    return results


def exit_grads(grads: dict) -> str:
    return ", ".join(f"{label} {v:.3g}" if isinstance(v, float) else f"{label} {v}" for label, v in grads.items())


def main(argv=None) -> int:
    results = run_variants(argv)
    print("\nsame loss and grad_norm to the last bit as another row = the same SDPA kernel ran (e.g. cli = sdpa-cudnn)")
    print("\n| variant | loss | grad_norm | params with non-finite grad | deepest bad param | first op making NaN "
          "| grad at each exit's features (max abs) | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if r["variant"].startswith("cli-trace"):
            continue
        if not r["ok"]:
            print(f"| {r['variant']} | - | - | - | - | could not run: {r['error']} | - | {r['seconds']} |")
            continue
        print(f"| {r['variant']} | {r['loss']:.6f} | {r['grad_norm']:.7g} | {r['bad_params']} of {r['of_params']} | "
              f"{r['deepest_bad']} | {r['first_bad_op']} | {exit_grads(r['loss_grads'])} | {r['seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
