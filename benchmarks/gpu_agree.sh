#!/usr/bin/env bash
# Device calls for issue 19 (exits that agree with the full model): quality.py on the recipes given,
# resuming whatever an earlier call on the same (still warm) machine finished.
#   bash benchmarks/gpu_agree.sh RECIPES [quality.py flags]         # in this call (QUALITY_TIMEOUT, default 540 s)
#   bash benchmarks/gpu_agree.sh start RECIPES [quality.py flags]   # in the background: it keeps training between calls
#   bash benchmarks/gpu_agree.sh wait SECONDS                       # until the background run ends or SECONDS pass
# Every form copies the tables, plot and per-recipe log tails to $OUT. Expects the model staged as in
# ../shared/tools/gpu-stage-model.sh (part a in /root/stage, part b carried in .stage/b), the data in
# .stage/data and the wheels in .whl (benchmarks/gpu_setup.sh).
set -uo pipefail
mode=now
case "${1:?recipes, or start RECIPES, or wait SECONDS}" in start|wait) mode=$1; shift ;; esac
if [ ! -f /root/smollm2.gguf ]; then
  test -f /root/stage/part-a || { echo STAGE-LOST; exit 3; }
  cat /root/stage/part-a .stage/b/part > /root/smollm2.gguf
fi
source benchmarks/gpu_setup.sh
report() {
  shopt -s nullglob
  for f in results.md results.json quality.png; do cp "/root/quality/$f" "$OUT/" 2>/dev/null; done
  for r in /root/quality/*/; do
    echo "== $r $(wc -l 2>/dev/null < "$r/metrics.jsonl") steps"; tail -c 1500 "$r/log.txt" 2>/dev/null
  done > "$OUT/logs.txt"
  grep -h "steps$" "$OUT/logs.txt"
  # Generated data comes back too, finished or not (gpu_stage.sh stages it for a later session's call
  # 1; an unfinished one resumes there, so sampling time survives a lost machine).
  for d in /root/quality/gen*/; do
    g=$(basename "$d")
    if [ -f "$d/data.jsonl" ]; then gzip -1 -c "$d/data.jsonl" > "$OUT/$g.jsonl.gz"
    elif [ -f "$d/data.jsonl.partial" ]; then
      gzip -1 -c "$d/data.jsonl.partial" > "$OUT/$g.partial.jsonl.gz" && cp "$d/data.jsonl.partial.json" "$OUT/$g.partial.json"
    fi
  done
}
if [ "$mode" = wait ]; then
  bash benchmarks/gpu_background.sh wait quality "${1:?seconds}"
  grep -v "Loading weights\|Writing model" /root/bg/quality.log | grep -v "^+" | tail -40
  report
  exit 0
fi
recipes=${1:?recipes}
shift
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
cmd=(python3 benchmarks/quality.py --model /root/smollm2-hf --data /root/data/alpaca_2000.json --recipes "$recipes"
     --out /root/quality --text /root/data/wikitext2_raw_test.txt --prefix-text /root/data/tinystories_valid_head.txt
     --resume "$@")
if [ "$mode" = start ]; then
  bash benchmarks/gpu_background.sh start quality "${cmd[@]}"
  exit 0
fi
timeout "${QUALITY_TIMEOUT:-540}" "${cmd[@]}" 2>&1 | grep -v "Loading weights\|Writing model shards" > "$OUT/quality.log"
echo "quality.py exit: ${PIPESTATUS[0]}"
tail -45 "$OUT/quality.log"
report
ls /root/quality
