# Source at the start of every device call (idempotent): installs manyinone and the wheels from
# ../shared/tools/gpu-wheels.sh (in .whl) beside the image's torch, converts the staged GGUF
# (/root/smollm2.gguf) once to an HF folder, and puts the data carried in .stage/data under /root/data.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARNING || true
mkdir -p /root/data && { test -d .stage/data && cp -n .stage/data/* /root/data/ || true; }
if [ -f /root/smollm2.gguf ] && [ ! -d /root/smollm2-hf ]; then
  python3 benchmarks/gguf_to_hf.py /root/smollm2.gguf /root/smollm2-hf 2>&1 | grep -v Convert | tail -1
fi
