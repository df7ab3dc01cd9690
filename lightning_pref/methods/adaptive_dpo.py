"""Adaptive-DPO (Zhang et al., arXiv 2503.16921): Diffusion-DPO that down-weights the pairs whose labels look
like a minority's, judged by EMAs of the model being trained. METHODS.md section 5, ``[code]``: read in the
authors' released training script."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_pref.backbones.base import Conditioning
from lightning_pref.batch import LABEL_FLIPPED
from lightning_pref.errors import CheckpointError, ConfigError, check_whole_numbers
from lightning_pref.losses.adaptive_dpo import (
    AdaptiveLossKind,
    MarginKind,
    WeightKind,
    adaptive_dpo_loss,
    check_adaptive_dpo_options,
)
from lightning_pref.methods.base import PreferenceDiffusionModule
from lightning_pref.methods.step import NoisySamples, SampleErrors, mean_squared_error
from lightning_pref.reference import EMACopies, check_ema_decays

#: the checkpoint entry holding the EMA annotators
ANNOTATORS_KEY = "adaptive_dpo_annotators"


@dataclass
class AnnotatedErrors(SampleErrors):
    """[`SampleErrors`][lightning_pref.methods.step.SampleErrors] plus the EMA annotators' per-row errors,
    ``(len(annotator_decays), 2B)`` and detached, or ``None`` during the warm-up."""

    annotators: Tensor | None = None


class AdaptiveDPO(PreferenceDiffusionModule):
    """Adaptive-DPO ``[code]``. Per step, for ``B`` pairs sharing a timestep and a noise draw each:

    1. the policy's logit ``h = D_ref - D_theta`` (the reference: adapters disabled under LoRA, a frozen copy
       in a full fine-tune);
    2. the *annotators*: the policy and EMAs of its trained weights
       ([`EMACopies`][lightning_pref.reference.EMACopies], decays 0.9999 and 0.5, updated after every
       optimizer step), each predicting on the same noisy inputs without gradient: ``h_m = D_ref - D_m``;
    3. the minority metric ``u_min`` of each pair from the annotators' logits, the weight
       ``w = 1 / (c1 + k1 u_min)`` and the margin ``gamma = mean_B(h) - u_min^2 / beta``;
    4. ``L = mean[-w log sigmoid(beta h - gamma)]``
       ([`adaptive_dpo_loss`][lightning_pref.losses.adaptive_dpo.adaptive_dpo_loss]).

    **Warm-up.** During the first ``annotator_warmup_steps`` optimizer steps of the run, ``u_min = 0`` (``w = 1``,
    ``gamma = mean_B(h)``) and the EMA forwards are skipped. The released code counts its warm-up in
    micro-batches *of each epoch* (``step >= 2 x gradient_accumulation_steps``, with ``step`` the epoch's batch
    index). That is 2 optimizer steps, repeated at the start of every epoch. Here the count is in optimizer steps
    and covers the start of the run only, so gradient accumulation, the epoch length and a resume do not change it.

    **Units.** ``beta`` has no 0.5 factor (the released ``beta_dpo``): Adaptive-DPO's 1000 is this library's
    Diffusion-DPO ``beta = 2000``. The logged ``reward_margin`` is ``beta * h``.

    Cost: one policy forward and backward, one reference forward, and one forward per EMA annotator (none in
    the warm-up) per step. Memory: with LoRA one extra adapter per EMA; in a full fine-tune one float32 copy
    of the denoiser per EMA. The EMAs need whole trained weights on every rank: one process, DDP and DeepSpeed
    ZeRO-2 work, ZeRO-3 and FSDP2 are refused at fit start. ``entropy_gamma`` is refused, because the annotators
    compare with the true reference.

    Args:
        beta: 1000 (the authors' SD1.5 recipe; no 0.5 factor).
        annotator_decays: one EMA annotator per decay (0.9999 and 0.5).
        annotator_warmup_steps: optimizer steps with ``u_min = 0`` at the start of the run (2: the released code's
            2 x accumulation micro-batches).
        rho: the logit scale of the minority metric (15).
        normalize_logits: divide each annotator's logits by their L2 norm over the batch first (on; the
            batch needs two or more pairs per process).
        weight_intercept, weight_scale: ``c1`` and ``k1`` of the weight (1 and 10).
        weighting: ``linear`` (``1 / (c1 + k1 u_min)``, the recipe) or ``quadratic`` (``u_min^2``).
        margin: ``quadratic`` (``- u_min^2 / beta``, the recipe), ``linear`` (``- u_min / beta``) or ``none``.
        loss_type: ``sigmoid`` (the recipe) or ``ipo``.
        ipo_beta: the IPO form's strength (100, the released code's default).
        **kwargs: the options of [`PreferenceDiffusionModule`][lightning_pref.methods.base.PreferenceDiffusionModule].

    The recipe (the authors' README): SD1.5, LoRA rank 8, lr 1e-5, no lr warm-up, batch 16 per GPU, gradient
    accumulation 2, one epoch. Every other option stays at its default.
    """

    def __init__(
        self,
        *args: Any,
        beta: float = 1000.0,
        annotator_decays: tuple[float, ...] = (0.9999, 0.5),
        annotator_warmup_steps: int = 2,
        rho: float = 15.0,
        normalize_logits: bool = True,
        weight_intercept: float = 1.0,
        weight_scale: float = 10.0,
        weighting: WeightKind = "linear",
        margin: MarginKind = "quadratic",
        loss_type: AdaptiveLossKind = "sigmoid",
        ipo_beta: float = 100.0,
        **kwargs: Any,
    ):
        check_ema_decays(annotator_decays, "annotator_decays")
        check_whole_numbers(0, annotator_warmup_steps=annotator_warmup_steps)
        check_adaptive_dpo_options(rho, weight_intercept, weight_scale, weighting, margin, loss_type, ipo_beta)
        if kwargs.get("entropy_gamma"):
            raise ConfigError(
                "entropy_gamma flattens the reference, and AdaptiveDPO's annotators compare with the true one: "
                "remove entropy_gamma."
            )
        super().__init__(*args, beta=beta, **kwargs)
        self.annotator_warmup_steps = annotator_warmup_steps
        self.loss_options = dict(
            rho=rho,
            normalize=normalize_logits,
            weight_intercept=weight_intercept,
            weight_scale=weight_scale,
            weighting=weighting,
            margin=margin,
            loss_type=loss_type,
            ipo_beta=ipo_beta,
        )
        #: the EMA annotators (a plain attribute, not a submodule: outside the optimizer)
        self.annotators = EMACopies(self.denoiser, annotator_decays, lora=self.finetune == "lora")

    # ------------------------------------------------------------------------------------- the step
    def annotating(self) -> bool:
        """Whether this step runs the EMA annotators (after the warm-up)."""
        return self.global_step >= self.annotator_warmup_steps

    def sample_errors(self, noisy: NoisySamples, conditioning: Conditioning, batch: dict[str, Any]) -> AnnotatedErrors:
        """The base's policy and reference errors, and after the warm-up each EMA annotator's errors on the same
        noisy inputs (one forward each, without gradient, with the policy's conditioning)."""
        errors = super().sample_errors(noisy, conditioning, batch)
        annotators = None
        if self.annotating():
            model_t = self.process.model_timesteps(noisy.timesteps)
            policy_conditioning = self.policy_conditioning(conditioning, batch)
            annotators = torch.stack(
                [
                    mean_squared_error(
                        self.annotators.predict(index, self.backbone, noisy.x_t, model_t, policy_conditioning),
                        noisy.target,
                    )
                    * noisy.error_weight
                    for index in range(len(self.annotators.decays))
                ]
            )
        fields = {field.name: getattr(errors, field.name) for field in dataclasses.fields(errors)}
        return AnnotatedErrors(**fields, annotators=annotators)

    def compute_loss(self, errors: AnnotatedErrors, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        annotators = (None, None) if errors.annotators is None else errors.annotators.split(errors.num_pairs, dim=1)
        return adaptive_dpo_loss(
            *errors.as_args(),
            *annotators,  # the annotators' errors of winners and losers, each (len(annotator_decays), B)
            beta=self.beta,
            flipped=batch.get(LABEL_FLIPPED),
            **self.loss_options,
        )

    # ------------------------------------------------------------------------- the annotators' life
    def _apply(self, fn, *args, **kwargs):
        # Device moves reach the EMA copies too; the averages stay float32.
        super()._apply(fn, *args, **kwargs)
        if getattr(self, "annotators", None) is not None:
            self.annotators.apply(fn)
        return self

    def on_fit_start(self) -> None:
        """The base's reference placement; then refuse strategies that partition the trained weights, and cast back
        to float32 the averages a strategy cast (DeepSpeed's bfloat16 engine casts every parameter it wraps)."""
        super().on_fit_start()
        self.annotators.check_strategy()
        self.annotators.keep_float32()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's optimizer step, then one EMA update of every annotator."""
        super().optimizer_step(*args, **kwargs)
        self.annotators.update()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The base's trained weights, and the annotators (plain CPU tensors) under ``adaptive_dpo_annotators``."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[ANNOTATORS_KEY] = self.annotators.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The base's checks, then the annotators as they were when the checkpoint was written."""
        super().on_load_checkpoint(checkpoint)
        if ANNOTATORS_KEY not in checkpoint:
            raise CheckpointError(
                f"the checkpoint has no '{ANNOTATORS_KEY}': it was not written by AdaptiveDPO, so its EMA annotators "
                "are unknown. Start a new run without --ckpt_path."
            )
        self.annotators.load_state_dict(checkpoint[ANNOTATORS_KEY])
