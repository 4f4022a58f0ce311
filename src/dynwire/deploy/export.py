"""Exports: self-describing safetensors files and ONNX graphs.

* :func:`export_safetensors` writes the weights plus the build information (model name,
  wiring, wiring options, classes, input size) into the file's metadata, so an export
  rebuilds with :func:`dynwire.load_model`, without its training checkpoint.
* :func:`export_onnx` writes an ONNX graph with a dynamic batch axis. Graph stages export with
  ``executor="dense"``: a removed node (Sec. 3.3) is computed and multiplied by a 0/1 mask, so
  the graph has no data-dependent shapes and its outputs equal the pruned executor's.
  :func:`compare_onnx` runs the file with onnxruntime against PyTorch. Both need the ``onnx``
  extra (``pip install 'dynwire[onnx]'``); :func:`require_onnx` says so in one line.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._registry import get_model_cfg
from .._version import __version__
from ..engine.checkpoint import export_safetensors as _write_safetensors
from ..engine.checkpoint import unwrap_model
from ..graph.stage import GraphStage
from .files import (
    BUILD_KEY,
    BUILD_VERSION,
    NoBuildInfoError,
    build_info_of,
    no_build_info,
    read_file,
    resolve_model_file,
)
from .rebuild import load_model

__all__ = [
    "export_safetensors",
    "require_onnx",
    "export_onnx",
    "compare_onnx",
    "onnx_max_abs_diff",
    "export_input_size",
    "set_executor",
]

_MIN_OPSET = 18  # the dynamo-based ONNX exporter (torch >= 2.9 default) writes opset 18+


# --------------------------------------------------------------------------- safetensors
def _portable_info(model: nn.Module, what: str) -> dict[str, Any]:
    info = build_info_of(model)
    if info is None:
        raise ValueError(f"{what}: the model was not built by dynwire.create_model, so an export cannot describe it")
    if info.get("unportable"):
        raise ValueError(
            f"{what}: the model was built with {', '.join(info['unportable'])}=<object>, which a file cannot "
            "record; export the bare weights with dynwire.engine.export_safetensors and rebuild with "
            "create_model(..., checkpoint_path=...)"
        )
    return info


def export_safetensors(
    source: nn.Module | str | os.PathLike[str], out: str | os.PathLike[str], *, use_ema: bool = False
) -> Path:
    """Write a self-describing ``.safetensors`` file (weights + build info in its metadata).

    ``source`` is a model built by :func:`dynwire.create_model` / :func:`~dynwire.load_model`, a run
    directory or a training checkpoint. :func:`~dynwire.load_model` rebuilds the model from the file.
    """
    if isinstance(source, nn.Module):
        if use_ema:
            raise ValueError("export_safetensors: use_ema applies to checkpoints, not to a model")
        info = _portable_info(source, "export_safetensors")
        state: Any = unwrap_model(source).state_dict()
    else:
        p = resolve_model_file(source)
        state, info, _ = read_file(p, use_ema)
        if info is None:
            raise NoBuildInfoError(no_build_info(p))
    keep = ("name", "num_classes", "in_chans", "wiring", "wiring_kwargs", "model_kwargs", "input_size", "classes")
    meta = {k: info.get(k) for k in keep}
    meta["version"] = BUILD_VERSION
    return _write_safetensors(state, out, metadata={BUILD_KEY: json.dumps(meta), "dynwire.version": __version__})


# --------------------------------------------------------------------------- ONNX
def require_onnx(check: bool = True) -> None:
    """Raise a one-line ``ValueError`` naming the ``dynwire[onnx]`` extra when its packages are missing.

    ``check``: also onnxruntime, which runs the exported file (``dynwire export`` does, unless
    ``--no-check``). Called before any work, so a missing extra costs nothing.
    """
    names = ["onnx", "onnxscript"] + (["onnxruntime"] if check else [])
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise ValueError(
            f"ONNX export needs the onnx extra ({', '.join(missing)} not installed): pip install 'dynwire[onnx]'"
        )


def set_executor(model: nn.Module, executor: str) -> dict[nn.Module, str]:
    """Set every graph stage's executor; returns the previous settings (to restore)."""
    if executor not in ("pruned", "dense"):
        raise ValueError(f"executor={executor!r}: choose 'pruned' or 'dense'")
    before = {}
    for m in model.modules():
        if isinstance(m, GraphStage):
            before[m] = m.executor
            m.executor = executor
    return before


