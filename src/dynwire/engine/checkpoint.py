"""Checkpoints: atomic saves, weights-only loading, RNG state capture, digests, safetensors export.

A checkpoint is a plain dict of tensors and Python scalars/containers, so it
loads with ``torch.load(..., weights_only=True)``; loading never unpickles
arbitrary objects. Saves go through :func:`dynwire.engine.files.atomic_write`,
so a crash mid-write never leaves a truncated ``last.pt``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .files import atomic_write

__all__ = [
    "CheckpointError",
    "atomic_torch_save",
    "load_checkpoint",
    "file_kind",
    "not_a_dynwire_file",
    "capture_rng_state",
    "restore_rng_state",
    "state_dict_sha256",
    "unwrap_model",
    "export_safetensors",
    "CKPT_VERSION",
    "stored_config",
    "with_explicit_node",
    "config_node",
]

#: version of the training checkpoints this dynwire writes. 2: the node form is explicit (files of
#: version 1 were all built with ``node="block"``, see :func:`stored_config`).
CKPT_VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or not loadable as weights only."""


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to ``path`` atomically (see :func:`~dynwire.engine.files.atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Digest of a state dict's names, dtypes, shapes and bytes (independent of device and key order)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{k}|{t.dtype}|{tuple(state[k].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_kind(path: str | os.PathLike[str]) -> str:
    """``"torch"`` (a zip archive or a pickle), ``"safetensors"`` or ``"unknown"``, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= os.path.getsize(path) - 8:
            return "safetensors"
    return "unknown"


def not_a_dynwire_file(path: str | os.PathLike[str], why: str = "neither a PyTorch checkpoint nor safetensors") -> str:
    """The one message for a file that is no checkpoint or export at all (random bytes, a text file)."""
    return f"{str(path)!r} is not a dynwire file ({why})"


def _unpickler_detail(exc: BaseException) -> str:
    """The line of a weights-only ``UnpicklingError`` that says what was refused, without torch's advice."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
        text = text.split("Check the documentation of torch.load", 1)[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; refuses pickled code objects.

    Raises :class:`CheckpointError` (a ``ValueError``) for missing, corrupt or unsafe files,
    and for files that are no PyTorch checkpoint at all (the message :func:`dynwire.load_model`
    gives for them too).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r}: file not found")
    kind = file_kind(path)
    if kind == "safetensors":
        raise CheckpointError(
            f"{str(path)!r} is a safetensors export, not a training checkpoint: it holds weights only "
            "(rebuild it with dynwire.load_model)"
        )
    if kind != "torch":
        raise CheckpointError(not_a_dynwire_file(path))
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(exc)
        if "global" not in detail.lower():  # not a refused class: bytes no pickler wrote
            raise CheckpointError(not_a_dynwire_file(path, f"unreadable pickle data: {detail}")) from exc
        raise CheckpointError(
            f"checkpoint {str(path)!r}: refused to load: it holds objects other than tensors and "
            f"plain Python values, which weights_only loading does not unpickle (could run code). "
            f"Details: {detail}"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: unreadable or truncated ({exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {str(path)!r}: expected a dict, got {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------- stored configs
def stored_config(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """A training checkpoint's run config (a copy), with what older versions left implicit filled in.

    Version 1 checkpoints (dynwire 0.1) did not record ``model.wiring_kwargs.node``: they were all
    built with ``node="block"``, the default then, so that is what they load as, whatever the
    default is now.
    """
    import copy

    from ..graph.wiring import LEGACY_NODE

    raw = copy.deepcopy(dict(ckpt["config"]))
    model = raw.get("model")
    if int(ckpt.get("version", 1)) < 2 and isinstance(model, dict):
        kwargs = dict(model.get("wiring_kwargs") or {})
        kwargs.setdefault("node", LEGACY_NODE)
        model["wiring_kwargs"] = kwargs
    return raw


def with_explicit_node(config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``config`` with ``model.wiring_kwargs.node`` set to the form ``model`` was built in, where the
    config left it to the default (what version-2 checkpoints store, so a later default cannot
    change what they load as)."""
    from ..graph.stage import GraphStage

    stage = next((m for m in unwrap_model(model).modules() if isinstance(m, GraphStage)), None)
    m = config.get("model")
    if stage is None or not isinstance(m, dict):
        return config
    kwargs = dict(m.get("wiring_kwargs") or {})
    kwargs.setdefault("node", stage.wiring.node)
    return {**config, "model": {**m, "wiring_kwargs": kwargs}}


def config_node(model: Mapping[str, Any] | None) -> str:
    """The node form a config's ``model`` section builds: ``wiring_kwargs.node``, else a detection
    backbone's ``backbone_kwargs.node``, else the current default."""
    from ..graph.wiring import WiringConfig

    model = model or {}
    return (model.get("wiring_kwargs") or {}).get(
        "node", (model.get("backbone_kwargs") or {}).get("node", WiringConfig.node)
    )


# --------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """RNG states of python ``random``, numpy, torch (and CUDA) as weights-only-safe values."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(py_version), "state": [int(x) for x in py_state], "gauss": py_gauss},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"]), py["gauss"]))
    npst = state["numpy"]
    keys = npst["keys"]
    keys = keys.cpu().numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state(
        (npst["name"], keys.astype(np.uint32), int(npst["pos"]), int(npst["has_gauss"]), float(npst["cached_gaussian"]))
    )
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu().to(torch.uint8) for s in cuda])
        else:  # a different GPU count: restore what lines up
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s.cpu().to(torch.uint8), i)


# --------------------------------------------------------------------------- export
def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def export_safetensors(
    model_or_ckpt: nn.Module | Mapping[str, Any] | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    use_ema: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write model weights as a ``.safetensors`` file.

    ``model_or_ckpt`` is a module, a state dict, a checkpoint dict (its
    ``model`` or, with ``use_ema``, ``ema`` entry) or a checkpoint path.
    Tensors that share storage (tied weights) are written as separate copies,
    so every key of the state dict is present and loads back with
    ``load_state_dict``.
    """
    from safetensors.torch import save

    obj: Any = model_or_ckpt
    if isinstance(obj, (str, os.PathLike)):
        obj = load_checkpoint(obj, map_location="cpu")
    if isinstance(obj, nn.Module):
        state = unwrap_model(obj).state_dict()
    elif isinstance(obj, Mapping):
        if "model" in obj and isinstance(obj["model"], Mapping):
            key = "ema" if use_ema else "model"
            if obj.get(key) is None:
                raise ValueError(f"export_safetensors: the checkpoint has no {key!r} weights")
            state = obj[key]
            if use_ema and isinstance(state, Mapping) and isinstance(state.get("weights"), Mapping):
                state = state["weights"]  # ModelEma.ema_state_dict() layout
        else:
            state = obj
    else:
        raise ValueError(
            f"export_safetensors: expected a module, state dict, checkpoint dict or path, got {type(obj).__name__}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"export_safetensors: entry {k!r} is {type(v).__name__}, not a tensor")
        # clone(): breaks storage sharing, which save_file refuses.
        tensors[k] = v.detach().to("cpu").contiguous().clone()
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    return atomic_write(path, save(tensors, metadata=meta))
