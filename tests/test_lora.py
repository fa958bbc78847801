"""LoRA-nested SoFT through peft: parity with peft's own model, merged exports, frozen base, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

import manyinone  # noqa: E402
from manyinone.core.errors import ManyinoneError  # noqa: E402
from manyinone.core.registry import adapter_for  # noqa: E402
from manyinone.core.space import SubnetSpec  # noqa: E402
from manyinone.io.checkpoint import build_index, save_checkpoint  # noqa: E402
from manyinone.io.export import export_budget  # noqa: E402
from manyinone.io.loading import load_pretrained  # noqa: E402
from manyinone.train import lora  # noqa: E402
from manyinone.train.config import LoraSettings, TrainConfig, load_config  # noqa: E402
from manyinone.train.loop import TRAINABLE_FILE, train  # noqa: E402

from helpers import sample_batch  # noqa: E402
from test_train import _crash_after_step, assert_bitwise_equal, weights  # noqa: E402

FAST = dict(data="demo", batch_size=2, max_length=200, lr=1e-2, exits=[2, 4])


def lora_model(source: Path, r: int = 4, targets="all-linear", seed: int = 1):
    """The tiny model with adapters whose B is random (peft starts B at zero: a no-op adapter)."""
    model, tokenizer = load_pretrained(str(source))
    tuned = lora.apply_lora(model, LoraSettings(r=r, targets=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, tokenizer, tuned


def test_nested_forward_at_full_depth_equals_peft(tiny_llama):
    model, _, tuned = lora_model(tiny_llama)
    ids, mask = sample_batch()
    adapter = adapter_for(model)
    with torch.no_grad():
        hidden = adapter.forward_nested(ids, mask, [SubnetSpec(depth=4)])[SubnetSpec(depth=4)]
        ours = adapter.exit_logits(hidden)  # [batch, seq, vocab]
        theirs = tuned(input_ids=ids, attention_mask=mask).logits
        with tuned.disable_adapter():
            base = tuned(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (ours - base).abs().max() > 1e-2  # the adapters really change the output


def test_adapters_are_shared_and_nested_like_the_layers(tiny_llama):
    """Exit 2 is the first two layers with their adapters: equal to peft's model cut to two layers."""
    model, _, tuned = lora_model(tiny_llama)
    ids, mask = sample_batch()
    adapter = adapter_for(model)
    with torch.no_grad():
        exit2 = adapter.exit_logits(adapter.forward_nested(ids, mask, [SubnetSpec(depth=2)])[SubnetSpec(depth=2)])
        layers = model.model.layers
        model.model.layers = layers[:2]
        model.config.num_hidden_layers = 2
        try:
            cut = tuned(input_ids=ids, attention_mask=mask).logits
        finally:
            model.model.layers, model.config.num_hidden_layers = layers, 4
    torch.testing.assert_close(exit2, cut, rtol=0, atol=1e-6)


