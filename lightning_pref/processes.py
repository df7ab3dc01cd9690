"""Noise processes: how a clean sample ``x0`` becomes the denoiser's input ``x_t`` and its regression target.

Two families cover every backbone of the library:

* ``DDPMProcess`` (SD1.5, SDXL, CogVideoX): ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with an
  epsilon target or a v target ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0``; built from the checkpoint's
  diffusers scheduler config so the training noise matches its schedule exactly (CogVideoX's included).
* ``FlowMatchingProcess`` (SD3, FLUX, Wan2.1): ``x_t = (1 - s) x0 + s eps`` with ``s`` in [0, 1] and the
  velocity target ``eps - x0``; ``FluxFlowMatchingProcess`` adds FLUX.1's resolution-dependent shift and sampler.

A process draws *process time* ``t`` (an integer step for DDPM, a float ``s`` for flow matching) and
converts it to what the denoiser is fed with ``NoiseProcess.model_timesteps``.

Both families also give the **per-step importance weight** of SDPO and DPO-C&M (METHODS.md section 2),
``w_t = p_theta(x_prev | x_t) / q(x_prev | x_t, x0)``, in closed form from one shared formula
(``NoiseProcess.log_importance_weight``).

DDPM processes also run a **deterministic DDIM inversion** (Inversion-DPO, METHODS.md section 4): ``x0`` carried
up the noise levels by a model's own noise predictions ([`ddim_invert`][lightning_pref.processes.ddim_invert],
through the timesteps of ``DDPMProcess.ddim_inversion_timesteps``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from diffusers import CogVideoXDDIMScheduler, DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor

from lightning_pref.errors import ConfigError, check_whole_numbers


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape ``(N,)`` coefficients to broadcast against ``like`` of shape ``(N, ...)``."""
    return values.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


