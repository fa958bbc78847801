#!/usr/bin/env bash
# The second device call of a session, the one that starts everything. Call 1 is
# `bash benchmarks/gpu_stage.sh` carrying [".stage/a", ".stage/gen16"] (part a of the model, and gen16
# when an earlier session brought it back: then the round skips sampling). This call carries
# .stage/b, .whl and .stage/data. In order, each bounded so the call ends inside 600 s:
#   1. the model put together and benchmarks/gpu_setup.sh;
#   2. issue 19's round (ROUND, JOBS) started in the background: it trains on across later calls;
#   3. gpu_agree.sh wait for what is left of the call.
# Later calls, with the same carry: `bash benchmarks/gpu_next.sh`, each call the same command (it waits
# on the round, then runs issue 14's, 13's and 18's measurements in turn). A machine given back between
# calls loses the round's checkpoints (only tables, logs and generated data come back in $OUT), so
# keep the calls back to back.
set -uo pipefail
SECONDS=0
# Round 9 on round 8's best (exit layers), three levers side by side, each aimed at the full depth's own
# greedy text, where agreement is scored: the teacher's samples drawn cooler (gen16t5, sampled in the
# round), on-policy rows sampled cool, and self-distillation from the full depth at 3x. The order fills
# the three job slots: t5 starts when gen16t5 is written. Round 8 ran two recipes at a time in ~9.5
# minutes of device time. Later: agree-xl2-layer (two epochs over gen16).
ROUND=${ROUND:-sft,gen16,gen16t5,agree-xl-layer-onpolicy-cool,agree-xl-layer-selfkd3,agree-xl-layer-t5}
JOBS=${JOBS:-3}
test -f /root/stage/part-a || { echo STAGE-LOST; exit 3; }
[ -f /root/smollm2.gguf ] || cat /root/stage/part-a .stage/b/part > /root/smollm2.gguf
source benchmarks/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
ls -la /root/quality/gen16 2>/dev/null
echo "== round: $ROUND ($SECONDS s)"
bash benchmarks/gpu_agree.sh start "$ROUND" --jobs "$JOBS" > /tmp/start.log 2>&1; tail -3 /tmp/start.log
echo "== waiting on the round ($SECONDS s)"
left=$((575 - SECONDS))
[ "$left" -gt 5 ] && bash benchmarks/gpu_agree.sh wait "$left"
echo "== call done at $SECONDS s"
