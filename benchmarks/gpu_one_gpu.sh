#!/usr/bin/env bash
# One device call for issue 15 (a 13B model on one GPU): the one-GPU cost table (7B full-FT SoFT,
# 13B LoRA SoFT at batch 1/2/4, 13B full-FT SoFT with 8-bit AdamW + checkpointing; random weights,
# seq 2048), then the CUDA tests of the LoRA / bf16 + AdamW8bit recipes. Needs peft and torchao on
# the device: `bash ../shared/tools/gpu-wheels.sh peft torchao` here first, and carry .whl.
set -uo pipefail
source benchmarks/gpu_setup.sh
python3 -c "import peft, torchao.optim; print('peft', peft.__version__, 'torchao', torchao.__version__)" 2>&1 | tail -1
timeout "${SUITE_TIMEOUT:-330}" python3 benchmarks/train_cost.py --suite one-gpu --json "$OUT/one_gpu.json" \
  > "$OUT/one_gpu.log" 2>&1
grep -v "Failed to load\|Enum subclass\|warn" "$OUT/one_gpu.log" | tail -12
timeout "${TESTS_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_one_gpu_gpu.py 2>&1 | tail -4
