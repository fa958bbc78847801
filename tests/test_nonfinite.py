"""A non-finite step stops the run with one line (or is skipped within nonfinite_skips); its NaN never
reaches the weights, and the last complete checkpoint stays intact. NaN is injected at one step through
the exit losses' inputs: in the forward (the loss goes NaN) or only in the backward (the loss stays finite)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import manyinone.train.loop as loop
from manyinone.core.errors import ManyinoneError
from manyinone.io.checkpoint import complete_resume_dirs
from manyinone.train import nonfinite, step_parts
from manyinone.train.config import TrainConfig

from test_train import metrics

FAST = dict(data="demo", batch_size=2, max_length=200, lr=1e-3, exits=[2, 4])


def poison(monkeypatch, at_step: int, where: str) -> None:
    """At optimizer step `at_step` (0-based), make the deepest exit's hidden states NaN in the forward
    (`where="forward"`) or only their gradient NaN (`where="backward"`: every loss stays finite)."""
    real = step_parts.exit_losses

    def exit_losses(cfg, adapter, space, exit_modules, weights, hidden, labels, teacher_target, step, micro):
        if step == at_step:
            deepest = max(hidden, key=lambda s: s["depth"])
            h = hidden[deepest]
            if where == "forward":
                hidden = {**hidden, deepest: h * float("nan")}
            else:
                h.register_hook(lambda g: torch.full_like(g, float("nan")))
        return real(cfg, adapter, space, exit_modules, weights, hidden, labels, teacher_target, step, micro)

    monkeypatch.setattr(step_parts, "exit_losses", exit_losses)


def run(model: Path, output: Path, **fields) -> Path:
    return loop.train(TrainConfig(model=str(model), output=str(output), **{**FAST, **fields}), show_progress=False)


def test_a_nan_loss_stops_at_its_step_naming_the_exit(tiny_llama, tmp_path, monkeypatch):
    poison(monkeypatch, at_step=0, where="forward")
    out = tmp_path / "run"
    with pytest.raises(ManyinoneError) as err:
        run(tiny_llama, out, max_steps=3)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("step 1: non-finite ce/depth=4=nan")
    assert "ce/depth=2" not in message  # the shallower exit stayed finite and is not blamed
    assert "no checkpoint was written" in message and "--dtype float32" in message
    assert not (out / "model.safetensors").exists()  # no final checkpoint made of NaN
    assert [r["step"] for r in metrics(out)] == [1] and "nonfinite" in metrics(out)[0]


def test_a_nan_gradient_with_finite_losses_names_the_deepest_bad_parameter(tiny_llama, tmp_path, monkeypatch):
    poison(monkeypatch, at_step=0, where="backward")
    with pytest.raises(ManyinoneError) as err:
        run(tiny_llama, tmp_path / "run", max_steps=2)
    message = str(err.value)
    assert message.startswith("step 1: non-finite grad_norm=nan with finite losses")
    # The NaN entered at layer 4's output: the deepest bad gradient is in layer 4 (index 3), none above it.
    deepest = message.split("met it first): ")[1].split(",")[0]
    assert deepest.startswith("model.layers.3."), message
    assert "lm_head" not in message and "model.norm" not in message


def test_the_last_checkpoint_stays_intact_and_finite(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison(monkeypatch, at_step=2, where="backward")
    with pytest.raises(ManyinoneError) as err:
        run(tiny_llama, out, max_steps=4, save_every=1)
    last = complete_resume_dirs(out)[-1]
    assert last.name == "step-0000002" and repr(str(last)) in str(err.value)
    state = load_file(str(last / loop.TRAINABLE_FILE)) if (last / loop.TRAINABLE_FILE).exists() else None
    tensors = state or {k: v for f in last.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    # Once the cause is gone the same command resumes from it and finishes.
    monkeypatch.undo()
    run(tiny_llama, out, max_steps=4, save_every=1)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4] and not any("nonfinite" in r for r in metrics(out))


def test_nonfinite_skips_skips_the_update_and_the_run_finishes(tiny_llama, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, at_step=1, where="forward")
    out = run(tiny_llama, tmp_path / "run", max_steps=3, nonfinite_skips=1)
    records = metrics(out)
    assert [("nonfinite" in r) for r in records] == [False, True, False]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in (records[0], records[2]))
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert "step skipped (no update), 1 of nonfinite_skips=1" in capsys.readouterr().err


def test_a_skipped_step_changes_no_weight_and_no_optimizer_state(tiny_llama, tmp_path, monkeypatch):
    poison(monkeypatch, at_step=1, where="backward")
    out = run(tiny_llama, tmp_path / "run", max_steps=2, save_every=1, nonfinite_skips=1)
    before, after = complete_resume_dirs(out)  # the states after step 1 and after the skipped step 2
    assert [d.name for d in (before, after)] == ["step-0000001", "step-0000002"]
    w1, w2 = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    o1, o2 = (torch.load(d / "optimizer.pt", weights_only=True)["state"] for d in (before, after))
    assert all(torch.equal(o1[i][k], o2[i][k]) for i in o1 for k in o1[i])  # moments and step count untouched


def test_describe_and_metrics_unit():
    sums = {"ce/depth=2": 1.0, "ce/depth=4": float("inf"), "loss": float("nan"), "grad_norm": 2.0}
    assert nonfinite.nonfinite_metrics(sums) == ["ce/depth=4", "loss"]
    line = nonfinite.describe(7, sums, ["ce/depth=4", "loss"], [])
    assert line == "step 7: non-finite ce/depth=4=inf, loss=nan"
    line = nonfinite.describe(3, {"grad_norm": float("nan")}, ["grad_norm"], ["a", "b", "c", "d"])
    assert line.endswith("4 parameter(s) got a non-finite gradient, the deepest (where backward met it first): d, c, b")


def test_nonfinite_grads_reads_every_gradient():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad, b.grad = torch.tensor([1.0, float("inf")]), torch.tensor([0.0, 1.0])  # c has no gradient
    assert nonfinite.nonfinite_grads([("a", a), ("b", b), ("c", c)]) == ["a"]


# --- a known cause, checked before training: a row that begins with an all-zero embedding ----------
def _deep_grad_at_start(zero_start: bool) -> float:
    """Largest gradient reaching the embeddings of a 16-layer float32 model at position 0, whose token
    (BOS) has its embedding row zeroed or left as drawn."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from helpers import BOS_ID, VOCAB_SIZE

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=16,
                         num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    if zero_start:
        with torch.no_grad():
            model.get_input_embeddings().weight[BOS_ID] = 0
    ids = torch.cat([torch.tensor([[BOS_ID]]), torch.randint(4, VOCAB_SIZE, (1, 31))], dim=1)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    model(inputs_embeds=embeds, labels=ids).loss.backward()
    return float(embeds.grad[0, 0].abs().max())


