"""The interface shared by every dynwire model (timm-style)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..graph.edges import warn_if_seed_independent
from ..graph.stage import GraphStage
from ..graph.wiring import WiringConfig
from ..layers.aggregation import recompute_aggregations

__all__ = ["GraphNet"]


class GraphNet(nn.Module):
    """Stem -> graph stages -> optional final conv -> pool -> dropout -> classifier.

    A family builds its stem, calls :meth:`add_stage` once per stage with that stage's
    blocks, then :meth:`build_head`; it implements :meth:`forward_stem` (and
    :meth:`forward_final` when it has a last conv after the stages). Weight-init loops of a
    family touch convolutions, norms and :meth:`get_classifier` only: the wiring initialises
    itself (routers, thresholds, edge logits).
    """

    stage_names: list[str]
    feature_info: list[dict[str, Any]]
    num_features: int
    in_chans: int
    wiring: WiringConfig

    def __init__(self, in_chans: int, num_classes: int, drop_rate: float, wiring: WiringConfig) -> None:
        super().__init__()
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans={in_chans!r} must be a positive int")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes={num_classes!r} must be an int >= 0 (0 removes the classifier)")
        if not (0.0 <= float(drop_rate) < 1.0):
            raise ValueError(f"drop_rate={drop_rate!r} must be in [0, 1)")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = float(drop_rate)
        self.wiring = wiring
        self.stage_names = []
        self.feature_info = []
        self.record_macs = False  # set by dynwire.record_adjacency: count stem and head MACs per sample
        self.recorded_macs: Tensor | None = None

    # -- construction helpers -------------------------------------------------------------
    def add_stage(self, name: str, blocks: list[nn.Module], channels: int, reduction: int) -> GraphStage:
        """Wire ``blocks`` as graph stage ``name`` and record its ``feature_info``."""
        stage = GraphStage(blocks, channels, self.wiring, stage_index=len(self.stage_names))
        warn_if_seed_independent(stage.edges, name)
        self.add_module(name, stage)
        self.stage_names.append(name)
        self.feature_info.append(dict(num_chs=channels, reduction=reduction, module=name))
        return stage

    def build_head(self, num_features: int) -> None:
        """Global pool, dropout and the classifier over ``num_features`` channels."""
        self.num_features = num_features
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(self.drop_rate) if self.drop_rate > 0 else nn.Identity()
        self.reset_classifier(self.num_classes)

    # -- the interface --------------------------------------------------------------------
    def graph_stages(self) -> Iterator[tuple[str, GraphStage]]:
        for name in self.stage_names:
            yield name, getattr(self, name)

    def set_eval_gate(self, mode: str) -> None:
        """Choose how evaluation thresholds edges in every stage: hard, soft or masked."""
        for _, stage in self.graph_stages():
            stage.set_eval_gate(mode)

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(
                f"expected a 4-D input (batch, channels, height, width), got shape {tuple(x.shape)}; "
                "add a batch dimension with x.unsqueeze(0) for a single image"
            )
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point input, got dtype {x.dtype}; convert with x.float() / 255")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)}); "
                f"build the model with in_chans={x.shape[1]} or convert the images"
            )

    def forward_stem(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_final(self, x: Tensor) -> Tensor:
        return x

    def _recompute_enabled(self) -> bool:
        # Spans all stages, so a stage's output (the next stage's input) is recomputed too;
        # each GraphStage also enables it on its own when used outside a GraphNet.
        return (
            self.training
            and torch.is_grad_enabled()
            and self.wiring.recompute
            and self.wiring.kind != "sequential"
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
        )

    def _counted(self, fn, x: Tensor) -> Tensor:
        """``fn(x)``; while recording, its multiply-adds are added to every sample's count."""
        if not self.record_macs:
            return fn(x)
        with FlopCounterMode(display=False) as fc:
            y = fn(x)
        per_sample = torch.full((x.shape[0],), fc.get_total_flops() / 2 / x.shape[0], dtype=torch.float64)
        self.recorded_macs = per_sample if self.recorded_macs is None else self.recorded_macs + per_sample
        return y

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        """Outputs of every graph stage (for FPN-style detection heads), see ``feature_info``."""
        self.check_input(x)
        self.recorded_macs = None
        outs = []
        with recompute_aggregations(self._recompute_enabled(), self.wiring.recompute_max_inputs):
            x = self._counted(self.forward_stem, x)
            for _, stage in self.graph_stages():
                x = stage(x)
                outs.append(x)
        return outs

    def forward_features(self, x: Tensor) -> Tensor:
        self.check_input(x)
        self.recorded_macs = None
        with recompute_aggregations(self._recompute_enabled(), self.wiring.recompute_max_inputs):
            x = self._counted(self.forward_stem, x)
            for _, stage in self.graph_stages():
                x = stage(x)
        return self._counted(self.forward_final, x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self._counted(lambda t: self._head(t, pre_logits), x)

    def _head(self, x: Tensor, pre_logits: bool) -> Tensor:
        x = self.global_pool(x).flatten(1)
        x = self.dropout(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` (0 = identity)."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes={num_classes!r} must be an int >= 0")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.fc, nn.Linear):
            self.init_classifier(self.fc)

    def init_classifier(self, fc: nn.Linear) -> None:
        """Initialise the classifier (``nn.Linear``'s default unless a family overrides it)."""

    def torchvision_key(self, key: str) -> str:
        """Map a torchvision ``state_dict`` key to this family's key (identity by default)."""
        return key
