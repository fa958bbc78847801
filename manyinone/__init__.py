"""manyinone: one pretrained LLM, trained once, served as many nested sub-models at any budget."""

from manyinone.core.adapter import DecoderStack, ModelAdapter, PlanAdapter, Reorderable
from manyinone.core.axes import Axis, Slice
from manyinone.core.cost import Cost, resolve_budget
from manyinone.core.errors import ManyinoneError
from manyinone.core.registry import register_adapter
from manyinone.core.space import DepthDim, NestedDimension, NestedSpace, SubnetSpec, register_dimension
from manyinone.io.api import NestedModel, load, open_checkpoint

__all__ = [
    "Axis", "Cost", "DecoderStack", "DepthDim", "ManyinoneError", "ModelAdapter", "NestedDimension", "NestedModel",
    "NestedSpace", "PlanAdapter", "Reorderable", "Slice", "SubnetSpec", "load", "open_checkpoint", "register_adapter",
    "register_dimension", "resolve_budget",
]
__version__ = "0.1.0"
