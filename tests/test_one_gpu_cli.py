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


def test_process_memory_is_read_for_our_pid_only():
    listing = "4242, 46000\n999, 70000\n4242, 1024\n"  # MiB; pid 999 is another process on the GPU
    assert one_gpu_cli.process_gib(listing, 4242) == (46000 + 1024) / 1024
    assert one_gpu_cli.process_gib(listing, 7) is None  # not listed (another PID namespace): no figure


def test_a_nan_step_is_printed_and_fails_the_train_row():
    nan = float("nan")
    metrics = [{"step": 1, "loss": 58.99, "ce/depth=8": 11.8, "grad_norm": nan, "peak_mem_gib": 46.7,
                "nonfinite": "step 1: non-finite grad_norm=nan with finite losses; ..."},
               {"step": 2, "loss": nan, "ce/depth=8": nan, "grad_norm": nan}]
    lines = one_gpu_cli.step_lines(metrics)
    assert lines[0].startswith("STEP 1: loss 58.9900, grad_norm nan; ce depth=8:11.800, torch peak 46.7 GiB")
    assert "SKIPPED" in lines[0] and "SKIPPED" not in lines[1]
    assert one_gpu_cli.first_nonfinite(metrics).startswith("step 1: non-finite grad_norm=nan with finite losses")
    assert one_gpu_cli.first_nonfinite(metrics[1:]) == "step 2: non-finite loss=nan, ce/depth=8=nan, grad_norm=nan"
    assert one_gpu_cli.first_nonfinite([{"step": 1, "loss": 2.0, "grad_norm": 1.0}]) is None


def test_the_table_shows_the_torch_peak_beside_nvidia_smi(tmp_path, capsys):
    args = one_gpu_cli.parse_args(["--device", "cuda", "--workdir", str(tmp_path)])
    driver = one_gpu_cli.Driver(args)
    peak = one_gpu_cli.PeakMemory("cuda", pid=1)
    peak.peak_gib, peak.process_peak_gib = 115.6, 66.0
    driver.record("train", "manyinone train ...", 100.0, peak, "6 steps", True, torch_peak_gib=64.3)
    driver.table()
    out = capsys.readouterr().out
    assert "| torch / proc / GPU GiB |" in out and "| 64.3 / 66.0 / 115.6 |" in out


def test_the_built_base_has_no_zero_embedding_row(tmp_path):
    # transformers zeroes the padding row; where the pad token also begins every row, step 1 was NaN
    # (benchmarks/RESULTS.md, the 13B NaN): the stand-in draws that row like the others.
    from helpers import make_char_tokenizer

    make_char_tokenizer().save_pretrained(tmp_path / "tok")
    one_gpu_cli.build_base(tmp_path / "base", str(tmp_path / "tok"), tiny=True, device="cpu", max_shard_size="5GB")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    weight = model.get_input_embeddings().weight
    assert model.config.pad_token_id is not None
    assert not bool((weight == 0).all(-1).any())
