"""Faster R-CNN + FPN over any dynwire backbone (paper Sec. 4.2, Table 2).

The detector is torchvision's :class:`~torchvision.models.detection.FasterRCNN`; only the
backbone is ours: a registered dynwire model whose graph-stage outputs
(``forward_intermediates``, described by ``feature_info``) feed a
:class:`~torchvision.ops.FeaturePyramidNetwork` with a max-pooled extra level, the same layout
as torchvision's ``BackboneWithFPN``. Defaults follow Detectron2's R50-FPN 1x: frozen
BatchNorm, stem and first stage frozen, anchors of 32..512 pixels on strides 4..64.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from .._registry import create_model
from ..graph.stage import GraphStage
from ..models import convert_torchvision_state_dict

__all__ = [
    "DynwireFPNBackbone",
    "fasterrcnn_fpn",
    "default_returned_stages",
    "load_backbone_weights",
    "NORMS",
]

NORMS: tuple[str, ...] = ("frozen_bn", "bn", "sync_bn")


def _norm_layer(norm: str) -> Any:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm in ("bn", "sync_bn"):
        return nn.BatchNorm2d  # sync_bn: converted after construction
    raise ValueError(f"norm={norm!r} is not valid; choose one of {', '.join(NORMS)}")


def default_returned_stages(feature_info: Sequence[dict[str, Any]], max_levels: int = 4) -> list[int]:
    """Indices of the stages an FPN reads: the last stage of each stride, the last ``max_levels`` of them.

    ResNet/RegNet: all four stages (strides 4, 8, 16, 32). MobileNetV2 (7 stages, strides 2, 4,
    8, 16, 16, 32, 32): stages 2, 3, 5 and 7. CIFAR ResNets (3 stages): all three.
    """
    last_of_stride: dict[int, int] = {}
    for i, info in enumerate(feature_info):
        last_of_stride[int(info["reduction"])] = i
    picked = sorted(last_of_stride.values())
    return picked[-max_levels:]


def _resolve_stages(returned_stages: Sequence[int | str] | None, feature_info: list[dict[str, Any]]) -> list[int]:
    names = [f["module"] for f in feature_info]
    if returned_stages is None:
        return default_returned_stages(feature_info)
    idx = []
    for s in returned_stages:
        if isinstance(s, str):
            if s not in names:
                raise ValueError(f"returned_stages: unknown stage {s!r}; this backbone has {names}")
            idx.append(names.index(s))
        elif isinstance(s, int) and -len(names) <= s < len(names):
            idx.append(s % len(names))
        else:
            raise ValueError(f"returned_stages: {s!r} is not a stage index or name of {names}")
    if not idx or sorted(set(idx)) != idx:
        raise ValueError(f"returned_stages={list(returned_stages)} must be distinct stages in increasing order")
    return idx


class DynwireFPNBackbone(nn.Module):
    """A dynwire model's stage outputs -> FPN (+ max-pool level); ``out_channels`` for FasterRCNN.

    Returns an ``OrderedDict`` with keys ``"0" .. "k-1"`` (one per returned stage, finest first)
    and ``"pool"``, like torchvision's ``BackboneWithFPN``. ``self.body`` is the dynwire model,
    so ``dynwire.record_adjacency(detector)`` and ``set_eval_gate`` reach its graph stages.
    """

    def __init__(self, body: nn.Module, returned_stages: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.returned_stages = list(returned_stages)
        infos = [body.feature_info[i] for i in self.returned_stages]
        self.in_channels_list = [int(f["num_chs"]) for f in infos]
        self.strides = [int(f["reduction"]) for f in infos]
        self.stage_names = [f["module"] for f in infos]
        self.fpn = FeaturePyramidNetwork(self.in_channels_list, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.featmap_names = [str(i) for i in range(len(infos))]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.body.forward_intermediates(x)
        return self.fpn(OrderedDict((k, feats[i]) for k, i in zip(self.featmap_names, self.returned_stages)))


def _freeze(body: nn.Module, feature_info: list[dict[str, Any]], returned: list[int], trainable_stages: int) -> None:
    """Stages train in groups that end at a returned stage (Detectron2's res2..res5 for ResNets).

    ``trainable_stages=k`` trains the last ``k`` groups; the stem, the earlier groups and
    modules the detector never runs (classifier, MobileNetV2's last 1x1 conv) are frozen. A
    stage's wiring (routers, thresholds, edge logits) lives inside the stage, so it trains
    exactly when the stage's blocks do.
    """
    if not isinstance(trainable_stages, int) or not 0 <= trainable_stages <= len(returned):
        raise ValueError(
            f"trainable_stages={trainable_stages!r} must be an int in [0, {len(returned)}] "
            f"(this backbone gives the FPN {len(returned)} stages)"
        )
    for p in body.parameters():
        p.requires_grad_(False)
    first_trained_group = len(returned) - trainable_stages
    if trainable_stages == 0:
        return
    start = returned[first_trained_group - 1] + 1 if first_trained_group > 0 else 0
    for f in feature_info[start:]:
        for p in getattr(body, f["module"]).parameters():
            p.requires_grad_(True)


def _anchor_generator(strides: list[int], anchor_sizes: Sequence[Sequence[int]] | None) -> AnchorGenerator:
    levels = len(strides) + 1  # + the max-pool level
    if anchor_sizes is None:
        # Detectron2: 32 px at stride 4, doubling per level (8 x stride), the pool level 2x the last.
        anchor_sizes = [(8 * s,) for s in strides] + [(16 * strides[-1],)]
    anchor_sizes = tuple(
        tuple(int(a) for a in (lvl if isinstance(lvl, (list, tuple)) else (lvl,))) for lvl in anchor_sizes
    )
    if len(anchor_sizes) != levels:
        raise ValueError(
            f"anchor_sizes has {len(anchor_sizes)} levels but the FPN gives {levels} "
            f"({len(strides)} stages at strides {strides} + the max-pool level)"
        )
    return AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * levels)


def fasterrcnn_fpn(
    backbone: str,
    wiring: Any = "dynamic",
    num_classes: int = 91,
    trainable_stages: int = 3,
    norm: str = "frozen_bn",
    returned_stages: Sequence[int | str] | None = None,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    backbone_weights: str | Path | None = None,
    *,
    backbone_kwargs: dict[str, Any] | None = None,
    fpn_channels: int = 256,
    anchor_sizes: Sequence[Sequence[int]] | None = None,
    representation_size: int = 1024,
    **model_kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN + FPN whose backbone is the registered dynwire model ``backbone``.

    Args:
        backbone: a name from ``dynwire.list_models()`` (every family works).
        wiring: ``sequential``, ``dynamic``, ... (as in ``create_model``).
        num_classes: detector classes including background (91: torchvision's raw COCO ids;
            81 for :class:`~dynwire.detection.CocoDetection`'s contiguous labels).
        trainable_stages: how many of the last stage groups train (Detectron2's freeze-at-2 is
            3 of 4); the stem is always frozen.
        norm: ``frozen_bn`` (Detectron2), ``bn`` (batch statistics) or ``sync_bn``.
        returned_stages: stage indices or names fed to the FPN (default: the last stage of
            each stride, at most 4, see :func:`default_returned_stages`).
        min_size: ``GeneralizedRCNNTransform`` resizing, the shorter side; a tuple picks one
            size per training batch at random (multi-scale training).
        max_size: ``GeneralizedRCNNTransform`` resizing, the longest the longer side may be.
        backbone_weights: a ``dynwire train`` classification checkpoint or a torchvision
            state-dict file, see :func:`load_backbone_weights`.
        backbone_kwargs: extra ``create_model`` options (``router_bias``, ``eval_gate``, ...).
        fpn_channels: FPN width (256 in the paper's setting).
        anchor_sizes: one tuple per FPN level (default ``8 x stride``: 32..512 on strides 4..64).
        representation_size: width of the two-layer box head (1024).
        **model_kwargs: any other ``FasterRCNN`` argument (``box_batch_size_per_image``, ...).
    """
    if norm == "frozen_bn" and backbone_weights is None:
        warnings.warn(
            "fasterrcnn_fpn: norm='frozen_bn' without backbone_weights freezes BatchNorm at its initial "
            "statistics (identity), which suits pretrained backbones only; train from scratch with norm='bn'",
            UserWarning,
            stacklevel=2,
        )
    body = create_model(
        backbone, num_classes=0, wiring=wiring, norm_layer=_norm_layer(norm), **dict(backbone_kwargs or {})
    )
    if backbone_weights is not None:
        load_backbone_weights(body, backbone_weights)
    info = list(body.feature_info)
    returned = _resolve_stages(returned_stages, info)
    _freeze(body, info, returned, trainable_stages)
    if norm == "sync_bn":
        body = nn.SyncBatchNorm.convert_sync_batchnorm(body)
    bb = DynwireFPNBackbone(body, returned, fpn_channels)
    model_kwargs.setdefault("rpn_anchor_generator", _anchor_generator(bb.strides, anchor_sizes))
    model_kwargs.setdefault(
        "box_roi_pool", MultiScaleRoIAlign(featmap_names=bb.featmap_names, output_size=7, sampling_ratio=2)
    )
    if "box_head" not in model_kwargs:
        model_kwargs["box_head"] = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
        if "box_predictor" not in model_kwargs:
            model_kwargs["box_predictor"] = FastRCNNPredictor(representation_size, num_classes)
            num_classes = None  # FasterRCNN refuses num_classes together with a predictor
    min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else min_size
    model = FasterRCNN(bb, num_classes=num_classes, min_size=min_size, max_size=max_size, **model_kwargs)
    model.backbone_name = backbone
    return model


# --------------------------------------------------------------------------- weights
def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ValueError(f"backbone weights '{path}': file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"backbone weights '{path}': not a weights-only torch file (a state dict or a `dynwire train` "
            f"checkpoint): {first}"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # a `dynwire train` checkpoint
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ValueError(
            f"backbone weights '{path}': expected a state dict (str -> tensor) or a checkpoint with a 'model' "
            f"entry, got {type(obj).__name__}"
        )
    return obj


def _stem_conv_key(own: dict[str, Tensor]) -> str | None:
    for k, v in own.items():
        if k.endswith("weight") and v.ndim == 4:
            return k
    return None


def load_backbone_weights(body: nn.Module, path: str | Path) -> dict[str, Any]:
    """Initialise a dynwire backbone from a file the user has; never downloads.

    Accepts a ``dynwire train`` checkpoint (its ``model`` entry) or a state-dict file in
    torchvision's or dynwire's names (any wiring: the routers, thresholds and edge logits that
    the file lacks keep their initialisation). The classifier is dropped; BatchNorm statistics
    load into frozen BatchNorm; a 1-channel stem (e.g. trained on Fashion-MNIST) is spread
    over 3 input channels (``w / 3`` each, same response to a gray image).

    Raises ``ValueError`` naming the file and the mismatched keys when it does not fit.
    Returns ``{"loaded": n, "kept_init": [...], "adapted": [...]}``.
    """
    path = Path(path)
    raw = _read_state_dict(path)
    converted = convert_torchvision_state_dict(body, raw)
    own = body.state_dict()
    stem = _stem_conv_key(own)
    sd: dict[str, Tensor] = {}
    adapted = []
    for k, v in converted.items():
        if re.match(r"^fc\.", k) and not any(o.startswith("fc.") for o in own):
            continue  # classifier of a classification model
        if k.endswith("num_batches_tracked") and k not in own:
            continue  # FrozenBatchNorm2d has no counter
        if k == stem and k in own and v.ndim == 4 and v.shape[1] == 1 and own[k].shape[1] != 1:
            if v.shape[0] == own[k].shape[0] and v.shape[2:] == own[k].shape[2:]:
                v = v.expand(-1, own[k].shape[1], -1, -1) / own[k].shape[1]
                adapted.append(f"{k}: 1 -> {own[k].shape[1]} input channels")
        sd[k] = v
    missing = [k for k in own if k not in sd and ".edges." not in k and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {shapes[:3]})")
        raise ValueError(
            f"backbone weights '{path}' do not fit this backbone ({type(body).__name__}, "
            f"{sum(1 for _ in body.modules() if isinstance(_, GraphStage))} graph stages): "
            + "; ".join(parts)
            + ". Check that the file was trained with the same model name (and in_chans)."
        )
    body.load_state_dict(sd, strict=False)
    kept = [k for k in own if k not in sd]
    return {"loaded": len(sd), "kept_init": kept, "adapted": adapted}
