#!/usr/bin/env bash
# One device call for issue 13 (one H200): the decode suite (benchmarks/decode_suite.py; rows past
# SUITE_BUDGET seconds are listed as skipped), then the fused-path and runtime GPU tests.
# Expects what benchmarks/gpu_setup.sh expects (wheels in .whl, SmolLM2 at /root/smollm2-hf).
set -uo pipefail
source benchmarks/gpu_setup.sh
export PYTHONPATH=$PWD:$PWD/adapters:${PYTHONPATH:-}
timeout "${SUITE_TIMEOUT:-430}" python3 benchmarks/decode.py --suite runtime --model /root/smollm2-hf \
  --time-budget "${SUITE_BUDGET:-300}" --out "$OUT/decode_suite.json" "$@" 2>&1 \
  | grep -v "Loading weights" > "$OUT/decode_suite.log"
tail -45 "$OUT/decode_suite.log"
timeout "${TEST_TIMEOUT:-140}" python3 -m pytest -q -x tests/gpu/test_fused_gpu.py tests/gpu/test_runtime_gpu.py 2>&1 \
  | tail -12 | tee "$OUT/gpu_tests.log"