class NoiseProcess:
    """Interface of a noise process. ``timestep_range`` restricts training times to a fraction of [0, 1]."""

    prediction_type: str

    def __init__(self, timestep_range: tuple[float, float] = (0.0, 1.0)):
        low, high = timestep_range
        if not 0.0 <= low < high <= 1.0:
            raise ConfigError(
                f"timestep_range={timestep_range}: need 0 <= low < high <= 1 (fractions of the schedule)."
            )
        self.timestep_range = (float(low), float(high))

    def sample_timesteps(self, num: int, generator: torch.Generator | None = None) -> Tensor:
        """``num`` training times drawn from the process's distribution within ``timestep_range``, ``(num,)``:
        integer steps for DDPM, ``s`` in [0, 1] for flow matching."""
        raise NotImplementedError

    def timesteps_at(self, quantiles: Tensor) -> Tensor:
        """The training times at ``quantiles`` in [0, 1) of ``sample_timesteps``' distribution (its inverse CDF),
        ``(N,)``: ``timesteps_at(U[0, 1))`` is distributed as ``sample_timesteps``."""
        raise NotImplementedError

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t`` of clean samples ``x0`` ``(N, ...)`` for ``noise`` (same shape) at process times ``t`` ``(N,)``."""
        raise NotImplementedError

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the denoiser regresses on at ``(x0, noise, t)``: ``eps``, ``v`` or the flow velocity ``eps - x0``."""
        raise NotImplementedError

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The timestep values the denoiser is conditioned on."""
        raise NotImplementedError

    def error_weight(self, t: Tensor) -> Tensor:
        """Per-sample multiplier of the denoising error, shape ``(N,)``."""
        raise NotImplementedError

    def sampling_scheduler(self) -> Any:
        """A fresh diffusers scheduler for inference with this process."""
        raise NotImplementedError

    def time_fraction(self, t: Tensor) -> Tensor:
        """Process time as a fraction of the schedule, in [0, 1] (0 = clean), shape ``(N,)``."""
        raise NotImplementedError

    # ----------------------------------------------------------------- importance weights (SDPO, DPO-C&M)
    def signal_to_noise(self, t: Tensor) -> Tensor:
        """``SNR(t) = alpha_t^2 / sigma_t^2`` in float64; ``inf`` at (and before) the clean end."""
        raise NotImplementedError

    def previous_time(self, t: Tensor, step: float | None = None) -> Tensor:
        """The time one reverse step of size ``step`` before ``t`` (towards clean), clamped at the clean end."""
        raise NotImplementedError

    def x0_error_scale(self, t: Tensor) -> Tensor:
        """``|x0_hat - x0|^2`` per unit of the prediction's squared error at ``t`` (float64, ``(N,)``).

        The prediction error converts to the error of the implied clean sample by a per-time factor:
        ``sigma_t^2 / alpha_t^2`` for epsilon, ``sigma_t^2`` for v (DDPM) and ``s^2`` for flow matching.
        """
        raise NotImplementedError

    def importance_coefficient(self, t: Tensor, step: float | None = None) -> Tensor:
        """``c_t``: ``KL(q(x_prev | x_t, x0) || p_theta(x_prev | x_t))`` per unit of squared prediction error.

        With ``p_theta(x_prev | x_t) = q(x_prev | x_t, x0_hat)`` (the DDPM parametrisation: the model's clean
        estimate plugged into the forward posterior, same variance), the KL of the two Gaussians is
        ``(1/2) (SNR(t_prev) - SNR(t)) |x0_hat - x0|^2`` (Kingma et al. 2021, Eq. 13), hence
        ``c_t = (1/2) (SNR(t_prev) - SNR(t)) * x0_error_scale(t)``. For DDPM epsilon-prediction and one step
        this is exactly ``beta_t^2 / (2 btilde_t alpha_t (1 - abar_t))`` of METHODS.md section 2. ``inf`` when
        ``t_prev`` is the clean end (the weight is then 0 unless the error is exactly 0). Shape ``(N,)``, float64.
        """
        snr_prev = self.signal_to_noise(self.previous_time(t, step))
        gap = torch.where(snr_prev.isinf(), math.inf, snr_prev - self.signal_to_noise(t))
        return (0.5 * gap * self.x0_error_scale(t)).nan_to_num(nan=math.inf, posinf=math.inf)

    def log_importance_weight(
        self,
        t: Tensor,
        squared_error: Tensor,
        estimator: Literal["expected", "sampled"] = "expected",
        step: float | None = None,
        standard_normal: Tensor | None = None,
    ) -> Tensor:
        """``log w_t = log p_theta(x_prev | x_t) - log q(x_prev | x_t, x0)`` of each sample, stop-gradient.

        SDPO / DPO-C&M (arXiv 2505.21893) ``[reconstructed]``, METHODS.md section 2. Both distributions are
        Gaussians with the same variance and means ``d`` apart, ``|d|^2 / (2 var) = c_t * squared_error``:

        * ``expected``: ``log w = -c_t * squared_error``, the expectation over ``x_prev ~ q``, i.e. ``-KL``;
        * ``sampled``: the log-ratio at one draw ``x_prev ~ q``, ``-c_t e - d.z / sqrt(var)`` with
          ``z ~ N(0, I)``; since ``d.z / sqrt(var) ~ N(0, 2 c_t e)``, it is drawn as
          ``-c_t e - sqrt(2 c_t e) * xi`` with one standard normal ``xi`` per sample (exact in distribution,
          no need for the residual tensor).

        Args:
            t: process times, ``(N,)``.
            squared_error: ``|prediction - target|^2`` of each sample, ``(N,)``: the *sum* over elements for the
                KL of the whole latent, or the *mean* for the KL per element (the methods' ``kl_reduction``).
            estimator: ``expected`` or ``sampled``.
            step: reverse-step size in process time (``None``: one training step; see ``previous_time``).
            standard_normal: ``xi``, ``(N,)``, for the ``sampled`` estimator (drawn here when ``None``).

        Returns:
            ``(N,)`` float32 log-weights, ``<= 0`` for ``expected``; detached.

        Example:
            >>> process = FlowMatchingProcess()   # one step of 1/1000 at s = 0.5: c = 0.001
            >>> process.log_importance_weight(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 100.0])).exp()
            tensor([1.0000, 0.9045])
        """
        if estimator not in ("expected", "sampled"):
            raise ConfigError(f"weight_estimator={estimator!r}: choose 'expected' or 'sampled'.")
        t = t.detach().cpu()
        error = squared_error.detach().to("cpu", torch.float64)
        coefficient = self.importance_coefficient(t, step)
        finite = coefficient.isfinite()
        kl = torch.where(finite, coefficient, 0.0) * error
        log_weight = -kl
        if estimator == "sampled":
            xi = (
                torch.randn(kl.shape, dtype=torch.float64)
                if standard_normal is None
                else standard_normal.cpu().double()
            )
            log_weight = log_weight - (2 * kl).sqrt() * xi
        log_weight = torch.where(finite | (error == 0), log_weight, -math.inf)
        return log_weight.to(squared_error.device, torch.float32)


def ddpm_scheduler_class(scheduler_config: dict[str, Any]) -> type[DDIMScheduler | CogVideoXDDIMScheduler]:
    """The DDIM-style scheduler whose ``alphas_cumprod`` is the config's training schedule, and which samples.

    CogVideoX's schedulers (Yang et al. 2024; ``_class_name`` ``CogVideoXDDIMScheduler`` or
    ``CogVideoXDPMScheduler``, or a ``snr_shift_scale`` key) divide the SNR by ``snr_shift_scale`` before the
    zero-terminal-SNR rescale, which ``DDIMScheduler`` ignores. Both share ``CogVideoXDDIMScheduler``'s schedule
    and sample with it (``CogVideoXDPMScheduler.step`` takes extra arguments). Every other config:
    ``DDIMScheduler``.
    """
    cogvideox = scheduler_config.get("_class_name") in ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")
    return CogVideoXDDIMScheduler if cogvideox or "snr_shift_scale" in scheduler_config else DDIMScheduler


class DDPMProcess(NoiseProcess):
    """Discrete-time DDPM with epsilon or v prediction (Ho et al. 2020; Salimans & Ho 2022).

    Args:
        scheduler_config: a diffusers scheduler config (``DDPMScheduler``-compatible keys); the schedule and the
            sampler are those of ``ddpm_scheduler_class`` (``DDIMScheduler``, or CogVideoX's own).
        timestep_range: train only on ``t`` in ``[low, high) * num_train_timesteps``.
        error_weighting: ``constant`` (Diffusion-DPO) or ``min_snr`` (Hang et al. 2023, ``gamma`` = 5).
    """

    def __init__(
        self,
        scheduler_config: dict[str, Any],
        timestep_range: tuple[float, float] = (0.0, 1.0),
        error_weighting: Literal["constant", "min_snr"] = "constant",
        min_snr_gamma: float = 5.0,
    ):
        super().__init__(timestep_range)
        self.scheduler_class = ddpm_scheduler_class(scheduler_config)
        scheduler = self.scheduler_class.from_config(scheduler_config)
        self.scheduler_config = dict(scheduler.config)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"prediction_type={self.prediction_type!r} in the scheduler config is not supported: "
                "use 'epsilon' or 'v_prediction'."
            )
        if error_weighting not in ("constant", "min_snr"):
            raise ConfigError(f"error_weighting={error_weighting!r}: choose 'constant' or 'min_snr'.")
        self.error_weighting = error_weighting
        self.min_snr_gamma = min_snr_gamma
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)

    def sample_timesteps(self, num: int, generator: torch.Generator | None = None) -> Tensor:
        low, high = self.step_range()
        return torch.randint(low, high, (num,), generator=generator)

    def timesteps_at(self, quantiles: Tensor) -> Tensor:
        low, high = self.step_range()
        return (low + (quantiles.double() * (high - low)).floor().long()).clamp(max=high - 1)

    def step_range(self) -> tuple[int, int]:
        """``[low, high)`` training steps of ``timestep_range``."""
        low, high = (round(f * self.num_train_timesteps) for f in self.timestep_range)
        return low, max(high, low + 1)

    def _coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        abar = self.alphas_cumprod[t.cpu()]
        return _per_sample(abar.sqrt(), like), _per_sample((1 - abar).sqrt(), like)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        signal, sigma = self._coefficients(t, x0)
        return (signal * x0.float() + sigma * noise.float()).to(x0.dtype)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return noise
        signal, sigma = self._coefficients(t, x0)
        return (signal * noise.float() - sigma * x0.float()).to(x0.dtype)

    def model_timesteps(self, t: Tensor) -> Tensor:
        return t

    def snr(self, t: Tensor) -> Tensor:
        return self.signal_to_noise(t).float()

    def error_weight(self, t: Tensor) -> Tensor:
        if self.error_weighting == "constant":
            return torch.ones(t.shape, dtype=torch.float32)
        snr = self.snr(t)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1)

    def sampling_scheduler(self) -> DDIMScheduler | CogVideoXDDIMScheduler:
        return self.scheduler_class.from_config(self.scheduler_config)

    def time_fraction(self, t: Tensor) -> Tensor:
        return t.float() / self.num_train_timesteps

    def signal_to_noise(self, t: Tensor) -> Tensor:
        t = t.cpu().long()
        abar = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], 1.0)  # abar_{-1} = 1: the clean sample
        return abar / (1 - abar)

    def previous_time(self, t: Tensor, step: float | None = None) -> Tensor:
        """``t - step`` in integer steps (default 1, the training chain); ``-1`` stands for the clean sample."""
        if step is not None and (step < 1 or step != int(step)):
            raise ConfigError(f"importance_step={step}: DDPM steps are whole training steps; use 1, 2, ... (or null).")
        return (t.cpu().long() - int(step or 1)).clamp(min=-1)

    def x0_error_scale(self, t: Tensor) -> Tensor:
        # eps: x0_hat - x0 = -(sigma/alpha)(eps_hat - eps); v: eps_hat - eps = alpha (v_hat - v), so
        # x0_hat - x0 = -sigma (v_hat - v) (see the v/epsilon check in tests/losses/test_importance.py).
        abar = self.alphas_cumprod[t.cpu().long()]
        return (1 - abar) / abar if self.prediction_type == "epsilon" else 1 - abar

    # ------------------------------------------------------------------------ DDIM inversion (Inversion-DPO)
    def ddim_inversion_timesteps(self, num_steps: int) -> Tensor:
        """The increasing timesteps ``t_i = i * (num_train_timesteps // num_steps)``, ``i = 0 .. num_steps - 1``, of
        a ``num_steps``-step DDIM inversion, ``(num_steps,)`` long.

        Leading spacing from 0: the timesteps of diffusers' ``DDIMInverseScheduler`` (and, reversed, of
        ``DDIMScheduler``) with ``timestep_spacing="leading"`` and ``steps_offset=0``, as Inversion-DPO's released
        code builds its scheduler (``k = 1000 // N``: 0, 12, ..., 948 for ``N = 80``). The checkpoint's own
        sampler settings are not used: SD1.5's scheduler config says ``steps_offset=1``, the toy model's
        ``trailing``.
        """
        check_whole_numbers(num_inversion_steps=num_steps)
        if num_steps > self.num_train_timesteps:
            raise ConfigError(
                f"num_inversion_steps={num_steps}: use at most the schedule's {self.num_train_timesteps} steps."
            )
        return torch.arange(num_steps) * (self.num_train_timesteps // num_steps)

    def predicted_noise(self, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The noise ``eps`` a denoiser output at ``(x_t, t)`` stands for, in fp32: the output itself for epsilon
        prediction, ``sqrt(abar_t) v + sqrt(1 - abar_t) x_t`` for v prediction."""
        if self.prediction_type == "epsilon":
            return prediction.float()
        signal, sigma = self._coefficients(t, x_t)
        return signal * prediction.float() + sigma * x_t.float()

    def noise_of(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """The noise that makes ``x_t`` of ``x0`` at ``t`` (``add_noise``'s inverse in its noise),
        ``(x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``, in fp32."""
        signal, sigma = self._coefficients(t, x_t)
        return (x_t.float() - signal * x0.float()) / sigma


class FlowMatchingProcess(NoiseProcess):
    """Rectified flow (Lipman et al. 2023; Esser et al. 2024 for SD3's sampling choices).

    ``x_t = (1 - s) x0 + s eps``, target ``eps - x0``; the denoiser sees ``s * num_train_timesteps``.

    Args:
        shift: SD3's timestep shift ``s' = shift s / (1 + (shift - 1) s)`` (1 = none; SD3 uses 3).
        time_sampling: ``uniform`` or ``logit_normal`` (SD3's default, ``logit_mean``/``logit_std``).
        error_weighting: ``constant`` (default) or ``eps_equivalent``, the weight ``(1 - s)^2`` that makes
            the velocity error equal the epsilon-prediction error; known to over-weight noisy steps.
    """

    prediction_type = "flow"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        time_sampling: Literal["uniform", "logit_normal"] = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        timestep_range: tuple[float, float] = (0.0, 1.0),
        error_weighting: Literal["constant", "eps_equivalent"] = "constant",
    ):
        super().__init__(timestep_range)
        if time_sampling not in ("uniform", "logit_normal"):
            raise ConfigError(f"time_sampling={time_sampling!r}: choose 'uniform' or 'logit_normal'.")
        if error_weighting not in ("constant", "eps_equivalent"):
            raise ConfigError(f"error_weighting={error_weighting!r}: choose 'constant' or 'eps_equivalent'.")
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift
        self.time_sampling = time_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.error_weighting = error_weighting

    @classmethod
    def from_scheduler_config(cls, scheduler_config: dict[str, Any], **options: Any) -> FlowMatchingProcess:
        return cls(
            num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
            shift=scheduler_config.get("shift", 1.0),
            **options,
        )

    def sample_timesteps(self, num: int, generator: torch.Generator | None = None) -> Tensor:
        if self.time_sampling == "uniform":
            s = torch.rand(num, generator=generator)
        else:
            s = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(num, generator=generator))
        return self.shifted(s)

    def timesteps_at(self, quantiles: Tensor) -> Tensor:
        u = quantiles.double()
        s = (
            u
            if self.time_sampling == "uniform"
            else torch.sigmoid(self.logit_mean + self.logit_std * torch.special.ndtri(u))
        )
        return self.shifted(s.float())

    def shifted(self, s: Tensor) -> Tensor:
        """``s`` in [0, 1) mapped into ``timestep_range``, then through SD3's timestep shift."""
        low, high = self.timestep_range
        s = low + (high - low) * s
        return self.shift * s / (1 + (self.shift - 1) * s)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        s = _per_sample(t, x0)
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def model_timesteps(self, t: Tensor) -> Tensor:
        return t * self.num_train_timesteps

    def error_weight(self, t: Tensor) -> Tensor:
        if self.error_weighting == "constant":
            return torch.ones(t.shape, dtype=torch.float32)
        return (1 - t.float()) ** 2

    def sampling_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift)

    def time_fraction(self, t: Tensor) -> Tensor:
        return t.float()

    def signal_to_noise(self, t: Tensor) -> Tensor:
        s = t.cpu().double()
        return ((1 - s) / s) ** 2  # inf at s = 0

    def previous_time(self, t: Tensor, step: float | None = None) -> Tensor:
        """``s - step`` (default ``1 / num_train_timesteps``), clamped at 0 (clean).

        The flow analogue of the DDPM reverse step ``[reconstructed]``: the Gaussian chain with the flow's
        marginals (``alpha_s = 1 - s``, ``sigma_s = s``), and ``p_theta(x_prev | x_s) = q(x_prev | x_s, x0_hat)``
        with ``x0_hat = x_s - s v_theta``. Its mean is ``-2 ds (v_theta - v) + O(ds^2)`` away from the true
        posterior's (the Euler step's gap, up to the factor 2 of a stochastic step) and its variance is the
        posterior's, ``2 s ds / (1 - s) + O(ds^2)``: our choice, which makes DDPM a special case of one formula.
        """
        if step is not None and not 0 < step <= 1:
            raise ConfigError(f"importance_step={step}: a flow step is a fraction of the schedule in (0, 1] (or null).")
        return (t.cpu().double() - (step if step is not None else 1.0 / self.num_train_timesteps)).clamp(min=0.0)

    def x0_error_scale(self, t: Tensor) -> Tensor:
        return t.cpu().double() ** 2  # x0_hat - x0 = -s (v_hat - v)


