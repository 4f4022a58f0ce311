"""Fashion-MNIST scenes: a CPU-scale COCO-format detection dataset, deterministic from a seed.

Each scene is a square RGB image with a smooth-noise colour background and 1-6 tinted
Fashion-MNIST garments that do not overlap. Garment sizes are drawn per object from COCO's
three area bands (small < 32^2, medium, large > 96^2 pixels of garment), so AP_S, AP_M and AP_L
all mean something. A garment's box is tight around its visible pixels: the resized garment
is thresholded into a mask, the mask's extent is the box, and the mask is also the alpha of the
paste, so nothing outside the box is drawn. ``area`` is the mask's pixel count (COCO's
convention: the object's area, not the box's).

The train split takes garments from Fashion-MNIST's train images, the val split from its test
images. Output (COCO layout)::

    out_dir/<split>/000001.png ...
    out_dir/annotations/instances_<split>.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST
from ..engine.files import atomic_write

__all__ = ["make_scenes", "main_make_scenes", "area_band", "SPLITS"]

SPLITS = {"train": "train", "val": "test"}  # scene split -> Fashion-MNIST split

MASK_THRESHOLD = 0.05  # garment intensity above which a pixel belongs to the garment
ALPHA_RAMP = 0.25  # intensity over the threshold at which a garment pixel is fully opaque
BAND_PROBS = (0.4, 0.4, 0.2)  # small, medium, large
BAND_AREAS = ((6**2, 30**2), (34**2, 90**2), (100**2, None))  # target garment areas (pixels)


def area_band(area: float) -> str:
    """COCO's area range of an object: ``small`` (< 32^2), ``medium`` or ``large`` (> 96^2)."""
    return "small" if area < 32**2 else ("medium" if area <= 96**2 else "large")


