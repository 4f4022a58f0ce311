"""RegNet-X / RegNet-Y (Radosavovic et al. 2020) with graph stages.

The architecture is torchvision's ``BlockParams`` built from the published RegNet parameters
``(depth, w_0, w_a, w_m, group_width[, se_ratio])``; each stage's "Regular Bottleneck" blocks
(``ResBottleneckBlock``) are the nodes of its graph (paper App. 6.1, Table 1 and Table 5:
RegNet-X-600MF is DG-Net-A's base, RegNet-Y-600MF DG-Net-B's).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.regnet import BlockParams, SimpleStemIN
from torchvision.models.regnet import ResBottleneckBlock as _TVResBottleneckBlock

from .._registry import register_model
from ..graph.wiring import WiringConfig
from ._base import GraphNet

__all__ = ["RegNet", "REGNET_PARAMS"]

# Published parameters (pycls model zoo; torchvision uses the same values for its sizes).
REGNET_PARAMS: dict[str, dict] = {
    "regnet_x_600mf": dict(depth=16, w_0=48, w_a=36.97, w_m=2.24, group_width=24),
    "regnet_x_1_6gf": dict(depth=18, w_0=80, w_a=34.01, w_m=2.25, group_width=24),
    "regnet_y_600mf": dict(depth=15, w_0=48, w_a=32.54, w_m=2.32, group_width=16, se_ratio=0.25),
}


class ResBottleneckBlock(_TVResBottleneckBlock):
    """torchvision's residual bottleneck (same parameters and forward) that names its branch."""

    def __init__(
        self,
        width_in: int,
        width_out: int,
        stride: int,
        norm_layer: Callable[..., nn.Module],
        activation_layer: Callable[..., nn.Module],
        *args,
        **kwargs,
    ) -> None:
        super().__init__(width_in, width_out, stride, norm_layer, activation_layer, *args, **kwargs)
        self.branch_act = activation_layer()  # out-of-place: the branch input is shared

    @property
    def has_residual_branch(self) -> bool:
        """True when the block is ``act(x + F(x))`` (no projection)."""
        return self.proj is None

    def forward_branch(self, x: Tensor, act: bool = True) -> Tensor:
        """The residual branch alone, pre-activation order: ``F(act(x))`` (``F(x)`` with ``act=False``,
        for a caller that applied the activation already)."""
        return self.f(self.branch_act(x) if act else x)


class RegNet(GraphNet):
    """RegNet whose stages ``s1`` .. ``s4`` are graph stages."""

    def __init__(
        self,
        block_params: BlockParams,
        num_classes: int = 1000,
        wiring: WiringConfig = WiringConfig(),
        in_chans: int = 3,
        drop_rate: float = 0.0,
        stem_width: int = 32,
        norm_layer: Callable[..., nn.Module] = partial(nn.BatchNorm2d, eps=1e-05, momentum=0.1),
        act_layer: Callable[..., nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(in_chans, num_classes, drop_rate, wiring)
        self.stem = SimpleStemIN(in_chans, stem_width, norm_layer, act_layer)
        width = stem_width
        reduction = 2
        for k, (w_out, stride, depth, group_width, bm) in enumerate(block_params._get_expanded_params()):
            blocks = [
                ResBottleneckBlock(
                    width if i == 0 else w_out,
                    w_out,
                    stride if i == 0 else 1,
                    norm_layer,
                    act_layer,
                    group_width,
                    bm,
                    block_params.se_ratio,
                )
                for i in range(depth)
            ]
            width = w_out
            reduction *= stride
            self.add_stage(f"s{k + 1}", blocks, w_out, reduction)
        self.build_head(width)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def init_classifier(self, fc: nn.Linear) -> None:
        nn.init.normal_(fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(fc.bias)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def torchvision_key(self, key: str) -> str:
        return re.sub(r"^trunk_output\.block(\d+)\.block\d+-(\d+)\.", r"s\1.\2.", key)


def _regnet(name: str, **kwargs) -> RegNet:
    with torch.device("cpu"):  # BlockParams computes widths with tensors; stay off "meta"
        params = BlockParams.from_init_params(**REGNET_PARAMS[name])
    return RegNet(params, **kwargs)


_PAPER = "Table 1, 5, App. 6.1"


@register_model(family="regnet", paper=_PAPER)
def regnet_x_600mf(**kwargs) -> RegNet:
    """RegNet-X-600MF (DG-Net-A's base)."""
    return _regnet("regnet_x_600mf", **kwargs)


@register_model(family="regnet", torchvision="regnet_x_1_6gf", paper=_PAPER)
def regnet_x_1_6gf(**kwargs) -> RegNet:
    """RegNet-X-1.6GF."""
    return _regnet("regnet_x_1_6gf", **kwargs)


@register_model(family="regnet", paper=_PAPER)
def regnet_y_600mf(**kwargs) -> RegNet:
    """RegNet-Y-600MF, with squeeze-excitation (DG-Net-B's base)."""
    return _regnet("regnet_y_600mf", **kwargs)
