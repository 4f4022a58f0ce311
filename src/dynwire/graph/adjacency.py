"""Public access to the per-sample adjacency buffer of Sec. 3.4."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .stage import GraphStage

__all__ = ["record_adjacency", "AdjacencyRecord"]


class AdjacencyRecord:
    """Adjacency matrices of the last forward pass inside :func:`record_adjacency`.

    ``record[name]`` is a ``(B, N, N)`` float tensor for the stage ``name``: row ``j`` holds
    the weights of node ``j``'s input edges and column ``i`` those of node ``i``'s output edges
    (zeros on and above the diagonal). Values are the weights used in the aggregation (after
    the threshold of Eq. 5 in evaluation); ``record.router[name]`` holds the raw edge weights
    before thresholding (router outputs for dynamic wiring). Node ``N-1`` is the output node.
    ``record.removed[name]`` says which nodes were removed for each sample and ``record.macs``
    how many multiply-adds each sample executed.
    """

    def __init__(self, stages: dict[str, GraphStage], counters: list[nn.Module]) -> None:
        self._stages = stages
        self._counters = counters
        self._frozen: tuple | None = None

    def _read(self) -> tuple:
        if self._frozen is not None:
            return self._frozen
        st = self._stages.items()
        eff = {n: s.adjacency for n, s in st if s.adjacency is not None}
        raw = {n: s.router_adjacency for n, s in st if s.router_adjacency is not None}
        removed = {n: s.removed for n, s in st if s.removed is not None}
        parts = [s.macs for _, s in st if s.macs is not None] + [
            m.recorded_macs for m in self._counters if m.recorded_macs is not None
        ]
        macs = torch.stack(parts).sum(0) if parts else None
        return eff, raw, removed, macs

    @property
    def adjacency(self) -> dict[str, Tensor]:
        return self._read()[0]

    @property
    def router(self) -> dict[str, Tensor]:
        return self._read()[1]

    @property
    def removed(self) -> dict[str, Tensor]:
        """``(B, N)`` booleans per stage: the nodes removed for each sample (Sec. 3.3)."""
        return self._read()[2]

    @property
    def macs(self) -> Tensor | None:
        """``(B,)`` multiply-adds executed for each sample in the last forward (float64).

        Counted from what ran, with torch's FLOP counter: stem, every block run for the sample,
        routers, aggregations and head. Blocks removed for a sample are not counted for it.
        """
        return self._read()[3]

    def __getitem__(self, name: str) -> Tensor:
        adj = self.adjacency
        if name not in adj:
            raise KeyError(
                f"no adjacency recorded for stage '{name}'; stages: {list(self._stages)} (run a forward pass first)"
            )
        return adj[name]

    def keys(self):
        return self.adjacency.keys()

    def items(self):
        return self.adjacency.items()


def _stages(model: nn.Module) -> dict[str, GraphStage]:
    stages = {n: m for n, m in model.named_modules() if isinstance(m, GraphStage)}
    if not stages:
        raise ValueError("record_adjacency(): the model has no GraphStage; build it with dynwire.create_model")
    return stages


@contextmanager
def record_adjacency(model: nn.Module) -> Iterator[AdjacencyRecord]:
    """Record the ``(B, N, N)`` adjacency of every graph stage during forward passes.

    Example::

        with dynwire.record_adjacency(model) as rec:
            model(x)
        rec["layer3"].shape  # (B, 7, 7) for ResNet-50's 6-block stage

    Outside the block nothing is recorded and the stages keep no reference to the matrices;
    the record keeps those of the last forward pass.
    """
    stages = _stages(model)
    counters = [m for m in model.modules() if hasattr(m, "recorded_macs")]
    for s in stages.values():
        s.record_adjacency = True
        s.adjacency = s.router_adjacency = s.removed = s.macs = None
    for m in counters:
        m.record_macs, m.recorded_macs = True, None
    rec = AdjacencyRecord(stages, counters)
    try:
        yield rec
    finally:
        rec._frozen = rec._read()
        for s in stages.values():
            s.record_adjacency = False
            s.adjacency = s.router_adjacency = s.removed = s.macs = None
        for m in counters:
            m.record_macs, m.recorded_macs = False, None
