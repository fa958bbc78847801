#!/usr/bin/env bash
# The second device call of a session, the one that starts everything (part a of the model staged
# by call 1: `mkdir -p /root/stage && cp .stage/a/part /root/stage/part-a`, carrying .stage/a).
# Carry .stage/b, .whl and .stage/data. In order, each bounded so the call ends inside 600 s:
#   1. the model put together and benchmarks/gpu_setup.sh;
#   2. the converted tokenizer's bos/pad ids (issue 15: a random model's zeroed padding row is the
#      NaN's cause where pad == the token rows begin with);
#   3. benchmarks/sampler_profile.py (~40 s, issue 19's data cost and issue 13), on a quiet GPU;
#   4. issue 19's round (ROUND, JOBS) started in the background: it trains on across later calls;
#   5. issue 15's 13B chain (train --lora 16, export --budget 0.5, serve), beside the round;
#   6. gpu_agree.sh wait for what is left of the call.
# Later calls: `bash benchmarks/gpu_agree.sh wait 560` until the round ends, then
# `bash benchmarks/gpu_speculative.sh /root/quality/<best>` (issue 14).
set -uo pipefail
SECONDS=0
ROUND=${ROUND:-sft,gen16,agree-xl-layer,agree-xl-layer-full10,agree-xl-layer-frozen,agree-xl-block-full10}
JOBS=${JOBS:-6}
test -f /root/stage/part-a || { echo STAGE-LOST; exit 3; }
[ -f /root/smollm2.gguf ] || cat /root/stage/part-a .stage/b/part > /root/smollm2.gguf
source benchmarks/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY'
from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained("/root/smollm2-hf")
print(f"tokenizer: bos {t.bos_token_id} ({t.bos_token!r}), pad {t.pad_token_id} ({t.pad_token!r}), eos {t.eos_token_id}")
PY
echo "== sampler profile ($SECONDS s)"
timeout 150 python3 benchmarks/sampler_profile.py --model /root/smollm2-hf --data /root/data/alpaca_2000.json 2>&1 \
  | grep -v "Loading weights\|Writing model" | tail -45
echo "== round: $ROUND ($SECONDS s)"
bash benchmarks/gpu_agree.sh start "$ROUND" --jobs "$JOBS" > /tmp/start.log 2>&1; tail -3 /tmp/start.log
echo "== 13B CLI chain ($SECONDS s)"
CLI_TIMEOUT=$((540 - SECONDS > 60 ? 540 - SECONDS - 30 : 30)) bash benchmarks/gpu_one_gpu_cli.sh
echo "== waiting on the round ($SECONDS s)"
left=$((575 - SECONDS))
[ "$left" -gt 5 ] && bash benchmarks/gpu_agree.sh wait "$left"
echo "== call done at $SECONDS s"
