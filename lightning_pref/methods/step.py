"""What one training step's data is, stage by stage: clean samples, noised samples, per-row errors.

The base module's hooks hand these from one to the next (nothing of a step is kept on the module): rows are
stacked once (``[winners; losers]`` of ``B`` pairs, or unpaired samples), and pairs are split once
([`SampleErrors`][lightning_pref.methods.step.SampleErrors]).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lightning_pref.backbones.base import Conditioning
from lightning_pref.errors import DataError


@dataclass
class Samples:
    """The clean samples of one step, stacked once: the ``[winners; losers]`` of ``num_pairs`` pairs (``2B``
    rows: winner ``i`` is row ``i``, its loser row ``B + i``), or unpaired samples (``num_pairs`` is ``None``),
    with one conditioning row each."""

    latents: Tensor
    conditioning: Conditioning
    num_pairs: int | None


@dataclass
class NoisySamples:
    """The samples after noising, one (t, eps) per pair (shared by winner and loser) or per unpaired sample.

    ``timesteps`` are process times and ``error_weight`` the process's per-row loss weight (min-SNR and the
    like; 1 by default), each ``(rows,)``.
    """

    x_t: Tensor
    target: Tensor
    noise: Tensor
    timesteps: Tensor
    error_weight: Tensor


@dataclass
class SampleErrors:
    """Per-row denoising errors: ``policy`` (with grad) and ``reference`` (no grad; zeros for reference-free
    methods), ``mean((prediction - target)^2)`` in fp32 times the row's ``error_weight``; ``policy_squared`` is
    the policy's unweighted error (detached), what importance weights are computed from.

    Pairs are split here, once: ``policy_w``, ``policy_l``, ``ref_w``, ``ref_l`` and ``timesteps`` are ``(B,)``.
    ``loser_gradient_scale`` is the safeguard's ``lambda`` per pair when ``loser_safeguard`` is on.
    """

    policy: Tensor
    reference: Tensor
    policy_squared: Tensor
    noisy: NoisySamples
    num_pairs: int | None
    loser_gradient_scale: Tensor | None = None

    def halves(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(winners, losers)`` of per-row values."""
        if self.num_pairs is None:
            raise DataError(
                "these errors are of unpaired samples: a pairwise loss needs pair batches (winners and losers)."
            )
        return rows[: self.num_pairs], rows[self.num_pairs :]

    @property
    def policy_w(self) -> Tensor:
        return self.halves(self.policy)[0]

    @property
    def policy_l(self) -> Tensor:
        return self.halves(self.policy)[1]

    @property
    def ref_w(self) -> Tensor:
        return self.halves(self.reference)[0]

    @property
    def ref_l(self) -> Tensor:
        return self.halves(self.reference)[1]

    @property
    def timesteps(self) -> Tensor:
        """Each pair's process time, ``(B,)`` (each sample's for unpaired samples)."""
        return self.noisy.timesteps if self.num_pairs is None else self.noisy.timesteps[: self.num_pairs]

    def as_args(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.policy_w, self.policy_l, self.ref_w, self.ref_l

    def named(self) -> dict[str, Tensor]:
        """The error terms by name (``policy_w`` ... ``ref_l`` for pairs), for messages and metrics."""
        if self.num_pairs is None:
            return {"policy": self.policy, "reference": self.reference}
        return dict(zip(("policy_w", "policy_l", "ref_w", "ref_l"), self.as_args()))


def mean_squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    """``mean over all non-batch dimensions of (prediction - target)^2``, in fp32, ``(N,)`` (METHODS.md: mean, not sum)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
