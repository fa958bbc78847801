"""manyinone: one pretrained LLM, trained once, served as many nested sub-models at any budget."""

from manyinone.api import NestedModel, load, open_checkpoint
from manyinone.budget import Cost, resolve_budget
from manyinone.dims import DepthDim, NestedDimension, NestedSpace, SubnetSpec
from manyinone.errors import ManyinoneError
from manyinone.registry import register_adapter

__all__ = [
    "Cost", "DepthDim", "ManyinoneError", "NestedDimension", "NestedModel", "NestedSpace", "SubnetSpec",
    "load", "open_checkpoint", "register_adapter", "resolve_budget",
]
__version__ = "0.1.0"
