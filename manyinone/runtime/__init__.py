"""Dynamic-budget generation from one loaded model: static KV cache, CUDA graphs, self-speculative
decoding, mixed-budget continuous batching, and an OpenAI-compatible server (`manyinone serve`, optional extra `manyinone[serve]`)."""

from manyinone.runtime.batching import Batcher
from manyinone.runtime.generate import Generation, Runtime
from manyinone.runtime.sampling import Sampling

__all__ = ["Batcher", "Generation", "Runtime", "Sampling"]
