#!/usr/bin/env bash
# Every device call after benchmarks/gpu_session.sh (same carry: .stage/b, .whl, .stage/data):
#   bash benchmarks/gpu_next.sh
# runs the session's next steps in a fixed order, each alone on the GPU, within ~575 s a call. Calls can
# then follow one another with no choice to make between them (the machine is given back after 30 s
# idle, and a lost machine loses the round's checkpoints):
#   1. round  issue 19's round (started by gpu_session.sh): wait on it; its tables come back each call;
#   2. spec   issue 14: speculative.py on the round's best recipe (the highest mean agreement on
#             generations over its exits), alone on the GPU;
#   3. decode issue 13: width_layouts.py, then the decode suite;
#   4. router issue 18: gpu_token_router.sh.
# A step that has run leaves /root/next/<step>.done (also when it was cut by its timeout: the next call
# moves on); one that does not fit in what is left of this call waits for the next. SKIP=spec,router
# skips steps.
set -uo pipefail
SECONDS=0
LIMIT=${LIMIT:-575}
source benchmarks/gpu_setup.sh
export PYTHONPATH=$PWD:$PWD/adapters:${PYTHONPATH:-}
mkdir -p /root/next "$OUT"
left() { echo $((LIMIT - SECONDS)); }
pending() { [ ! -f "/root/next/$1.done" ] && [[ ",${SKIP:-}," != *",$1,"* ]]; }
fits() { [ "$(left)" -ge "$1" ] || { echo "== $2 needs $1 s, $(left) s left: next call"; exit 0; }; }

if pending round; then
  if [ ! -f /root/bg/quality.log ]; then
    echo "== no round on this machine (a fresh machine: ROUND-LOST); going on"
  else
    bash benchmarks/gpu_agree.sh wait $(( $(left) - 15 ))
    [ -f /root/bg/quality.rc ] || { echo "== round still running at $SECONDS s"; exit 0; }
  fi
  touch /root/next/round.done
fi

if pending spec; then
  best=$(python3 benchmarks/best_recipe.py /root/quality/results.json)
  if [ -z "$best" ]; then
    echo "== no trained recipe with agreement figures: spec skipped"
  else
    best=/root/quality/$best
    fits 340 "spec ($best)"
    echo "== spec on $best ($SECONDS s)"
    timeout -k 20 320 python3 benchmarks/speculative.py --ckpt "$best" --prompts /root/data/alpaca_2000.json \
      --out "$OUT/speculative" --time-budget 250 --hf-tokens 0 2>&1 | grep -v "Loading weights" > "$OUT/speculative.log"
    grep -q "^Batch-1 sweep" "$OUT/speculative.log" && sed -n '/^Batch-1 sweep/,$p' "$OUT/speculative.log" \
      || tail -40 "$OUT/speculative.log"
  fi
  touch /root/next/spec.done
fi

if pending decode; then
  fits 300 decode
  echo "== decode ($SECONDS s)"
  timeout 120 python3 benchmarks/width_layouts.py 2>&1 | tee "$OUT/width_layouts.log"
  budget=$(( $(left) - 90 ))
  SUITE_BUDGET=$budget SUITE_TIMEOUT=$(( budget + 70 )) bash benchmarks/gpu_decode.sh suite
  touch /root/next/decode.done
fi

if pending router; then
  fits 500 router
  echo "== router ($SECONDS s)"
  PARETO_TIMEOUT=300 DECODE_TIMEOUT=150 bash benchmarks/gpu_token_router.sh
  touch /root/next/router.done
fi
echo "== gpu_next.sh: every step done ($SECONDS s)"
