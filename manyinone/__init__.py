"""manyinone: one pretrained LLM, trained once, served as many nested sub-models at any budget."""

from manyinone.io.api import NestedModel, load, open_checkpoint
from manyinone.core.cost import Cost, resolve_budget
from manyinone.core.space import DepthDim, NestedDimension, NestedSpace, SubnetSpec
from manyinone.core.errors import ManyinoneError
from manyinone.core.registry import register_adapter

__all__ = [
    "Cost", "DepthDim", "ManyinoneError", "NestedDimension", "NestedModel", "NestedSpace", "SubnetSpec",
    "load", "open_checkpoint", "register_adapter", "resolve_budget",
]
__version__ = "0.1.0"
