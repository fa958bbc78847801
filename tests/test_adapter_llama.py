"""The LLaMA-layout depth adapter against plain transformers, and the adapter registry."""

from __future__ import annotations

import ast
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import manyinone
from helpers import max_abs_diff, sample_batch, tiny_config
from manyinone.core.adapter import ModelAdapter
from manyinone.core.cost import Cost
from manyinone.io.checkpoint import build_index
from manyinone.core.space import SubnetSpec
from manyinone.core.errors import ManyinoneError
from manyinone.core.registry import adapter_class, adapter_for, register_adapter, registered_model_types
from manyinone_llama import LlamaDepthAdapter, truncate_config

PACKAGE = Path(manyinone.__file__).parent
DEPTHS = (1, 2, 3, 4)


def load_eval(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture
def model(any_tiny_model):
    return load_eval(any_tiny_model)


# --- parity with plain transformers -------------------------------------------------------------
@torch.no_grad()
def test_full_spec_equals_hf_logits(model):
    ids, mask = sample_batch()  # the last row is right-padded
    adapter = adapter_for(model)
    full = SubnetSpec(depth=4)
    hidden = adapter.forward_nested(ids, mask, [full])[full]  # [batch, seq, hidden]
    nested = adapter.exit_logits(hidden)  # [batch, seq, vocab]
    plain = model(input_ids=ids, attention_mask=mask).logits
    assert nested.shape == plain.shape == (3, 12, 100)
    assert max_abs_diff(nested, plain) <= 1e-5


@torch.no_grad()
def test_every_exit_equals_the_extracted_model(model):
    ids, mask = sample_batch(seed=1)
    adapter = adapter_for(model)
    specs = [SubnetSpec(depth=d) for d in DEPTHS]
    hidden = adapter.forward_nested(ids, mask, specs)
    assert set(hidden) == set(specs)
    for spec in specs:
        sub = adapter.extract(spec)
        assert sub.config.num_hidden_layers == spec["depth"] and len(sub.model.layers) == spec["depth"]
        plain = sub(input_ids=ids, attention_mask=mask).logits
        assert max_abs_diff(adapter.exit_logits(hidden[spec]), plain) <= 1e-5, spec


@torch.no_grad()
def test_exits_differ_from_each_other(model):
    """Guards the parity tests against trivially passing (e.g. every exit returning the same tensor)."""
    ids, mask = sample_batch()
    adapter = adapter_for(model)
    hidden = adapter.forward_nested(ids, mask, [SubnetSpec(depth=2), SubnetSpec(depth=4)])
    assert max_abs_diff(hidden[SubnetSpec(depth=2)], hidden[SubnetSpec(depth=4)]) > 1e-3


@torch.no_grad()
def test_shallow_forward_leaves_the_model_whole(model):
    ids, mask = sample_batch()
    adapter = adapter_for(model)
    layers = list(model.model.layers)
    before = model(input_ids=ids, attention_mask=mask).logits
    adapter.forward_nested(ids, mask, [SubnetSpec(depth=1)])
    assert list(model.model.layers) == layers and model.config.num_hidden_layers == 4
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    assert not any(m._forward_hooks for m in model.modules())  # capture hooks removed


def test_shallow_forward_runs_only_the_layers_it_needs(tiny_llama):
    model = load_eval(tiny_llama)
    calls = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda *_args, i=i: calls.append(i))
    ids, mask = sample_batch()
    with torch.no_grad():
        adapter_for(model).forward_nested(ids, mask, [SubnetSpec(depth=2)])
    assert calls == [0, 1]


def test_forward_nested_keeps_gradients(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).train()
    adapter = adapter_for(model)
    ids, mask = sample_batch()
    hidden = adapter.forward_nested(ids, mask, [SubnetSpec(depth=1), SubnetSpec(depth=4)])
    adapter.exit_logits(hidden[SubnetSpec(depth=1)]).sum().backward()
    # Exit 1 trains layer 0, the shared final norm and head, and not layer 3.
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None
    assert model.model.norm.weight.grad is not None and model.lm_head.weight.grad is not None
    assert model.model.layers[3].mlp.down_proj.weight.grad is None


