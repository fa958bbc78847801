#!/usr/bin/env bash
# One device call for issue 19 (exits that agree with the full model): quality.py on the recipes
# given as $1, resuming whatever an earlier call on the same (still warm) machine finished.
# Expects the model staged as in ../shared/tools/gpu-stage-model.sh (part a in /root/stage, part b
# carried in .stage/b), the data in .stage/data and the wheels in .whl (benchmarks/gpu_setup.sh).
set -uo pipefail
recipes=${1:?recipes}
shift
if [ ! -f /root/smollm2.gguf ]; then
  test -f /root/stage/part-a || { echo STAGE-LOST; exit 3; }
  cat /root/stage/part-a .stage/b/part > /root/smollm2.gguf
fi
source benchmarks/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout "${QUALITY_TIMEOUT:-540}" python3 benchmarks/quality.py --model /root/smollm2-hf --data /root/data/alpaca_2000.json \
  --recipes "$recipes" --out /root/quality --text /root/data/wikitext2_raw_test.txt --resume "$@" 2>&1 \
  | grep -v "Loading weights\|Writing model shards" > "$OUT/quality.log"
echo "quality.py exit: ${PIPESTATUS[0]}"
tail -45 "$OUT/quality.log"
for f in results.md results.json quality.png; do cp "/root/quality/$f" "$OUT/" 2>/dev/null; done
for r in /root/quality/*/; do echo "== $r"; tail -c 2500 "$r/log.txt" 2>/dev/null; done > "$OUT/logs.txt"
test -f /root/quality/gen/data.jsonl && gzip -c /root/quality/gen/data.jsonl > "$OUT/gen.jsonl.gz"
ls /root/quality
