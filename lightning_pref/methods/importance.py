"""What DPO-C&M and SDPO share: per-step importance weights from the noise process (METHODS.md section 2).

``w_t = p_theta(x_prev | x_t) / q(x_prev | x_t, x0)`` -- the current model's reverse step over the forward
posterior, *not* policy over reference -- computed in closed form by
[`log_importance_weight`][lightning_pref.processes.NoiseProcess.log_importance_weight] from the policy's
(detached) error, for DDPM epsilon- and v-prediction and for flow matching alike. ``[reconstructed]``: every
choice below is an option. The mask, the clipped weight and their option checks:
[`losses.importance`][lightning_pref.losses.importance].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from lightning_pref.errors import ConfigError
from lightning_pref.losses.importance import check_importance_options, importance_mask, timestep_bucket_means
from lightning_pref.methods.base import PreferenceDiffusionModule
from lightning_pref.methods.step import NoisySamples, SampleErrors, Samples
from lightning_pref.seeding import PairRandomness


class ImportanceWeightedModule(PreferenceDiffusionModule):
    """Base of the importance-weighted methods: computes ``(w_w, w_l)`` per pair and their metrics.

    Args:
        mask_threshold: ``tau``: a pair counts only if both weights are ``>= tau`` (0.9 in the paper).
        kl_reduction: the per-element ``mean`` error (default) or the ``sum`` over the latent in
            ``log w = -c_t * err``. The Gaussian KL sums over elements, but with ``sum`` the weights of a
            64x64x4 latent are ~0 at every t and ``tau = 0.9`` masks everything; with ``mean`` (the KL per
            element) they are ~1 except at the first steps. See the docs page for measured values.
        weight_estimator: ``expected`` (``-KL``, default) or ``sampled`` (the log-ratio at one draw).
        importance_step: reverse-step size in process time (``None``: one training step, ``1 / T`` for flows).
        **kwargs: the options of [`PreferenceDiffusionModule`][lightning_pref.methods.base.PreferenceDiffusionModule].
    """

    def __init__(
        self,
        *args: Any,
        mask_threshold: float | None = 0.9,
        kl_reduction: Literal["mean", "sum"] = "mean",
        weight_estimator: Literal["expected", "sampled"] = "expected",
        importance_step: float | None = None,
        **kwargs: Any,
    ):
        check_importance_options(mask_threshold)
        if kl_reduction not in ("mean", "sum"):
            raise ConfigError(f"kl_reduction={kl_reduction!r}: choose 'mean' (KL per element) or 'sum' (whole latent).")
        if weight_estimator not in ("expected", "sampled"):
            raise ConfigError(f"weight_estimator={weight_estimator!r}: choose 'expected' or 'sampled'.")
        super().__init__(*args, **kwargs)
        self.mask_threshold = mask_threshold
        self.kl_reduction = kl_reduction
        self.weight_estimator = weight_estimator
        self.importance_step = importance_step

    def noise_samples(self, samples: Samples, random: PairRandomness) -> NoisySamples:
        noisy = super().noise_samples(samples, random)
        if self.weight_estimator == "expected":
            return noisy
        standard_normal = (
            random.normal((2,)).T.flatten().double()
        )  # one per sample, [winners; losers], from its pair's stream
        return ImportanceNoisySamples(**vars(noisy), standard_normal=standard_normal)

    def importance_weights(self, errors: SampleErrors) -> tuple[Tensor, Tensor]:
        """``(w_w, w_l)``, each ``(B,)``, from the policy's unweighted errors (stop-gradient): the weight is a
        property of the denoising error itself, not of the process's loss weighting."""
        squared_error = errors.policy_squared
        if self.kl_reduction == "sum":  # the KL of the whole latent
            squared_error = squared_error * errors.noisy.x_t[0].numel()
        log_weight = self.process.log_importance_weight(
            errors.noisy.timesteps,
            squared_error,
            self.weight_estimator,
            self.importance_step,
            getattr(errors.noisy, "standard_normal", None),
        )
        return errors.halves(log_weight.exp())

    def weight_metrics(self, errors: SampleErrors, weight_w: Tensor, weight_l: Tensor) -> dict[str, Tensor]:
        """Mean weights per branch, and per timestep bucket the mean weight and (with a mask) the masked fraction."""
        fraction = self.process.time_fraction(errors.timesteps)
        metrics = {
            "importance_weight_w": weight_w.mean(),
            "importance_weight_l": weight_l.mean(),
            **timestep_bucket_means((weight_w + weight_l) / 2, fraction, "importance_weight"),
        }
        if self.mask_threshold is not None:
            masked = 1 - importance_mask(weight_w, weight_l, self.mask_threshold)
            metrics.update(timestep_bucket_means(masked, fraction, "masked_fraction"))
        return metrics


@dataclass
class ImportanceNoisySamples(NoisySamples):
    """The noised samples plus one standard normal per sample for the ``sampled`` weight estimator."""

    standard_normal: Tensor | None = None