def export_input_size(model: nn.Module, input_size: Sequence[int] | None) -> tuple[int, int, int]:
    """The ``(C, H, W)`` an export traces with: ``input_size`` checked against the model's channels,
    or else the training input size its build information records, else its registered size."""
    info = build_info_of(model) or {}
    in_chans = int(getattr(model, "in_chans", info.get("in_chans", 3)))
    if input_size is None:
        size = info.get("input_size")
        if not size and info.get("name"):
            size = (in_chans, *get_model_cfg(info["name"]).input_size[1:])
        if not size:
            raise ValueError("export_onnx: give input_size=(C, H, W); the model does not say its input size")
        input_size = size
    if len(input_size) != 3 or not all(isinstance(s, int) and s > 0 for s in input_size):
        raise ValueError(f"input size {tuple(input_size)!r}: expected three positive ints C H W")
    if input_size[0] != in_chans:
        raise ValueError(f"input size {tuple(input_size)}: the model takes {in_chans} channels, not {input_size[0]}")
    return tuple(int(s) for s in input_size)  # type: ignore[return-value]


def export_onnx(
    source: nn.Module | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    input_size: Sequence[int] | None = None,
    opset: int | None = None,
    batch_size: int = 2,
    use_ema: bool = False,
    optimize: bool = True,
) -> Path:
    """Export a model to ONNX with a dynamic batch axis (input ``input``, output ``logits``).

    Args:
        source: a model, a run directory, a checkpoint or a self-describing safetensors export.
        out: the ``.onnx`` file to write (weights inside, unless over ONNX's 2 GB limit).
        input_size: ``(C, H, W)`` of the example input (default: the training input size the
            file records, else the model's registered size). Convolutional models accept other
            ``H, W`` only if exported with them: the spatial size is fixed in the graph.
        opset: ONNX opset (default: the exporter's, 18); 18 or later.
        batch_size: batch of the example input; the exported batch axis is dynamic anyway.
        optimize: run onnxscript's graph optimizer (constant folding, CSE, rewrites) as torch's
            exporter does by default; onnxruntime runs the optimized graph ~3x faster.

    Uses the default (dynamo-based) exporter of torch. The model is exported in ``eval()`` with
    every graph stage on ``executor="dense"`` (removal as masks; restored afterwards) and the
    aggregation as plain ops; the build info goes into the ONNX metadata (``dynwire.build``).
    """
    require_onnx(check=False)
    if opset is not None and (not isinstance(opset, int) or opset < _MIN_OPSET):
        raise ValueError(f"opset {opset!r} is not supported: torch's ONNX exporter writes opset {_MIN_OPSET} or later")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    if isinstance(source, nn.Module):
        if use_ema:
            raise ValueError("export_onnx: use_ema applies to checkpoints, not to a model")
        model = unwrap_model(source)
    else:
        model = load_model(source, "cpu", use_ema=use_ema)
    size = export_input_size(model, input_size)
    device = next(model.parameters()).device
    x = torch.randn(batch_size, *size, device=device)
    was_training = model.training
    before = set_executor(model, "dense")
    model.eval()
    try:
        with torch.no_grad():
            prog = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                opset_version=opset,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                verbose=False,
                optimize=False,  # below, without the one quadratic rewrite rule
            )
    finally:
        for m, e in before.items():
            m.executor = e
        model.train(was_training)
    if optimize:
        _optimize(prog)
    info = build_info_of(model)
    if info is not None:
        meta = {k: v for k, v in info.items() if k != "unportable"}
        prog.model.metadata_props[BUILD_KEY] = json.dumps({**meta, "input_size": list(size)})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prog.save(out)
    return out


def _optimize(prog: Any) -> None:
    """``prog.optimize()`` without onnxscript's multi-output rewrite rules (today: ``SlicesSplit``).

    Their matcher tries every same-type node of the graph for each candidate (quadratic): on
    the dense masked graph of cifar_resnet56 (6300 nodes, many Slice ops) optimizing took 205 s
    with them and 12 s without, giving the same 1432-node graph. Falls back to the full
    optimizer if onnxscript's internals look different.
    """
    try:
        from onnxscript import rewriter

        rules = rewriter._DEFAULT_REWRITE_RULES
        fast = tuple(r for r in rules if getattr(r._target_pattern, "has_single_output_node", True))
    except (ImportError, AttributeError):
        prog.optimize()
        return
    rewriter._DEFAULT_REWRITE_RULES = fast
    try:
        prog.optimize()
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def compare_onnx(model: nn.Module, onnx_path: str | os.PathLike[str], x: torch.Tensor) -> tuple[float, float]:
    """(max abs difference onnxruntime vs ``model(x)`` in ``eval()``, max abs value of ``model(x)``)."""
    require_onnx(check=True)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(x).float().cpu()
    finally:
        model.train(was_training)
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.detach().cpu().numpy()})[0])
    return float((got - ref).abs().max()), float(ref.abs().max())


def onnx_max_abs_diff(model: nn.Module, onnx_path: str | os.PathLike[str], x: torch.Tensor) -> float:
    """Max abs difference between onnxruntime's outputs and ``model(x)`` (in ``eval()``, as set)."""
    return compare_onnx(model, onnx_path, x)[0]
