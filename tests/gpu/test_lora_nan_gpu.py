"""CUDA: step 1 of `manyinone train --lora 16 --axes depth` on a LLaMA-2-13B-width random bf16 model has finite
gradients (issue 15's H200 run had finite losses and grad_norm NaN at step 1; no CPU run reproduced it).

Two checks, from the bottom up, so a failure names its layer:
- SDPA alone, at one 13B layer's attention shape with right-padded rows (bool mask, bf16, head_dim 128), per
  backend: a backend whose backward makes NaN out of finite inputs is a kernel bug;
- the whole step 1 through the training loop's own pieces (benchmarks/nan_grad_probe.py's `cli` variant) on a
  2-layer 13B-width model and the CLI run's first batch of Alpaca rows.

Skipped without CUDA; the second also without peft or the Alpaca file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[2]
DATA = [p for p in (Path("/root/data/alpaca_2000.json"), ROOT.parent / "shared/assets/data/alpaca_2000.json")
        if p.is_file()]
TOKENIZER = [p for p in (Path("/root/smollm2-hf"),) if (p / "tokenizer.json").is_file()]


def _padded_mask(lengths: list[int], seq: int, device) -> torch.Tensor:
    """Causal and right-padding, as transformers builds it for SDPA: [batch, 1, seq, seq] bool."""
    keys = torch.arange(seq, device=device)
    valid = keys[None, :] < torch.tensor(lengths, device=device)[:, None]  # [batch, seq]
    causal = keys[None, :] <= keys[:, None]  # [seq, seq]
    return (causal[None] & valid[:, None, :])[:, None]  # [batch, 1, seq, seq]


@pytest.mark.parametrize("backend", ["MATH", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"])
@pytest.mark.parametrize("seq", [512, 448])  # a full 512 row; 448 = 3.5 tiles of 128
def test_sdpa_backward_is_finite_with_a_padding_mask(backend, seq):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    batch, heads, dim = 8, 40, 128
    lengths = [seq, seq - 37, seq - 200, 300, seq, 129, seq - 1, 64]
    q, k, v = (torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    mask = _padded_mask(lengths, seq, "cuda")
    grad_out = torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16)
    for b, n in enumerate(lengths):  # padded rows get no gradient from the loss, as in training
        grad_out[b, :, n:] = 0
    try:
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    except RuntimeError as exc:
        pytest.skip(f"{backend} cannot run here: {str(exc).splitlines()[0]}")
    out.backward(grad_out)
    assert torch.isfinite(out).all()
    bad = {name: int((~torch.isfinite(t.grad)).sum()) for name, t in (("q", q), ("k", k), ("v", v))}
    assert bad == {"q": 0, "k": 0, "v": 0}, f"{backend} backward made non-finite gradients: {bad}"


@pytest.mark.skipif(not DATA or not TOKENIZER, reason="needs /root/data/alpaca_2000.json and /root/smollm2-hf")
def test_lora_step_one_has_finite_gradients_at_13b_width():
    pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location("nan_grad_probe", ROOT / "benchmarks" / "nan_grad_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    results = probe.run_variants(["--tokenizer", str(TOKENIZER[0]), "--data", str(DATA[0]), "--layers", "2",
                                  "--variants", "cli"])
    (cli,) = results
    assert cli["ok"], cli
    assert cli["bad_params"] == 0, f"step 1 made non-finite gradients: {cli}"
