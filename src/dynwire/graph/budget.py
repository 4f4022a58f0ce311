"""A compute budget for DG-Net (beyond the paper, its "future work"): expected executed MACs.

In evaluation a block is removed for a sample when none of its input edges is open (Sec. 3.3).
During training the same event is estimated differentiably: edge ``i -> j`` is open with
probability ``p_ij = sigmoid((alpha_ij - tau_j) / T)``, and node ``j`` is alive with probability
``1 - prod_i (1 - p_ij * alive_i)`` (node 0 always runs). The expected multiply-adds of a
sample are the fixed part of the model (stem, every stage's node 0, head) plus each block's
MACs times its probability of being alive; divided by the dense model's MACs this is the
*expected MAC fraction* that :class:`ComputeBudget` pushes toward a target.

With ``difficulty > 0`` the target is per sample (the paper's "adjusting the computation cost
based upon the difficulties of samples", Sec. 5): a sample whose loss ranks ``r`` in ``[0, 1]``
within its batch (0 the easiest) aims at ``target * (1 + difficulty * (2 r - 1))``, clipped to
``[0, 1]``, so the batch's mean target stays ``target`` and easy samples are asked to spend less.

``per_stage=True`` spreads the budget evenly over the stages: the term becomes the
removable-MAC-weighted mean over stages of ``(stage fraction - removable target)^2``, where a stage's
fraction is its expected executed share of its own removable blocks (blocks 1..n-1) and the
removable target is the share of all removable MACs the sample's target leaves. It is scaled by
``(removable / dense)^2`` so that it equals the whole-model term when every stage spends the same
share, and is never smaller (Jensen); with it one stage cannot be emptied to pay for the others.
A target below the fixed part asks for a removable share of 0 (clipped). Without per-sample
targets (``difficulty=0``) each stage's fraction is the batch mean, as the whole-model term's is.

``warmup_epochs > 0`` ramps the term's weight linearly from 0 to ``weight`` over that many epochs
(the trainer passes the progress), so the blocks learn features before the budget removes them.
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

    def __init__(
        self,
        model: nn.Module,
        target: float,
        weight: float = 1.0,
        temperature: float = 0.2,
        difficulty: float = 0.0,
        warmup_epochs: float = 0.0,
        per_stage: bool | float = False,
    ) -> None:
        super().__init__()
        if not 0.0 < target <= 1.0:
            raise ValueError(f"budget target={target!r}: must be a MAC fraction in (0, 1]")
        if weight < 0 or temperature <= 0:
            raise ValueError(f"budget weight={weight!r} must be >= 0 and temperature={temperature!r} > 0")
        if not 0.0 <= difficulty <= 1.0:
            raise ValueError(f"budget difficulty={difficulty!r}: must be in [0, 1] (0: one target for every sample)")
        if warmup_epochs < 0:
            raise ValueError(f"budget warmup_epochs={warmup_epochs!r}: must be >= 0")
        if per_stage not in (0, 1):  # 0/1 from a config's number, or a bool
            raise ValueError(f"budget per_stage={per_stage!r}: must be 0 (one term for the model) or 1 (one per stage)")
        self.stages = [s for s in model.modules() if isinstance(s, GraphStage) and hasattr(s.edges, "tau")]
        if not self.stages:
            raise ValueError("a compute budget needs thresholded wirings (dynamic or static); this model has none")
        self.model = [model]  # not a submodule: the budget owns no parameters
        self.target, self.weight, self.temperature = float(target), float(weight), float(temperature)
        self.difficulty = float(difficulty)
        self.warmup_epochs = float(warmup_epochs)
        self.per_stage = bool(per_stage)
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

    def _removable(self) -> list[tuple[GraphStage, float]]:
        """Each stage with removable blocks and their MACs (blocks 1..n-1), after a training forward."""
        out = []
        for s in self.stages:
            if s.expected_block_macs is None:
                raise ValueError("ComputeBudget: run the model's training forward before asking for the budget")
            removable = sum(s.block_macs[1:])
            if removable > 0:
                out.append((s, removable))
        return out

    def stage_fractions(self) -> list[Tensor]:
        """Per stage, the ``(B,)`` expected executed share of its removable MACs (last training forward)."""
        return [s.expected_block_macs / removable for s, removable in self._removable()]

    def _per_stage_term(self, sample_shape: tuple[int, ...], targets: Tensor | None) -> Tensor:
        """Mean over samples of the removable-MAC-weighted per-stage squared gaps (module docstring);
        ``targets`` None: one target, on each stage's batch-mean fraction."""
        dense = self.dense_macs(sample_shape)
        shares = [r for _, r in self._removable()]
        removable = sum(shares)
        fracs = self.stage_fractions()
        if targets is None:
            fracs, targets = [f.mean().reshape(1) for f in fracs], fracs[0].new_full((1,), self.target)
        # the share of the removable MACs a sample's whole-model target leaves (its fixed part runs anyway)
        t_r = ((targets * dense - (dense - removable)) / removable).clamp(0.0, 1.0)
        gaps = sum(w / removable * (f - t_r) ** 2 for w, f in zip(shares, fracs))
        return (removable / dense) ** 2 * gaps.mean()

    def sample_targets(self, sample_loss: Tensor) -> Tensor:
        """``(B,)`` per-sample targets from the samples' losses (their ranks; see the module docstring)."""
        b = sample_loss.numel()
        if b < 2 or self.difficulty == 0:
            return sample_loss.new_full((b,), self.target)
        ranks = sample_loss.detach().flatten().argsort().argsort().to(sample_loss.dtype) / (b - 1)
        return (self.target * (1 + self.difficulty * (2 * ranks - 1))).clamp(0.0, 1.0)

    def weight_at(self, epoch: float | None) -> float:
        """The term's weight at training progress ``epoch`` (fractional epochs; None: full weight)."""
        if self.warmup_epochs == 0 or epoch is None:
            return self.weight
        return self.weight * min(1.0, max(0.0, epoch) / self.warmup_epochs)

    def loss(
        self, sample_shape: tuple[int, ...], sample_loss: Tensor | None = None, epoch: float | None = None
    ) -> tuple[Tensor, float]:
        """The budget term and the batch's mean expected MAC fraction. ``sample_loss``: the ``(B,)``
        per-sample task loss, needed when ``difficulty > 0``; ``epoch``: training progress for the warm-up."""
        fracs = self.expected_fraction(sample_shape)
        frac = fracs.mean()
        weight = self.weight_at(epoch)
        if self.difficulty == 0:
            if self.per_stage:
                return weight * self._per_stage_term(sample_shape, None), float(frac.detach())
            return weight * (frac - self.target) ** 2, float(frac.detach())
        if sample_loss is None or sample_loss.numel() != fracs.numel():
            raise ValueError("ComputeBudget.loss: difficulty > 0 needs the (B,) per-sample loss of the same batch")
        targets = self.sample_targets(sample_loss).to(fracs.dtype)
        if self.per_stage:
            return weight * self._per_stage_term(sample_shape, targets), float(frac.detach())
        return weight * ((fracs - targets) ** 2).mean(), float(frac.detach())