def test_merged_export_equals_the_nested_exit_with_adapters(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer, tuned = lora_model(tiny_llama)
    ids, mask = sample_batch()
    adapter = adapter_for(model)
    space = adapter.space({"depth": [2, 4]})
    with torch.no_grad():
        nested = adapter.exit_logits(adapter.forward_nested(ids, mask, [SubnetSpec(depth=2)])[SubnetSpec(depth=2)])
    plain = lora.merge(tuned)
    assert plain is model and not lora.is_lora(plain)
    save_checkpoint(plain, tokenizer, build_index(adapter, space), tmp_path / "ckpt")
    export_budget(tmp_path / "ckpt", 0.6, tmp_path / "half")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "half", dtype=torch.float32)
    assert exported.config.num_hidden_layers == 2
    assert not any("lora" in k for k in exported.state_dict())
    with torch.no_grad():
        served = manyinone.load(tmp_path / "ckpt", budget=0.6)(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(exported(input_ids=ids, attention_mask=mask).logits, nested, rtol=0, atol=1e-5)
    torch.testing.assert_close(served, nested, rtol=0, atol=1e-5)


# --- training ---------------------------------------------------------------------------------------
def config(model: Path, output: Path, **fields) -> TrainConfig:
    return TrainConfig(**{"model": str(model), **FAST, "output": str(output), "lora": {"r": 4}, **fields})


@pytest.fixture(scope="module")
def lora_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    return train(config(tiny_llama, out, max_steps=4, save_every=2, exit_heads="translator"), show_progress=False)


def test_merging_non_finite_adapters_is_a_one_line_error(tiny_llama):
    model, _, tuned = lora_model(tiny_llama)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
    with pytest.raises(ManyinoneError, match="non-finite weights .*not written"):
        lora.merge(tuned)


def test_adapters_train_and_the_base_stays_bit_identical(tiny_llama, lora_run):
    """The merged checkpoint is the untouched base plus scale * B @ A on every adapted weight, and the
    exact base everywhere else; the resumable state holds only adapters and exit modules."""
    base = load_file(str(tiny_llama / "model.safetensors"))
    merged = weights(lora_run)
    trained = load_file(str(lora_run / "checkpoints" / "step-0000004" / TRAINABLE_FILE))
    assert trained and all("lora_" in k or "manyinone_exit_heads" in k for k in trained)
    scale = 2.0  # alpha defaults to 2 * r
    adapted = set()
    for key in trained:
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        a, b = trained[key], trained[key.replace("lora_A", "lora_B")]
        assert b.abs().max() > 0  # B starts at zero: it trained
        weight = f"{module}.weight"
        torch.testing.assert_close(merged[weight], base[weight] + scale * b @ a, rtol=0, atol=1e-6)
        adapted.add(weight)
    assert len(adapted) == 4 * 7  # q, k, v, o, gate, up, down of 4 layers
    untouched = [k for k in base if k not in adapted]
    assert untouched and all(torch.equal(merged[k], base[k]) for k in untouched)  # embeddings, norms, head
    index = json.loads((lora_run / "manyinone.json").read_text())
    assert index["train"]["tuning"].startswith("lora r=4")
    assert "exit_heads" in index  # per-exit translators kept working with adapters


def test_lora_checkpoint_serves_and_exports(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    ids, mask = sample_batch()
    export_budget(lora_run, 0.6, tmp_path / "half")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "half", dtype=torch.float32)
    with torch.no_grad():
        ours = manyinone.load(lora_run, budget=0.6)(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(exported(input_ids=ids, attention_mask=mask).logits, ours, rtol=0, atol=1e-5)


def test_the_runtime_serves_a_lora_export_like_transformers(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from manyinone.runtime import Runtime
    from test_runtime import hf_greedy

    half = export_budget(lora_run, 0.6, tmp_path / "half")  # translator folded, adapters merged
    runtime = Runtime.open(half, device="cpu")
    plain = AutoModelForCausalLM.from_pretrained(half, dtype=torch.float32).eval()
    prompt = [5, 17, 40, 33, 8, 21]
    assert runtime.generate([prompt], max_new_tokens=12, stop_ids=set()).tokens[0] == hf_greedy(plain, prompt, 12)


def test_lora_trains_with_a_frozen_teacher(tiny_llama, tmp_path):
    run = train(config(tiny_llama, tmp_path / "kd", max_steps=2, teacher=str(tiny_llama), exit_heads="translator"),
                show_progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["teacher_kl/depth=2"] >= 0 and r["teacher_kl/depth=4"] >= 0 for r in records)
    assert json.loads((run / "manyinone.json").read_text())["train"]["tuning"].startswith("lora")


def test_lora_resume_is_exact(tiny_llama, lora_run, tmp_path, monkeypatch):
    out = tmp_path / "crashy"
    cfg = config(tiny_llama, out, max_steps=4, save_every=2, exit_heads="translator")
    with monkeypatch.context() as patch:
        _crash_after_step(patch, 3)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg, show_progress=False)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    train(cfg, show_progress=False)
    assert_bitwise_equal(weights(out), weights(lora_run))
    assert_bitwise_equal(load_file(str(out / "exit_heads.safetensors")), load_file(str(lora_run / "exit_heads.safetensors")))


def test_bf16_lora_keeps_the_base_bf16_and_the_adapters_float32(tiny_llama, tmp_path, monkeypatch):
    seen = {}
    original = lora.apply_lora

    def spy(model, settings):
        tuned = original(model, settings)
        seen.update({n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()})
        return tuned

    monkeypatch.setattr(lora, "apply_lora", spy)
    run = train(config(tiny_llama, tmp_path / "bf16", max_steps=1, dtype="bfloat16"), show_progress=False)
    frozen = {d for n, (d, grad) in seen.items() if not grad}
    trainable = {d for n, (d, grad) in seen.items() if grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    assert all("lora_" in n for n, (_, grad) in seen.items() if grad)
    assert {t.dtype for t in weights(run).values()} == {torch.bfloat16}  # merged into a bf16 checkpoint


# --- bad input --------------------------------------------------------------------------------------
def test_targets_naming_no_module_are_refused(tiny_llama):
    model, _ = load_pretrained(str(tiny_llama))
    with pytest.raises(ManyinoneError, match=r"lora.targets \['qproj'\] name no Linear module.*q_proj") as err:
        lora.apply_lora(model, LoraSettings(r=4, targets=["q_proj", "qproj"]))
    assert "\n" not in str(err.value)
    assert not lora.is_lora(model)  # refused before peft touched the model


@pytest.mark.parametrize("override, message", [
    ("lora.r=0", r"config field 'lora.r': Input should be greater than 0 \(got 0\)"),
    ("lora.r=-3", r"config field 'lora.r': Input should be greater than 0 \(got -3\)"),
    ("lora.rank=4", r"config field 'lora.rank'.*allowed keys: r, alpha, dropout, targets"),
    ("optimizer=sgd", r"config field 'optimizer'.*'adamw', 'adamw8bit', 'adamw4bit' or 'adamw-bf16sr' \(got 'sgd'\)"),
    ("dtype=float16", r"config field 'dtype'.*'auto', 'float32' or 'bfloat16' \(got 'float16'\)"),
    ("lora.targets=[]", r"lora.targets \[\] must name at least one module"),
])
def test_bad_settings_are_one_line_errors(override, message):
    with pytest.raises(ManyinoneError, match=message) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_lora_on_width_axes_is_refused():
    with pytest.raises(ManyinoneError, match=r"lora trains the depth axis only; got axes \['depth', 'width'\]"):
        load_config(None, ["lora=8", "axes=[depth,width]"])


def test_lora_flags_compose():
    cfg = load_config(None, ["lora.alpha=32", "lora.targets=q_proj,v_proj"], lora=16)
    assert (cfg.lora.r, cfg.lora.scale_alpha, cfg.lora.targets) == (16, 32.0, ["q_proj", "v_proj"])
    assert load_config(None, ["lora=8"]).lora.scale_alpha == 16.0
    assert load_config(None, []).lora is None
