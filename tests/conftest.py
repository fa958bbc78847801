"""Shared fixtures: tiny models built from configs (no hub), a character tokenizer, one short run.

Every model here is a few hundred kB, so the whole suite runs on two CPU cores. Session-scoped
fixtures are read-only for tests: a test that writes into a checkpoint copies it first.
"""

from __future__ import annotations

import os
from pathlib import Path

# Nothing in the suite may reach a model hub; set before transformers/datasets read their config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on small VMs two OpenMP threads fighting over
# two vCPUs made a training step ~15x slower than one thread. MANYINONE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("MANYINONE_TEST_THREADS", "1")))

# transformers' "Loading weights" bars would bury the CLI's error lines in failure reports.
from transformers.utils import logging as _hf_logging  # noqa: E402

_hf_logging.disable_progress_bar()

from helpers import build_tiny_model, make_char_tokenizer  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_hf_caches(tmp_path_factory):
    """Keep `datasets`' JSON cache out of the user's home (datasets reads this at import)."""
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets_cache"))
    yield


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Folder of a 4-layer LLaMA (untied head) + char tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama", tie=False)


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama_tied"), "llama", tie=True)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_mistral"), "mistral")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A model type no adapter serves."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_gpt2"), "gpt2")


ARCHS = ["llama", "llama-tied", "mistral", "qwen2"]


@pytest.fixture(params=ARCHS)
def any_tiny_model(request) -> Path:
    """Each LLaMA-layout architecture the built-in adapter serves, tied and untied heads."""
    name = {"llama": "tiny_llama", "llama-tied": "tiny_llama_tied", "mistral": "tiny_mistral",
            "qwen2": "tiny_qwen2"}[request.param]
    return request.getfixturevalue(name)


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture(scope="session")
def trained_run(tiny_llama, tmp_path_factory) -> Path:
    """A 4-step run on the demo data, exits 2 and 4: the checkpoint export/eval tests read."""
    from manyinone.train.config import TrainConfig
    from manyinone.train.loop import train

    out = tmp_path_factory.mktemp("runs") / "trained"
    cfg = TrainConfig(model=str(tiny_llama), exits=[2, 4], data="demo", max_steps=4, batch_size=4,
                      lr=1e-3, output=str(out))
    return train(cfg, show_progress=False)


@pytest.fixture(scope="session")
def trained_run_tied(tiny_llama_tied, tmp_path_factory) -> Path:
    """Like `trained_run`, with a tied embedding / LM head (stored once in safetensors)."""
    from manyinone.train.config import TrainConfig
    from manyinone.train.loop import train

    out = tmp_path_factory.mktemp("runs") / "trained_tied"
    cfg = TrainConfig(model=str(tiny_llama_tied), exits=[1, 2, 3, 4], data="demo", max_steps=2, batch_size=4,
                      lr=1e-3, output=str(out))
    return train(cfg, show_progress=False)
