"""Public access to the per-sample adjacency buffer of Sec. 3.4."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
    """

    def __init__(self, stages: dict[str, GraphStage]) -> None:
        self._stages = stages
        self._frozen: tuple[dict, dict] | None = None

    def _read(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if self._frozen is not None:
            return self._frozen
        eff = {n: s.adjacency for n, s in self._stages.items() if s.adjacency is not None}
        raw = {n: s.router_adjacency for n, s in self._stages.items() if s.router_adjacency is not None}
        return eff, raw

    @property
    def adjacency(self) -> dict[str, Tensor]:
        return self._read()[0]

    @property
    def router(self) -> dict[str, Tensor]:
        return self._read()[1]

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
    for s in stages.values():
        s.record_adjacency = True
        s.adjacency = s.router_adjacency = None
    rec = AdjacencyRecord(stages)
    try:
        yield rec
    finally:
        rec._frozen = rec._read()
        for s in stages.values():
            s.record_adjacency = False
            s.adjacency = s.router_adjacency = None
