"""Backbone and whole-detector multiply-accumulates at 800x1333 (Table 2's GFLOPs column).

Counted like ``dynwire profile`` (``torch.utils.flop_counter``; convolutions, linear layers and
the aggregation op, element-wise work not counted) and reported as MACs, the convention the
paper's Table 1 uses for "FLOPs". The backbone is counted on the ``meta`` device at exactly
``size``; the whole detector runs for real on the CPU (its RPN and RoI heads have
data-dependent shapes), on one random image, so its box-head share depends on how many
proposals survive (reported).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops.misc import FrozenBatchNorm2d

from .._registry import create_model
from .model import fasterrcnn_fpn

__all__ = ["profile_detector"]


def _macs(counter: FlopCounterMode, prefix: str | None = None) -> int:
    if prefix is None:
        return counter.get_total_flops() // 2
    counts = counter.get_flop_counts()
    return sum(counts.get(prefix, {}).values()) // 2


def profile_detector(
    backbone: str,
    wiring: str = "dynamic",
    size: Sequence[int] = (800, 1333),
    *,
    num_classes: int = 81,
    detector: bool = True,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, Any]:
    """GMACs of the backbone (at ``size``) and of the whole Faster R-CNN + FPN (one image).

    Returns ``backbone_gmacs``, ``backbone_params`` and, with ``detector=True``,
    ``fpn_gmacs``, ``rpn_gmacs``, ``roi_heads_gmacs``, ``detector_gmacs``, ``detector_params``
    and ``proposals`` (the RoIs the box head saw). ``kwargs`` go to :func:`fasterrcnn_fpn`.
    """
    h, w = int(size[0]), int(size[1])
    with torch.device("meta"):
        family_kwargs = kwargs.get("backbone_kwargs") or {}  # e.g. {stem: imagenet}: count the backbone that is built
        body = create_model(backbone, num_classes=0, wiring=wiring, norm_layer=FrozenBatchNorm2d, **family_kwargs)
    body.eval()
    x = torch.zeros(1, 3, h, w, device="meta")
    with FlopCounterMode(display=False) as c, torch.no_grad():
        body.forward_intermediates(x)
    out: dict[str, Any] = {
        "backbone": backbone,
        "wiring": wiring,
        "size": [h, w],
        "backbone_gmacs": _macs(c) / 1e9,
        "backbone_params": sum(p.numel() for p in body.parameters()),
    }
    if not detector:
        return out
    torch.manual_seed(seed)
    model = fasterrcnn_fpn(backbone, wiring, num_classes=num_classes, min_size=min(h, w), max_size=max(h, w), **kwargs)
    model.eval()
    seen: list[int] = []
    hook = model.roi_heads.box_roi_pool.register_forward_hook(lambda m, a, o: seen.append(int(o.shape[0])))
    image = torch.rand(3, h, w)
    try:
        with FlopCounterMode(display=False) as c, torch.no_grad():
            model([image])
    finally:
        hook.remove()
    out.update(
        fpn_gmacs=_macs(c, "FasterRCNN.backbone.fpn") / 1e9,
        rpn_gmacs=_macs(c, "FasterRCNN.rpn") / 1e9,
        roi_heads_gmacs=_macs(c, "FasterRCNN.roi_heads") / 1e9,
        detector_gmacs=_macs(c) / 1e9,
        detector_backbone_gmacs=(_macs(c, "FasterRCNN.backbone") - _macs(c, "FasterRCNN.backbone.fpn")) / 1e9,
        detector_params=sum(p.numel() for p in model.parameters()),
        padded_size=list(model.transform([image])[0].tensors.shape[-2:]),
        proposals=seen[0] if seen else 0,
    )
    return out
