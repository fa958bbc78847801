#!/usr/bin/env bash
# One device call for issue-3 quality: the recipes given as $1 (default base,sft,soft; more
# quality.py flags may follow), evaluated on Alpaca held-out, WikiText-2 test and TriviaQA 1k,
# then export parity on the manyinone (or soft) run. See benchmarks/gpu_setup.sh for what it expects.
set -euo pipefail
recipes=${1:-base,sft,soft}
shift || true  # the rest goes to quality.py (e.g. --jobs 4 --recipe NAME=FLAGS)
source benchmarks/gpu_setup.sh
timeout "${QUALITY_TIMEOUT:-3000}" python3 benchmarks/quality.py --model /root/smollm2-hf --data /root/data/alpaca_2000.json --recipes "$recipes" \
  --out /root/quality --text /root/data/wikitext2_raw_test.txt --qa /root/data/triviaqa_1k.jsonl "$@" 2>&1 \
  | grep -v "Loading weights" > "$OUT/quality.log" || true
tail -60 "$OUT/quality.log"
cp /root/quality/results.md /root/quality/results.json /root/quality/quality.png "$OUT/" 2>/dev/null || true
for run in manyinone soft; do
  if [ -f "/root/quality/$run/manyinone.json" ]; then
    python3 benchmarks/export_parity.py "/root/quality/$run" 2>&1 | grep -v "Loading weights" | tee "$OUT/parity.log"
    break
  fi
done
