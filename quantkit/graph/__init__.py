"""The layer graph: what each decoder-layer type of a model consists of, derived from the
model's own code (see docs/architecture.md)."""

from .derive import derive_layer_graph
from .fold import fold_scales, producer_scales
from .model import ModelGraph, derive_model_graph
from .rotate import rotate_layer
from .types import (
    ChannelMap,
    InputGroup,
    LayerGraph,
    Producer,
    ResidualReader,
    ResidualWriter,
    Resume,
    Segment,
    Unit,
    Unquantized,
)

__all__ = [
    "ChannelMap", "InputGroup", "LayerGraph", "ModelGraph", "Producer", "ResidualReader", "ResidualWriter", "Resume",
    "Segment", "Unit", "Unquantized", "derive_layer_graph", "derive_model_graph", "fold_scales",
    "producer_scales", "rotate_layer",
]
