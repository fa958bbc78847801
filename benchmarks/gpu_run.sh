#!/usr/bin/env bash
# One device call: install manyinone beside the image's torch, convert the staged GGUF once,
# run the quality recipes given as $1 (default base,sft,soft; more quality.py flags may follow) and export parity on the SoFT run.
# Expects the wheels from ../shared/tools/gpu-wheels.sh in .whl and the model at /root/smollm2.gguf.
set -euo pipefail
recipes=${1:-base,sft,soft}
shift || true  # the rest goes to quality.py (e.g. --jobs 4 --recipe NAME=FLAGS)
out=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARNING || true
python3 -c "import manyinone.registry as r; print('adapters:', r.registered_model_types())"
test -d /root/smollm2-hf || python3 benchmarks/gguf_to_hf.py /root/smollm2.gguf /root/smollm2-hf 2>&1 | grep -v Convert | tail -1
data=${DATA:-/root/alpaca_2000.json}
python3 benchmarks/quality.py --model /root/smollm2-hf --data "$data" --recipes "$recipes" --out /root/quality "$@" 2>&1 \
  | grep -v "Loading weights" | tee "$out/quality.log"
cp /root/quality/results.md /root/quality/results.json /root/quality/quality.png "$out/" 2>/dev/null || true
if [[ ",$recipes," == *",soft,"* ]]; then
  python3 benchmarks/export_parity.py /root/quality/soft 2>&1 | grep -v "Loading weights" | tee "$out/parity.log"
fi
