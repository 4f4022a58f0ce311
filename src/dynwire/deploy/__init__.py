"""Deployment: rebuild trained models from files, self-describing safetensors, ONNX export.

* :func:`load_model` rebuilds a trained model from a run directory (``best.pt``, else
  ``last.pt``), a training checkpoint or a ``.safetensors`` export, ready for evaluation.
* ``create_model(name, ..., checkpoint_path=...)`` builds a model and loads weights into it
  (timm-style); the file must fit the model (:func:`load_weights`).
* :func:`export_safetensors` writes the weights plus the build information (model name,
  wiring, wiring options, classes, input size) into the file's metadata, so an export
  rebuilds without its training checkpoint.
* :func:`export_onnx` writes an ONNX graph with a dynamic batch axis. Graph stages export with
  ``executor="dense"``: a removed node (Sec. 3.3) is computed and multiplied by a 0/1 mask, so
  the graph has no data-dependent shapes and its outputs equal the pruned executor's.

Every file that does not fit raises a ``ValueError`` naming the file and the mismatch.

Three modules, each importing only those before it: :mod:`.files` (build information, reading
files, loading weights into a model; what the model registry uses), :mod:`.rebuild` (building
the model a file describes, through the registry) and :mod:`.export` (safetensors and ONNX).
"""

from .export import (
    compare_onnx,
    export_input_size,
    export_onnx,
    export_safetensors,
    onnx_max_abs_diff,
    require_onnx,
    set_executor,
)
from .files import BUILD_KEY, NoBuildInfoError, build_info_of, describe_build, load_weights, resolve_model_file
from .rebuild import load_model, read_build_info

__all__ = [
    "BUILD_KEY",
    "NoBuildInfoError",
    "load_model",
    "load_weights",
    "read_build_info",
    "resolve_model_file",
    "build_info_of",
    "describe_build",
    "export_safetensors",
    "export_onnx",
    "require_onnx",
    "onnx_max_abs_diff",
    "compare_onnx",
    "export_input_size",
    "set_executor",
]
