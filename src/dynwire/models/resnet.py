"""ResNet and ResNeXt (He et al. 2016; Xie et al. 2017) with graph stages.

An architecture is ``(block, layers)``: each entry of ``layers`` is one stage whose blocks
become the nodes of that stage's graph (paper App. 6.1: BasicBlock for ResNet-18, Bottleneck
for ResNet-50/101, aggregated Bottleneck for ResNeXt). Parameter names match torchvision, so a
torchvision ``state_dict`` loads as is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

from torch import Tensor, nn

from .._registry import register_model
from ..graph.wiring import WiringConfig
from ._base import GraphNet

__all__ = ["BasicBlock", "Bottleneck", "ResNet"]

LayerFn = Callable[..., nn.Module]


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = act_layer(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        # branch form (WiringConfig.node): the activation moves to the start of the branch; a
        # separate, out-of-place instance, because the branch's input is a sum other nodes share
        self.branch_act = act_layer()

    @property
    def has_residual_branch(self) -> bool:
        """True when the block is ``act(x + F(x))`` with an identity shortcut."""
        return self.downsample is None

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def _branch(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def forward_branch(self, x: Tensor, act: bool = True) -> Tensor:
        """The residual branch alone, pre-activation order: ``F(act(x))`` (``F(x)`` with ``act=False``,
        for a caller that applied the activation already)."""
        return self._branch(self.branch_act(x) if act else x)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self._branch(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, stride, groups)
        self.bn2 = norm_layer(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = act_layer(inplace=True)
        self.downsample = downsample
        self.branch_act = act_layer()  # see BasicBlock

    @property
    def has_residual_branch(self) -> bool:
        """True when the block is ``act(x + F(x))`` with an identity shortcut."""
        return self.downsample is None

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def _branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def forward_branch(self, x: Tensor, act: bool = True) -> Tensor:
        """The residual branch alone, pre-activation order: ``F(act(x))`` (``F(x)`` with ``act=False``,
        for a caller that applied the activation already)."""
        return self._branch(self.branch_act(x) if act else x)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self._branch(x)
        out += identity
        return self.relu(out)


BlockType = type[Union[BasicBlock, Bottleneck]]


class ResNet(GraphNet):
    """ResNet/ResNeXt whose stages are graph stages.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        wiring: stage connectivity (see :class:`~dynwire.graph.wiring.WiringConfig`).
        stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max pool) or ``"cifar"`` (3x3/1 conv).
        stem_width: stem output channels; ``widths``: per-stage ``planes``.
        strides: per-stage stride of the first block (``None``: 1 then 2).
    """

    def __init__(
        self,
        block: BlockType,
        layers: Sequence[int],
        num_classes: int = 1000,
        wiring: WiringConfig = WiringConfig(),
        in_chans: int = 3,
        drop_rate: float = 0.0,
        groups: int = 1,
        width_per_group: int = 64,
        stem: str = "imagenet",
        stem_width: int = 64,
        widths: Sequence[int] = (64, 128, 256, 512),
        strides: Sequence[int] | None = None,
        zero_init_residual: bool = False,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU,
    ) -> None:
        super().__init__(in_chans, num_classes, drop_rate, wiring)
        if len(layers) != len(widths) or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers={tuple(layers)} must give >= 1 block for each of the {len(widths)} stages")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem={stem!r}: choose 'imagenet' or 'cifar'")
        strides = list(strides) if strides is not None else [1] + [2] * (len(layers) - 1)
        self.groups, self.base_width = groups, width_per_group
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
            reduction = 4
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
            reduction = 1
        self.bn1 = norm_layer(stem_width)
        self.relu = act_layer(inplace=True)
        inplanes = stem_width
        for k, (planes, n, stride) in enumerate(zip(widths, layers, strides)):
            out = planes * block.expansion
            blocks = []
            for i in range(int(n)):
                s = stride if i == 0 else 1
                down = None
                if i == 0 and (s != 1 or inplanes != out):
                    down = nn.Sequential(_conv1x1(inplanes, out, s), norm_layer(out))
                blocks.append(block(inplanes, planes, s, down, groups, width_per_group, norm_layer, act_layer))
                inplanes = out
            reduction *= stride
            self.add_stage(f"layer{k + 1}", blocks, out, reduction)
        self.build_head(inplanes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def _resnet(block: BlockType, layers: Sequence[int], /, **kwargs) -> ResNet:
    """Build a ResNet; ``layers=`` (and ``block=``) in ``kwargs`` override the registered table."""
    return ResNet(kwargs.pop("block", block), kwargs.pop("layers", layers), **kwargs)


_PAPER = "Table 1, App. 6.1"


@register_model(family="resnet", torchvision="resnet18", paper=_PAPER)
def resnet18(**kwargs) -> ResNet:
    """ResNet-18: BasicBlock nodes, stages of (2, 2, 2, 2)."""
    return _resnet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model(family="resnet", torchvision="resnet50", paper=_PAPER)
def resnet50(**kwargs) -> ResNet:
    """ResNet-50: Bottleneck nodes, stages of (3, 4, 6, 3)."""
    return _resnet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model(family="resnet", torchvision="resnet101", paper=_PAPER)
def resnet101(**kwargs) -> ResNet:
    """ResNet-101: Bottleneck nodes, stages of (3, 4, 23, 3)."""
    return _resnet(Bottleneck, (3, 4, 23, 3), **kwargs)


@register_model(family="resnet", torchvision="resnext50_32x4d", paper=_PAPER)
def resnext50_32x4d(**kwargs) -> ResNet:
    """ResNeXt-50 32x4d: aggregated Bottleneck nodes."""
    kwargs.setdefault("groups", 32)
    kwargs.setdefault("width_per_group", 4)
    return _resnet(Bottleneck, (3, 4, 6, 3), **kwargs)


_CIFAR = dict(stem="cifar", stem_width=16, widths=(16, 32, 64))


@register_model(family="resnet", input_size=(3, 32, 32), paper="small-input variant (not in the paper)")
def cifar_resnet20(**kwargs) -> ResNet:
    """CIFAR-style ResNet-20: 3x3 stem, three stages of 3 BasicBlocks (16/32/64 channels)."""
    return _resnet(BasicBlock, (3, 3, 3), **{**_CIFAR, **kwargs})


@register_model(family="resnet", input_size=(3, 32, 32), paper="small-input variant (not in the paper)")
def cifar_resnet32(**kwargs) -> ResNet:
    """CIFAR-style ResNet-32: three stages of 5 BasicBlocks (He et al. 2016's CIFAR series)."""
    return _resnet(BasicBlock, (5, 5, 5), **{**_CIFAR, **kwargs})


@register_model(family="resnet", input_size=(3, 32, 32), paper="small-input variant (not in the paper)")
def cifar_resnet44(**kwargs) -> ResNet:
    """CIFAR-style ResNet-44: three stages of 7 BasicBlocks (He et al. 2016's CIFAR series)."""
    return _resnet(BasicBlock, (7, 7, 7), **{**_CIFAR, **kwargs})


@register_model(family="resnet", input_size=(3, 32, 32), paper="small-input variant (not in the paper)")
def cifar_resnet56(**kwargs) -> ResNet:
    """CIFAR-style ResNet-56: 3x3 stem, three stages of 9 BasicBlocks (16/32/64 channels)."""
    return _resnet(BasicBlock, (9, 9, 9), **{**_CIFAR, **kwargs})


@register_model(family="resnet", input_size=(3, 32, 32), paper="small-input variant (not in the paper)")
def cifar_resnet18(**kwargs) -> ResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max pool, for 28x28 / 32x32 images."""
    kwargs.setdefault("stem", "cifar")
    return _resnet(BasicBlock, (2, 2, 2, 2), **kwargs)
