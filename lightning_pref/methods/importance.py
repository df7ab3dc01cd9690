"""What DPO-C&M and SDPO share: per-step importance weights from the noise process (METHODS.md section 2).

``w_t = p_theta(x_prev | x_t) / q(x_prev | x_t, x0)`` -- the current model's reverse step over the forward
posterior, *not* policy over reference -- computed in closed form by
[`log_importance_weight`][lightning_pref.processes.NoiseProcess.log_importance_weight] from the policy's
(detached) error, for DDPM epsilon- and v-prediction and for flow matching alike. ``[reconstructed]``: every
choice below is an option. The mask, the clipped weight, the calibrated scale and their option checks:
[`losses.importance`][lightning_pref.losses.importance].
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_pref.errors import ConfigError
from lightning_pref.losses.importance import (
    calibrated_kl_scale,
    check_importance_options,
    importance_mask,
    timestep_bucket_means,
)
from lightning_pref.methods.base import PreferenceDiffusionModule
from lightning_pref.methods.step import NoisySamples, SampleErrors, Samples, mean_squared_error
from lightning_pref.processes import DDPMProcess
from lightning_pref.seeding import PairRandomness
from lightning_pref.strategies import mean_across_ranks

log = logging.getLogger(__name__)

#: the checkpoint entry of the calibration: the time it was measured at and the typical error measured there
CALIBRATION_KEY = "importance_kl_calibration"


class ImportanceWeightedModule(PreferenceDiffusionModule):
    """Base of the importance-weighted methods: computes ``(w_w, w_l)`` per pair and their metrics.

    ``log w_t = -kl_scale * c_t * err``, with ``c_t`` the process's coefficient and ``err`` the policy's error,
    per element (``kl_reduction: mean``) or summed over the latent (``sum``).

    **The scale of the weight** ``[reconstructed]``. The weight's shape over ``t`` is fixed by the process
    (``c_t``) and the model (its error at each ``t``); its scale is not. The expected log-ratio of two
    Gaussians sums over the latent's elements, which treats them as independent: with ``sum`` every weight of
    a real latent is ~0 and ``tau = 0.9`` masks every pair; with ``mean`` (the KL per element) the weights stay
    above 0.95 from the first few steps on (above 0.99 from ``t = 50`` on the toy model), so the mask removes
    almost nothing and DPO-C&M is Diffusion-DPO. The paper's weights are low at ``t ~ 0..100`` and ``t ~ 1000``
    and high around 500; the number of independent elements its KL counts is stated nowhere. So that number is
    an option, ``kl_scale`` (1: ``mean``'s per-element KL), and ``calibrate_kl_scale_at`` sets it from the
    model instead of by hand:

    * at the first batch (the sanity-check validation batch when the trainer runs one), the policy's mean
      per-element error ``e_typ`` at ``t*`` is measured (one extra forward without gradient, noise from each
      pair's own calibration stream, averaged over ranks) and
      ``kl_scale = -log(tau) / (c_t* e_typ)``
      ([`calibrated_kl_scale`][lightning_pref.losses.importance.calibrated_kl_scale]): a typical sample's
      weight is ``tau`` at ``t*``, lower below it, where the KL per element is larger;
    * measured once, then fixed (and checkpointed): a scale that followed the error as training lowers it
      would change the objective while it is optimised;
    * from a measured error rather than the process alone: ``c_t`` says how the KL grows with the error, not
      how large the model's error is, and that varies by orders of magnitude over ``t`` on a trained model;
    * one crossing pinned, not two: one constant can place one edge of the mask. The other end is where the
      model's own weights put it (logged as ``masked_fraction_t0.9-1.0``): a second constant, one per end,
      would draw the paper's curve instead of measuring the model's.

    ``calibrate_kl_scale_at: 0.1`` puts the mask's lower edge at the paper's ``t ~ 100``; on the toy model it
    then drops 91% of the pairs below ``t = 100`` and keeps the middle of the schedule (measured by
    ``benchmarks/importance_masking.py``; the docs page has the table).

    Args:
        mask_threshold: ``tau``: a pair counts only if both weights are ``>= tau`` (0.9 in the paper).
        kl_reduction: the per-element ``mean`` error (default) or the ``sum`` over the latent in
            ``log w = -c_t * err``. See the docs page for measured values.
        kl_scale: multiplies the KL, ``log w = -kl_scale * c_t * err`` (default 1: the weights of
            ``kl_reduction`` unchanged) ``[reconstructed]``.
        calibrate_kl_scale_at: ``t*`` as a fraction of the schedule, in (0, 1), or ``None`` (off, the default):
            ``kl_scale`` is measured at the first batch so that a typical sample's weight at ``t*`` is
            ``mask_threshold`` (above). Needs ``kl_reduction: mean`` (the measured scale absorbs the latent's
            size) and no ``kl_scale`` of its own ``[reconstructed]``.
        weight_estimator: ``expected`` (``-KL``, default) or ``sampled`` (the log-ratio at one draw).
        importance_step: reverse-step size in process time (``None``: one training step, ``1 / T`` for flows).
        **kwargs: the options of [`PreferenceDiffusionModule`][lightning_pref.methods.base.PreferenceDiffusionModule].
    """

    def __init__(
        self,
        *args: Any,
        mask_threshold: float | None = 0.9,
        kl_reduction: Literal["mean", "sum"] = "mean",
        kl_scale: float = 1.0,
        calibrate_kl_scale_at: float | None = None,
        weight_estimator: Literal["expected", "sampled"] = "expected",
        importance_step: float | None = None,
        **kwargs: Any,
    ):
        check_importance_options(mask_threshold)
        if kl_reduction not in ("mean", "sum"):
            raise ConfigError(f"kl_reduction={kl_reduction!r}: choose 'mean' (KL per element) or 'sum' (whole latent).")
        if not (math.isfinite(kl_scale) and kl_scale > 0):
            raise ConfigError(f"kl_scale={kl_scale}: use a positive number (1 leaves the KL of kl_reduction as it is).")
        if weight_estimator not in ("expected", "sampled"):
            raise ConfigError(f"weight_estimator={weight_estimator!r}: choose 'expected' or 'sampled'.")
        if calibrate_kl_scale_at is not None:
            check_calibration_options(calibrate_kl_scale_at, mask_threshold, kl_reduction, kl_scale)
        super().__init__(*args, **kwargs)
        self.mask_threshold = mask_threshold
        self.kl_reduction = kl_reduction
        self.weight_estimator = weight_estimator
        self.importance_step = importance_step
        self.calibrate_kl_scale_at = calibrate_kl_scale_at
        #: the multiplier of the KL; with ``calibrate_kl_scale_at``, ``None`` until the first batch measures it
        self.kl_scale: float | None = kl_scale if calibrate_kl_scale_at is None else None
        #: the typical per-element error at ``t*`` the calibrated scale was computed from
        self.typical_error: float | None = None
        if calibrate_kl_scale_at is not None and not 0 < self.calibration_coefficient() < math.inf:
            raise ConfigError(
                f"calibrate_kl_scale_at={calibrate_kl_scale_at}: t* is the step into the clean sample, where every "
                "weight is 0 whatever the scale; use a later time (e.g. 0.1)."
            )

    # ------------------------------------------------------------------------------ the weights
    def reduced_error(self, squared_error: Tensor, sample: Tensor) -> Tensor:
        """The error ``c_t`` multiplies: per element (``mean``), or over the whole latent ``sample`` (``sum``)."""
        return squared_error * sample.numel() if self.kl_reduction == "sum" else squared_error

    def importance_weights(self, errors: SampleErrors) -> tuple[Tensor, Tensor]:
        """``(w_w, w_l)``, each ``(B,)``, from the policy's unweighted errors (stop-gradient): the weight is a
        property of the denoising error itself, not of the process's loss weighting."""
        log_weight = self.process.log_importance_weight(
            errors.noisy.timesteps,
            self.reduced_error(errors.policy_squared, errors.noisy.x_t[0]) * self.kl_scale,
            self.weight_estimator,
            self.importance_step,
            getattr(errors.noisy, "standard_normal", None),
        )
        return errors.halves(log_weight.exp())

    def weight_metrics(self, errors: SampleErrors, weight_w: Tensor, weight_l: Tensor) -> dict[str, Tensor]:
        """Mean weights per branch, the KL scale, and per timestep bucket the mean weight and (with a mask) the
        masked fraction."""
        fraction = self.process.time_fraction(errors.timesteps)
        metrics = {
            "importance_weight_w": weight_w.mean(),
            "importance_weight_l": weight_l.mean(),
            "importance_kl_scale": torch.tensor(self.kl_scale),
            **timestep_bucket_means((weight_w + weight_l) / 2, fraction, "importance_weight"),
        }
        if self.mask_threshold is not None:
            masked = 1 - importance_mask(weight_w, weight_l, self.mask_threshold)
            metrics.update(timestep_bucket_means(masked, fraction, "masked_fraction"))
        return metrics

    # ------------------------------------------------------------------------------ the step's hooks
    def prepare_samples(self, batch: dict[str, Any], random: PairRandomness) -> Samples:
        """The base module's clean samples; with ``calibrate_kl_scale_at``, the first ones also set ``kl_scale``."""
        samples = super().prepare_samples(batch, random)
        if self.kl_scale is None:
            self.set_calibrated_kl_scale(self.measure_typical_error(samples, batch, random))
            log.info(
                "kl_scale calibrated at t* = %s: typical error %.4g, kl_scale %.4g",
                self.calibrate_kl_scale_at,
                self.typical_error,
                self.kl_scale,
            )
        return samples

    def noise_samples(self, samples: Samples, random: PairRandomness) -> NoisySamples:
        noisy = super().noise_samples(samples, random)
        if self.weight_estimator == "expected":
            return noisy
        standard_normal = (
            random.normal((2,)).T.flatten().double()
        )  # one per sample, [winners; losers], from its pair's stream
        return ImportanceNoisySamples(**vars(noisy), standard_normal=standard_normal)

    # ------------------------------------------------------------------------------ calibration
    def calibration_time(self) -> Tensor:
        """``t*`` in process time, ``(1,)``: the training step nearest ``calibrate_kl_scale_at * T`` (DDPM), or
        ``s = calibrate_kl_scale_at`` (flow matching)."""
        if isinstance(self.process, DDPMProcess):
            steps = self.process.num_train_timesteps
            return torch.tensor([min(round(self.calibrate_kl_scale_at * steps), steps - 1)])
        return torch.tensor([self.calibrate_kl_scale_at])

    def calibration_coefficient(self) -> float:
        """``c_t*``, the process's KL per unit of squared error at ``t*`` (with this module's ``importance_step``)."""
        return self.process.importance_coefficient(self.calibration_time(), self.importance_step).item()

    @torch.no_grad()
    def measure_typical_error(self, samples: Samples, batch: dict[str, Any], random: PairRandomness) -> float:
        """The policy's mean per-element squared error at ``t*`` over ``samples`` (and over ranks): one forward
        without gradient, each pair's winner and loser noised with one draw from the pair's calibration stream
        (named by ``seed`` and the pair's index in the global batch, so it leaves the step's own draws alone)."""
        x0 = samples.latents
        t = self.calibration_time().repeat(x0.shape[0]).to(x0.device)
        streams = PairRandomness.for_pairs((self.seed, "kl_scale_calibration"), random.pairs, random.total)
        noise = streams.normal(tuple(x0.shape[1:])).to(x0).repeat(2, *([1] * (x0.ndim - 1)))  # [winners; losers]
        x_t = self.process.add_noise(x0, noise, t)
        prediction = self.backbone.predict(
            self.denoiser,
            x_t,
            self.process.model_timesteps(t),
            self.policy_conditioning(samples.conditioning, batch),
        )
        error = mean_squared_error(prediction, self.process.target(x0, noise, t)).mean()
        return mean_across_ranks(error).item()

    def set_calibrated_kl_scale(self, typical_error: float) -> None:
        """``kl_scale = -log(tau) / (c_t* * typical_error)``, from a measured (or restored) typical error."""
        self.typical_error = typical_error
        self.kl_scale = calibrated_kl_scale(self.calibration_coefficient(), typical_error, self.mask_threshold)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The base module's checkpoint, plus the calibration's measurement (``t*`` and the typical error)."""
        super().on_save_checkpoint(checkpoint)
        if self.typical_error is not None:
            checkpoint[CALIBRATION_KEY] = {"at": self.calibrate_kl_scale_at, "typical_error": self.typical_error}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume the calibration measured at the same ``t*`` (its scale recomputed with this run's ``tau`` and
        ``importance_step``); a calibration at another ``t*``, or none, is measured again at the next batch."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(CALIBRATION_KEY)
        if self.calibrate_kl_scale_at is not None and saved is not None and saved["at"] == self.calibrate_kl_scale_at:
            self.set_calibrated_kl_scale(saved["typical_error"])


def check_calibration_options(at: float, mask_threshold: float | None, kl_reduction: str, kl_scale: float) -> None:
    """Raise a ``ConfigError`` for a ``calibrate_kl_scale_at`` that cannot be honoured with the other options."""
    if not 0.0 < at < 1.0:
        raise ConfigError(
            f"calibrate_kl_scale_at={at}: give t* as a fraction of the schedule in (0, 1) (e.g. 0.1 for t ~ 100 "
            "of 1000), or null for no calibration."
        )
    if mask_threshold is None or not 0.0 < mask_threshold < 1.0:
        raise ConfigError(
            f"calibrate_kl_scale_at needs a mask_threshold in (0, 1), the weight it puts at t* (got "
            f"{mask_threshold}); set mask_threshold: 0.9, or calibrate_kl_scale_at: null."
        )
    if kl_reduction != "mean":
        raise ConfigError(
            f"kl_reduction={kl_reduction!r} with calibrate_kl_scale_at: the calibrated scale absorbs the latent's "
            "size, so the reduction changes nothing; leave kl_reduction at 'mean'."
        )
    if kl_scale != 1.0:
        raise ConfigError(
            f"kl_scale={kl_scale} with calibrate_kl_scale_at={at}: the calibration sets kl_scale; give one of them."
        )


@dataclass
class ImportanceNoisySamples(NoisySamples):
    """The noised samples plus one standard normal per sample for the ``sampled`` weight estimator."""

    standard_normal: Tensor | None = None
