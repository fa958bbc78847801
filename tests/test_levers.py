"""Training levers for exit agreement: LayerSkip-style layer dropout and per-exit-segment learning rates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from manyinone.core.errors import ManyinoneError
from manyinone.io.loading import load_pretrained
from manyinone.train.config import TrainConfig
from manyinone.train.layer_dropout import dropped_layers, keep_masks, layer_rates
from manyinone.train.loop import train
from manyinone.train.model_setup import param_groups

FAST = dict(data="demo", batch_size=2, max_length=200, lr=1e-3, max_steps=3)


def config(model: Path, output: Path, **fields) -> TrainConfig:
    return TrainConfig(**{"model": str(model), "exits": [2, 4], **FAST, "output": str(output), **fields})


def test_layer_rates_rise_linearly_from_zero():
    assert layer_rates(5, 0.2) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert layer_rates(1, 0.5) == [0.0]


def test_keep_masks_follow_the_rates_and_the_seed():
    rates = [0.0, 0.5, 0.99]
    masks = keep_masks(rates, 4000, torch.Generator().manual_seed(3))  # [layers, batch]
    assert masks.shape == (3, 4000)
    assert bool(masks[0].all())  # rate 0: never skipped
    assert masks.float().mean(1)[1].item() == pytest.approx(0.5, abs=0.03)
    assert masks.float().mean(1)[2].item() == pytest.approx(0.01, abs=0.01)
    assert torch.equal(masks, keep_masks(rates, 4000, torch.Generator().manual_seed(3)))


def test_a_dropped_layer_is_skipped_for_its_examples_only(tiny_llama):
    model, _ = load_pretrained(str(tiny_llama))
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    mask = torch.ones_like(ids)
    keep = torch.ones(len(model.model.layers), 2, dtype=torch.bool)
    keep[1, 0] = False  # example 0 skips layer 1
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with dropped_layers(model.model.layers, keep):
            mixed = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        layers = model.model.layers
        model.model.layers = torch.nn.ModuleList([m for i, m in enumerate(layers) if i != 1])
        model.config.num_hidden_layers -= 1
        try:
            without = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            model.model.layers = layers
            model.config.num_hidden_layers += 1
    torch.testing.assert_close(mixed[1], full[1])  # example 1 ran every layer
    torch.testing.assert_close(mixed[0], without[0])  # example 0: as if layer 1 were gone
    assert not torch.allclose(mixed[0], full[0])
    assert not any(layer._forward_hooks for layer in layers)  # the hooks leave with the context


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_layer_dropout_changes_training_and_replays_exactly(tiny_llama, tmp_path):
    plain = _losses(train(config(tiny_llama, tmp_path / "plain"), show_progress=False))
    first = _losses(train(config(tiny_llama, tmp_path / "a", layer_dropout=0.9), show_progress=False))
    again = _losses(train(config(tiny_llama, tmp_path / "b", layer_dropout=0.9), show_progress=False))
    assert first == again  # masks derive from (seed, step)
    assert first != plain


def test_segment_lr_scales_put_each_layer_in_its_exit_group(tiny_llama):
    model, _ = load_pretrained(str(tiny_llama))
    cfg = TrainConfig(model=str(tiny_llama), exits=[1, 3], segment_lr_scales=[4.0, 2.0])
    layers = model.model.layers
    groups = param_groups(model, None, cfg, layers)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert {scale_of[id(p)] for p in layers[0].parameters()} == {4.0}
    assert {scale_of[id(p)] for layer in layers[1:3] for p in layer.parameters()} == {2.0}
    assert {scale_of[id(p)] for p in layers[3].parameters()} == {1.0}  # past the last exit
    assert scale_of[id(model.lm_head.weight)] == 1.0


def test_segment_lr_scales_need_one_positive_number_per_exit(tiny_llama):
    with pytest.raises(ManyinoneError, match="one positive number per exit"):
        from manyinone.train.config import load_config
        load_config(None, ["exits=[1,3]", "segment_lr_scales=[1]"])
    with pytest.raises(ManyinoneError, match="one positive number per exit"):
        from manyinone.train.config import load_config
        load_config(None, ["exits=[1,3]", "segment_lr_scales=[1,0]"])


# --- named recipes ---------------------------------------------------------------------------------


def test_a_recipe_applies_first_and_flags_win(tmp_path):
    from manyinone.train.config import load_config

    cfg = load_config(None, ["lr=5e-4"], recipe="gentle", exits=[2, 4, 6])
    assert cfg.exit_weights == [1.0, 1.0, 3.0]  # sized to the run's exits, the full depth at 3x
    assert cfg.exit_heads == "translator" and cfg.epochs == 4
    assert cfg.lr == 5e-4  # --set wins over the recipe
    assert load_config(None, recipe="gentle").exit_weights == [1.0, 1.0, 1.0, 1.0, 3.0]  # 5 default exits


def test_the_agree_recipe_says_what_it_needs(tmp_path):
    from manyinone.train.config import load_config

    with pytest.raises(ManyinoneError, match=r"recipe 'agree' needs teacher=\.\.\., mix_data=\.\.\."):
        load_config(None, recipe="agree")
    cfg = load_config(None, ["teacher=runs/sft", "mix_data=gen.jsonl"], recipe="agree")
    assert (cfg.lr, cfg.epochs, cfg.mix_ratio, cfg.exit_heads_lr_scale) == (3e-4, 1, 0.9, 10.0)
    assert cfg.teacher_full_weight == 3.0 and set(cfg.exit_weights) == {1.0}  # the teacher holds the full depth
    assert cfg.exit_heads == "layer"  # round 8's best (benchmarks/RESULTS.md)
    with pytest.raises(ManyinoneError, match="recipe 'fast' unknown; known: gentle, agree"):
        load_config(None, recipe="fast")


def test_train_command_takes_a_recipe(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from manyinone.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_llama), "--recipe", "gentle", "--exits", "2,4",
                                      "--max-steps", "1", "--batch-size", "2", "--output", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    saved = (out / "train_config.yaml").read_text()
    assert "exit_heads: translator" in saved and "exit_heads_lr_scale: 30.0" in saved


# --- on-policy rows (GKD-style) ---------------------------------------------------------------------


def _tiny_examples(tokenizer, n=4):
    from manyinone.train.data import load_records, tokenize_records

    return tokenize_records(load_records("demo", f"0:{n}"), tokenizer, 200, "alpaca")


def test_on_policy_batches_are_reproducible_from_seed_and_step(tiny_llama):
    from manyinone.train.on_policy import on_policy_batch, prompt_of, runtime_sampler

    model, tokenizer = load_pretrained(str(tiny_llama))
    sample = runtime_sampler(model, tokenizer, max_new_tokens=12, temperature=1.0, max_len=200)
    assert model.training  # the sampler leaves the model as training had it
    examples = _tiny_examples(tokenizer)
    args = dict(ratio=0.5, seed=3, micro=0, max_length=200, stop_id=tokenizer.eos_token_id)
    first = on_policy_batch(examples, sample, step=7, **args)
    again = on_policy_batch(examples, sample, step=7, **args)
    other = on_policy_batch(examples, sample, step=8, **args)
    assert first == again
    assert first[:2] != other[:2]
    assert first[2:] == examples[2:]  # rows past round(0.5 * 4) keep their labels
    for fresh, original in zip(first[:2], examples[:2]):
        assert prompt_of(fresh) == prompt_of(original) and fresh != original
        assert len(fresh.input_ids) == len(fresh.labels)


def test_on_policy_samples_follow_the_current_weights(tiny_llama):
    from manyinone.train.on_policy import runtime_sampler

    model, tokenizer = load_pretrained(str(tiny_llama))
    sample = runtime_sampler(model, tokenizer, max_new_tokens=6, temperature=1.0, max_len=64)
    prompt = [[5, 6, 7]]
    before = sample(prompt, 0)
    with torch.no_grad():  # what an optimizer step does: change the weights in place
        model.lm_head.weight.mul_(-3.0)
    after = sample(prompt, 0)
    assert after != before  # same seed, new weights: a runtime reading a stale copy would repeat itself
    assert sample(prompt, 0) == after


def test_on_policy_sampler_keeps_one_cache_sized_to_its_largest_batch(tiny_llama):
    from manyinone.runtime.generate import DEFAULT_MAX_CACHE_MIB
    from manyinone.train.on_policy import runtime_sampler

    model, tokenizer = load_pretrained(str(tiny_llama))
    sample = runtime_sampler(model, tokenizer, max_new_tokens=4, temperature=1.0, max_len=64)
    rt = sample.runtime
    assert rt.max_cache_bytes == DEFAULT_MAX_CACHE_MIB * 2**20  # a bounded limit, not "keep every cache"
    rt.max_cache_bytes = 1  # as if the default were too small for these batches
    assert len(sample([[5, 6, 7]] * 3, 0)) == 3 and len(sample([[5, 6, 7]], 0)) == 1
    assert rt.max_cache_bytes == rt.cache_bytes(3)  # raised to the largest batch asked
    assert list(rt._runners) == [1]  # the 1-row cache replaced the 3-row one: not one cache per batch size


def test_on_policy_needs_a_teacher():
    from manyinone.train.config import load_config

    with pytest.raises(ManyinoneError, match="on_policy_ratio=0.5 scores the model's own samples against a frozen "
                                             "teacher; set teacher="):
        load_config(None, ["on_policy_ratio=0.5"])


def test_training_with_on_policy_rows_replays_exactly(tiny_llama, tmp_path):
    fields = dict(teacher=str(tiny_llama), on_policy_ratio=0.5, on_policy_tokens=8, max_steps=2)
    first = train(config(tiny_llama, tmp_path / "a", **fields), show_progress=False)
    again = train(config(tiny_llama, tmp_path / "b", **fields), show_progress=False)
    assert _losses(first) == _losses(again)
    rows = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert all(r["on_policy_s"] > 0 for r in rows)
    assert _losses(first) != _losses(train(config(tiny_llama, tmp_path / "c", teacher=str(tiny_llama), max_steps=2),
                                           show_progress=False))


# --- exit losses on a subset of positions -------------------------------------------------------------


def _loss_case(seed=0, tokens=12, hidden=6, vocab=11):
    from manyinone.core.space import SubnetSpec
    from manyinone.train.lean_loss import LinearHead
    from manyinone.train.losses import TeacherTarget

    g = torch.Generator().manual_seed(seed)
    specs = [SubnetSpec({"depth": d}) for d in (1, 2, 3)]
    feats = {s: torch.randn(tokens, hidden, generator=g, requires_grad=True) for s in specs}
    weight = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    head = LinearHead(norm=torch.nn.LayerNorm(hidden, elementwise_affine=False), weight=weight)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    frozen = TeacherTarget(torch.randn(tokens, hidden, generator=g), torch.randn(vocab, hidden, generator=g),
                           {s: 0.5 + i for i, s in enumerate(specs)})
    return specs, feats, head, weight, targets, frozen


@pytest.mark.parametrize("lean", [True, False])
def test_exit_losses_on_every_position_equal_the_nested_loss(lean):
    from manyinone.train.losses import nested_loss, nested_loss_on_positions

    specs, feats, head, weight, targets, frozen = _loss_case()
    if not lean:
        head = head.__call__  # a plain callable: the logits path
    weights = {specs[0]: 1.0, specs[1]: 2.0, specs[2]: 3.0}
    every = torch.arange(targets.numel())
    a = nested_loss(feats, head, targets, weights, teacher=specs[2], distill_weight=0.7, frozen=frozen)
    grads_a = torch.autograd.grad(a.total, [*feats.values(), weight])
    b = nested_loss_on_positions(feats, head, targets, weights, specs[2], every, 0.7, 1.0, frozen)
    grads_b = torch.autograd.grad(b.total, [*feats.values(), weight])
    torch.testing.assert_close(b.total, a.total)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga)
    assert set(b.ce) == set(a.ce) and set(b.teacher_kl) == set(a.teacher_kl)


def test_exit_losses_on_a_subset_use_only_those_positions():
    import torch.nn.functional as F

    from manyinone.train.losses import nested_loss_on_positions

    specs, feats, head, _, targets, _ = _loss_case()
    keep = torch.tensor([0, 3, 4, 9])
    out = nested_loss_on_positions(feats, head, targets, {s: 1.0 for s in specs}, specs[2], keep)
    for s in specs[:2]:  # exits: the kept positions only
        torch.testing.assert_close(out.ce[s], F.cross_entropy(head(feats[s][keep]).float(), targets[keep]))
    torch.testing.assert_close(out.ce[specs[2]], F.cross_entropy(head(feats[specs[2]]).float(), targets))  # full: all


def test_training_with_exit_positions_runs_and_differs(tiny_llama, tmp_path):
    plain = _losses(train(config(tiny_llama, tmp_path / "plain"), show_progress=False))
    subset = _losses(train(config(tiny_llama, tmp_path / "subset", exit_positions=0.25), show_progress=False))
    again = _losses(train(config(tiny_llama, tmp_path / "again", exit_positions=0.25), show_progress=False))
    assert subset == again and subset != plain


@pytest.mark.slow
def test_compiled_layers_train_like_eager_ones(tiny_llama, tmp_path):
    eager = _losses(train(config(tiny_llama, tmp_path / "eager", max_steps=2), show_progress=False))
    compiled = _losses(train(config(tiny_llama, tmp_path / "compiled", max_steps=2, compile_layers=True),
                             show_progress=False))
    assert compiled == pytest.approx(eager, rel=1e-4)
