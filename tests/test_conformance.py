"""manyinone.testing.check_adapter on every built-in adapter and on a third-party one (examples/third_party)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from helpers import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, make_char_tokenizer, tiny_config
from manyinone.testing import check_adapter

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "third_party"


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_llama_depth_adapter_conforms(kind, tmp_path):
    from manyinone_llama import LlamaDepthAdapter

    report = check_adapter(LlamaDepthAdapter, tiny_config(kind), make_char_tokenizer(), {"depth": [1, 2, 4]},
                           workdir=tmp_path)
    print(report)
    assert [name for name, _, _ in report.checks] == ["parity", "exits", "costs", "reload", "runtime"]


def test_llama_flextron_adapter_conforms(tmp_path):
    from manyinone_flextron import LlamaFlextronAdapter

    report = check_adapter(LlamaFlextronAdapter, tiny_config("llama", tie=True), make_char_tokenizer(),
                           {"depth": [2, 4], "width": [32, 128], "heads": [2, 4]}, workdir=tmp_path)
    print(report)
    assert not report.failed


def test_third_party_gemma_adapter_conforms(tmp_path, monkeypatch):
    """Gemma, an architecture the project does not ship, added from outside with the public API."""
    from transformers import GemmaConfig

    import manyinone.core.registry as registry

    registry.registered_model_types()
    monkeypatch.setattr(registry, "_ADAPTERS", dict(registry._ADAPTERS))  # the registration ends with the test
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.delitem(sys.modules, "manyinone_gemma", raising=False)
    from manyinone_gemma import GemmaDepthAdapter

    assert len((EXAMPLES / "manyinone_gemma.py").read_text().splitlines()) <= 80
    config = GemmaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID, pad_token_id=PAD_ID, max_position_embeddings=256)
    report = check_adapter(GemmaDepthAdapter, config, make_char_tokenizer(), {"depth": [1, 2, 4]}, workdir=tmp_path)
    print(report)
    assert not report.failed and report.adapter == "gemma-depth"


def test_the_suite_fails_a_broken_adapter(tmp_path):
    """A planted bug per check: an adapter whose exits skip the final norm fails parity and exits."""
    from manyinone_llama import LlamaDepthAdapter

    class NoNorm(LlamaDepthAdapter):
        def exit_logits(self, hidden):
            return self.model.lm_head(hidden)  # the bug: the final norm left out

    report = check_adapter(NoNorm, tiny_config("llama"), make_char_tokenizer(), {"depth": [2, 4]}, workdir=tmp_path,
                           raise_on_failure=False)
    assert {"parity", "exits"} <= set(report.failed)
    with pytest.raises(AssertionError, match="fails"):
        check_adapter(NoNorm, tiny_config("llama"), make_char_tokenizer(), {"depth": [2, 4]}, workdir=tmp_path)