# --- extract ------------------------------------------------------------------------------------
def test_extract_shares_tensors_and_leaves_the_original_untouched(model):
    adapter = adapter_for(model)
    before = {name: (t.data_ptr(), t.clone()) for name, t in model.state_dict().items()}
    sub = adapter.extract(SubnetSpec(depth=2))
    originals = dict(model.named_parameters(remove_duplicate=False))
    for name, param in sub.named_parameters(remove_duplicate=False):
        assert param.data_ptr() == originals[name].data_ptr(), f"{name} was copied"
    originals_buf = dict(model.named_buffers())
    for name, buf in sub.named_buffers():
        assert buf.data_ptr() == originals_buf[name].data_ptr(), f"buffer {name} was copied"
    assert not any(n.startswith(("model.layers.2.", "model.layers.3.")) for n in sub.state_dict())
    # The original: same layers, same config, same tensors with the same values.
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    for name, t in model.state_dict().items():
        ptr, value = before[name]
        assert t.data_ptr() == ptr and torch.equal(t, value)
    assert not sub.training and not any(t.is_meta for t in sub.state_dict().values())


def test_extract_keeps_tied_head_tied(tiny_llama_tied):
    model = load_eval(tiny_llama_tied)
    sub = adapter_for(model).extract(SubnetSpec(depth=2))
    assert sub.lm_head.weight is sub.model.embed_tokens.weight
    assert sub.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_extract_untied_head_stays_separate(tiny_llama):
    sub = adapter_for(load_eval(tiny_llama)).extract(SubnetSpec(depth=2))
    assert sub.lm_head.weight.data_ptr() != sub.model.embed_tokens.weight.data_ptr()


def test_extract_cuts_per_layer_config_lists(tiny_qwen2):
    model = load_eval(tiny_qwen2)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    sub = adapter_for(model).extract(SubnetSpec(depth=3))
    assert sub.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2


def test_truncate_config_copies():
    config = tiny_config("qwen2")
    cut = truncate_config(config, 1)
    assert cut.num_hidden_layers == 1 and cut.layer_types == ["full_attention"]
    assert config.num_hidden_layers == 4 and len(config.layer_types) == 4


@pytest.mark.parametrize("depth", [0, 5])
def test_extract_out_of_range(tiny_llama, depth):
    adapter = adapter_for(load_eval(tiny_llama))
    with pytest.raises(ManyinoneError, match=rf"depth={depth} out of range; allowed 1..4"):
        adapter.extract(SubnetSpec(depth=depth))


# --- space and cost ----------------------------------------------------------------------------
def test_space_defaults_and_choices(tiny_llama):
    adapter = adapter_for(load_eval(tiny_llama))
    assert [s["depth"] for s in adapter.space({"depth": None}).specs()] == [1, 2, 3, 4]
    assert [s["depth"] for s in adapter.space({"depth": [2]}).specs()] == [2, 4]
    with pytest.raises(ManyinoneError) as err:
        adapter.space({"width": [32]})
    assert "'width'" in str(err.value) and "allowed: ['depth']" in str(err.value)


@pytest.mark.parametrize("axes", [["width"], ["depth", "heads"], []])
def test_check_axes(tiny_llama, axes):
    adapter = adapter_for(load_eval(tiny_llama))
    with pytest.raises(ManyinoneError, match=r"not supported by the 'llama-depth' adapter; allowed: \['depth'\]"):
        adapter.check_axes(axes)
    assert adapter.check_axes(["depth"]) == ("depth",)


def test_cost_by_hand(tiny_llama):
    """hidden 64, 4 heads of 16, 2 KV heads, MLP 128, vocab 100, context 512."""
    adapter = adapter_for(load_eval(tiny_llama))
    matmul = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3  # q, o + k, v + gate, up, down = 36,864
    layer = matmul + 2 * 64  # + two RMSNorm weights
    head = 100 * 64
    for d in DEPTHS:
        cost = adapter.cost(SubnetSpec(depth=d))
        assert cost.params == d * layer + 64  # + the final norm; embeddings and head excluded
        assert cost.flops_per_token == 2 * (d * matmul + head) + d * 4 * 512 * 64
    assert adapter.cost(SubnetSpec(depth=1)) == Cost(params=37_056, flops_per_token=217_600.0)
    # A longer context costs more attention FLOPs, and the same parameters.
    assert adapter.cost(SubnetSpec(depth=2), context=1024).flops_per_token > adapter.cost(SubnetSpec(depth=2)).flops_per_token


