"""A compute budget for DG-Net (beyond the paper, its "future work"): expected executed MACs.

In evaluation a block is removed for a sample when none of its input edges is open (Sec. 3.3).
During training the same event is estimated differentiably: edge ``i -> j`` is open with
probability ``p_ij = sigmoid((alpha_ij - tau_j) / T)``, and node ``j`` is alive with probability
``1 - prod_i (1 - p_ij * alive_i)`` (node 0 always runs). The expected multiply-adds of a
sample are the fixed part of the model (stem, every stage's node 0, head) plus each block's
MACs times its probability of being alive; divided by the dense model's MACs this is the
*expected MAC fraction* that :class:`ComputeBudget` pushes toward a target.
"""

from __future__ import annotations

from torch import Tensor, nn

from .stage import GraphStage, alive_probabilities

__all__ = ["ComputeBudget", "alive_probabilities"]


class ComputeBudget(nn.Module):
    """Training term ``weight * (E[MAC fraction] - target)^2`` over the graph stages of a model.

    Call :meth:`loss` right after the model's forward in training; it also returns the batch's
    expected MAC fraction (for logging). Block MACs are counted once with torch's FLOP counter.
    """

    def __init__(self, model: nn.Module, target: float, weight: float = 1.0, temperature: float = 0.2) -> None:
        super().__init__()
        if not 0.0 < target <= 1.0:
            raise ValueError(f"budget target={target!r}: must be a MAC fraction in (0, 1]")
        if weight < 0 or temperature <= 0:
            raise ValueError(f"budget weight={weight!r} must be >= 0 and temperature={temperature!r} > 0")
        self.stages = [s for s in model.modules() if isinstance(s, GraphStage) and hasattr(s.edges, "tau")]
        if not self.stages:
            raise ValueError("a compute budget needs thresholded wirings (dynamic or static); this model has none")
        self.model = [model]  # not a submodule: the budget owns no parameters
        self.target, self.weight, self.temperature = float(target), float(weight), float(temperature)
        self._dense: float | None = None
        for s in self.stages:
            s.cost_temperature = self.temperature

    def dense_macs(self, sample_shape: tuple[int, ...]) -> float:
        """MACs of one sample through the dense model (every block), counted once."""
        if self._dense is None:
            from ..analysis.profile import count_macs

            self._dense = float(count_macs(self.model[0], sample_shape))
        return self._dense

    def expected_fraction(self, sample_shape: tuple[int, ...]) -> Tensor:
        """``(B,)`` expected executed-MAC fraction of each sample of the last training forward."""
        dense = self.dense_macs(sample_shape)
        removable = 0.0
        expected = None
        for s in self.stages:
            if s.expected_block_macs is None:
                raise ValueError("ComputeBudget: run the model's training forward before asking for the budget")
            removable += sum(s.block_macs[1:])
            expected = s.expected_block_macs if expected is None else expected + s.expected_block_macs
        return (dense - removable + expected) / dense

    def loss(self, sample_shape: tuple[int, ...]) -> tuple[Tensor, float]:
        frac = self.expected_fraction(sample_shape).mean()
        return self.weight * (frac - self.target) ** 2, float(frac.detach())
