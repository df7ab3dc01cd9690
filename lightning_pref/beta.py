"""What this library's ``beta`` is in other tools' units, and ``auto_beta``, which steers it while training.

This library's units (METHODS.md, section 1). The per-sample error is the *mean* over the latent's ``N``
elements, ``err(x) = (1/N) sum_i (f_i - target_i)^2``, and the DPO logit is

    u = -(beta / 2) * (D_theta - D_ref),    D = err(winner) - err(loser),    L = -log sigmoid(u).

Two losses are the same loss when their logits ``u`` are the same function of the predictions. Each mapping
below equates the other tool's logit with ``u``:

* **diffusers' SD research script** (``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``): the
  same mean error, ``logits = ref_diff - model_diff = -(D_theta - D_ref)`` and ``-logsigmoid(beta_dpo * logits)``,
  without the 0.5. Equal logits: ``beta_dpo * (-(D_theta - D_ref)) = -(beta/2) (D_theta - D_ref)``, so
  ``beta_dpo = beta / 2`` (its default 2500 is this library's 5000). diffusers' SDXL script
  (``train_diffusion_dpo_sdxl.py``, ``scale_term = -0.5 * args.beta_dpo``) and the Salesforce code use this
  library's units unchanged. Under the same mapping this library's IPO loss is exactly 1/4 of that script's
  (same minimiser): ours is ``(u/beta - 1/(2 beta))^2 = (logits/2 - 1/(2 beta))^2 = (1/4) (logits - 1/beta)^2``,
  the script's ``(logits - 1/(2 beta_dpo))^2 = (logits - 1/beta)^2``.
* **a summed error** over the latent (SimpleTuner's Flow-DPO, ``norm_type="sum"``, its default:
  ``simpletuner/helpers/distillation/flow_dpo/distiller.py``, logit ``0.5 * beta * margin``). The sum is ``N`` times
  the mean, ``D_sum = N D``, so ``(beta_sum / 2) D_sum = (beta / 2) D`` gives ``beta_sum = beta / N``, with
  ``N`` the element count of one sample's latent (``C x H x W``, or ``C x F x H x W`` for video). Its default 1.0 on
  SD1.5's ``4 x 64 x 64`` latent is this library's 16384.
* **flow_grpo's DPO** (``scripts/train_sd3_dpo.py`` of yifan123/flow_grpo_refactor: ``((pred - target) ** 2)
  .reshape(B, -1).mean(dim=1)`` and ``inside_term = -0.5 * beta * (w_diff - l_diff)``): the same mean error and the
  same 0.5, so ``beta_flow_grpo = beta`` (its ``config/dpo.py`` sets 100).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_pref.errors import ConfigError

#: One training sample's latent, per published checkpoint: ``(C, H, W)`` or ``(C, F, H, W)``, the denoiser's
#: native resolution read from the checkpoints' configs (the sizes a summed error would add up).
PUBLISHED_LATENT_SHAPES: dict[str, tuple[int, ...]] = {
    # runwayml/stable-diffusion-v1-5 unet/config.json: in_channels 4, sample_size 64 (512 px / VAE factor 8)
    "sd1.5": (4, 64, 64),
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: in_channels 4, sample_size 128 (1024 px)
    "sdxl": (4, 128, 128),
    # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json: in_channels 16, sample_size 128
    "sd3": (16, 128, 128),
    # black-forest-labs/FLUX.1-dev: vae/config.json latent_channels 16, 8x (1024 px); the transformer's
    # in_channels 64 are the same 16 x 128 x 128 elements packed 2x2 into 4096 tokens
    "flux.1-dev": (16, 128, 128),
    # THUDM/CogVideoX-5b (and -2b): 49 frames 480x720, VAE 4x in time and 8x in space, 16 channels
    "cogvideox": (16, 13, 60, 90),
    # Wan-AI/Wan2.1-T2V-1.3B/14B-Diffusers: 81 frames 480x832, VAE z_dim 16, 4x in time, 8x in space
    "wan2.1": (16, 21, 60, 104),
    # Wan-AI/Wan2.2-T2V-A14B-Diffusers: the Wan2.1 VAE, 81 frames at 720x1280
    "wan2.2-a14b": (16, 21, 90, 160),
    # Wan-AI/Wan2.2-TI2V-5B-Diffusers: transformer in_channels 48, VAE z_dim 48, 4x in time and 16x in space,
    # 121 frames at 704x1280
    "wan2.2-ti2v-5b": (48, 31, 44, 80),
}


def latent_elements(latent_shape: tuple[int, ...]) -> int:
    """``N``: the element count of one sample's latent (its shape without the batch dimension)."""
    return math.prod(latent_shape)


def diffusers_beta(beta: float) -> float:
    """This library's ``beta`` as diffusers' SD research script's ``--beta_dpo`` (no 0.5 factor): ``beta / 2``."""
    return beta / 2