def test_cost_monotone_and_relative_full_is_one(model):
    adapter = adapter_for(model)
    index = build_index(adapter, adapter.space({"depth": [1, 2, 3]}))
    rel = [e["relative"] for e in index["specs"]]
    for metric in ("flops", "params"):
        values = [r[metric] for r in rel]
        assert values == sorted(values) and len(set(values)) == 4
        assert values[-1] == 1.0 and 0 < values[0] < 1
    assert index["adapter"] == "llama-depth" and index["model_type"] == model.config.model_type


# --- registry -------------------------------------------------------------------------------------
def test_entry_point_discovery_finds_llama():
    found = {ep.name: ep.value for ep in entry_points(group="manyinone.adapters")}
    assert found.get("llama") == "manyinone_llama:LlamaDepthAdapter"
    assert {"llama", "mistral", "qwen2"} <= set(registered_model_types())
    assert adapter_class("llama") is adapter_class("mistral") is adapter_class("qwen2") is LlamaDepthAdapter


def test_unknown_model_type_lists_registered_types():
    with pytest.raises(ManyinoneError) as err:
        adapter_class("gpt2")
    msg = str(err.value)
    assert "'gpt2'" in msg and "'llama'" in msg and "'mistral'" in msg and "'qwen2'" in msg
    assert "register_adapter" in msg


def test_adapter_for_an_unserved_model(tiny_gpt2):
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with pytest.raises(ManyinoneError, match="unknown model type 'gpt2'"):
        adapter_for(gpt2)


def test_llama_adapter_on_a_model_without_the_layout(tiny_gpt2):
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with pytest.raises(ManyinoneError) as err:
        LlamaDepthAdapter(gpt2)
    assert "GPT2LMHeadModel" in str(err.value) and "LLaMA layout" in str(err.value)
    with pytest.raises(ManyinoneError, match="LLaMA layout"):
        LlamaDepthAdapter(torch.nn.Linear(2, 2))


@pytest.fixture
def clean_registry(monkeypatch):
    """Register test adapters into a copy of the registry, discarded after the test."""
    import manyinone.core.registry as registry

    registry.registered_model_types()  # discover the built-ins first
    monkeypatch.setattr(registry, "_ADAPTERS", dict(registry._ADAPTERS))
    return registry


def _toy_adapter(name, types):
    class Toy(ModelAdapter):
        model_types = types
        axes = ("depth",)

        def space(self, choices): ...
        def forward_nested(self, input_ids, attention_mask, specs): ...
        def exit_logits(self, hidden): ...
        def cost(self, spec, context=512): ...
        def extract(self, spec): ...

    Toy.name = name
    return Toy


def test_register_adapter(clean_registry):
    toy = _toy_adapter("toy", ("toy-arch",))
    assert register_adapter(toy) is toy  # usable as a decorator
    assert adapter_class("toy-arch") is toy and "toy-arch" in registered_model_types()
    register_adapter(toy)  # registering the same class again is harmless


def test_register_conflict_names_both_adapters(clean_registry):
    with pytest.raises(ManyinoneError) as err:
        register_adapter(_toy_adapter("other-llama", ("llama",)))
    assert "'llama'" in str(err.value) and "'llama-depth'" in str(err.value) and "'other-llama'" in str(err.value)
    assert adapter_class("llama") is LlamaDepthAdapter


def test_register_rejects_non_adapters(clean_registry):
    with pytest.raises(ManyinoneError, match="not a ModelAdapter subclass"):
        register_adapter(object)


# --- architecture knowledge stays in adapters ------------------------------------------------------
def test_core_never_imports_transformers_models():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):  # recursive: the runtime and every subpackage too
        source = path.read_text()
        name = path.relative_to(PACKAGE).as_posix()
        if "transformers.models" in source:
            offenders.append(f"{name}: mentions transformers.models")
        for node in ast.walk(ast.parse(source)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{name}: imports {n}" for n in names if n.startswith("transformers.models")]
    assert len(list(PACKAGE.rglob("*.py"))) > 10  # the scan really looked at the package
    assert any(p.parent.name == "runtime" for p in PACKAGE.rglob("*.py"))  # ... including the runtime
    assert offenders == []
