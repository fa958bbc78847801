"""Per-exit modules (translators, SFT+heads, feed-forward blocks, decoder layers): init, loss routing,
checkpoint round trip, export folding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import manyinone
from helpers import max_abs_diff, sample_batch
from manyinone.train.config import TrainConfig, load_config
from manyinone.core.space import SubnetSpec
from manyinone.core.adapter import ModelAdapter
from manyinone.core.errors import ManyinoneError
from manyinone.eval.session import load_for_eval
from manyinone.train.exit_heads import ExitHeads, for_adapter
from manyinone.io.export import export_all, export_budget
from manyinone.train.lean_loss import LinearHead
from manyinone.train.losses import nested_loss
from manyinone.core.registry import adapter_for
from manyinone.train.loop import train
from manyinone.train.model_setup import param_groups

TOL = 1e-5


def _model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["translator", "head", "block", "layer"])
def test_fresh_exit_heads_equal_the_shared_head(tiny_llama, kind):
    """Initialised from the model's own norm and head, every exit's logits start unchanged."""
    adapter = adapter_for(_model(tiny_llama))
    space = adapter.space({"depth": [2, 4]})
    heads = for_adapter(adapter, kind, space)
    assert heads.specs == [SubnetSpec(depth=2)]  # never the full depth
    hidden = torch.randn(5, adapter.model.config.hidden_size)
    with torch.no_grad():
        assert max_abs_diff(heads.linear_head(SubnetSpec(depth=2))(hidden), adapter.exit_logits(hidden)) <= TOL


def test_translator_is_applied_after_the_exit_norm():
    """logits = W · (T · norm(h)); checked against a hand-built 2-d example."""
    norm = torch.nn.Identity()
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # [vocab=3, hidden=2]
    heads = ExitHeads("translator", [SubnetSpec(depth=1)], norm, weight)
    with torch.no_grad():
        heads.maps["depth_1"].copy_(torch.tensor([[0.0, 2.0], [1.0, 0.0]]))  # T swaps and doubles
    logits = heads.linear_head(SubnetSpec(depth=1))(torch.tensor([[3.0, 5.0]]))
    # T·h = [10, 3]; W·[10, 3] = [10, 3, 13]
    assert logits.tolist() == [[10.0, 3.0, 13.0]]
    assert heads.folded_head_weight(SubnetSpec(depth=1)).tolist() == [[0.0, 2.0], [1.0, 0.0], [1.0, 2.0]]


def test_nested_loss_takes_one_head_per_spec():
    """A mapping of heads gives each spec its own head; lean and plain paths agree."""
    torch.manual_seed(0)
    a, b = SubnetSpec(depth=1), SubnetSpec(depth=2)
    feats = {a: torch.randn(6, 4, requires_grad=True), b: torch.randn(6, 4, requires_grad=True)}
    targets = torch.randint(0, 7, (6,))
    w_a, w_b = torch.randn(7, 4), torch.randn(7, 4)
    lean = {a: LinearHead(norm=lambda h: h, weight=w_a), b: LinearHead(norm=lambda h: h, weight=w_b)}
    plain = {a: lambda h: h @ w_a.T, b: lambda h: h @ w_b.T}
    weights = {a: 1.0, b: 2.0}
    out_lean = nested_loss(feats, lean, targets, weights, teacher=b, distill_weight=0.5)
    out_plain = nested_loss(feats, plain, targets, weights, teacher=b, distill_weight=0.5)
    expected_ce_a = torch.nn.functional.cross_entropy(feats[a] @ w_a.T, targets)
    assert abs(out_plain.ce[a].item() - expected_ce_a.item()) <= 1e-6
    assert abs(out_lean.total.item() - out_plain.total.item()) <= 1e-5
    g_lean = torch.autograd.grad(out_lean.total, [feats[a], feats[b]])
    g_plain = torch.autograd.grad(out_plain.total, [feats[a], feats[b]])
    for x, y in zip(g_lean, g_plain):
        assert max_abs_diff(x, y) <= 1e-5


def _exit_heads_run(model: Path, tmp_path_factory, kind: str) -> Path:
    """3 steps at a high lr with `kind` exit heads at exit 2 of 4, so that they move."""
    out = tmp_path_factory.mktemp("runs") / kind
    cfg = TrainConfig(model=str(model), exits=[2, 4], data="demo", max_steps=3, batch_size=4, lr=1e-2,
                      exit_heads=kind, exit_heads_lr_scale=2.0, output=str(out))
    return train(cfg, show_progress=False)


@pytest.fixture(scope="module")
def translator_run(tiny_llama_tied, tmp_path_factory) -> Path:
    return _exit_heads_run(tiny_llama_tied, tmp_path_factory, "translator")


@pytest.fixture(scope="module")
def block_run(tiny_llama_tied, tmp_path_factory) -> Path:
    return _exit_heads_run(tiny_llama_tied, tmp_path_factory, "block")


@pytest.fixture(scope="module")
def layer_run(tiny_llama_tied, tmp_path_factory) -> Path:
    return _exit_heads_run(tiny_llama_tied, tmp_path_factory, "layer")


def _export_exit_2(run: Path, out: Path):
    """(exported model, ids, mask, its logits, the nested exit's, manyinone.load's) for exit 2 of `run`."""
    nested = manyinone.open_checkpoint(run)
    spec = SubnetSpec(depth=2)
    ids, mask = sample_batch()
    with torch.no_grad():
        expected = nested.exit_logits(spec, nested.forward_nested(ids, mask, [spec])[spec])
    budget = next(e["relative"]["flops"] for e in nested.index["specs"] if e["spec"] == {"depth": 2})
    exported = _model(export_budget(run, budget, out))
    with torch.no_grad():
        got = exported(input_ids=ids, attention_mask=mask).logits
        served = manyinone.load(run, budget=budget)(input_ids=ids, attention_mask=mask).logits
    return exported, ids, mask, got, expected, served


def test_translator_run_trains_the_maps_and_keeps_the_full_model_plain(translator_run):
    nested = manyinone.open_checkpoint(translator_run)
    assert nested.index["exit_heads"]["kind"] == "translator"
    t = nested.exit_heads.maps["depth_2"]
    assert not torch.allclose(t, torch.eye(t.shape[0]))  # it was trained
    # The checkpoint's weights file holds only HF tensors: plain transformers loads it cleanly.
    plain = AutoModelForCausalLM.from_pretrained(translator_run, dtype=torch.float32, output_loading_info=True)
    assert not plain[1]["unexpected_keys"] and not plain[1]["missing_keys"]


# a block or a layer is one more decoder layer
@pytest.mark.parametrize("run, layers", [("translator_run", 2), ("block_run", 3), ("layer_run", 3)])
def test_exported_exit_with_heads_equals_the_nested_exit(run, layers, request, tmp_path):
    folder = request.getfixturevalue(run)
    exported, _, mask, got, expected, served = _export_exit_2(folder, tmp_path / "b")
    assert exported.config.tie_word_embeddings is False and exported.config.num_hidden_layers == layers
    assert max_abs_diff(got, expected, mask) <= TOL
    assert max_abs_diff(served, expected, mask) <= TOL
    assert "exit_heads" not in manyinone.io.checkpoint.read_index(tmp_path / "b")  # folded: nothing left to load


def test_export_all_keeps_the_exit_heads(translator_run, tmp_path):
    out = export_all(translator_run, tmp_path / "all")
    again = manyinone.open_checkpoint(out)
    before = manyinone.open_checkpoint(translator_run)
    assert torch.equal(again.exit_heads.maps["depth_2"], before.exit_heads.maps["depth_2"])


def test_sft_plus_heads_trains_only_the_heads(trained_run, tmp_path):
    """The baseline: exit heads on a frozen SFT checkpoint; the base weights stay bit-identical."""
    cfg = TrainConfig(model=str(trained_run), exits=[2, 4], data="demo", max_steps=2, batch_size=4, lr=1e-2,
                      exit_heads="head", freeze_base=True, output=str(tmp_path / "heads"))
    out = train(cfg, show_progress=False)
    before, after = _model(trained_run).state_dict(), _model(out).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    heads = manyinone.open_checkpoint(out).exit_heads
    assert heads.kind == "head"
    assert not torch.equal(heads.maps["depth_2"], before["lm_head.weight"])  # its own head moved


def test_missing_exit_heads_file_is_a_clear_error(translator_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(translator_run, copy)
    (copy / "exit_heads.safetensors").unlink()
    (copy / "checksums.json").unlink(missing_ok=True)  # so the missing file itself is what gets reported
    with pytest.raises(ManyinoneError, match="exit_heads"):
        manyinone.open_checkpoint(copy)


def test_freeze_base_without_exit_heads_is_refused():
    with pytest.raises(ManyinoneError, match="freeze_base"):
        load_config(None, ["freeze_base=true"])
    with pytest.raises(ManyinoneError, match="exit_heads"):
        load_config(None, ["exit_heads=lens"])


def test_exit_heads_lr_scale_sets_the_translators_step(tiny_llama, tmp_path):
    """Adam's first step moves each weight by about lr: the translators must move by lr * scale."""
    lr, scale = 1e-3, 7.0
    cfg = TrainConfig(model=str(tiny_llama), exits=[2, 4], data="demo", max_steps=1, batch_size=4, lr=lr,
                      exit_heads="translator", exit_heads_lr_scale=scale, output=str(tmp_path / "run"))
    out = train(cfg, show_progress=False)
    moved_map = (manyinone.open_checkpoint(out).exit_heads.maps["depth_2"] - torch.eye(64)).abs().max().item()
    before, after = _model(tiny_llama).state_dict(), _model(out).state_dict()
    moved_body = max((after[k] - before[k]).abs().max().item() for k in before)
    assert moved_map == pytest.approx(lr * scale, rel=1e-3)
    assert moved_body == pytest.approx(lr, rel=1e-3)