def summed_error_beta(beta: float, latent_shape: tuple[int, ...]) -> float:
    """This library's ``beta`` on a per-sample error *summed* over a latent of ``latent_shape``: ``beta / N``."""
    return beta / latent_elements(latent_shape)


def flow_grpo_beta(beta: float) -> float:
    """This library's ``beta`` as flow_grpo's DPO ``config.train.beta`` (the same units): ``beta``."""
    return beta


def beta_equivalents(beta: float, latent_shape: tuple[int, ...]) -> str:
    """One line: ``beta`` in this library's units and what it is elsewhere, for a latent of ``latent_shape``.

    Example:
        >>> from lightning_pref.beta import beta_equivalents
        >>> print(beta_equivalents(5000.0, (4, 64, 64)))
        beta 5000 (mean error per latent element, u = -(beta/2)(D_theta - D_ref)) = diffusers' SD research script's beta_dpo 2500 = flow_grpo's beta 5000 = beta 0.3052 on an error summed over the 4x64x64 latent (16384 elements)
    """
    shape = "x".join(map(str, latent_shape))
    return (
        f"beta {beta:.4g} (mean error per latent element, u = -(beta/2)(D_theta - D_ref)) = diffusers' SD research "
        f"script's beta_dpo {diffusers_beta(beta):.4g} = flow_grpo's beta {flow_grpo_beta(beta):.4g} = beta "
        f"{summed_error_beta(beta, latent_shape):.4g} on an error summed over the {shape} latent "
        f"({latent_elements(latent_shape)} elements)"
    )


@dataclass(frozen=True)
class AutoBeta:
    """Steer ``beta`` so that the mean gradient factor ``g = mean sigmoid(-u)`` of the DPO logit approaches ``target``.

    ``sigmoid(-u)`` is how much of a pair's gradient the loss passes on (``d(-log sigmoid(u))/du = -sigmoid(-u)``):
    1/2 at ``u = 0``, near 0 once a pair is won by far. After each optimizer step,

        beta <- clip(beta * exp(rate * (g - target)), min_beta, max_beta),

    with ``g`` averaged over the ranks, so ``beta`` is the same everywhere. While most margins are positive a
    larger ``beta`` lowers ``g``, so ``beta`` rises when ``g > target`` and falls when ``g < target`` and stays
    where ``g = target``. If most margins turn negative (``g > 1/2``), ``g`` rises with ``beta`` and ``beta``
    climbs to ``max_beta``: ``implicit_acc`` then tells that the policy is losing the pairs.

    The idea is SimpleTuner's Flow-DPO ``auto_beta`` (``simpletuner/helpers/distillation/flow_dpo/distiller.py``),
    which sets ``beta = -2 logit(target) / EMA(mean |margin|)`` in closed form every step (EMA decay 0.99,
    target 0.2, beta clipped to [1e-3, 1] on a summed error). This rule differs: it steers the gradient factor
    itself (signed margins, not their magnitude) by a multiplicative step instead of an EMA; its bounds are in this
    library's units; and the current ``beta`` is checkpointed and restored on resume.

    Args:
        target: the wanted mean ``sigmoid(-u)``, in (0, 1/2] (SimpleTuner's default 0.2; 1/2 holds ``beta`` where the
            margins average ``u = 0``).
        rate: the step of ``log beta`` per unit of ``g - target``, per optimizer step.
        min_beta, max_beta: the range ``beta`` stays in.
    """

    target: float
    rate: float
    min_beta: float
    max_beta: float

    def __post_init__(self) -> None:
        if not 0 < self.target <= 0.5:
            raise ConfigError(
                f"auto_beta_target={self.target}: use a mean sigmoid(-u) in (0, 0.5] (0.5: margins around u = 0)."
            )
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ConfigError(f"auto_beta_rate={self.rate}: use a finite number > 0 (e.g. 0.05).")
        if not 0 < self.min_beta <= self.max_beta < math.inf:
            raise ConfigError(
                f"auto_beta_min={self.min_beta}, auto_beta_max={self.max_beta}: use 0 < auto_beta_min <= "
                "auto_beta_max < inf."
            )

    def next_beta(self, beta: float, gradient_factor: float) -> float:
        """``beta`` after one optimizer step whose mean ``sigmoid(-u)`` (over every rank) was ``gradient_factor``.

        Example:
            >>> from lightning_pref.beta import AutoBeta
            >>> steer = AutoBeta(target=0.2, rate=0.1, min_beta=100.0, max_beta=10000.0)
            >>> steer.next_beta(1000.0, 0.2), round(steer.next_beta(1000.0, 0.5), 2)
            (1000.0, 1030.45)
        """
        return min(max(beta * math.exp(self.rate * (gradient_factor - self.target)), self.min_beta), self.max_beta)
