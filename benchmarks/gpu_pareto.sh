#!/usr/bin/env bash
# Device calls for issue 19, item 6: benchmarks/pareto.py for depth, width, depth+width and routed, every
# variant trained with the depth recipe's signal (quality.py's agree-init-lr3): start from the SFT run, its
# frozen teacher (full depth's KL x3), gen6 mixed in at 75% of each epoch, 2 epochs (900 steps), lr 3e-4
# with 20 warm-up steps, self-distillation 1; the per-exit translators (x10 lr) on depth only (they are
# per-exit modules; a width space has 24 sub-networks and routed plans have none).
#   bash benchmarks/gpu_pareto.sh start [pareto.py flags]   # in the background: it outlives this call
#   bash benchmarks/gpu_pareto.sh wait SECONDS              # until it ends or SECONDS pass; results to $OUT
#   bash benchmarks/gpu_pareto.sh run [pareto.py flags]     # in the foreground (what `start` runs)
# Teacher and data: /root/quality/sft and /root/quality/gen6/data.jsonl, as benchmarks/gpu_agree.sh
# leaves them. Missing: with PARETO_MAKE=1 the run first makes them (quality.py --recipes gen6: the sft
# run, its evaluation, then gen6; ~6 GPU-min), otherwise it says so and trains without them (base model).
# Later flags win, e.g. `--variant-set width:lr=1e-4`; PARETO_JOBS (default 3) trainings share the GPU.
set -uo pipefail
mode=${1:?start, wait SECONDS, or run}
shift
if [ ! -f /root/smollm2.gguf ] && [ ! -d /root/smollm2-hf ]; then
  test -f /root/stage/part-a || { echo STAGE-LOST; exit 3; }
  cat /root/stage/part-a .stage/b/part > /root/smollm2.gguf
fi
source benchmarks/gpu_setup.sh
report() {
  shopt -s nullglob
  for f in results.md results.json pareto.png latency.json; do cp "/root/pareto/$f" "$OUT/" 2>/dev/null; done
  {
    for r in /root/pareto/*/metrics.jsonl; do echo "== $r: $(wc -l < "$r") steps"; done
    for f in /root/pareto/*.log; do echo "== $f"; tail -c 1500 "$f"; done
    echo "== /root/bg/pareto.log"; grep -v "Loading weights\|Writing model" /root/bg/pareto.log 2>/dev/null | tail -60
  } > "$OUT/logs.txt"
  grep -h "steps$" "$OUT/logs.txt"
}
case "$mode" in
  wait)
    bash benchmarks/gpu_background.sh wait pareto "${1:?seconds}"
    grep -v "Loading weights\|Writing model" /root/bg/pareto.log | tail -40
    report
    exit 0
    ;;
  start)
    if [ -f /root/bg/pareto.log ] && [ ! -f /root/bg/pareto.rc ]; then
      echo "pareto is still running (see: bash benchmarks/gpu_pareto.sh wait SECONDS)"; exit 0
    fi
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 benchmarks/pareto.py --help > /dev/null || { echo "pareto.py does not start"; exit 1; }
    mkdir -p /root/bg && rm -f /root/bg/pareto.rc && : > /root/bg/pareto.log  # "running" from now on
    bash benchmarks/gpu_background.sh start pareto bash benchmarks/gpu_pareto.sh run "$@"
    exit 0
    ;;
  run) ;;
  *) echo "unknown mode $mode (allowed: start, wait, run)"; exit 2 ;;
esac

python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
teacher=/root/quality/sft
mix=/root/quality/gen6/data.jsonl
have() { [ -f "$teacher/manyinone.json" ] && [ -f "$mix" ]; }
if ! have && [ "${PARETO_MAKE:-0}" = 1 ]; then
  echo "making the teacher and gen6 ($(date -u +%T))"
  python3 benchmarks/quality.py --model /root/smollm2-hf --data /root/data/alpaca_2000.json --recipes gen6 \
    --out /root/quality --resume --gen-prompts 0 2>&1 | grep -v "Loading weights\|Writing model" | tail -5
fi
if have; then
  records=$(wc -l < "$mix")
  echo "teacher $teacher, mix data $mix ($records records; quality.py's gen6 has 10800)"
  model=$teacher
  signal=(--set "teacher=$teacher" --set "mix_data=$mix" --set mix_ratio=0.75 --set teacher_full_weight=3)
else
  echo "NO TEACHER: $teacher or $mix is missing; every variant trains WITHOUT the teacher and the generated data"
  model=/root/smollm2-hf
  signal=()
fi
echo "pareto.py starts $(date -u +%T)"
started=$(date +%s)
timeout "${PARETO_TIMEOUT:-3000}" python3 benchmarks/pareto.py --model "$model" --data /root/data/alpaca_2000.json \
  --out /root/pareto --variants depth,width,depth+width,routed --epochs 2 --lr 3e-4 --jobs "${PARETO_JOBS:-3}" \
  --no-decode --set warmup_steps=20 --set distill_weight=1 ${signal[@]+"${signal[@]}"} \
  --variant-set depth:exit_heads=translator --variant-set depth:exit_heads_lr_scale=10 "$@"
rc=$?
echo "pareto.py exit $rc after $(( $(date +%s) - started )) s"
exit $rc
