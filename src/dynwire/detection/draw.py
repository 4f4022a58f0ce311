"""Drawing detections (boxes, class names, scores) into PNG files."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.utils import draw_bounding_boxes

from ..engine.files import atomic_write

__all__ = ["draw_detections", "detect_images", "read_image"]

_PALETTE = [
    "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
    "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3",
]  # fmt: skip


def _name(class_names: Sequence[str] | Mapping[int, str] | None, label: int) -> str:
    if class_names is None:
        return str(label)
    if isinstance(class_names, Mapping):
        return str(class_names.get(label, label))
    return str(class_names[label]) if 0 <= label < len(class_names) else str(label)


def read_image(path: str | os.PathLike[str]) -> Tensor:
    """An image file as a float ``(3, H, W)`` tensor in [0, 1]."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB")).copy()
    except OSError as exc:
        raise ValueError(f"image '{path}': cannot read ({exc})") from exc
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def draw_detections(
    image: Tensor,
    detections: Mapping[str, Tensor],
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    score_thresh: float = 0.5,
    out_path: str | os.PathLike[str] | None = None,
    width: int = 2,
) -> Tensor:
    """Draw the detections scoring at least ``score_thresh`` on ``image``; save a PNG if ``out_path``.

    ``image`` is ``(3, H, W)``, float in [0, 1] or uint8; ``detections`` is one output of a
    torchvision detector (``boxes`` xyxy, ``labels``, ``scores``). ``class_names`` is indexed
    by label (``CocoDetection.class_names``, with ``__background__`` at 0) or maps label ->
    name. Returns the drawn uint8 image.
    """
    img = image.detach().cpu()
    if img.is_floating_point():
        img = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected an image of shape (3, H, W), got {tuple(image.shape)}")
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    scores = detections["scores"].detach().cpu()
    keep = scores >= score_thresh
    boxes = detections["boxes"].detach().cpu().float()[keep]
    labels = detections["labels"].detach().cpu()[keep].tolist()
    captions = [f"{_name(class_names, lab)} {s:.2f}" for lab, s in zip(labels, scores[keep].tolist())]
    colors = [_PALETTE[lab % len(_PALETTE)] for lab in labels]
    if len(boxes):
        img = draw_bounding_boxes(img, boxes, labels=captions, colors=colors, width=width)
    if out_path is not None:
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        atomic_write(out_path, lambda f: pil.save(f, format="PNG"))
    return img


@torch.no_grad()
def detect_images(
    model: nn.Module,
    paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    score_thresh: float = 0.5,
) -> list[Path]:
    """Run ``model`` on image files and write ``<out_dir>/<stem>.png`` with the drawn detections.

    What ``dynwire detect --checkpoint X IMAGE... --out DIR`` will call.
    """
    model.eval()
    device = next(model.parameters()).device
    written = []
    for p in paths:
        img = read_image(p)
        det = model([img.to(device)])[0]
        out = Path(out_dir) / f"{Path(p).stem}.png"
        draw_detections(img, det, class_names, score_thresh, out)
        written.append(out)
    return written