def test_a_zero_embedding_at_the_row_start_grows_the_gradient_by_orders_of_magnitude():
    # The 13B stand-in's NaN (benchmarks/RESULTS.md): the same model, the same tokens; only the BOS row differs.
    drawn, zeroed = _deep_grad_at_start(False), _deep_grad_at_start(True)
    assert math.isfinite(drawn) and drawn < 10
    assert not math.isfinite(zeroed) or zeroed > 1e6 * drawn


def test_training_warns_when_rows_begin_with_an_all_zero_embedding(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from manyinone.train.batches import load_run_data

    folder = tmp_path / "zero-bos"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = TrainConfig(model=str(folder), output=str(tmp_path / "run"), **FAST, max_steps=1)
    firsts = {ex.input_ids[0] for ex in load_run_data(cfg, tokenizer, 1).unpacked}
    assert nonfinite.zero_embedding_starts(model, firsts) == {}
    with torch.no_grad():
        for t in firsts:
            model.get_input_embeddings().weight[t] = 0
    assert set(nonfinite.zero_embedding_starts(model, firsts)) == firsts
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    capsys.readouterr()
    loop.train(cfg, show_progress=False)
    err = capsys.readouterr().err
    assert "input embedding is all zeros" in err and f"id {min(firsts)} " in err
    run(tiny_llama, tmp_path / "plain", max_steps=1)  # the same data on the drawn rows: no warning
    assert "input embedding is all zeros" not in capsys.readouterr().err
