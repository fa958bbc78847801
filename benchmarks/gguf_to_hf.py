"""Convert a GGUF model (dequantized to float32) into an HF folder once, so repeated runs load fast.

    python benchmarks/gguf_to_hf.py /root/smollm2.gguf /root/smollm2-hf
"""

import sys

from manyinone.io.loading import load_pretrained

model, tokenizer = load_pretrained(sys.argv[1])
model.save_pretrained(sys.argv[2])
tokenizer.save_pretrained(sys.argv[2])
print("saved", sys.argv[2])
