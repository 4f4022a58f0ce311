"""COCO box evaluation with ``pycocotools.cocoeval.COCOeval``: the columns of Table 2."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.distributed import DistInfo, all_gather_objects
from ..engine.files import atomic_write

__all__ = ["evaluate_coco", "predict_coco", "detections_to_coco", "coco_eval_from_results", "TABLE2_COLUMNS"]

#: COCOeval's first six statistics, named as in Table 2 (all in %).
TABLE2_COLUMNS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detections_to_coco(
    outputs: Iterable[Mapping[str, Tensor]], image_ids: Iterable[int], label_to_cat_id: Mapping[int, int] | None
) -> list[dict[str, Any]]:
    """torchvision detections (``boxes`` xyxy, ``labels``, ``scores``) -> COCO results entries."""
    results = []
    for out, img_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().cpu().float()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for b, lab, s in zip(xywh, out["labels"].tolist(), out["scores"].tolist()):
            cat = label_to_cat_id[int(lab)] if label_to_cat_id is not None else int(lab)
            results.append(
                {
                    "image_id": int(img_id),
                    "category_id": int(cat),
                    "bbox": [round(v, 2) for v in b],
                    "score": round(float(s), 5),
                }
            )
    return results


def coco_eval_from_results(
    coco_gt: Any, results: list[dict[str, Any]], image_ids: Iterable[int] | None = None
) -> dict[str, Any]:
    """Run COCOeval (bbox) on results entries; Table 2 columns in %.

    A column is ``None`` when the evaluated images have no ground truth in that area range
    (COCOeval's -1), e.g. ``APl`` on images smaller than 96x96. With no detections at all
    every defined column is 0.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes refuses an empty list: an empty result set with the same images
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(coco_gt.dataset["images"]),
                "categories": list(coco_gt.dataset["categories"]),
                "annotations": [],
            }
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted({int(i) for i in image_ids})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) for s in ev.stats]
    metrics: dict[str, Any] = {}
    for name, s in zip(TABLE2_COLUMNS, stats[:6]):
        metrics[name] = None if s < 0 or not math.isfinite(s) else 100.0 * s
    metrics["AR100"] = None if stats[8] < 0 else 100.0 * stats[8]
    metrics["summary"] = buf.getvalue().strip()
    return metrics


@torch.no_grad()
def predict_coco(
    model: nn.Module,
    loader: Iterable[tuple[list[Tensor], list[dict[str, Tensor]]]],
    *,
    label_to_cat_id: Mapping[int, int] | None = None,
    device: str | torch.device | None = None,
    max_images: int | None = None,
) -> tuple[list[dict[str, Any]], list[int]]:
    """Run ``model`` (in eval mode) over ``loader``; returns the COCO results entries and the image ids seen."""
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    try:
        for images, targets in loader:
            ids = [int(t["image_id"]) for t in targets]
            outputs = model([im.to(device, non_blocking=True) for im in images])
            results.extend(detections_to_coco(outputs, ids, label_to_cat_id))
            image_ids.extend(ids)
            if max_images is not None and len(image_ids) >= max_images:
                break
    finally:
        model.train(was_training)
    return results, image_ids


def evaluate_coco(
    model: nn.Module,
    loader: Iterable[tuple[list[Tensor], list[dict[str, Tensor]]]],
    coco_gt: Any,
    out_json: str | os.PathLike[str] | None,
    *,
    label_to_cat_id: Mapping[int, int] | None = None,
    device: str | torch.device | None = None,
    max_images: int | None = None,
    dist_info: DistInfo | None = None,
) -> dict[str, Any]:
    """Run ``model`` over ``loader``, write COCO results JSON, return Table 2's columns (in %).

    ``loader`` yields ``(images, targets)`` as :func:`collate_detection` makes them; targets
    only give the ``image_id``. Labels are mapped back to COCO category ids with
    ``label_to_cat_id`` (default: ``loader.dataset.label_to_cat_id`` when present, else the
    labels are the category ids). Returns ``AP, AP50, AP75, APs, APm, APl`` (None where the
    images have no ground truth of that size), ``AR100``, ``images``, ``detections`` and the
    COCOeval ``summary`` text.

    Distributed (``dist_info`` with ``world_size > 1``): every rank runs its own shard of the
    images (its ``loader``), the detections of all ranks are gathered on rank 0, which writes
    ``out_json`` and runs COCOeval once; every rank returns the same metrics. A collective call.
    """
    if label_to_cat_id is None:
        label_to_cat_id = getattr(getattr(loader, "dataset", None), "label_to_cat_id", None)
    results, image_ids = predict_coco(
        model, loader, label_to_cat_id=label_to_cat_id, device=device, max_images=max_images
    )
    info = dist_info or DistInfo()
    if info.distributed:
        shards = all_gather_objects((results, image_ids), info)
        results = [r for rs, _ in shards for r in rs]
        image_ids = [i for _, ids in shards for i in ids]
    metrics: dict[str, Any] | None = None
    if info.is_main:
        if out_json is not None:
            atomic_write(out_json, json.dumps(results))
        metrics = coco_eval_from_results(coco_gt, results, image_ids)
        metrics["images"] = len(set(image_ids))
        metrics["detections"] = len(results)
    if info.distributed:
        metrics = all_gather_objects(metrics, info)[0]
    if metrics is None:  # rank 0 computes the metrics and every rank receives them
        raise RuntimeError("COCO evaluation produced no metrics on rank 0")
    return metrics
