"""COCO-format detection data (instances JSON + image folder), validated, read with pycocotools.

Bad input is found when the dataset is built: by default the first problem stops with a
``ValueError`` naming the file and the image or annotation id; ``skip_bad=True`` drops the
offending image or annotation instead and counts it in ``dataset.skipped`` (a warning
summarises the counts). Malformed JSON always stops. The cleaned annotations are
``dataset.coco`` (a ``pycocotools.coco.COCO``), the ground truth for :func:`evaluate_coco`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["CocoDetection", "CocoFormatError", "collate_detection", "drop_crowd", "coco_split_paths", "CHECK_IMAGES"]

log = logging.getLogger(__name__)

#: How much :class:`CocoDetection` checks the image files when it is built.
CHECK_IMAGES: tuple[str, ...] = ("none", "exists", "header", "decode")

#: Boxes may stick out of the image by this many pixels (rounding in real annotations); they are clipped.
BOX_TOLERANCE = 1.0


class CocoFormatError(ValueError):
    """An annotation file or an image does not fit the COCO format."""


def coco_split_paths(root: str | os.PathLike[str], split: str) -> tuple[Path, Path]:
    """COCO's layout: ``root/<split>/`` images and ``root/annotations/instances_<split>.json``."""
    root = Path(root)
    return root / split, root / "annotations" / f"instances_{split}.json"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CocoFormatError(f"annotation file '{path}': not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CocoFormatError(f"annotation file '{path}': unreadable ({exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CocoFormatError(
            f"annotation file '{path}': malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"annotation file '{path}': expected a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoFormatError(f"annotation file '{path}': missing or non-list '{key}' (COCO instances format)")
    return data


class CocoDetection(Dataset):
    """COCO instances JSON + image folder -> ``(image, target)`` in torchvision's detection format.

    ``image`` is a float ``(3, H, W)`` tensor in [0, 1]; ``target`` has ``boxes`` (``(N, 4)``
    float, ``x1, y1, x2, y2`` in pixels), ``labels`` (``(N,)`` int64, contiguous ``1..K`` in
    the order of the category ids; 0 is background), ``image_id``, ``area`` and ``iscrowd``.
    Crowd regions are in the target with ``iscrowd=1``: training drops them
    (:func:`drop_crowd`, as torchvision's references do) and COCOeval handles them as COCO does.

    Args:
        image_dir: folder the ``file_name`` entries are relative to.
        ann_file: the instances JSON.
        skip_bad: drop and count bad images / annotations instead of stopping.
        check_images: ``none``, ``exists``, ``header`` (default: the file opens as an image of
            the size the JSON says) or ``decode`` (every image is decoded once, slow).
        remove_empty: drop images without non-crowd boxes (Detectron2 does for training).
        transforms: optional ``f(image, target) -> (image, target)``.

    Resizing (multi-scale training included) is done by the detector's
    ``GeneralizedRCNNTransform`` (``min_size``/``max_size`` of :func:`fasterrcnn_fpn`), the
    horizontal flip by the training loop; the dataset returns images at their own size.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike[str],
        ann_file: str | os.PathLike[str],
        *,
        skip_bad: bool = False,
        check_images: str = "header",
        remove_empty: bool = False,
        transforms: Callable[[Tensor, dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]] | None = None,
    ) -> None:
        if check_images not in CHECK_IMAGES:
            raise ValueError(f"check_images={check_images!r} is not valid; choose one of {', '.join(CHECK_IMAGES)}")
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.skip_bad = bool(skip_bad)
        self.transforms = transforms
        self.skipped: Counter[str] = Counter()
        self.skipped_ids: dict[str, list[int]] = {}
        data = _load_json(self.ann_file)

        cats = self._categories(data["categories"])
        images = self._images(data["images"], check_images)
        anns = self._annotations(data["annotations"], images, cats)
        if remove_empty:
            has_box = {a["image_id"] for a in anns if not a["iscrowd"]}
            for img_id in [i for i in images if i not in has_box]:
                del images[img_id]
            anns = [a for a in anns if a["image_id"] in images]
        if self.skipped:
            log.warning(
                "%s: skipped %s",
                self.ann_file,
                ", ".join(f"{n} ({reason})" for reason, n in sorted(self.skipped.items())),
            )

        self.cat_ids: list[int] = sorted(cats)
        self.cat_id_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id = {i + 1: c for i, c in enumerate(self.cat_ids)}
        #: index = label: ``class_names[0] == "__background__"``.
        self.class_names: list[str] = ["__background__"] + [cats[c]["name"] for c in self.cat_ids]
        self.num_classes = len(self.cat_ids) + 1
        self.ids: list[int] = sorted(images)
        cleaned = {
            "info": data.get("info", {}),
            "licenses": data.get("licenses", []),
            "images": [images[i] for i in self.ids],
            "annotations": anns,
            "categories": [cats[c] for c in self.cat_ids],
        }
        self.coco = _make_coco(cleaned)

    # -- validation ---------------------------------------------------------------------
    def _bad(self, reason: str, ident: int | None, message: str) -> None:
        """Stop with ``message`` or (``skip_bad``) count the problem."""
        if not self.skip_bad:
            raise CocoFormatError(message + " (pass skip_bad=True / data.skip_bad=true to skip and count)")
        self.skipped[reason] += 1
        if ident is not None:
            self.skipped_ids.setdefault(reason, []).append(ident)

    def _categories(self, items: list[Any]) -> dict[int, dict[str, Any]]:
        cats: dict[int, dict[str, Any]] = {}
        for c in items:
            if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
                raise CocoFormatError(
                    f"annotation file '{self.ann_file}': category {c!r} needs an int 'id' and a 'name'"
                )
            if c["id"] in cats:
                raise CocoFormatError(f"annotation file '{self.ann_file}': duplicate category id {c['id']}")
            cats[c["id"]] = {"id": c["id"], "name": c["name"], "supercategory": c.get("supercategory", "")}
        if not cats:
            raise CocoFormatError(f"annotation file '{self.ann_file}': no categories")
        return cats

    def _images(self, items: list[Any], check: str) -> dict[int, dict[str, Any]]:
        images: dict[int, dict[str, Any]] = {}
        f = self.ann_file
        for im in items:
            ident = im.get("id") if isinstance(im, dict) else None
            if not isinstance(im, dict) or not _is_int(ident) or not isinstance(im.get("file_name"), str):
                self._bad(
                    "malformed image",
                    None,
                    f"annotation file '{f}': image entry {im!r} needs an int 'id' and a 'file_name'",
                )
                continue
            if ident in images:
                self._bad("duplicate image id", ident, f"annotation file '{f}': duplicate image id {ident}")
                continue
            w, h = im.get("width"), im.get("height")
            if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
                self._bad(
                    "bad image size", ident, f"annotation file '{f}': image id {ident} has width={w!r}, height={h!r}"
                )
                continue
            path = self.image_dir / im["file_name"]
            problem = _check_image(path, (w, h), check)
            if problem:
                self._bad(problem[0], ident, f"image '{path}' (image id {ident} in '{f}'): {problem[1]}")
                continue
            images[ident] = dict(im)
        return images

    def _annotations(
        self, items: list[Any], images: dict[int, dict[str, Any]], cats: dict[int, dict[str, Any]]
    ) -> list[dict[str, Any]]:
        f = self.ann_file
        seen: set[int] = set()
        out = []
        for a in items:
            ident = a.get("id") if isinstance(a, dict) else None
            where = f"annotation file '{f}', annotation id {ident}"
            if not isinstance(a, dict) or not _is_int(ident):
                self._bad("malformed annotation", None, f"annotation file '{f}': annotation {a!r} has no int 'id'")
                continue
            if ident in seen:
                self._bad("duplicate annotation id", ident, f"{where}: duplicate annotation id")
                continue
            seen.add(ident)
            img = images.get(a.get("image_id"))
            if img is None:
                if self.skip_bad and a.get("image_id") in self._skipped_image_ids():
                    self.skipped["annotation of a skipped image"] += 1  # goes with its image
                else:
                    self._bad("unknown image id", ident, f"{where}: image_id {a.get('image_id')!r} is not in 'images'")
                continue
            if a.get("category_id") not in cats:
                self._bad(
                    "unknown category id",
                    ident,
                    f"{where}: category_id {a.get('category_id')!r} is not in 'categories' (ids {sorted(cats)[:10]}...)",
                )
                continue
            box = a.get("bbox")
            if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_num(v) for v in box)):
                self._bad("malformed box", ident, f"{where}: bbox {box!r} is not [x, y, width, height]")
                continue
            x, y, w, h = (float(v) for v in box)
            if w <= 0 or h <= 0:
                self._bad("non-positive box size", ident, f"{where}: bbox {box} has non-positive width or height")
                continue
            W, H = img["width"], img["height"]
            t = BOX_TOLERANCE
            if x < -t or y < -t or x + w > W + t or y + h > H + t:
                self._bad(
                    "box outside image",
                    ident,
                    f"{where}: bbox {box} (x1, y1, x2, y2 = {x:g}, {y:g}, {x + w:g}, {y + h:g}) lies outside the "
                    f"{W}x{H} image id {img['id']}",
                )
                continue
            x1, y1 = max(0.0, x), max(0.0, y)
            x2, y2 = min(float(W), x + w), min(float(H), y + h)
            crowd = a.get("iscrowd", 0)
            if crowd not in (0, 1, False, True):
                self._bad("bad iscrowd", ident, f"{where}: iscrowd={crowd!r} must be 0 or 1")
                continue
            area = a.get("area")
            clean = dict(a)
            clean.update(
                bbox=[x1, y1, x2 - x1, y2 - y1],
                iscrowd=int(crowd),
                area=float(area) if _is_num(area) and area > 0 else (x2 - x1) * (y2 - y1),
            )
            out.append(clean)
        return out

    def _skipped_image_ids(self) -> set[int]:
        image_reasons = (
            "duplicate image id",
            "bad image size",
            "missing image",
            "unreadable image",
            "image size mismatch",
        )
        return {i for r in image_reasons for i in self.skipped_ids.get(r, [])}

    # -- access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, index: int) -> Tensor:
        info = self.coco.imgs[self.ids[index]]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise CocoFormatError(
                f"image '{path}' (image id {info['id']} in '{self.ann_file}'): cannot decode ({exc})"
            ) from exc
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)

    def target(self, index: int) -> dict[str, Tensor]:
        img_id = self.ids[index]
        anns = self.coco.imgToAnns.get(img_id, [])
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        return {
            "boxes": boxes,
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(img_id, dtype=torch.int64),
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "iscrowd": torch.tensor([a["iscrowd"] for a in anns], dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image, target = self.load_image(index), self.target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        skipped = f", skipped={dict(self.skipped)}" if self.skipped else ""
        return f"CocoDetection('{self.ann_file}', images={len(self)}, classes={self.num_classes - 1}{skipped})"


def _check_image(path: Path, size: tuple[int, int], check: str) -> tuple[str, str] | None:
    if check == "none":
        return None
    if not path.is_file():
        return "missing image", "file not found"
    if check == "exists":
        return None
    try:
        with Image.open(path) as im:
            actual = im.size
            if check == "decode":
                im.load()
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return "unreadable image", f"cannot read ({type(exc).__name__}: {exc})"
    if tuple(actual) != tuple(size):
        return "image size mismatch", f"is {actual[0]}x{actual[1]} but the JSON says {size[0]}x{size[1]}"
    return None


def _make_coco(dataset: dict[str, Any]):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def collate_detection(
    batch: Sequence[tuple[Tensor, dict[str, Tensor]]],
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Batch variable-size images as lists (the detector pads them itself)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def drop_crowd(target: dict[str, Tensor]) -> dict[str, Tensor]:
    """The training target: crowd regions removed (torchvision's references do the same)."""
    keep = target["iscrowd"] == 0
    if bool(keep.all()):
        return target
    return {k: (v[keep] if k in ("boxes", "labels", "area", "iscrowd") else v) for k, v in target.items()}
