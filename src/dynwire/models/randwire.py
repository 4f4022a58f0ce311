"""RandWire's small computation regime (Xie et al. 2019, Table 1 and Sec. 3) with graph stages.

The family the DG-Net paper compares with in Table 4 (ER, BA, WS generators against DG-Net over
the complete DAG of the same nodes, ~600M FLOPs). Layout at 224x224, RandWire Table 1 "small":

=========  ========  ================================================
conv1      112x112   3x3 conv, stride 2, C/2 channels, BN
conv2      56x56     ReLU, 3x3 conv, stride 2, C channels, BN
conv3      28x28     graph stage of N nodes, C channels
conv4      14x14     graph stage of N nodes, 2C channels
conv5      7x7       graph stage of N nodes, 4C channels
head       1x1       ReLU, 1x1 conv to 1280, BN, ReLU, global pool, fc
=========  ========  ================================================

with ``N = 32`` and ``C = 78`` (the RandWire-WS small model: 5.6M parameters, 583M FLOPs, i.e.
multiply-adds). conv1 and conv2 are plain 3x3 convolutions, as Table 1 writes them; only the
graph nodes are separable.

**A node** (RandWire Sec. 3.3) is a ReLU -> 3x3 separable convolution (depthwise 3x3, then
pointwise 1x1) -> BN triplet, :class:`SepConvNode`. RandWire aggregates a node's inputs by a
weighted sum with positive learnable weights (sigmoid); here the stage's edge weights do that
(``sigmoid(theta)`` for the ``random-*`` and ``static`` wirings, routed weights for ``dynamic``).

**Mapping onto** :class:`~dynwire.graph.stage.GraphStage`. A stage is ``N`` triplets: node 0
plus ``N - 1`` more, so the stage holds exactly RandWire's ``N`` convolutional nodes, and the
random generators run over those same ``N`` nodes (``random_dag_edges`` over the blocks, node 0
being the generator's node 0, which is always a source once edges point from lower to higher
index). Node 0 is the triplet that reads the stage input with stride 2 and maps ``C_in -> C``;
nodes ``1 .. N-1`` keep ``C`` channels and the resolution. The output node is GraphStage's
weighted sum of the generator's sinks (RandWire: their unweighted average, no parameters).

What differs from RandWire: there, *every* source of the generated DAG reads the stage input
(a unique input node sends it to all of them) with stride 2; here only node 0 does, and the other
sources read node 0's output through one weighted edge. Such a source then costs a stride-1
depthwise conv over ``C`` channels and a ``C x C`` pointwise conv at the output resolution,
instead of a stride-2 depthwise over ``C_in`` and a ``C_in x C`` pointwise: more parameters and
MACs in conv4 and conv5 (where ``C_in = C / 2``), the same in conv3 (``C_in = C``), and one more
node on every path from such a source. For the default WS graphs this is a few nodes per stage
(see ``dynwire graphs randwire_small --wiring random-ws``). ``sequential`` is the chain of the
same ``N`` nodes; ``dynamic`` and ``static`` use the complete DAG over them (DG-Net, Table 4).

``cifar_randwire_small`` is a CPU-sized variant (not in either paper) for 28x28 / 32x32 images:
``C = 32``, ``N = 16`` and stride-1 conv1/conv2, so the three stages run at 1/2, 1/4 and 1/8 of
the input (16, 8, 4 at 32x32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from .._registry import register_model
from ..graph.wiring import WiringConfig
from ._base import GraphNet

__all__ = ["RandWire", "SepConvNode"]

LayerFn = Callable[..., nn.Module]


class SepConvNode(nn.Module):
    """RandWire's node transformation (Sec. 3.3): ReLU -> depthwise 3x3 -> pointwise 1x1 -> BN."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int = 1,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU,
    ) -> None:
        super().__init__()
        # not in place: the input is a stage input or an aggregation that other nodes also read
        self.act = act_layer()
        self.depthwise = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = norm_layer(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.pointwise(self.depthwise(self.act(x))))


class RandWire(GraphNet):
    """RandWire (small regime) whose random graphs are graph stages ``conv3`` .. ``conv5``.

    Args:
        channels: ``C``; stages have ``C``, ``2C``, ``4C`` channels, conv1 ``C // 2``.
        nodes: ``N``, triplets per stage (node 0, which downsamples, plus ``N - 1``).
        stem_strides: strides of conv1 and conv2 (``(2, 2)`` at 224x224).
        head_width: channels of the 1x1 conv before pooling (1280).
        wiring: stage connectivity (see :class:`~dynwire.graph.wiring.WiringConfig`).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        wiring: WiringConfig = WiringConfig(),
        in_chans: int = 3,
        drop_rate: float = 0.0,
        channels: int = 78,
        nodes: int = 32,
        stem_strides: Sequence[int] = (2, 2),
        head_width: int = 1280,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU,
    ) -> None:
        super().__init__(in_chans, num_classes, drop_rate, wiring)
        if not isinstance(channels, int) or channels < 2:
            raise ValueError(f"channels={channels!r} must be an int >= 2")
        if not isinstance(nodes, int) or nodes < 1:
            raise ValueError(f"nodes={nodes!r} must be an int >= 1")
        if len(stem_strides) != 2 or any(int(s) not in (1, 2) for s in stem_strides):
            raise ValueError(f"stem_strides={tuple(stem_strides)!r} must be two strides of 1 or 2 (conv1, conv2)")
        s1, s2 = (int(s) for s in stem_strides)
        half = channels // 2
        self.conv1 = nn.Sequential(nn.Conv2d(in_chans, half, 3, stride=s1, padding=1, bias=False), norm_layer(half))
        self.conv2 = nn.Sequential(
            act_layer(), nn.Conv2d(half, channels, 3, stride=s2, padding=1, bias=False), norm_layer(channels)
        )
        cin, reduction = channels, s1 * s2
        for k, width in enumerate((channels, 2 * channels, 4 * channels)):
            blocks = [SepConvNode(cin, width, 2, norm_layer, act_layer)]  # node 0: the stride-2 input node
            blocks += [SepConvNode(width, width, 1, norm_layer, act_layer) for _ in range(nodes - 1)]
            reduction *= 2
            self.add_stage(f"conv{k + 3}", blocks, width, reduction)
            cin = width
        self.conv_head = nn.Sequential(
            act_layer(), nn.Conv2d(cin, head_width, 1, bias=False), norm_layer(head_width), act_layer()
        )
        self.build_head(head_width)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))

    def forward_final(self, x: Tensor) -> Tensor:
        return self.conv_head(x)


_PAPER = "Table 4 (RandWire small regime, Xie et al. 2019 Table 1)"


@register_model(family="randwire", paper=_PAPER)
def randwire_small(**kwargs) -> RandWire:
    """RandWire small regime: C = 78, N = 32, 224x224 input."""
    return RandWire(**kwargs)


@register_model(family="randwire", input_size=(3, 32, 32), paper="small-input variant (not in the paper)")
def cifar_randwire_small(**kwargs) -> RandWire:
    """RandWire layout for 28x28 / 32x32 images: C = 32, N = 16, stride-1 conv1 and conv2."""
    kwargs = {"channels": 32, "nodes": 16, "stem_strides": (1, 1), **kwargs}
    return RandWire(**kwargs)
