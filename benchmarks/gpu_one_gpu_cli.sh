#!/usr/bin/env bash
# One device call for issue 15's "the commands run as written on one GPU": benchmarks/one_gpu_cli.py
# builds a LLaMA-2-13B-shaped random bf16 model, then runs `manyinone train --lora 16`, `export --budget 0.5`
# and `serve` on it. Needs peft (train) and fastapi + uvicorn (serve) on the device, as wheels here first:
#   bash ../shared/tools/gpu-wheels.sh peft torchao fastapi starlette anyio idna annotated-doc \
#        opentelemetry-api uvicorn h11 click
# and carry .whl. Prints the driver's log without library noise; the table is its last lines.
set -uo pipefail
source benchmarks/gpu_setup.sh
python3 -c "import peft, fastapi, uvicorn; print('peft', peft.__version__, 'fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__)" 2>&1 | tail -1
df -h "${WORKDIR:-/root}" | tail -1
timeout -s TERM "${CLI_TIMEOUT:-560}" python3 benchmarks/one_gpu_cli.py --tokenizer /root/smollm2-hf \
  --data /root/data/alpaca_2000.json --workdir "${WORKDIR:-/root}/one_gpu_cli" --json "$OUT/one_gpu_cli.json" \
  > "$OUT/one_gpu_cli.log" 2>&1
echo "exit $?"
grep -v "Failed to load\|Enum subclass\|warn\|Loading weights\|Writing model shards" "$OUT/one_gpu_cli.log" | tail -40
rm -rf "${WORKDIR:-/root}/one_gpu_cli"   # 35+ GiB of random weights: nothing to keep
