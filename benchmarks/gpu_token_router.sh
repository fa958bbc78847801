#!/usr/bin/env bash
# One device call for issue 18 (one H200, ~5 min): the token router's Pareto points on SmolLM2 +
# Alpaca (width run, static / per-prompt / per-token routers, measured average costs), its decode speed
# against the static plan of the same cost (SmolLM2 and 7B shapes, random weights), and its GPU tests.
set -uo pipefail
source benchmarks/gpu_setup.sh
export PYTHONPATH=$PWD:$PWD/adapters:${PYTHONPATH:-}
mkdir -p "$OUT"
timeout "${PARETO_TIMEOUT:-190}" python3 benchmarks/pareto.py --model /root/smollm2-hf --data /root/data/alpaca_2000.json \
  --variants width,routed,adaptive,token,token-joint --no-decode --latency-repeats 5 --router-steps 150 \
  --out "$OUT/pareto" 2>&1 \
  | grep -v "Loading weights" > "$OUT/pareto.log"
if grep -q "average cost ≤" "$OUT/pareto.log"; then grep -v "^{" "$OUT/pareto.log" | tail -30; else tail -40 "$OUT/pareto.log"; fi
timeout "${DECODE_TIMEOUT:-75}" python3 benchmarks/token_decode.py --new 96 --repeats 2 --out "$OUT/token_decode.json" 2>&1 \
  | grep -v "Loading weights" > "$OUT/token_decode.log"
tail -8 "$OUT/token_decode.log"
timeout "${TEST_TIMEOUT:-30}" python3 -m pytest -q -x "tests/gpu/test_token_routed_gpu.py::test_token_routing_under_graphs_equals_eager[False]" 2>&1 | tail -4
