"""Dynamic-budget generation from one loaded model: static KV cache, CUDA graphs, self-speculative
decoding, and an OpenAI-compatible server (`manyinone serve`, optional extra `manyinone[serve]`)."""

from manyinone.runtime.generate import Generation, Runtime
from manyinone.runtime.sampling import Sampling

__all__ = ["Generation", "Runtime", "Sampling"]
