"""The shared base of every preference method: one training step, read top to bottom.

``PreferenceDiffusionModule.training_step`` does, for a batch of ``B`` preference pairs:

1. ``prepare_samples`` -- the clean latents of winners and losers, stacked once as ``[winners; losers]``
   (``2B`` rows, one encoder call), and each pair's prompt conditioning for its two rows (encoders skipped
   when the batch carries precomputed tensors; caption dropout here): a
   [`Samples`][lightning_pref.methods.step.Samples]. Methods whose loss takes single labelled samples
   (Diffusion-KTO) also accept unpaired batches here.
2. ``noise_samples`` -- one timestep and one noise draw per pair, shared by its winner and loser; ``x_t``, the
   target and the process's loss weight of every row: a
   [`NoisySamples`][lightning_pref.methods.step.NoisySamples].
3. ``sample_errors`` -- one policy forward (with grad) and one reference forward (no grad) over all rows;
   per-row errors, split into winners and losers in one place: a
   [`SampleErrors`][lightning_pref.methods.step.SampleErrors].
4. ``compute_loss`` -- the method's objective, from [`lightning_pref.losses`][lightning_pref.losses].

Nothing of a step is kept on the module between these hooks: each returns what the next needs. A method
subclasses this module and overrides only the hook where it differs from Diffusion-DPO: the loss (most
methods), the noising (Inversion-DPO), the conditioning (``policy_conditioning``, PPD), where the samples
come from (``prepare_samples``, SPIN-Diffusion, SSPO) or what the reference is (``reference`` and
``reference_prediction``, SPIN-Diffusion, SSPO, Adaptive-DPO).

Two options apply to every pairwise method, around its loss rather than inside it:

* ``loser_safeguard`` (Diffusion-SDPO, arXiv 2511.03317): ``sample_errors`` scales the gradient of the
  losers' errors by ``lambda`` ([`loser_gradient_scale`][lightning_pref.losses.loser_gradient_scale]), so an
  update never raises the winner's error to first order; the loss value is unchanged. Logged as
  ``loser_gradient_scale``.
* ``entropy_gamma`` (SEE-DPO, arXiv 2411.04712): ``compute_loss`` sees the reference errors flattened by the
  self-entropy term ([`entropy_regularized_reference`][lightning_pref.losses.entropy_regularized_reference]),
  which turns every margin ``u`` into ``u - (gamma/2) D_theta``; the logged error metrics stay those of the
  true reference.

The reference model is a component of its own ([`lightning_pref.reference`][lightning_pref.reference]):
with ``finetune="lora"`` the same network with its adapters disabled (no second copy; checkpoints hold the
adapter weights only), with ``finetune="full"`` a frozen copy outside the optimizer and the checkpoints,
optionally CPU-offloaded (``reference_offload``), partitioned under ZeRO-3 and sharded under FSDP2. Either
can be replaced while training by a snapshot of earlier weights (``reference.install(trained_weights())``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from peft import LoraConfig
from torch import Tensor, nn

from lightning_pref.backbones.base import Backbone, Conditioning, concat_conditioning
from lightning_pref.batch import LATENTS, PIXELS, WINNER, batch_size_of, media_field, pair_media, sample_media
from lightning_pref.beta import AutoBeta, beta_equivalents
from lightning_pref.errors import CheckpointError, ConfigError, DataError, TrainingError
from lightning_pref.generation import evaluating, generate
from lightning_pref.losses import (
    check_entropy_gamma,
    check_safeguard_options,
    entropy_regularized_reference,
    error_metrics,
    loser_gradient_scale,
    scale_gradient,
)
from lightning_pref.methods.options import (
    apply_optimizer_options,
    changed_optimizer_entries,
    check_resumed_options,
    check_training_options,
)
from lightning_pref.methods.step import NoisySamples, SampleErrors, Samples, mean_squared_error
from lightning_pref.pair_sources import PAIR_SOURCE_KEY, PairSource
from lightning_pref.reference import AdaptersDisabled, FrozenCopy, Reference
from lightning_pref.seeding import PairRandomness
from lightning_pref.strategies import fully_shard_blocks, mean_across_ranks

log = logging.getLogger(__name__)

#: the checkpoint entry holding ``auto_beta``'s current beta (a float)
AUTO_BETA_KEY = "auto_beta"


class PreferenceDiffusionModule(pl.LightningModule):
    """Base LightningModule of preference optimization for diffusion models.

    Args:
        backbone: the model family and checkpoint ([`lightning_pref.backbones`][lightning_pref.backbones.base]).
        beta: KL strength of the objective, in the official Diffusion-DPO units.
        finetune: ``lora`` (reference = adapters disabled) or ``full`` (reference = frozen copy).
        lora_rank, lora_alpha, lora_dropout: LoRA shape; ``lora_alpha`` defaults to the rank.
        lora_target_modules: module names to adapt; defaults to the backbone's attention projections.
        reference_offload: with ``finetune="full"``, keep the frozen reference on the CPU between forwards.
        gradient_checkpointing: trade compute for activation memory in the denoiser; ``None``: the backbone's
            default (on for SD3 and the video transformers, off for SD1.5/SDXL).
        optimizer: ``adamw`` (SD1.5 recipe) or ``adafactor`` (SDXL recipe).
        lr: learning rate; with ``scale_lr`` it is multiplied by the pairs per optimizer step
            (per-device batch x devices x nodes x accumulation), Diffusion-DPO's ``1e-8 x 2048`` recipe.
        weight_decay, adam_betas: optimizer options.
        warmup_steps: linear warm-up, then constant (Diffusion-DPO: 500 for SD1.5, 200 for SDXL).
        caption_dropout: probability of training a pair on the empty prompt (Diffusion-DPO: 0.2).
        seed: seeds the per-step noise, so a resumed run draws what the uninterrupted run would have.
        loser_safeguard: scale the loser branch's gradient so the winner's error never rises to first order
            (Diffusion-SDPO ``[code]``); pairwise methods only.
        safeguard_mu: the safeguard's margin ``mu`` in [0, 1] (0.9 in the authors' scripts).
        safeguard_scope: ``batch`` (one ``lambda`` per micro-batch, the official code) or ``pair``.
        entropy_gamma: SEE-DPO's self-entropy weight ``gamma`` (beta's units; 0 = off; ``gamma / beta`` in
            0.05..0.5 to start) ``[reconstructed]``; pairwise methods with a reference only.
        nonfinite: what a NaN or infinite loss or gradient does: ``stop`` the run with an error naming the step
            and the term, before the optimizer touches the weights (default), or ``skip`` that optimizer step
            (logged as ``train/skipped_step``). Under DeepSpeed only the loss is checked (ZeRO holds the gradients).
        stratified_timesteps: draw the pairs' timesteps from equal strata of the schedule, one per pair of the
            global batch, instead of independently: the same distribution and expected loss, a lower-variance
            gradient ([`PairRandomness.timesteps`][lightning_pref.seeding.PairRandomness.timesteps]).
        pair_source: make the pairs during training from the batch's prompts instead of reading them from
            shards ([`lightning_pref.pair_sources`][lightning_pref.pair_sources]); pairwise methods only.
        auto_beta: after every optimizer step, move ``beta`` so that the mean ``sigmoid(-u)`` of the DPO logit
            (the loss's ``gradient_factor``) approaches ``auto_beta_target``
            ([`AutoBeta`][lightning_pref.beta.AutoBeta]); methods whose loss is ``-log sigmoid(u)`` of Diffusion-DPO's
            logit only. The current beta is logged (``train/beta``) and checkpointed.
        auto_beta_target, auto_beta_rate: the wanted mean ``sigmoid(-u)`` in (0, 0.5] and the step of ``log beta``
            per unit of its error.
        auto_beta_min, auto_beta_max: the range of ``beta``; ``None``: ``beta / 10`` and ``beta * 10``.
    """

    #: prediction types (``epsilon``, ``v_prediction``, ``flow``) the method is defined for; ``None``: all.
    supported_prediction_types: tuple[str, ...] | None = None
    #: whether the method needs a reference model at all (MaPO does not).
    uses_reference: bool = True
    #: the ``finetune`` choices: which weights train (PPD trains a ``user_branch`` of its own instead)
    finetune_modes: tuple[str, ...] = ("lora", "full")
    #: whether the loss compares a winner with a loser (Diffusion-KTO does not): the safeguard and the
    #: entropy regulariser need it.
    pairwise: bool = True
    #: whether the loss also takes unpaired labelled samples (``pixels``/``latents`` and ``label``)
    takes_unpaired_samples: bool = False
    #: whether the loss is ``-log sigmoid`` of Diffusion-DPO's logit ``u`` and reports ``gradient_factor``, the mean
    #: ``sigmoid(-u)`` that ``auto_beta`` steers
    reports_gradient_factor: bool = False

    def __init__(
        self,
        backbone: Backbone,
        beta: float = 5000.0,
        finetune: Literal["lora", "full"] = "lora",
        lora_rank: int = 8,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        reference_offload: bool = False,
        gradient_checkpointing: bool | None = None,
        optimizer: Literal["adamw", "adafactor"] = "adamw",
        lr: float = 1e-5,
        scale_lr: bool = False,
        weight_decay: float = 1e-2,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        caption_dropout: float = 0.0,
        seed: int = 0,
        loser_safeguard: bool = False,
        safeguard_mu: float = 0.9,
        safeguard_scope: Literal["batch", "pair"] = "batch",
        entropy_gamma: float = 0.0,
        nonfinite: Literal["stop", "skip"] = "stop",
        stratified_timesteps: bool = False,
        pair_source: PairSource | None = None,
        auto_beta: bool = False,
        auto_beta_target: float = 0.2,
        auto_beta_rate: float = 0.05,
        auto_beta_min: float | None = None,
        auto_beta_max: float | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "pair_source"])
        self.check_backbone(backbone)
        check_training_options(beta, lr, weight_decay, adam_betas, warmup_steps, lora_rank, lora_alpha, lora_dropout)
        if nonfinite not in ("stop", "skip"):
            raise ConfigError(f"nonfinite={nonfinite!r}: choose 'stop' (the default) or 'skip'.")
        if finetune not in self.finetune_modes:
            raise ConfigError(f"finetune={finetune!r}: choose {' or '.join(map(repr, self.finetune_modes))}.")
        if optimizer not in ("adamw", "adafactor"):
            raise ConfigError(f"optimizer={optimizer!r}: choose 'adamw' or 'adafactor'.")
        if reference_offload and finetune != "full":
            raise ConfigError(
                "reference_offload=True needs finetune='full': with LoRA the reference is the same network "
                "with its adapters disabled, so there is no copy to offload."
            )
        if not 0.0 <= caption_dropout < 1.0:
            raise ConfigError(f"caption_dropout={caption_dropout}: use a probability in [0, 1).")
        if auto_beta and not self.reports_gradient_factor:
            raise ConfigError(
                f"auto_beta steers the mean sigmoid(-u) of Diffusion-DPO's logit u, and {type(self).__name__}'s loss "
                "has no such logit: remove auto_beta, or use a method with Diffusion-DPO's sigmoid loss (DiffusionDPO "
                "and its subclasses)."
            )
        self.check_cross_method_options(loser_safeguard, safeguard_mu, safeguard_scope, entropy_gamma)
        self.backbone = backbone
        self.beta = beta
        self.finetune = finetune
        self.reference_offload = reference_offload
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.loser_safeguard = loser_safeguard
        self.safeguard_mu = safeguard_mu
        self.safeguard_scope = safeguard_scope
        self.entropy_gamma = entropy_gamma
        self.nonfinite = nonfinite
        self.stratified_timesteps = stratified_timesteps
        #: steers ``beta`` while training (``auto_beta``), or ``None``
        self.auto_beta = (
            AutoBeta(auto_beta_target, auto_beta_rate, auto_beta_min or beta / 10, auto_beta_max or beta * 10)
            if auto_beta
            else None
        )
        if pair_source is not None and not self.pairwise:
            raise ConfigError(f"{type(self).__name__} does not train on pairs: remove its pair_source.")
        self.pair_source = pair_source.requires_grad_(False) if pair_source is not None else None
        # Only the trained weights go into checkpoints; the frozen parts reload from `backbone`.
        self.strict_loading = False

        self.backbone.requires_grad_(False)
        adapter_config = None
        if finetune == "lora":
            adapter_config = LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha or lora_rank,
                lora_dropout=lora_dropout,
                init_lora_weights="gaussian",
                target_modules=list(lora_target_modules or backbone.lora_target_modules),
            )
            with torch.random.fork_rng(devices=[]):  # the adapters' initial weights depend on `seed` alone
                torch.manual_seed(seed)
                self.denoiser.add_adapter(adapter_config)
        elif finetune == "full":
            self.denoiser.requires_grad_(True)
        #: what the policy is compared with (lightning_pref.reference); a plain attribute, not a submodule
        self.reference: Reference | None = self.build_reference(adapter_config) if self.uses_reference else None
        if backbone.gradient_checkpointing_by_default if gradient_checkpointing is None else gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()

    # ----------------------------------------------------------------------------------------- set-up
    def build_reference(self, adapter_config: LoraConfig | None) -> Reference:
        """The reference of this fine-tuning mode: the adapters disabled (LoRA) or a frozen copy, optionally
        offloaded (full); a method with its own trainable set (PPD's user branch) overrides it."""
        if adapter_config is not None:
            return AdaptersDisabled(self.denoiser, adapter_config)
        return FrozenCopy(self.denoiser, offload=self.reference_offload)

    @property
    def denoiser(self) -> nn.Module:
        return self.backbone.denoiser

    @property
    def process(self):
        return self.backbone.process

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse a backbone whose noise process the method is not defined for."""
        kind = backbone.process.prediction_type
        if self.supported_prediction_types is not None and kind not in self.supported_prediction_types:
            raise ConfigError(
                f"{type(self).__name__} is defined for prediction types {self.supported_prediction_types}, "
                f"but {type(backbone).__name__}({getattr(backbone, 'pretrained', '')!r}) predicts {kind!r}: "
                "choose a backbone with a supported process, or another method."
            )

    def check_cross_method_options(self, safeguard: bool, mu: float, scope: str, gamma: float) -> None:
        """Refuse the safeguard or the entropy regulariser where they are undefined, and bad values."""
        name = type(self).__name__
        if (safeguard or gamma) and not self.pairwise:
            option = "loser_safeguard" if safeguard else "entropy_gamma"
            raise ConfigError(f"{option} applies to pairwise methods only, and {name} is not one: remove the option.")
        if gamma and not self.uses_reference:
            raise ConfigError(
                f"entropy_gamma flattens the reference, and {name} has none: remove the option, or use a "
                "method with a reference (e.g. SEEDPO)."
            )
        check_safeguard_options(mu, scope)
        check_entropy_gamma(gamma)

    def _apply(self, fn, *args, **kwargs):
        # Device and dtype moves reach the reference too (a frozen copy is not a registered submodule).
        super()._apply(fn, *args, **kwargs)
        if getattr(self, "reference", None) is not None:
            self.reference.apply(fn)
        return self

    def setup(self, stage: str) -> None:
        """Single-file checkpoints are written atomically ([`AtomicCheckpointIO`][lightning_pref.checkpoints.AtomicCheckpointIO])
        unless the run brings its own checkpoint writer (DeepSpeed and FSDP2 write their own directories)."""
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        from lightning_pref.checkpoints import AtomicCheckpointIO

        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()

    # ----------------------------------------------------------------------------------- sharding
    def configure_model(self) -> None:
        """FSDP2 (``ModelParallelStrategy``): shard the denoiser block by block; other strategies: nothing."""
        from lightning.pytorch.strategies import ModelParallelStrategy
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self.trainer.strategy, ModelParallelStrategy) and not isinstance(self.denoiser, FSDPModule):
            fully_shard_blocks(self.denoiser, self.device_mesh["data_parallel"])

    def on_fit_start(self) -> None:
        """Log (rank zero) what ``beta`` is in other tools' units for this backbone's latent
        ([`beta_equivalents`][lightning_pref.beta.beta_equivalents]); partition a full fine-tune's frozen reference the
        way the strategy shards the policy ([`shard_reference`][lightning_pref.strategies.shard_reference]): ZeRO-3 and
        FSDP2 never hold a whole copy per rank."""
        if self.uses_reference and self.trainer.is_global_zero:
            log.info("%s", beta_equivalents(self.beta, self.backbone.latent_shape(1)[1:]))
        if self.reference is not None:
            mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
            self.reference.shard(self.trainer.strategy, mesh)

    # ------------------------------------------------------------------------------ the training step
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.preference_step(batch, batch_idx, stage="train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.preference_step(batch, batch_idx, stage="val")

    def preference_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> Tensor:
        random = self.step_randomness(batch, batch_idx, stage)
        batch, random = self.make_pairs(batch, random)
        samples = self.prepare_samples(batch, random)
        noisy = self.noise_samples(samples, random)
        errors = self.sample_errors(noisy, samples.conditioning, batch)
        loss, metrics = self.compute_loss(self.entropy_regularized(errors), batch)
        metrics = {**metrics, **self.cross_method_metrics(errors)}
        if stage == "train" and self.auto_beta is not None:
            metrics["beta"] = self.steer_beta(metrics, batch_idx)
        self.log_metrics(stage, loss, metrics, batch_size=samples.num_pairs or samples.latents.shape[0])
        if stage == "train":
            self.check_finite_loss(loss, errors.named())
        return loss

    def step_randomness(self, batch: dict[str, Any], batch_idx: int, stage: str) -> PairRandomness:
        """Per-pair streams named (seed, stage, optimizer step, micro-batch, the pair's index in the global batch).

        Validation names its streams by batch alone, so every evaluation draws the same noise. (An unpaired
        batch gets one stream per sample.)
        """
        if stage == "train":
            stream = (self.seed, stage, self.global_step, batch_idx % self.trainer.accumulate_grad_batches)
        else:
            stream = (self.seed, stage, batch_idx)
        num_pairs = batch_size_of(batch)
        first = self.global_rank * num_pairs
        return PairRandomness.for_pairs(
            stream, range(first, first + num_pairs), total=num_pairs * self.trainer.world_size
        )

    def make_pairs(self, batch: dict[str, Any], random: PairRandomness) -> tuple[dict[str, Any], PairRandomness]:
        """The batch the step trains on and its rows' streams: with a ``pair_source``, the pairs it makes from
        ``batch`` ([`PairSource.pairs`][lightning_pref.pair_sources.PairSource.pairs]); otherwise ``batch``
        itself (offline pairs)."""
        return (batch, random) if self.pair_source is None else self.pair_source.pairs(self, batch, random)

    def prepare_samples(self, batch: dict[str, Any], random: PairRandomness) -> Samples:
        """The step's clean samples: a pair batch's ``[winners; losers]`` (``prepare_pairs``), or, for a
        method whose loss takes single labelled samples (``takes_unpaired_samples``), an unpaired batch
        (``prepare_unpaired``)."""
        if self.takes_unpaired_samples and pair_media(batch) is None and sample_media(batch) is not None:
            return self.prepare_unpaired(batch, random)
        return self.prepare_pairs(batch, random)

    def prepare_pairs(self, batch: dict[str, Any], random: PairRandomness) -> Samples:
        """Clean latents of winners and losers, stacked once (one encoder call for both), and the
        (caption-dropped) prompt conditioning of each pair, repeated for its two samples."""
        media = pair_media(batch)
        if media is None:
            wanted = "'pixels_w' and 'pixels_l' (or precomputed 'latents_w' and 'latents_l')"
            if self.takes_unpaired_samples:
                wanted += ", or unpaired 'pixels' (or 'latents')"
            raise DataError(
                f"{type(self).__name__} needs {wanted} in the batch, but the batch has {sorted(batch)}: check the "
                "DataModule's output or the shard fields it reads."
            )
        kind, winners, losers = media
        self.backbone.check_batch_media(media_field(kind, WINNER), winners, latents=kind == LATENTS)
        stacked = torch.cat([winners, losers])
        if kind == PIXELS:
            stacked = self.backbone.encode_pixels(stacked, random.generators * 2)
        conditioning = self.prompt_conditioning(batch, random)
        return Samples(stacked, concat_conditioning([conditioning, conditioning]), num_pairs=winners.shape[0])

    def prepare_unpaired(self, batch: dict[str, Any], random: PairRandomness) -> Samples:
        """Clean latents of unpaired samples and their prompt conditioning."""
        kind, samples = sample_media(batch)
        self.backbone.check_batch_media(kind, samples, latents=kind == LATENTS)
        latents = self.backbone.encode_pixels(samples, random.generators) if kind == PIXELS else samples
        return Samples(latents, self.prompt_conditioning(batch, random), num_pairs=None)

    def prompt_conditioning(self, batch: dict[str, Any], random: PairRandomness) -> Conditioning:
        """The batch's prompt conditioning, each row replaced by the empty prompt's with ``caption_dropout``."""
        conditioning = self.backbone.conditioning_for(batch)
        if self.caption_dropout > 0 and self.training:
            conditioning = self.backbone.drop_prompts(conditioning, random.uniform() < self.caption_dropout)
        return conditioning

    def noise_samples(self, samples: Samples, random: PairRandomness) -> NoisySamples:
        """One (t, eps) per pair, shared by its winner and loser (METHODS.md, shared notation), or per unpaired
        sample; ``x_t``, the target and the process's loss weight of every row."""
        t = random.timesteps(self.process, stratified=self.stratified_timesteps).to(samples.latents.device)
        noise = random.normal(tuple(samples.latents.shape[1:])).to(samples.latents)
        if samples.num_pairs is not None:
            t, noise = t.repeat(2), noise.repeat(2, *([1] * (noise.ndim - 1)))
        x0 = samples.latents
        return NoisySamples(
            self.process.add_noise(x0, noise, t),
            self.process.target(x0, noise, t),
            noise,
            t,
            self.process.error_weight(t).to(x0.device),
        )

    def sample_errors(self, noisy: NoisySamples, conditioning: Conditioning, batch: dict[str, Any]) -> SampleErrors:
        """Per-row errors of the policy (with grad) and the reference (no grad), one forward each over all rows."""
        model_t = self.process.model_timesteps(noisy.timesteps)
        prediction = self.backbone.predict(
            self.denoiser, noisy.x_t, model_t, self.policy_conditioning(conditioning, batch)
        )
        squared = mean_squared_error(prediction, noisy.target)
        policy = squared * noisy.error_weight
        num_pairs = len(noisy.timesteps) // 2 if pair_media(batch) is not None else None
        loser_scale = None
        if self.loser_safeguard and num_pairs is not None:
            policy, loser_scale = self.safeguard_loser(prediction, noisy, policy, num_pairs)
        if self.reference is None:
            reference = torch.zeros_like(policy)
        else:
            reference_prediction = self.reference_prediction(
                noisy.x_t, model_t, self.reference_conditioning(conditioning, batch)
            )
            reference = mean_squared_error(reference_prediction, noisy.target) * noisy.error_weight
        return SampleErrors(policy, reference, squared.detach(), noisy, num_pairs, loser_scale)

    def compute_loss(self, errors: SampleErrors, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The method's objective. Returns the scalar loss and the metrics to log."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss().")

    # ------------------------------------------------------------------------ cross-method options
    def safeguard_loser(
        self, prediction: Tensor, noisy: NoisySamples, policy: Tensor, num_pairs: int
    ) -> tuple[Tensor, Tensor]:
        """The policy's errors with the losers' gradient scaled by the safeguard's ``lambda``, and ``lambda``."""
        residual_w, residual_l = (prediction.detach().float() - noisy.target.float()).split(num_pairs)
        scale = loser_gradient_scale(
            residual_w, residual_l, self.safeguard_mu, self.safeguard_scope, noisy.error_weight[:num_pairs]
        )
        policy_w, policy_l = policy.split(num_pairs)
        return torch.cat([policy_w, scale_gradient(policy_l, scale.to(policy_l.device))]), scale

    def entropy_regularized(self, errors: SampleErrors) -> SampleErrors:
        """The errors ``compute_loss`` sees: with ``entropy_gamma``, SEE-DPO's flattened reference."""
        if not self.entropy_gamma:
            return errors
        ref_w, ref_l = entropy_regularized_reference(*errors.as_args(), beta=self.beta, gamma=self.entropy_gamma)
        return dataclasses.replace(errors, reference=torch.cat([ref_w, ref_l]))

    def steer_beta(self, metrics: dict[str, Tensor], batch_idx: int) -> Tensor:
        """``auto_beta``: returns the beta this step trained with; after the last micro-batch of an optimizer step,
        moves ``beta`` by [`AutoBeta.next_beta`][lightning_pref.beta.AutoBeta.next_beta] on the loss's
        ``gradient_factor`` averaged over the ranks (so every rank holds the same beta)."""
        used = torch.tensor(self.beta)
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self.beta = self.auto_beta.next_beta(self.beta, float(mean_across_ranks(metrics["gradient_factor"])))
        return used

    def cross_method_metrics(self, errors: SampleErrors) -> dict[str, Tensor]:
        """The safeguard's ``lambda``; with ``entropy_gamma``, the error metrics of the true reference."""
        metrics = error_metrics(*errors.as_args()) if self.entropy_gamma else {}
        if errors.loser_gradient_scale is not None:
            metrics["loser_gradient_scale"] = errors.loser_gradient_scale.mean()
        return metrics

    # ----------------------------------------------------------------------------------------- hooks
    def policy_conditioning(self, conditioning: Conditioning, batch: dict[str, Any]) -> Conditioning:
        """Conditioning the policy sees (PPD adds a user embedding here)."""
        return conditioning

    def reference_conditioning(self, conditioning: Conditioning, batch: dict[str, Any]) -> Conditioning:
        """Conditioning the reference sees."""
        return conditioning

    def reference_prediction(self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        """The reference's prediction ([`Reference.predict`][lightning_pref.reference.Reference.predict])."""
        return self.checked_reference().predict(self.backbone, x_t, timesteps, conditioning)

    def reference_denoiser(self) -> contextlib.AbstractContextManager[nn.Module]:
        """The reference network, ready to call on this module's device, for the duration of a ``with`` block."""
        return self.checked_reference().network(self.device)

    def trained_weights(self) -> dict[str, Tensor]:
        """A snapshot of the trained tensors, as CPU copies named as in the denoiser's state dict: the adapters'
        weights under LoRA, the whole denoiser in a full fine-tune. ``self.reference.install(snapshot)`` makes
        them the reference."""
        if self.finetune == "lora":
            return {
                name: p.detach().to("cpu", copy=True) for name, p in self.denoiser.named_parameters() if p.requires_grad
            }
        return {name: value.detach().to("cpu", copy=True) for name, value in self.denoiser.state_dict().items()}

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        source: Literal["policy", "reference"] = "policy",
        **settings: Any,
    ) -> Tensor:
        """Samples of ``prompts`` from the policy or from the reference (whatever weights are installed in it), in
        eval mode, restoring the train mode and the adapters afterwards; ``settings``: those of
        [`generation.generate`][lightning_pref.generation.generate] (steps, guidance, batch size, ``decode``)."""
        if source not in ("policy", "reference"):
            raise ConfigError(f"source={source!r}: generate from 'policy' or 'reference'.")
        network = self.reference_denoiser() if source == "reference" else contextlib.nullcontext(self.denoiser)
        with evaluating(self), network as denoiser:
            return generate(self.backbone, prompts, seeds, denoiser=denoiser, **settings)

    def checked_reference(self) -> Reference:
        if self.reference is None:
            raise RuntimeError(
                f"{type(self).__name__} is reference-free: it keeps no reference network. Load the base model "
                "from its pipeline (type(module.backbone)(module.backbone.pretrained)) to compare with it."
            )
        return self.reference

    def configure_callbacks(self) -> list[pl.Callback]:
        """A checkpoint on SIGTERM ([`SaveOnSigterm`][lightning_pref.callbacks.SaveOnSigterm]) unless the run has one."""
        from lightning_pref.callbacks import SaveOnSigterm

        if any(isinstance(callback, SaveOnSigterm) for callback in self.trainer.callbacks):
            return []
        return [SaveOnSigterm()]

    # ------------------------------------------------------------------------------ non-finite values
    def check_finite_loss(self, loss: Tensor, terms: dict[str, Tensor]) -> None:
        """Stop (``nonfinite="stop"``) on a NaN or infinite loss, naming the step and the non-finite error terms;
        with ``skip`` the step's gradients are dropped in ``on_before_optimizer_step``."""
        if bool(torch.isfinite(loss)):
            return
        bad = [
            f"{name} ({int((~torch.isfinite(value)).sum())} of {value.numel()})"
            for name, value in terms.items()
            if not bool(torch.isfinite(value).all())
        ]
        cause = (
            f"non-finite errors: {', '.join(bad)}; the inputs or the weights hold NaN/Inf (a corrupt latent, "
            "or a learning rate that blew the weights up)"
            if bad
            else f"every error is finite, so the loss's own options overflow (beta={self.beta})"
        )
        message = f"step {self.global_step}: the loss is {loss.item()}, {cause}."
        if self.nonfinite == "stop":
            raise TrainingError(
                f"{message} Stopped before the optimizer step; `nonfinite: skip` skips such steps instead."
            )
        log.warning("%s The optimizer step is skipped.", message)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Before every optimizer step (and before gradient clipping): a NaN or infinite gradient stops the run or
        (``nonfinite="skip"``) removes every gradient, so the optimizer leaves the weights and its state alone."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params or bool(torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params]))):
            return
        first = next(
            name for name, p in self.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        )
        if self.nonfinite == "stop":
            raise TrainingError(
                f"step {self.global_step}: the gradient of {first} holds NaN/Inf; stopped before the optimizer step "
                "(check the data and the learning rate; `nonfinite: skip` skips such steps instead)."
            )
        log.warning(
            "step %d: the gradient of %s holds NaN/Inf; this optimizer step is skipped.", self.global_step, first
        )
        for param in params:
            param.grad = None
        self.log("train/skipped_step", 1.0, on_step=True, on_epoch=False)

    # --------------------------------------------------------------------------------------- logging
    def logs_this_step(self) -> bool:
        """Whether the logger writes this training step's values: every ``trainer.log_every_n_steps`` optimizer
        steps (Lightning's own rule). Per-step values are logged only then (and the loss at every step while a
        progress bar shows it), since each value logged costs Lightning about a millisecond, which on a small model
        is a few percent of the step."""
        trainer = self._trainer
        if trainer is None:  # outside a fit (a step called by hand): nothing is logged
            return False
        every = trainer.log_every_n_steps
        return bool(trainer.fast_dev_run) or (bool(every) and (self.global_step + 1) % every == 0)

    def log_metrics(self, stage: str, loss: Tensor, metrics: dict[str, Tensor], batch_size: int) -> None:
        """Validation: the loss and the metrics. Training: the loss at every step while a progress bar shows it,
        and, on the steps the logger writes (``logs_this_step``), the loss and the metrics."""
        on_step = stage == "train"
        logs = not on_step or self.logs_this_step()
        if logs or self.trainer.progress_bar_callback is not None:
            self.log(
                f"{stage}/loss",
                loss.detach(),
                prog_bar=True,
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=batch_size,
            )
        if not logs:
            return
        self.log_dict(
            {f"{stage}/{name}": value for name, value in metrics.items()},
            prog_bar=False,
            on_step=on_step,
            on_epoch=not on_step,
            batch_size=batch_size,
        )

    # ------------------------------------------------------------------------- optimizer, checkpoints
    def pairs_per_optimizer_step(self) -> int:
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if batch_size is None:
            raise ConfigError(
                "scale_lr=True needs the pairs per optimizer step: use a DataModule with a `batch_size` "
                "attribute, or set scale_lr: false and give the final lr."
            )
        return batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def optimizer_options(self) -> dict[str, Any]:
        """What the optimizer's parameter groups hold: ``lr`` (times the pairs per step with ``scale_lr``),
        ``weight_decay`` and, for AdamW, ``betas``."""
        hp = self.hparams
        options = {
            "lr": hp.lr * self.pairs_per_optimizer_step() if hp.scale_lr else hp.lr,
            "weight_decay": hp.weight_decay,
        }
        if hp.optimizer == "adamw":
            options["betas"] = tuple(hp.adam_betas)
        return options

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, **self.optimizer_options())
        else:
            from transformers.optimization import Adafactor

            optimizer = Adafactor(
                params, **self.optimizer_options(), scale_parameter=False, relative_step=False, warmup_init=False
            )
        warmup = self.hparams.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def trained_state_keys(self) -> set[str]:
        """State-dict keys a checkpoint must hold: trainable parameters (and, for full fine-tuning, the
        denoiser's buffers). Frozen encoders and the base weights under LoRA reload from the backbone."""
        keys = {name for name, param in self.named_parameters() if param.requires_grad}
        if self.finetune == "full":
            keys |= {f"backbone.denoiser.{name}" for name in self.denoiser.state_dict()}
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the trained weights only (and what the ``pair_source`` needs to resume), and refuse to write any
        that are NaN or infinite."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self.auto_beta is not None:
            checkpoint[AUTO_BETA_KEY] = float(self.beta)
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            return  # FSDP2's distributed checkpoint reloads the whole module, sharded: keep every key
        if self.pair_source is not None and (state := self.pair_source.checkpoint_state()):
            checkpoint[PAIR_SOURCE_KEY] = state
        keep = self.trained_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        for key, value in checkpoint["state_dict"].items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise TrainingError(
                    f"step {self.global_step}: refusing to write a checkpoint whose {key} holds NaN/Inf (the last "
                    "finite checkpoint is kept); lower the learning rate or check the data."
                )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume with this run's config: refuse a checkpoint trained with tensors of another shape, apply (and
        log) harmless differences such as ``lr`` or ``beta``, also to the restored optimizer and schedule."""
        changed = check_resumed_options(checkpoint.get("hyper_parameters") or {}, dict(self.hparams))
        if checkpoint.get("optimizer_states") and changed:
            apply_optimizer_options(checkpoint, changed_optimizer_entries(self.optimizer_options(), changed))
        if self.pair_source is not None:
            self.pair_source.restore(self, checkpoint.get(PAIR_SOURCE_KEY, {}))
        if self.auto_beta is not None and AUTO_BETA_KEY in checkpoint:
            self.beta = checkpoint[AUTO_BETA_KEY]  # the steered beta, not the config's starting value
        if "state_dict" not in checkpoint:  # DeepSpeed restores the weights through its engine
            return
        missing = self.trained_state_keys() - set(checkpoint["state_dict"])
        if missing:
            raise CheckpointError(
                f"The checkpoint lacks {len(missing)} trained weights of this module (e.g. {sorted(missing)[:3]}): "
                "it was written by a different configuration (finetune, LoRA rank or target modules). Resume "
                "with the configuration that wrote it."
            )
