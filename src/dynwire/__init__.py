"""dynwire: instance-aware connectivity (DG-Net, Differentiable Dynamic Wirings) for PyTorch."""

from . import models  # noqa: F401  (registers the model zoo)
from ._malloc import keep_freed_memory
from ._registry import create_model, get_model_cfg, list_models, register_model
from ._version import __version__
from .deploy import export_onnx, load_model
from .graph.adjacency import record_adjacency
from .graph.stage import GraphStage
from .graph.wiring import WIRINGS, WiringConfig
from .layers.aggregation import aggregate

__all__ = [
    "create_model",
    "load_model",
    "export_onnx",
    "list_models",
    "get_model_cfg",
    "register_model",
    "GraphStage",
    "WiringConfig",
    "WIRINGS",
    "record_adjacency",
    "aggregate",
    "keep_freed_memory",
    "__version__",
]
