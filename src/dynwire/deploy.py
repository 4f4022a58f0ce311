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
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "BUILD_KEY",
    "NoBuildInfoError",
    "load_model",
    "load_weights",
    "read_build_info",
    "resolve_model_file",
    "export_safetensors",
    "export_onnx",
    "onnx_max_abs_diff",
    "compare_onnx",
    "export_input_size",
    "set_executor",
]

#: Metadata key of a safetensors / ONNX export that holds the build information (JSON).
BUILD_KEY = "dynwire.build"
_BUILD_VERSION = 1
_MIN_OPSET = 18  # the dynamo-based ONNX exporter (torch >= 2.9 default) writes opset 18+


class NoBuildInfoError(ValueError):
    """A file holds weights but does not say which model they belong to."""


# --------------------------------------------------------------------------- build info
def build_info_of(model: nn.Module) -> dict[str, Any] | None:
    """The ``build_config`` that :func:`dynwire.create_model` attached to ``model`` (or None)."""
    from .engine.checkpoint import unwrap_model

    info = getattr(unwrap_model(model), "build_config", None)
    return dict(info) if isinstance(info, Mapping) else None


def _wiring_kwargs(wiring: Any) -> dict[str, Any]:
    """Wiring options that differ from the :class:`WiringConfig` defaults (``kind`` excluded)."""
    from .graph.wiring import WiringConfig

    default = WiringConfig()
    return {
        f.name: getattr(wiring, f.name)
        for f in dataclasses.fields(WiringConfig)
        if f.name != "kind" and getattr(wiring, f.name) != getattr(default, f.name)
    }


