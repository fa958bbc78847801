#!/usr/bin/env bash
# One device call for issue 14 (about 9 minutes on one H200; fused steps by default): the self-speculation sweep and the bf16
# faithfulness diagnosis on checkpoint $1 (default /root/quality/manyinone; a plain HF folder such as
# /root/smollm2-hf needs EXITS, e.g. EXITS=6,12,18,24), then the CUDA tests of batched speculation.
set -uo pipefail
ckpt=${1:-/root/quality/manyinone}
source benchmarks/gpu_setup.sh
exits=${EXITS:+--exits $EXITS}
timeout -k 20 300 python3 benchmarks/speculative.py --ckpt "$ckpt" $exits --prompts /root/data/alpaca_2000.json \
  --out "$OUT/speculative" --time-budget "${SWEEP_BUDGET:-230}" --hf-tokens 0 ${SWEEP_FLAGS:-} 2>&1 | grep -v "Loading weights" > "$OUT/speculative.log"
grep -q "^Batch-1 sweep" "$OUT/speculative.log" && sed -n '/^Batch-1 sweep/,$p' "$OUT/speculative.log" \
  || tail -40 "$OUT/speculative.log"
timeout 150 python3 benchmarks/bf16_faithfulness.py --ckpt "$ckpt" $exits --prompts /root/data/alpaca_2000.json \
  2>&1 | grep -v "Loading weights" > "$OUT/bf16.log"
grep -q "drafted tokens," "$OUT/bf16.log" && sed -n '/drafted tokens,/,$p' "$OUT/bf16.log" || tail -30 "$OUT/bf16.log"
timeout 180 python3 -m pytest -q tests/gpu/test_speculative_gpu.py tests/gpu/test_exit_heads_gpu.py 2>&1 | tail -3
