"""MobileNetV2 (Sandler et al. 2018) with graph stages.

The architecture is the paper's ``[t, c, n, s]`` table; each row is a stage whose inverted
bottlenecks are the nodes of that stage's graph (paper App. 6.1). Blocks have torchvision's
``InvertedResidual`` layout (and parameter names), so ``sequential`` wiring is torchvision's
model exactly; unlike torchvision's they take ``act_layer`` (default ``nn.ReLU6``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torchvision.models.mobilenetv2 import _make_divisible
from torchvision.ops.misc import Conv2dNormActivation

from .._registry import register_model
from ..graph.wiring import WiringConfig
from ._base import GraphNet

__all__ = ["MobileNetV2", "InvertedResidual", "MBV2_SETTING"]

LayerFn = Callable[..., nn.Module]

# t (expansion), c (channels), n (blocks), s (stride of the first block)
MBV2_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> project 1x1, residual when the shape is kept."""

    def __init__(
        self,
        inp: int,
        oup: int,
        stride: int,
        expand_ratio: int,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU6,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden, 1, norm_layer=norm_layer, activation_layer=act_layer))
        layers += [
            Conv2dNormActivation(
                hidden, hidden, stride=stride, groups=hidden, norm_layer=norm_layer, activation_layer=act_layer
            ),
            nn.Conv2d(hidden, oup, 1, bias=False),
            norm_layer(oup),
        ]
        self.conv = nn.Sequential(*layers)

    #: the linear bottleneck adds without an activation: in branch form nothing moves
    branch_act = None

    @property
    def has_residual_branch(self) -> bool:
        """True when the block is ``x + F(x)`` (stride 1, same channels)."""
        return self.use_res_connect

    def forward_branch(self, x: Tensor) -> Tensor:
        """The residual branch alone: ``F(x)``."""
        return self.conv(x)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(GraphNet):
    """MobileNetV2 whose ``[t, c, n, s]`` rows are graph stages ``stage1`` .. ``stage7``."""

    def __init__(
        self,
        num_classes: int = 1000,
        wiring: WiringConfig = WiringConfig(),
        in_chans: int = 3,
        drop_rate: float = 0.2,
        width_mult: float = 1.0,
        setting: Sequence[Sequence[int]] = MBV2_SETTING,
        round_nearest: int = 8,
        stem_width: int = 32,
        last_channel: int = 1280,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU6,
    ) -> None:
        super().__init__(in_chans, num_classes, drop_rate, wiring)
        if width_mult <= 0:
            raise ValueError(f"width_mult={width_mult!r} must be > 0")
        if any(len(row) != 4 for row in setting):
            raise ValueError("setting must be a list of [t, c, n, s] rows")
        cin = _make_divisible(stem_width * width_mult, round_nearest)
        last = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        self.stem = Conv2dNormActivation(in_chans, cin, stride=2, norm_layer=norm_layer, activation_layer=act_layer)
        reduction = 2
        for k, (t, c, n, s) in enumerate(setting):
            cout = _make_divisible(c * width_mult, round_nearest)
            blocks = []
            for i in range(int(n)):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, norm_layer, act_layer))
                cin = cout
            reduction *= s
            self.add_stage(f"stage{k + 1}", blocks, cout, reduction)
        self._block_counts = [int(row[2]) for row in setting]
        self.conv_head = Conv2dNormActivation(
            cin, last, kernel_size=1, norm_layer=norm_layer, activation_layer=act_layer
        )
        self.build_head(last)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def init_classifier(self, fc: nn.Linear) -> None:
        nn.init.normal_(fc.weight, 0, 0.01)
        nn.init.zeros_(fc.bias)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def forward_final(self, x: Tensor) -> Tensor:
        return self.conv_head(x)

    def torchvision_key(self, key: str) -> str:
        m = re.match(r"features\.(\d+)\.(.*)", key)
        if m:
            k, rest = int(m.group(1)), m.group(2)
            if k == 0:
                return f"stem.{rest}"
            total = sum(self._block_counts)
            if k == total + 1:
                return f"conv_head.{rest}"
            idx = k - 1
            for s, n in enumerate(self._block_counts):
                if idx < n:
                    return f"stage{s + 1}.{idx}.{rest}"
                idx -= n
        return re.sub(r"^classifier\.1\.", "fc.", key)


@register_model(family="mobilenetv2", torchvision="mobilenet_v2", paper="Table 1, 3, 4, 6, App. 6.1")
def mobilenet_v2(**kwargs) -> MobileNetV2:
    """MobileNetV2-1.0: inverted bottleneck nodes."""
    return MobileNetV2(**kwargs)