def describe_build(name: str, num_classes: int, model: nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`dynwire.create_model` records on a model so that files can describe it."""
    wiring = getattr(model, "wiring", None)
    scalar = (str, int, float, bool, type(None))

    def jsonable(v: Any) -> bool:
        return isinstance(v, scalar) or (isinstance(v, (list, tuple)) and all(isinstance(e, scalar) for e in v))

    return {
        "name": name,
        "num_classes": int(num_classes),
        "in_chans": int(getattr(model, "in_chans", kwargs.get("in_chans", 3))),
        "wiring": wiring.kind if wiring is not None else "dynamic",
        "wiring_kwargs": _wiring_kwargs(wiring) if wiring is not None else {},
        "model_kwargs": {
            k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if k != "in_chans" and jsonable(v)
        },
        # options a file cannot record (callables such as norm_layer): exports refuse these models
        "unportable": sorted(k for k, v in kwargs.items() if not jsonable(v)),
    }


def _info_from_checkpoint(ckpt: Mapping[str, Any], path: Path) -> tuple[Any, dict[str, Any]]:
    """(run config, build info) of a training checkpoint, as ``dynwire eval`` reads them."""
    from .engine.config import config_from_dict

    if "config" not in ckpt or "model" not in ckpt:
        keys = ", ".join(sorted(map(str, ckpt))[:8])
        raise ValueError(
            f"{str(path)!r} is not a dynwire training checkpoint (no 'config'/'model' entries; it holds: {keys}); "
            "for a bare state dict build the model with dynwire.create_model(name, ..., checkpoint_path=...)"
        )
    raw = ckpt["config"]
    if isinstance(raw, Mapping) and isinstance(raw.get("model"), Mapping) and "fpn_channels" in raw["model"]:
        raise ValueError(f"{str(path)!r} is a detection checkpoint (Faster R-CNN); load it with dynwire.detection")
    try:
        cfg = config_from_dict(raw)
    except ValueError as exc:
        raise ValueError(f"{str(path)!r}: its stored config is not a dynwire classification config: {exc}") from exc
    data = ckpt.get("data_info")
    if not isinstance(data, Mapping) or "num_classes" not in data or "in_chans" not in data:
        raise ValueError(
            f"{str(path)!r}: the checkpoint has no data_info (num_classes, in_chans); it was written by an older "
            "dynwire: build the model with dynwire.create_model(name, num_classes=..., checkpoint_path=...)"
        )
    info = {
        "name": cfg.model.name,
        "num_classes": int(data["num_classes"]),
        "in_chans": int(data["in_chans"]),
        "wiring": cfg.model.wiring,
        "wiring_kwargs": dict(cfg.model.wiring_kwargs),
        "model_kwargs": {"drop_rate": float(cfg.model.drop_rate)},
        "input_size": [int(s) for s in data.get("input_size", ())] or None,
        "classes": [str(c) for c in data.get("classes", ())],
    }
    return cfg, info


def _check_build(info: Mapping[str, Any], path: Path) -> dict[str, Any]:
    from ._registry import list_models

    missing = [k for k in ("name", "num_classes", "in_chans", "wiring") if k not in info]
    if missing:
        raise ValueError(f"{str(path)!r}: the {BUILD_KEY} metadata lacks {', '.join(missing)}")
    if int(info.get("version", _BUILD_VERSION)) > _BUILD_VERSION:
        raise ValueError(
            f"{str(path)!r}: written by a newer dynwire (build info version {info['version']}); upgrade dynwire"
        )
    if info["name"] not in list_models():
        raise ValueError(f"{str(path)!r} holds model {info['name']!r}, which this dynwire does not know")
    return dict(info)


# --------------------------------------------------------------------------- files
def resolve_model_file(path: str | os.PathLike[str]) -> Path:
    """A run directory's ``best.pt`` (else ``last.pt``), or ``path`` itself."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise ValueError(f"run directory {str(p)!r} holds neither best.pt nor last.pt")
    if not p.is_file():
        raise FileNotFoundError(f"{str(p)!r}: no such file or run directory")
    return p


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{str(path)!r}: unreadable safetensors file ({exc})") from exc


def _read(path: Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, Any]:
    """(state dict, build info or None, run config or None) of a checkpoint / export file."""
    from .engine.checkpoint import file_kind, load_checkpoint, not_a_dynwire_file

    if file_kind(path) == "safetensors":
        if use_ema:
            raise ValueError(f"{str(path)!r}: a safetensors export holds one set of weights; use_ema does not apply")
        state, meta = _read_safetensors(path)
        info = None
        if BUILD_KEY in meta:
            try:
                info = _check_build(json.loads(meta[BUILD_KEY]), path)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{str(path)!r}: corrupt {BUILD_KEY} metadata ({exc})") from exc
        return state, info, None
    ckpt = load_checkpoint(path, map_location="cpu")  # CheckpointError (a ValueError) for anything else
    if "model" in ckpt and isinstance(ckpt["model"], Mapping):
        state = ckpt["model"]
        if use_ema:
            if not isinstance(ckpt.get("ema"), Mapping):
                raise ValueError(f"checkpoint {str(path)!r} has no EMA weights (train.ema_decay was off)")
            state = ckpt["ema"]["weights"]
        if "config" in ckpt:
            cfg, info = _info_from_checkpoint(ckpt, path)
            return dict(state), info, cfg
        return dict(state), None, None
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        if use_ema:
            raise ValueError(f"{str(path)!r} is a bare state dict; use_ema does not apply")
        return dict(ckpt), None, None  # a bare state dict
    raise ValueError(not_a_dynwire_file(path, "no model weights in it"))


def read_build_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The build information of a run directory, checkpoint or self-describing export."""
    p = resolve_model_file(path)
    _, info, _ = _read(p, use_ema=False)
    if info is None:
        raise NoBuildInfoError(_no_build_info(p))
    return info


def _no_build_info(p: Path) -> str:
    return (
        f"{str(p)!r} does not say which model it holds (no training config, no {BUILD_KEY} metadata); "
        "build the model yourself: dynwire.create_model(name, num_classes=..., checkpoint_path=...)"
    )


def _describe(info: Mapping[str, Any]) -> str:
    return (
        f"{info['name']!r} (wiring {info['wiring']!r}, num_classes {info['num_classes']}, in_chans {info['in_chans']})"
    )


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        detail = "; ".join(lines[:4]) + ("; ..." if len(lines) > 4 else "")
        raise ValueError(f"{str(path)!r} does not fit model {what}: {detail or exc}") from exc


def load_weights(
    model: nn.Module, path: str | os.PathLike[str], *, use_ema: bool = False, expect: Mapping[str, Any] | None = None
) -> nn.Module:
    """Load the weights of a run directory / checkpoint / export / state dict into ``model``.

    ``expect`` (default: the model's ``build_config``) is what the model was built as; when the
    file says which model it holds, model name, wiring, ``num_classes`` and ``in_chans`` must
    match, else a ``ValueError`` names the file and each mismatch. Weights must fit exactly.
    """
    p = resolve_model_file(path)
    state, info, _ = _read(p, use_ema)
    expect = dict(expect) if expect is not None else build_info_of(model)
    if info is not None and expect is not None:
        diffs = [
            f"{k} {info[k]!r} in the file, {expect[k]!r} requested"
            for k in ("name", "wiring", "num_classes", "in_chans")
            if k in expect and info[k] != expect[k]
        ]
        if diffs:
            raise ValueError(f"{str(p)!r} holds {_describe(info)}, not the requested model: {'; '.join(diffs)}")
    what = _describe(expect) if expect is not None else type(model).__name__
    _load_state(model, state, p, what)
    return model


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu", *, use_ema: bool = False) -> nn.Module:
    """Rebuild a trained model, in ``eval()`` mode on ``device``.

    Args:
        path: a run directory (its ``best.pt``, else ``last.pt``), a training checkpoint
            (``.pt``; model name, wiring and options come from its stored config, classes and
            channels from its ``data_info``, as ``dynwire eval`` does) or a ``.safetensors``
            file written by ``dynwire export`` / :func:`export_safetensors`.
        device: where to put the model.
        use_ema: load a checkpoint's EMA weights instead of the trained ones.

    The model's ``build_config`` holds what it was built from, plus ``input_size`` and
    ``classes`` (the class names) when the file has them.
    """
    from ._registry import create_model
    from .engine.builders import build_model

    p = resolve_model_file(path)
    state, info, cfg = _read(p, use_ema)
    if info is None:
        raise NoBuildInfoError(_no_build_info(p))
    try:
        if cfg is not None:  # a training checkpoint: exactly what `dynwire eval` builds
            data = types.SimpleNamespace(num_classes=info["num_classes"], in_chans=info["in_chans"])
            model = build_model(cfg, data)
        else:
            model = create_model(
                info["name"],
                num_classes=int(info["num_classes"]),
                wiring=info["wiring"],
                in_chans=int(info["in_chans"]),
                **dict(info.get("model_kwargs") or {}),
                **dict(info.get("wiring_kwargs") or {}),
            )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{str(p)!r}: cannot rebuild {_describe(info)}: {exc}") from exc
    _load_state(model, state, p, _describe(info))
    model.build_config = {**model.build_config, "input_size": info.get("input_size"), "classes": info.get("classes")}
    return model.to(device).eval()


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

    ``source`` is a model built by :func:`dynwire.create_model` / :func:`load_model`, a run
    directory or a training checkpoint. :func:`load_model` rebuilds the model from the file.
    """
    from .engine.checkpoint import export_safetensors as _write
    from .engine.checkpoint import unwrap_model

    if isinstance(source, nn.Module):
        if use_ema:
            raise ValueError("export_safetensors: use_ema applies to checkpoints, not to a model")
        info = _portable_info(source, "export_safetensors")
        state: Any = unwrap_model(source).state_dict()
    else:
        p = resolve_model_file(source)
        state, info, _ = _read(p, use_ema)
        if info is None:
            raise NoBuildInfoError(_no_build_info(p))
    keep = ("name", "num_classes", "in_chans", "wiring", "wiring_kwargs", "model_kwargs", "input_size", "classes")
    meta = {k: info.get(k) for k in keep}
    meta["version"] = _BUILD_VERSION
    from . import __version__

    return _write(state, out, metadata={BUILD_KEY: json.dumps(meta), "dynwire.version": __version__})


# --------------------------------------------------------------------------- ONNX
def set_executor(model: nn.Module, executor: str) -> dict[nn.Module, str]:
    """Set every graph stage's executor; returns the previous settings (to restore)."""
    from .graph.stage import GraphStage

    if executor not in ("pruned", "dense"):
        raise ValueError(f"executor={executor!r}: choose 'pruned' or 'dense'")
    before = {}
    for m in model.modules():
        if isinstance(m, GraphStage):
            before[m] = m.executor
            m.executor = executor
    return before


def export_input_size(model: nn.Module, input_size: Sequence[int] | None) -> tuple[int, int, int]:
    from ._registry import get_model_cfg

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
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"ONNX export needs onnx and onnxscript: pip install 'dynwire[onnx]' ({exc})") from exc
    from .engine.checkpoint import unwrap_model

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
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ValueError(f"checking an ONNX file needs onnxruntime: pip install 'dynwire[onnx]' ({exc})") from exc
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
