"""Model files: the build information a model carries, reading checkpoints and exports, loading weights.

The lowest layer of :mod:`dynwire.deploy`, and what :func:`dynwire.create_model`'s
``checkpoint_path`` uses: it never imports the model registry (the registry imports it).

* :func:`describe_build` is what ``create_model`` records on a model (``model.build_config``);
* :func:`resolve_model_file` and :func:`read_file` read a run directory, a training checkpoint,
  a self-describing ``.safetensors`` export or a bare state dict;
* :func:`load_weights` loads such a file into a model that must fit it.

Every file that does not fit raises a ``ValueError`` naming the file and the mismatch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.checkpoint import file_kind, load_checkpoint, not_a_dynwire_file, stored_config, unwrap_model

__all__ = [
    "BUILD_KEY",
    "BUILD_VERSION",
    "NoBuildInfoError",
    "build_info_of",
    "describe_build",
    "describe",
    "resolve_model_file",
    "read_file",
    "no_build_info",
    "load_state",
    "load_weights",
]

#: Metadata key of a safetensors / ONNX export that holds the build information (JSON).
BUILD_KEY = "dynwire.build"
#: version of the build information this dynwire writes and reads. 2: ``wiring_kwargs`` always
#: holds ``node``; version 1 files were all built with ``node="block"`` and load as that.
BUILD_VERSION = 2


class NoBuildInfoError(ValueError):
    """A file holds weights but does not say which model they belong to."""


# --------------------------------------------------------------------------- build info
def build_info_of(model: nn.Module) -> dict[str, Any] | None:
    """The ``build_config`` that :func:`dynwire.create_model` attached to ``model`` (or None)."""
    info = getattr(unwrap_model(model), "build_config", None)
    return dict(info) if isinstance(info, Mapping) else None


def _wiring_kwargs(wiring: Any) -> dict[str, Any]:
    """Wiring options that differ from the :class:`WiringConfig` defaults, and ``node`` (``kind`` excluded)."""
    from ..graph.wiring import WiringConfig

    default = WiringConfig()
    return {
        f.name: getattr(wiring, f.name)
        for f in dataclasses.fields(WiringConfig)
        # the node form always: a later default must not change what a file loads as
        if f.name != "kind" and (f.name == "node" or getattr(wiring, f.name) != getattr(default, f.name))
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
    from ..engine.config import config_from_dict

    if "config" not in ckpt or "model" not in ckpt:
        keys = ", ".join(sorted(map(str, ckpt))[:8])
        raise ValueError(
            f"{str(path)!r} is not a dynwire training checkpoint (no 'config'/'model' entries; it holds: {keys}); "
            "for a bare state dict build the model with dynwire.create_model(name, ..., checkpoint_path=...)"
        )
    raw = stored_config(ckpt)
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
    """Build information of a file, checked for its keys and version (the model name: by the caller)."""
    missing = [k for k in ("name", "num_classes", "in_chans", "wiring") if k not in info]
    if missing:
        raise ValueError(f"{str(path)!r}: the {BUILD_KEY} metadata lacks {', '.join(missing)}")
    if int(info.get("version", BUILD_VERSION)) > BUILD_VERSION:
        raise ValueError(
            f"{str(path)!r}: written by a newer dynwire (build info version {info['version']}); upgrade dynwire"
        )
    info = dict(info)
    if int(info.get("version", BUILD_VERSION)) < 2:
        from ..graph.wiring import LEGACY_NODE

        info["wiring_kwargs"] = {"node": LEGACY_NODE, **dict(info.get("wiring_kwargs") or {})}
    return info


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


def read_file(path: Path, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, Any]:
    """(state dict, build info or None, run config or None) of a checkpoint / export file."""
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


def no_build_info(p: Path) -> str:
    return (
        f"{str(p)!r} does not say which model it holds (no training config, no {BUILD_KEY} metadata); "
        "build the model yourself: dynwire.create_model(name, num_classes=..., checkpoint_path=...)"
    )


def describe(info: Mapping[str, Any]) -> str:
    return (
        f"{info['name']!r} (wiring {info['wiring']!r}, num_classes {info['num_classes']}, in_chans {info['in_chans']})"
    )


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
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
    state, info, _ = read_file(p, use_ema)
    expect = dict(expect) if expect is not None else build_info_of(model)
    if info is not None and expect is not None:
        diffs = [
            f"{k} {info[k]!r} in the file, {expect[k]!r} requested"
            for k in ("name", "wiring", "num_classes", "in_chans")
            if k in expect and info[k] != expect[k]
        ]
        if diffs:
            raise ValueError(f"{str(p)!r} holds {describe(info)}, not the requested model: {'; '.join(diffs)}")
    what = describe(expect) if expect is not None else type(model).__name__
    load_state(model, state, p, what)
    return model
