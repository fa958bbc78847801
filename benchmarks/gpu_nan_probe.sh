#!/usr/bin/env bash
# One device call for issue 15's step-1 NaN gradient: benchmarks/nan_grad_probe.py runs step 1 of
# `manyinone train --lora 16 --axes depth` on a LLaMA-2-13B-shaped random bf16 model (40 layers, the CLI
# run's first batch of Alpaca rows) under variants that each remove one suspect, then the CUDA tests of
# tests/gpu/test_lora_nan_gpu.py. Needs peft on the device, as a wheel here first:
#   bash ../shared/tools/gpu-wheels.sh peft   (and carry .whl)
# About 2 minutes on an H200. Per --init: the weight table, the traced layer, every layer's gradient
# profile, then the variants' table (all of it in $OUT/nan_grad_probe_<init>.log); then the pytest summary.
set -uo pipefail
source benchmarks/gpu_setup.sh
python3 -c "import torch, peft; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), 'peft', peft.__version__)" 2>&1 | tail -1
# Each --init in turn (PROBE_INITS): the model as from_config leaves it (its padding row zeroed), then
# with only that row drawn (one_gpu_cli.build_base since 2026-12-03); `explicit` draws every weight again.
for init in ${PROBE_INITS:-from-config padding-row}; do
  timeout -s TERM "${PROBE_TIMEOUT:-300}" python3 benchmarks/nan_grad_probe.py --tokenizer /root/smollm2-hf \
    --data /root/data/alpaca_2000.json --init "$init" --variants "${PROBE_VARIANTS:-cli}" > "$OUT/nan_grad_probe_$init.log" 2>&1
  echo "probe --init $init exit $?"
  grep -v "Failed to load\|Enum subclass\|warn" "$OUT/nan_grad_probe_$init.log" | grep -v "^[a-z0-9-]*: {" | tail -40
done
timeout -s TERM 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_lora_nan_gpu.py 2>&1 | tail -15