def _background(rng: np.random.Generator, size: int) -> torch.Tensor:
    """Smooth colour noise: a base colour + two octaves of upsampled noise."""
    base = torch.from_numpy(rng.uniform(0.1, 0.6, size=(3, 1, 1))).float()
    coarse = torch.from_numpy(rng.normal(0.0, 1.0, size=(1, 3, 4, 4))).float()
    fine = torch.from_numpy(rng.normal(0.0, 1.0, size=(1, 3, max(2, size // 12), max(2, size // 12)))).float()
    img = base + 0.12 * F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
    img = img + 0.05 * F.interpolate(fine, size=(size, size), mode="bilinear", align_corners=False)[0]
    return img.clamp_(0.0, 1.0)


def _garment_side(rng: np.random.Generator, band: int, fill: float, size: int) -> int:
    """Side of the resized 28x28 garment so that its mask area lands in ``band``."""
    lo, hi = BAND_AREAS[band]
    cap = 0.45 * size * size
    hi = cap if hi is None else min(hi, cap)
    lo = min(lo, hi)
    area = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    side = round(math.sqrt(area / max(fill, 0.05)))
    return int(min(max(side, 8), int(0.95 * size)))


def _render_garment(garment: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int]]:
    """Resize a (28, 28) float garment; returns (intensity, mask) cropped to the mask's box, and the box."""
    g = F.interpolate(garment[None, None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)[
        0, 0
    ]
    mask = g > MASK_THRESHOLD
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(ys) == 0:
        return g[:0, :0], mask[:0, :0], (0, 0, 0, 0)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    return g[y0:y1, x0:x1], mask[y0:y1, x0:x1], (x0, y0, x1 - x0, y1 - y0)


def _free(box: tuple[int, int, int, int], placed: Sequence[tuple[int, int, int, int]], gap: int = 2) -> bool:
    x, y, w, h = box
    for px, py, pw, ph in placed:
        if x < px + pw + gap and px < x + w + gap and y < py + ph + gap and py < y + h + gap:
            return False
    return True


def _scene(
    rng: np.random.Generator, data: torch.Tensor, labels: torch.Tensor, size: int, max_objects: int
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    img = _background(rng, size)
    n = int(rng.integers(1, max_objects + 1))
    specs = []
    for _ in range(n):
        idx = int(rng.integers(len(data)))
        garment = data[idx].float() / 255.0
        fill = float((garment > MASK_THRESHOLD).float().mean())
        band = int(rng.choice(3, p=BAND_PROBS))
        side = _garment_side(rng, band, fill, size)
        tint = torch.from_numpy(rng.uniform(0.45, 1.0, size=3)).float()
        specs.append((side, idx, garment, tint))
    specs.sort(key=lambda s: -s[0])  # place the large ones first
    placed: list[tuple[int, int, int, int]] = []
    objects = []
    for side, idx, garment, tint in specs:
        g, mask, (_, _, bw, bh) = _render_garment(garment, side)
        if bw == 0 or bw > size or bh > size:
            continue
        for _ in range(40):
            x, y = int(rng.integers(0, size - bw + 1)), int(rng.integers(0, size - bh + 1))
            if _free((x, y, bw, bh), placed):
                break
        else:
            continue
        placed.append((x, y, bw, bh))
        alpha = ((g - MASK_THRESHOLD) / ALPHA_RAMP).clamp(0.0, 1.0) * mask
        color = tint[:, None, None] * (0.3 + 0.7 * g)
        region = img[:, y : y + bh, x : x + bw]
        img[:, y : y + bh, x : x + bw] = region * (1 - alpha) + color * alpha
        objects.append(
            {
                "category_id": int(labels[idx]) + 1,
                "bbox": [x, y, bw, bh],
                "area": int(mask.sum()),
                "iscrowd": 0,
                "fmnist_index": idx,
            }
        )
    return img, objects


def make_scenes(
    out_dir: str | os.PathLike[str],
    split: str = "train",
    num_images: int = 1000,
    image_size: int = 192,
    seed: int = 0,
    fmnist_root: str | os.PathLike[str] | None = None,
    max_objects: int = 6,
) -> dict[str, Any]:
    """Write ``num_images`` scenes of ``split`` (``train`` or ``val``) in COCO format under ``out_dir``.

    Deterministic from ``(seed, split)``: the same arguments give the same pixels and JSON.
    Returns a summary: paths, image / object counts, objects per COCO area band and per class.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose 'train' (Fashion-MNIST train images) or 'val' (test images)")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images={num_images!r} must be a positive int")
    if not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size={image_size!r} must be an int >= 32")
    if not 1 <= int(max_objects) <= 50:
        raise ValueError(f"max_objects={max_objects!r} must be in [1, 50]")
    fm = FashionMNIST(fmnist_root, split=SPLITS[split])
    out = Path(out_dir)
    img_dir = out / split
    ann_path = out / "annotations" / f"instances_{split}.json"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), list(SPLITS).index(split)])
    images, annotations = [], []
    for i in range(num_images):
        img, objects = _scene(rng, fm.data, fm.targets, image_size, int(max_objects))
        name = f"{i + 1:06d}.png"
        pixels = (img * 255.0).round_().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(img_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": image_size, "height": image_size})
        for o in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **o})
    data = {
        "info": {
            "description": f"Fashion-MNIST scenes ({split}), garments from Fashion-MNIST {SPLITS[split]} images",
            "seed": int(seed),
            "image_size": image_size,
            "generator": "dynwire.detection.scenes",
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "garment"} for k, name in enumerate(FASHION_MNIST_CLASSES)
        ],
    }
    atomic_write(ann_path, json.dumps(data))
    bands = Counter(area_band(a["area"]) for a in annotations)
    classes = Counter(FASHION_MNIST_CLASSES[a["category_id"] - 1] for a in annotations)
    return {
        "split": split,
        "image_dir": str(img_dir),
        "ann_file": str(ann_path),
        "images": len(images),
        "objects": len(annotations),
        "bands": {b: bands.get(b, 0) for b in ("small", "medium", "large")},
        "classes": dict(sorted(classes.items())),
    }


MAKE_SCENES_DESCRIPTION = "Generate Fashion-MNIST detection scenes in COCO format (deterministic from --seed)."


def add_make_scenes_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``dynwire make-scenes`` (shared by the CLI and :func:`main_make_scenes`)."""
    p.add_argument("out_dir", help="output folder: <out>/{train,val}/*.png and <out>/annotations/instances_*.json")
    p.add_argument("--train-images", type=int, default=4000, help="train scenes (0: skip the split)")
    p.add_argument("--val-images", type=int, default=500, help="val scenes (0: skip the split)")
    p.add_argument("--image-size", type=int, default=192)
    p.add_argument("--max-objects", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fmnist-root", default=None, help="folder with the Fashion-MNIST IDX files (default: searched)")
    return p


def run_make_scenes(args: argparse.Namespace) -> int:
    """Write the splits ``args`` asks for and print one summary line per split."""
    for split, n in (("train", args.train_images), ("val", args.val_images)):
        if n <= 0:
            continue
        s = make_scenes(args.out_dir, split, n, args.image_size, args.seed, args.fmnist_root, args.max_objects)
        print(
            f"{split}: {s['images']} images, {s['objects']} garments "
            f"(small {s['bands']['small']}, medium {s['bands']['medium']}, large {s['bands']['large']}) "
            f"-> {s['image_dir']}, {s['ann_file']}"
        )
    return 0


def main_make_scenes(argv: Sequence[str] | None = None) -> int:
    """``dynwire make-scenes OUT_DIR``: write the train and val scene splits in COCO format."""
    p = argparse.ArgumentParser(prog="dynwire make-scenes", description=MAKE_SCENES_DESCRIPTION)
    return run_make_scenes(add_make_scenes_arguments(p).parse_args(argv))
