"""benchmarks/one_gpu_cli.py: its disk estimates rest on param_count, which must equal the parameters
of the model it builds (13B on the meta device: no memory), and its table must report a failed step."""

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("one_gpu_cli", ROOT / "benchmarks" / "one_gpu_cli.py")
one_gpu_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(one_gpu_cli)


def test_param_count_equals_the_built_model():
    for shape in (one_gpu_cli.SHAPE_13B, one_gpu_cli.SHAPE_TINY):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=49152, **shape), dtype=torch.bfloat16)
        assert one_gpu_cli.param_count(shape, 49152) == sum(p.numel() for p in model.parameters())
    # LLaMA-2-13B's published size at its own vocabulary: 13,015,864,320 parameters
    assert one_gpu_cli.param_count(one_gpu_cli.SHAPE_13B, 32000) == 13_015_864_320


def test_not_enough_disk_is_a_failed_row(tmp_path, capsys):
    args = one_gpu_cli.parse_args(["--tiny", "--device", "cpu", "--workdir", str(tmp_path)])
    driver = one_gpu_cli.Driver(args)
    assert not driver.disk_ok("export", needs_gib=1e9)
    assert driver.rows[-1]["ok"] is False and "not run" in driver.rows[-1]["result"]
    assert "NOT ENOUGH" in capsys.readouterr().out
