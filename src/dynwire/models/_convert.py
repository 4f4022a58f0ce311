"""Loading torchvision weights into dynwire models (any wiring)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

from torch import Tensor, nn

from ._base import GraphNet

__all__ = ["convert_torchvision_state_dict", "load_torchvision_state_dict", "torchvision_reference"]


def convert_torchvision_state_dict(model: GraphNet, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename the keys of a torchvision ``state_dict`` to ``model``'s names."""
    return {model.torchvision_key(k): v for k, v in state_dict.items()}


def load_torchvision_state_dict(model: GraphNet, state_dict: Mapping[str, Tensor]) -> None:
    """Load torchvision weights; the wiring parameters (routers, thresholds) keep their init.

    Raises ``ValueError`` when a backbone weight is missing, unexpected or of another shape,
    which means the state dict belongs to a different architecture.
    """
    converted = convert_torchvision_state_dict(model, state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in converted and ".edges." not in k]
    unexpected = [k for k in converted if k not in own]
    shapes = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in converted.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            "the torchvision state_dict does not match this model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}; "
            "check that the model name and num_classes match the checkpoint"
        )
    model.load_state_dict(converted, strict=False)


def torchvision_reference(name: str, num_classes: int = 1000) -> nn.Module:
    """The torchvision model that ``create_model(name, wiring='sequential')`` reproduces."""
    import torchvision.models as tvm
    from torchvision.models.regnet import BlockParams, RegNet

    from .regnet import REGNET_PARAMS

    if name in REGNET_PARAMS:
        params = BlockParams.from_init_params(**REGNET_PARAMS[name])
        return RegNet(params, num_classes=num_classes, norm_layer=partial(nn.BatchNorm2d, eps=1e-05, momentum=0.1))
    if not hasattr(tvm, name):
        raise ValueError(f"torchvision has no model '{name}'")
    return getattr(tvm, name)(weights=None, num_classes=num_classes)
