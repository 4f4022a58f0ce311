"""Detection checkpoints of :mod:`dynwire.detection.train`: recognising, loading and evaluating them.

A :func:`~dynwire.detection.train.train_detector` checkpoint carries ``format`` =
:data:`CHECKPOINT_FORMAT` and is always loaded weights-only; :func:`load_detector` rebuilds its
detector (with config overrides), :func:`evaluate_detector_checkpoint` runs COCOeval on it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..engine.checkpoint import CheckpointError, load_checkpoint, stored_config
from ._builders import build_detector
from .coco import CocoDetection, coco_split_paths, collate_detection
from .config import (
    DetectionConfig,
    apply_detection_override,
    detection_config_from_dict,
    detection_config_to_dict,
)
from .evaluate import evaluate_coco

CHECKPOINT_FORMAT = "dynwire-detection/1"


def _pick_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A detection checkpoint, loaded weights-only (``CheckpointError``, a ``ValueError``, otherwise)."""
    try:
        ckpt = load_checkpoint(path, map_location="cpu")
    except CheckpointError:
        raise
    except Exception as exc:  # e.g. IndexError from the weights-only unpickler on a text file
        raise CheckpointError(
            f"checkpoint '{path}': unreadable, not a torch file ({type(exc).__name__}: {exc})"
        ) from exc
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint '{path}': not a dynwire detection checkpoint ({CHECKPOINT_FORMAT})")
    return ckpt


def is_detection_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a :func:`train_detector` checkpoint (False for anything unreadable)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not ours to judge: the classification loader reports it
        return False
    return isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT


def _checkpoint_config(ckpt: dict[str, Any], overrides: Sequence[str] = ()) -> DetectionConfig:
    raw = stored_config(ckpt)
    for item in overrides:
        apply_detection_override(raw, item)
    return detection_config_from_dict(raw)


def load_detector(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", overrides: Sequence[str] = ()
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the detector of a :func:`train_detector` checkpoint; returns ``(model, checkpoint)``.

    The checkpoint is loaded weights-only. ``overrides`` (``section.key=value``) change its
    stored config first, e.g. ``model.wiring_kwargs.eval_gate=soft`` or ``data.test_min_size=640``;
    the checkpoint's ``config`` entry is returned with them applied.
    """
    path = Path(path)
    ckpt = _load(path)
    cfg = _checkpoint_config(ckpt, overrides)
    model = build_detector(cfg, int(ckpt["num_classes"]), backbone_weights=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(
            f"checkpoint '{path}' does not fit the detector its config (with overrides) builds: {exc}"
        ) from None
    model.to(_pick_device(device)).eval()
    model.transform.min_size = (int(cfg.data.test_min_size),)
    ckpt["config"] = detection_config_to_dict(cfg)
    return model, ckpt


def evaluate_detector_checkpoint(
    path: str | os.PathLike[str],
    *,
    data_root: str | None = None,
    split: str | None = None,
    out_json: str | os.PathLike[str] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    max_images: int | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """COCO evaluation of a detection checkpoint (what ``dynwire eval`` runs on one).

    Evaluates on ``split`` (default: the config's ``data.val_split``) under ``data_root``
    (default: the config's ``data.root``), the first ``max_images`` images if given. Detections
    are written in COCO results format to ``out_json`` (default: beside the checkpoint,
    ``<name>_detections.json``). Returns Table 2's columns and ``AR100`` (in %), ``images``,
    ``detections``, ``detections_json``, ``iter`` and the COCOeval ``summary`` text.
    """
    dev = _pick_device(device)
    model, ckpt = load_detector(path, dev, overrides)
    cfg = detection_config_from_dict(ckpt["config"])
    root = data_root if data_root is not None else cfg.data.root
    if root is None:
        raise ValueError(f"checkpoint '{path}': its config has no data.root; pass the dataset folder (--data-dir)")
    split = split or cfg.data.val_split
    images, ann = coco_split_paths(root, split)
    if not ann.is_file():
        raise ValueError(f"annotation file '{ann}' not found (data root {str(root)!r}, split {split!r})")
    ds = CocoDetection(images, ann, skip_bad=cfg.data.skip_bad, check_images=cfg.data.check_images)
    names = {str(v): int(k) for k, v in ckpt["label_to_cat_id"].items()}
    if sorted(int(c) for c in ds.label_to_cat_id.values()) != sorted(int(c) for c in names):
        raise ValueError(f"'{ann}' has other categories than the checkpoint was trained on")
    n = len(ds) if max_images is None else min(int(max_images), len(ds))
    loader = DataLoader(
        Subset(ds, list(range(n))),
        batch_size=batch_size or cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers if num_workers is None else num_workers,
        collate_fn=collate_detection,
    )
    out_json = Path(out_json) if out_json is not None else Path(path).with_name(Path(path).stem + "_detections.json")
    mapping = {int(k): int(v) for k, v in ckpt["label_to_cat_id"].items()}
    m = evaluate_coco(model, loader, ds.coco, out_json, label_to_cat_id=mapping, device=dev)
    m["detections_json"] = str(out_json)
    m["iter"] = int(ckpt["iter"])
    m["split"] = split
    return m
