#!/usr/bin/env bash
# Device calls for issue 13 (one H200). `suite` (default, ~5 min): the decode suite
# (benchmarks/decode_suite.py; rows starting after SUITE_BUDGET seconds are listed as skipped; more
# decode.py flags may follow, e.g. --only "7B shape"). `layouts` (~10 s): benchmarks/width_layouts.py.
# `tests` (~2 min): the fused-path and runtime GPU tests. `all`: all three. Expects what benchmarks/gpu_setup.sh expects (wheels in .whl, /root/smollm2-hf).
set -uo pipefail
mode=${1:-suite}
shift || true
source benchmarks/gpu_setup.sh
export PYTHONPATH=$PWD:$PWD/adapters:${PYTHONPATH:-}
if [ "$mode" = layouts ] || [ "$mode" = all ]; then  # ~10 s: where a width plan's GEMMs lose against dense ones
  timeout 120 python3 benchmarks/width_layouts.py 2>&1 | tee "$OUT/width_layouts.log"
fi
if [ "$mode" = suite ] || [ "$mode" = all ]; then
  timeout "${SUITE_TIMEOUT:-400}" python3 benchmarks/decode.py --suite runtime --model /root/smollm2-hf \
    --time-budget "${SUITE_BUDGET:-290}" --out "$OUT/decode_suite.json" "$@" 2>&1 \
    | grep -v "Loading weights" > "$OUT/decode_suite.log"
  tail -45 "$OUT/decode_suite.log"
fi
if [ "$mode" = tests ] || [ "$mode" = all ]; then
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -x tests/gpu/test_fused_gpu.py tests/gpu/test_fused_layer_gpu.py tests/gpu/test_runtime_gpu.py 2>&1 \
    | tail -12 | tee "$OUT/gpu_tests.log"
fi