def image_token_shift(image_seq_len: int, scheduler_config: dict[str, Any]) -> float:
    """FLUX.1's ``mu`` for ``image_seq_len`` image tokens: linear from ``base_shift`` at ``base_image_seq_len`` tokens
    to ``max_shift`` at ``max_image_seq_len`` (0.5 at 256, 1.15 at 4096: 1.15 at 1024 x 1024 pixels), as
    ``FluxPipeline`` computes it from the scheduler config. The time shift it stands for is ``exp(mu)``:
    ``exp(mu) / (exp(mu) + 1 / s - 1) = shift s / (1 + (shift - 1) s)`` with ``shift = exp(mu)``."""
    low, high = scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096)
    low_shift, high_shift = scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15)
    slope = (high_shift - low_shift) / (high - low)
    return low_shift + slope * (image_seq_len - low)


class FluxEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` as ``FluxPipeline`` drives it: ``set_timesteps(N)`` places the ``N`` sigmas
    at ``linspace(1, 1/N, N)`` and shifts them by ``mu`` (the attribute, set by
    [`FluxFlowMatchingProcess`][lightning_pref.processes.FluxFlowMatchingProcess]) under ``use_dynamic_shifting``, by
    the config's ``shift`` otherwise (FLUX.1-schnell: 1, no shift)."""

    mu: float | None = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, **options: Any) -> None:
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        super().set_timesteps(sigmas=sigmas, mu=self.mu, device=device, **options)


class FluxFlowMatchingProcess(FlowMatchingProcess):
    """FLUX.1's rectified flow: ``FlowMatchingProcess`` with the shift of the image token count.

    A checkpoint whose scheduler says ``use_dynamic_shifting`` (FLUX.1-dev) shifts the sampler's times by
    ``exp(mu)``, ``mu = image_token_shift(image_seq_len)`` (the resolution-dependent shift of the SD3 paper, Esser et
    al. 2024). Training times get the same shift by default: the training noise levels then follow the
    sampler's at that resolution, as SD3's fixed shift does for SD3 (and as the ``flux_shift`` time sampling of
    kohya-ss/sd-scripts does); ``exp(1.15) = 3.16`` at 1024 x 1024 pixels. Diffusers' DreamBooth-FLUX scripts draw
    unshifted times instead (their dynamic-shifting scheduler keeps its training sigmas unshifted): pass
    ``shift=1.0`` for that. A checkpoint without dynamic shifting (FLUX.1-schnell) uses its config's ``shift`` (1).

    Args:
        scheduler_config: the checkpoint's ``FlowMatchEulerDiscreteScheduler`` config.
        image_seq_len: image tokens (2 x 2 latent patches) at the resolution the sampler generates.
        shift: the training times' shift; ``None``: ``exp(mu)`` under dynamic shifting, else the config's ``shift``.
        options: the other [`FlowMatchingProcess`][lightning_pref.processes.FlowMatchingProcess] options.
    """

    def __init__(
        self, scheduler_config: dict[str, Any], image_seq_len: int, shift: float | None = None, **options: Any
    ):
        dynamic = bool(scheduler_config.get("use_dynamic_shifting", False))
        self.mu = image_token_shift(image_seq_len, scheduler_config) if dynamic else None
        if shift is None:
            shift = math.exp(self.mu) if dynamic else scheduler_config.get("shift", 1.0)
        super().__init__(num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000), shift=shift, **options)
        self.scheduler_config = dict(scheduler_config)

    def sampling_scheduler(self) -> FluxEulerScheduler:
        scheduler = FluxEulerScheduler.from_config(self.scheduler_config)
        scheduler.mu = self.mu
        return scheduler


@dataclass
class DDIMInversion:
    """Every state of a deterministic DDIM inversion of ``B`` samples through ``n`` timesteps.

    ``latents``: ``(B, n + 1, ...)``, ``z_0 = x0, z_1, ..., z_n``; ``noise``: ``(B, n, ...)``, ``e_0 .. e_{n-1}``,
    the noise prediction ``e_i = predict_eps(z_i, t_i)`` that moved ``z_i`` to ``z_{i+1}``; ``timesteps``: ``(n,)``.
    Both fp32.
    """

    latents: Tensor
    noise: Tensor
    timesteps: Tensor


def ddim_invert(
    predict_eps: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    initial_alpha_cumprod: float | None = None,
) -> DDIMInversion:
    """Deterministic DDIM inversion (Song et al., ICLR 2021, Eq. 12 run clean to noisy): ``x0 = z_0 -> ... -> z_n``.

    Step ``i`` (``t_i = timesteps[i]``, increasing; ``a_i = alphas_cumprod[t_i]``; ``a_{-1} = initial_alpha_cumprod``):

        e_i = predict_eps(z_i, t_i)
        z_{i+1} = sqrt(a_i) (z_i - sqrt(1 - a_{i-1}) e_i) / sqrt(a_{i-1}) + sqrt(1 - a_i) e_i

    so ``z_{i+1}`` is at the noise level of ``t_i``, while ``e_i`` is predicted at ``t_i`` from ``z_i`` (one level
    below): DDIM sampling through the same timesteps undoes every step exactly when the noise prediction does not
    depend on its input, and up to ``predict_eps(z_{i+1}, t_i) - predict_eps(z_i, t_i)`` otherwise.

    It is diffusers' ``DDIMInverseScheduler.step`` with ``clip_sample=False`` (its default ``True`` clamps the clean
    estimate to [-1, 1], which latents exceed), on the timesteps of ``set_timesteps`` with
    ``timestep_spacing="leading"`` and ``steps_offset=0``
    ([`DDPMProcess.ddim_inversion_timesteps`][lightning_pref.processes.DDPMProcess.ddim_inversion_timesteps]), and
    ``a_{-1}``:

    * ``None`` (default): ``alphas_cumprod[0]``, ``DDIMInverseScheduler(set_alpha_to_one=False)``, as
      Inversion-DPO's released code (``train_ddim.py``, ``_next_step_scheduler``). With ``t_0 = 0`` the first step
      then maps ``a_{-1} = a_0`` to ``a_0``: it is the identity, ``z_1 = z_0`` exactly;
    * ``1.0``: the scheduler's default ``set_alpha_to_one=True``, whose first step adds ``t_0``'s noise.

    The step is computed here rather than by the scheduler so that any DDPM process's ``alphas_cumprod`` applies
    (CogVideoX's SNR-shifted schedule, which ``DDIMInverseScheduler`` would rebuild without the shift, included).
    Classifier-free guidance, v prediction and the reference network are the caller's ``predict_eps``. The
    coefficients are computed in float64, the states in fp32.

    Args:
        predict_eps: ``(z, t) -> eps``, with ``z`` of ``x0``'s shape and ``t`` the ``(B,)`` process times.
        x0: clean samples, ``(B, ...)``.
        timesteps: increasing process times, ``(n,)``.
        alphas_cumprod: the schedule's ``abar``, indexed by process time.
        initial_alpha_cumprod: ``a_{-1}``, the level the first step starts from.

    Returns:
        A [`DDIMInversion`][lightning_pref.processes.DDIMInversion].

    Example:
        >>> process = DDPMProcess({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
        >>> x0 = torch.zeros(1, 4, 2, 2)
        >>> steps = process.ddim_inversion_timesteps(4)   # 0, 250, 500, 750
        >>> inversion = ddim_invert(lambda z, t: torch.ones_like(z), x0, steps, process.alphas_cumprod)
        >>> inversion.latents.shape, bool((inversion.latents[:, 1] == x0).all())   # the first step is the identity
        (torch.Size([1, 5, 4, 2, 2]), True)
        >>> exact = ddim_invert(lambda z, t: torch.ones_like(z), x0, steps, process.alphas_cumprod, 1.0)
        >>> exact.latents[0, :, 0, 0, 0]   # a constant prediction e = 1 from a_{-1} = 1: z_{i+1} = sqrt(1 - a_i)
        tensor([0.0000, 0.0292, 0.5711, 0.8507, 0.9715])
    """
    abar = alphas_cumprod.to(torch.float64).cpu()
    levels = abar[timesteps.cpu().long()].tolist()
    first = abar[0].item() if initial_alpha_cumprod is None else initial_alpha_cumprod
    z = x0.float()
    latents, noise = [z], []
    for t, a_prev, a_next in zip(timesteps, [first, *levels[:-1]], levels):
        eps = predict_eps(z, t.expand(z.shape[0])).float()
        scale = math.sqrt(a_next / a_prev)
        z = scale * z + (math.sqrt(1 - a_next) - scale * math.sqrt(1 - a_prev)) * eps
        latents.append(z)
        noise.append(eps)
    return DDIMInversion(torch.stack(latents, 1), torch.stack(noise, 1), timesteps)
