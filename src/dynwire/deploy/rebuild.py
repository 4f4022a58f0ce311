"""Rebuilding a trained model from a file alone: :func:`load_model` and :func:`read_build_info`.

Above :mod:`.files` (reading) and the model registry (building): the one part of
:mod:`dynwire.deploy` that builds models by name.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._registry import create_model, list_models
from ..engine.builders import build_model
from .files import NoBuildInfoError, describe, load_state, no_build_info, read_file, resolve_model_file

__all__ = ["load_model", "read_build_info"]


def _known(info: Mapping[str, Any], path: Path) -> None:
    if info["name"] not in list_models():
        raise ValueError(f"{str(path)!r} holds model {info['name']!r}, which this dynwire does not know")


def read_build_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The build information of a run directory, checkpoint or self-describing export."""
    p = resolve_model_file(path)
    _, info, cfg = read_file(p, use_ema=False)
    if info is None:
        raise NoBuildInfoError(no_build_info(p))
    if cfg is None:
        _known(info, p)
    return info


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu", *, use_ema: bool = False) -> nn.Module:
    """Rebuild a trained model, in ``eval()`` mode on ``device``.

    Args:
        path: a run directory (its ``best.pt``, else ``last.pt``), a training checkpoint
            (``.pt``; model name, wiring and options come from its stored config, classes and
            channels from its ``data_info``, as ``dynwire eval`` does) or a ``.safetensors``
            file written by ``dynwire export`` / :func:`~dynwire.deploy.export_safetensors`.
        device: where to put the model.
        use_ema: load a checkpoint's EMA weights instead of the trained ones.

    The model's ``build_config`` holds what it was built from, plus ``input_size`` and
    ``classes`` (the class names) when the file has them.
    """
    p = resolve_model_file(path)
    state, info, cfg = read_file(p, use_ema)
    if info is None:
        raise NoBuildInfoError(no_build_info(p))
    try:
        if cfg is not None:  # a training checkpoint: exactly what `dynwire eval` builds
            data = types.SimpleNamespace(num_classes=info["num_classes"], in_chans=info["in_chans"])
            model = build_model(cfg, data)
        else:
            _known(info, p)
            model = create_model(
                info["name"],
                num_classes=int(info["num_classes"]),
                wiring=info["wiring"],
                in_chans=int(info["in_chans"]),
                **dict(info.get("model_kwargs") or {}),
                **dict(info.get("wiring_kwargs") or {}),
            )
    except (TypeError, ValueError) as exc:
        if "which this dynwire does not know" in str(exc):
            raise
        raise ValueError(f"{str(p)!r}: cannot rebuild {describe(info)}: {exc}") from exc
    load_state(model, state, p, describe(info))
    model.build_config = {**model.build_config, "input_size": info.get("input_size"), "classes": info.get("classes")}
    return model.to(device).eval()
