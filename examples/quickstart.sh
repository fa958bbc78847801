#!/usr/bin/env bash
# The main job on the embedded default, offline: SoFT-tune SmolLM2-135M (from its PyPI-shipped GGUF)
# on manyinone's generated demo instructions (in its chat template: the model is an Instruct one), evaluate
# every exit, export 60% of the cost (with its model card and a GGUF for llama.cpp), then answer one
# prompt at every budget with each one's tokens/s. About 5 minutes on a 2-core CPU.
set -euo pipefail
export HF_HUB_OFFLINE=1
out=${1:-runs/quickstart}
manyinone train --model smollm2 --axes depth --exits 6,12,18,24,30 --data demo --rows 0:320 \
  --output "$out" --max-steps 24 --batch-size 4 --lr 1e-4 --set max_length=128
manyinone info "$out"
manyinone eval "$out" --data demo --rows 320:360 --max-length 128
manyinone export "$out" --budget 0.6 --output "$out-b0.6" --gguf
python -c "from transformers import AutoModelForCausalLM as M; m = M.from_pretrained('$out-b0.6'); print('plain transformers loads the export:', m.config.num_hidden_layers, 'layers')"
echo "model card: $out-b0.6/README.md; llama.cpp: $out-b0.6/model.gguf"
# The trade-off: the same question at every budget, cheapest first.
manyinone generate "$out" --every-budget --prompt "What is 12 plus 30?" --max-new-tokens 16
