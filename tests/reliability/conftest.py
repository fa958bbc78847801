"""Fixtures of the reliability tests: reference runs that killed and resumed runs must equal bitwise."""

from __future__ import annotations

import pytest
import torch

from harness import SETTINGS, run_weights


@pytest.fixture(scope="session")
def reference_weights(tiny_llama, tmp_path_factory):
    """steps -> final weights of an uninterrupted in-process run with the harness's settings."""
    from manyinone.train.config import TrainConfig
    from manyinone.train.loop import train

    cache: dict[int, dict[str, torch.Tensor]] = {}

    def get(steps: int) -> dict[str, torch.Tensor]:
        if steps not in cache:
            out = tmp_path_factory.mktemp("reference") / "run"
            train(TrainConfig(model=str(tiny_llama), output=str(out), max_steps=steps, **SETTINGS), show_progress=False)
            cache[steps] = run_weights(out)
        return cache[steps]

    return get