def test_building_an_exit_sub_model_leaves_the_full_model_alone(translator_run):
    """Sub-models share tensors with the full model: folding an exit's norm must not write into them."""
    nested = manyinone.open_checkpoint(translator_run)
    norm_before = nested.model.model.norm.weight.detach().clone()
    with torch.no_grad():  # make the exit's norm differ from the final one, so a leak would show
        nested.exit_heads.norms["depth_2"].weight.mul_(3.0)
    sub = nested.sub_model(SubnetSpec(depth=2))
    assert torch.equal(nested.model.model.norm.weight, norm_before)
    assert torch.equal(sub.model.norm.weight, nested.exit_heads.norms["depth_2"].weight)


# --- exit_heads="block": a per-exit feed-forward block (h + mlp(norm(h))) before the translator ---

def test_block_is_copied_from_the_first_skipped_layer_with_a_zero_output(tiny_llama):
    adapter = adapter_for(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    heads = for_adapter(adapter, "block", adapter.space({"depth": [1, 2, 4]}))
    layers = adapter.decoder_stack().layers
    for depth in (1, 2):
        block = heads.blocks[f"depth_{depth}"]
        assert torch.equal(block.mlp.gate_proj.weight, layers[depth].mlp.gate_proj.weight)
        assert block.mlp.gate_proj.weight.data_ptr() != layers[depth].mlp.gate_proj.weight.data_ptr()  # a copy
        assert not block.mlp.down_proj.weight.any()
        assert layers[depth].mlp.down_proj.weight.any()  # the model's own layer is untouched


def test_block_run_trains_the_blocks_and_saves_them(block_run):
    nested = manyinone.open_checkpoint(block_run)
    assert nested.index["exit_heads"]["kind"] == "block"
    assert nested.exit_heads.blocks["depth_2"].mlp.down_proj.weight.abs().max() > 0  # trained away from zero
    plain = AutoModelForCausalLM.from_pretrained(block_run, dtype=torch.float32, output_loading_info=True)
    assert not plain[1]["unexpected_keys"] and not plain[1]["missing_keys"]  # the blocks live beside, not inside


def test_exported_block_layer_adds_nothing_through_attention_and_caches_like_any_layer(block_run, tmp_path):
    exported, ids, _, _, _, _ = _export_exit_2(block_run, tmp_path / "b")
    assert not exported.model.layers[2].self_attn.o_proj.weight.any()
    with torch.no_grad():
        # the appended layer has its own KV-cache slot: cached greedy decoding equals the uncached forward
        prompt = ids[:1, :6]
        cached = exported.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        seq = prompt
        for _ in range(6):
            seq = torch.cat([seq, exported(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, seq)
    nested = manyinone.open_checkpoint(block_run)  # the full model was left alone by the export
    assert nested.model.config.num_hidden_layers == 4 and len(nested.model.model.layers) == 4


@pytest.mark.parametrize("run, costed_as", [("translator_run", 2), ("block_run", 3), ("layer_run", 3)])
def test_the_index_costs_a_block_exit_as_the_layer_its_export_appends(run, costed_as, request):
    nested = manyinone.open_checkpoint(request.getfixturevalue(run))
    entry = next(e for e in nested.index["specs"] if e["spec"] == {"depth": 2})
    cost = nested.adapter.cost(SubnetSpec(depth=costed_as), nested.index["context"])
    full = next(e for e in nested.index["specs"] if e["spec"] == {"depth": 4})
    assert entry["flops_per_token"] == cost.flops_per_token and entry["params"] == cost.params
    assert entry["relative"]["flops"] < full["relative"]["flops"] == 1.0  # still below the full model's
    _, _, costs, _ = load_for_eval(str(request.getfixturevalue(run)), [2, 4], device="cpu")
    assert costs["depth=2"] == entry["relative"]["flops"]  # `manyinone eval` reports the same cost


def test_blocks_train_at_the_body_rate_and_translators_at_theirs(tiny_llama):
    adapter = adapter_for(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    heads = for_adapter(adapter, "block", adapter.space({"depth": [2, 4]}))
    cfg = TrainConfig(model=str(tiny_llama), exits=[2, 4], exit_heads="block", exit_heads_lr_scale=10.0)
    groups = param_groups(adapter.model, heads, cfg)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(heads.maps["depth_2"])] == 10.0
    assert scale[id(heads.blocks["depth_2"].mlp.up_proj.weight)] == 1.0
    assert len(scale) == sum(len(g["params"]) for g in groups)  # no parameter in two groups


def test_block_with_lora_is_refused():
    with pytest.raises(ValueError, match="exit_heads='block'.*LoRA"):
        TrainConfig(model="x", exit_heads="block", lora=8)


def test_block_needs_an_adapter_that_builds_blocks(tiny_llama):
    norm, weight = torch.nn.Identity(), torch.randn(7, 4)
    with pytest.raises(ManyinoneError, match="needs the model's adapter to build its blocks"):
        ExitHeads("block", [SubnetSpec(depth=1)], norm, weight)
    adapter = adapter_for(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    with pytest.raises(ManyinoneError, match="serves depth exits only"):
        ExitHeads("block", [SubnetSpec(depth=1, width=8)], norm, weight, adapter.exit_block)
    with pytest.raises(ManyinoneError, match=r"exit_heads='block' needs decoder layers.*'bare' adapter offers none"):
        _BareAdapter.exit_block(_BareAdapter.__new__(_BareAdapter), 1)


class _BareAdapter(ModelAdapter):
    """An adapter that keeps ModelAdapter's defaults for exit blocks."""

    name = "bare"
    model_types = ()
    axes = ("depth",)
    space = forward_nested = exit_logits = cost = extract = None


# --- exit_heads="layer": a per-exit decoder layer (attention + MLP) before the translator ------------
def test_exit_layer_is_copied_from_the_first_skipped_layer_with_zero_outputs(tiny_llama):
    adapter = adapter_for(_model(tiny_llama))
    heads = for_adapter(adapter, "layer", adapter.space({"depth": [1, 2, 4]}))
    layers = adapter.model.model.layers
    for depth in (1, 2):
        layer = heads.layers[f"depth_{depth}"]
        assert torch.equal(layer.self_attn.q_proj.weight, layers[depth].self_attn.q_proj.weight)
        assert layer.self_attn.q_proj.weight.data_ptr() != layers[depth].self_attn.q_proj.weight.data_ptr()
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()


def test_exit_layers_run_on_the_exit_with_its_mask_and_start_as_the_identity(tiny_llama):
    from manyinone.train.exit_heads import forward_nested

    adapter = adapter_for(_model(tiny_llama))
    space = adapter.space({"depth": [2, 4]})
    heads = for_adapter(adapter, "layer", space)
    spec, full = SubnetSpec(depth=2), space.full()
    ids, mask = sample_batch()
    with torch.no_grad():
        plain = adapter.forward_nested(ids, mask, [spec, full])
        fresh = forward_nested(adapter, heads, ids, mask, [spec, full])
        assert torch.equal(fresh[spec], plain[spec]) and torch.equal(fresh[full], plain[full])
        for p in heads.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
        moved = forward_nested(adapter, heads, ids, mask, [spec, full])
        # by hand: the exit's layer after layer 2, with the mask, positions and rotary of the model's own call
        sub = adapter.extract(spec)
        adapter.append_exit_layer(sub, heads.layers["depth_2"])
        sub.model.norm = torch.nn.Identity()
        by_hand = sub(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(moved[full], plain[full])  # the main stream is untouched
    assert max_abs_diff(moved[spec], plain[spec], mask) > 1e-3  # the layer now does something
    assert max_abs_diff(moved[spec], by_hand, mask) <= TOL


def test_layer_run_trains_the_layers_and_the_runtime_serves_its_export_s_tokens(layer_run, tmp_path):
    from manyinone.runtime import Runtime

    nested = manyinone.open_checkpoint(layer_run)
    assert nested.index["exit_heads"]["kind"] == "layer"
    assert nested.exit_heads.layers["depth_2"].self_attn.o_proj.weight.abs().max() > 0  # trained away from zero
    plain = AutoModelForCausalLM.from_pretrained(layer_run, dtype=torch.float32, output_loading_info=True)
    assert not plain[1]["unexpected_keys"] and not plain[1]["missing_keys"]  # the layers live beside, not inside
    rt = Runtime.from_nested(nested, max_len=64)
    budget = next(e["relative"]["flops"] for e in nested.index["specs"] if e["spec"] == {"depth": 2})
    exported = _model(export_budget(layer_run, budget, tmp_path / "e"))
    prompt = [5, 6, 7, 8, 9]
    with torch.no_grad():
        want = exported.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 eos_token_id=None, pad_token_id=3)[0, len(prompt):].tolist()
    assert rt.generate([prompt], budget=budget, max_new_tokens=8, stop_ids=set()).tokens[0] == want


def test_exit_layers_train_at_the_body_rate_and_lora_is_refused(tiny_llama):
    adapter = adapter_for(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    heads = for_adapter(adapter, "layer", adapter.space({"depth": [2, 4]}))
    cfg = TrainConfig(model=str(tiny_llama), exits=[2, 4], exit_heads="layer", exit_heads_lr_scale=10.0)
    scale = {id(p): g["lr_scale"] for g in param_groups(adapter.model, heads, cfg) for p in g["params"]}
    assert scale[id(heads.maps["depth_2"])] == 10.0
    assert scale[id(heads.layers["depth_2"].self_attn.k_proj.weight)] == 1.0
    with pytest.raises(ValueError, match="exit_heads='layer'.*LoRA"):
        TrainConfig(model="x", exit_heads="layer", lora=8)
