"""Training precision and optimizers: dtype choice per device, low-memory optimizers, bad input."""

from __future__ import annotations

import pytest
import torch

from manyinone.core.errors import ManyinoneError
from manyinone.train import optim
from manyinone.train.config import TrainConfig
from manyinone.train.loop import train

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def groups(dtype=torch.float32):
    return [{"params": [torch.nn.Parameter(torch.zeros(4, 4, dtype=dtype))]}]


def test_auto_dtype_is_bf16_only_for_lora_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert optim.training_dtype("auto", CUDA, lora=True) == torch.bfloat16
    assert optim.training_dtype("auto", CUDA, lora=False) == torch.float32
    assert optim.training_dtype("auto", CPU, lora=True) == torch.float32
    assert optim.training_dtype("bfloat16", CPU, lora=False) == torch.bfloat16


def test_a_dtype_the_device_cannot_train_in_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ManyinoneError, match=r"dtype bfloat16 cannot train on Tesla V100.*allowed here: float32"):
        optim.training_dtype("bfloat16", CUDA, lora=True)
    with pytest.raises(ManyinoneError, match=r"dtype 'float16' cannot train; allowed auto, float32, bfloat16"):
        optim.training_dtype("float16", CPU, lora=False)


def test_unknown_optimizer_is_one_line():
    with pytest.raises(ManyinoneError, match=r"optimizer 'sgd' unknown; allowed adamw, adamw8bit, adamw4bit, adamw-bf16sr"):
        optim.make_optimizer("sgd", groups(), 1e-3, 0.0, CPU)


def test_stochastic_rounding_needs_bf16_weights():
    pytest.importorskip("torchao")
    with pytest.raises(ManyinoneError, match=r"'adamw-bf16sr' updates bfloat16 weights; set dtype=bfloat16"):
        optim.make_optimizer("adamw-bf16sr", groups(torch.float32), 1e-3, 0.0, CPU)


def test_plain_adamw_on_bf16_full_fine_tune_is_refused(tiny_llama, tmp_path):
    cfg = TrainConfig(model=str(tiny_llama), exits=[2, 4], data="demo", batch_size=2, max_steps=1,
                      output=str(tmp_path / "run"), dtype="bfloat16")
    with pytest.raises(ManyinoneError, match=r"dtype=bfloat16 with a full fine-tune and optimizer=adamw"):
        train(cfg, show_progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_adamw_keeps_training_as_before():
    opt = optim.make_optimizer("adamw", groups(), 1e-3, 0.1, CPU)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.1


def test_set_lr_fills_a_tensor_learning_rate_in_place():
    """torchao keeps lr as a tensor and refuses a float (its compiled step would recompile)."""
    group = {"lr": torch.tensor(1e-3)}
    tensor = group["lr"]
    optim.set_lr(group, 5e-4)
    assert group["lr"] is tensor and float(tensor) == pytest.approx(5e-4)
    plain = {"lr": 1e-3}
    optim.set_lr(plain, 5e-4)
    assert plain["lr"] == 5e-4
