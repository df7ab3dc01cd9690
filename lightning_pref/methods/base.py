"""The shared base of every preference method: one training step, read top to bottom.

``PreferenceDiffusionModule.training_step`` does, for a batch of ``B`` preference pairs:

1. :meth:`~PreferenceDiffusionModule.prepare_pairs` -- clean latents of winners and losers, and the prompt
   conditioning (encoders skipped when the batch carries precomputed tensors; caption dropout here).
2. :meth:`~PreferenceDiffusionModule.noise_pairs` -- one timestep and one noise draw per pair, shared by its
   winner and loser; ``x_t`` and the target for the stacked ``[winners; losers]`` batch.
3. :meth:`~PreferenceDiffusionModule.pair_errors` -- one policy forward (with grad) and one reference forward
   (no grad) over the stacked batch; per-sample errors.
4. :meth:`~PreferenceDiffusionModule.compute_loss` -- the method's objective, from :mod:`lightning_pref.losses`.

A method subclasses this module and overrides only the hook where it differs from Diffusion-DPO: the loss
(most methods), the noising (Inversion-DPO), the conditioning (:meth:`policy_conditioning`, PPD), where the
loser comes from (:meth:`prepare_pairs`, SPIN-Diffusion, SSPO) or what the reference is
(:meth:`reference_prediction`, SPIN-Diffusion, SSPO, Adaptive-DPO).

Two options apply to every pairwise method, around its loss rather than inside it:

* ``loser_safeguard`` (Diffusion-SDPO, arXiv 2511.03317): :meth:`pair_errors` scales the gradient of the
  loser's error by ``lambda`` (:func:`~lightning_pref.losses.loser_gradient_scale`), so an update never
  raises the winner's error to first order; the loss value is unchanged. Logged as ``loser_gradient_scale``.
* ``entropy_gamma`` (SEE-DPO, arXiv 2411.04712): :meth:`compute_loss` sees the reference errors flattened by
  the self-entropy term (:func:`~lightning_pref.losses.entropy_regularized_reference`), which turns every
  margin ``u`` into ``u - (gamma/2) D_theta``; the logged error metrics stay those of the true reference.

The reference model:

* ``finetune="lora"``: LoRA adapters (peft) on the denoiser; the reference is the same network with the
  adapters disabled. No second copy; checkpoints hold the adapter weights only.
* ``finetune="full"``: the whole denoiser trains; the reference is a frozen copy that is not a registered
  submodule, so it is outside the optimizer and never written to a checkpoint. ``reference_offload=True``
  keeps it on the CPU between its forwards.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal

import lightning.pytorch as pl
import torch
from peft import LoraConfig
from torch import Tensor, nn

from lightning_pref.backbones.base import Backbone, Conditioning, concat_conditioning
from lightning_pref.losses import (
    check_entropy_gamma,
    check_safeguard_options,
    entropy_regularized_reference,
    error_metrics,
    loser_gradient_scale,
    scale_gradient,
)
from lightning_pref.seeding import stream_seed
from lightning_pref.strategies import fully_shard_blocks, shard_reference
from lightning_pref.errors import CheckpointError, ConfigError, DataError, TrainingError


log = logging.getLogger(__name__)


def check_training_options(
    beta: float, lr: float, weight_decay: float, adam_betas: tuple[float, float], warmup_steps: int,
    lora_rank: int, lora_alpha: float | None, lora_dropout: float,
) -> None:
    """Refuse options that cannot train: a non-positive or non-finite beta (``beta: 0`` learns nothing,
    ``beta: -1000`` trains toward the losers) or learning rate, and the like."""

    def positive(name: str, value: float) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name}={value!r}: use a finite number > 0.")

    positive("beta", beta)
    positive("lr", lr)
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"weight_decay={weight_decay!r}: use a finite number >= 0.")
    if len(adam_betas) != 2 or not all(0 <= b < 1 for b in adam_betas):
        raise ConfigError(f"adam_betas={adam_betas!r}: use two numbers in [0, 1), e.g. [0.9, 0.999].")
    if warmup_steps < 0:
        raise ConfigError(f"warmup_steps={warmup_steps}: use a number of optimizer steps >= 0.")
    if lora_rank < 1:
        raise ConfigError(f"lora_rank={lora_rank}: use a rank >= 1.")
    if lora_alpha is not None:
        positive("lora_alpha", lora_alpha)
    if not 0 <= lora_dropout < 1:
        raise ConfigError(f"lora_dropout={lora_dropout}: use a probability in [0, 1).")


def batch_size_of(batch: dict[str, Any]) -> int:
    """Pairs in a batch: the length of its first tensor field (or of its prompt list)."""
    for value in batch.values():
        if isinstance(value, Tensor) and value.ndim > 0:
            return value.shape[0]
    return len(batch["prompt"])


class PairRandomness:
    """The random draws of one step, one seeded stream per pair of the *global* batch.

    Pair ``i`` of the global batch draws from ``torch.Generator().manual_seed(stream_seed(*stream, i))``, whatever
    rank it lands on (:func:`~lightning_pref.seeding.stream_seed`): one process with a global batch of ``B`` and
    ``N`` processes with ``B / N`` each draw the same timesteps, noise, caption dropout and VAE posterior
    samples, so their losses agree. A resumed run draws what the uninterrupted run would have.
    """

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators

    @classmethod
    def for_pairs(cls, stream: tuple[Any, ...], pairs: Iterable[int]) -> "PairRandomness":
        """One generator per global pair index in ``pairs``, for the stream named ``stream``."""
        return cls([torch.Generator().manual_seed(stream_seed(*stream, pair)) for pair in pairs])

    def __len__(self) -> int:
        return len(self.generators)

    def uniform(self) -> Tensor:
        """One ``U[0, 1)`` draw per pair, ``(B,)``."""
        return torch.cat([torch.rand(1, generator=g) for g in self.generators])

    def normal(self, shape: tuple[int, ...]) -> Tensor:
        """One standard normal tensor of ``shape`` per pair, ``(B, *shape)``."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators])

    def timesteps(self, process) -> Tensor:
        """One process time per pair, ``(B,)``."""
        return torch.cat([process.sample_timesteps(1, g) for g in self.generators])


@dataclass
class PreferencePairs:
    """Clean latents of ``B`` pairs (``latents_w``, ``latents_l``: ``(B, ...)``) and their conditioning."""

    latents_w: Tensor
    latents_l: Tensor
    conditioning: Conditioning


@dataclass
class NoisyPairs:
    """The stacked ``[winners; losers]`` batch after noising. ``timesteps`` are process times, ``(2B,)``."""

    x_t: Tensor
    target: Tensor
    timesteps: Tensor


@dataclass
class PairErrors:
    """Per-sample errors of the policy and the reference, each ``(B,)``, and each pair's process time.

    ``loser_gradient_scale`` is the safeguard's ``lambda`` per pair when ``loser_safeguard`` is on.
    """

    policy_w: Tensor
    policy_l: Tensor
    ref_w: Tensor
    ref_l: Tensor
    timesteps: Tensor
    loser_gradient_scale: Tensor | None = None

    def as_args(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.policy_w, self.policy_l, self.ref_w, self.ref_l


class PreferenceDiffusionModule(pl.LightningModule):
    """Base LightningModule of preference optimization for diffusion models.

    Args:
        backbone: the model family and checkpoint (:mod:`lightning_pref.backbones`).
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
    """

    #: prediction types (``epsilon``, ``v_prediction``, ``flow``) the method is defined for; ``None``: all.
    supported_prediction_types: tuple[str, ...] | None = None
    #: whether the method needs a reference model at all (MaPO does not).
    uses_reference: bool = True
    #: whether the loss compares a winner with a loser (Diffusion-KTO does not): the safeguard and the
    #: entropy regulariser need it.
    pairwise: bool = True

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
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.check_backbone(backbone)
        check_training_options(beta, lr, weight_decay, adam_betas, warmup_steps, lora_rank, lora_alpha, lora_dropout)
        if nonfinite not in ("stop", "skip"):
            raise ConfigError(f"nonfinite={nonfinite!r}: choose 'stop' (the default) or 'skip'.")
        if finetune not in ("lora", "full"):
            raise ConfigError(f"finetune={finetune!r}: choose 'lora' or 'full'.")
        if optimizer not in ("adamw", "adafactor"):
            raise ConfigError(f"optimizer={optimizer!r}: choose 'adamw' or 'adafactor'.")
        if reference_offload and finetune != "full":
            raise ConfigError(
                "reference_offload=True needs finetune='full': with LoRA the reference is the same network "
                "with its adapters disabled, so there is no copy to offload."
            )
        if not 0.0 <= caption_dropout < 1.0:
            raise ConfigError(f"caption_dropout={caption_dropout}: use a probability in [0, 1).")
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
        # Only the trained weights go into checkpoints; the frozen parts reload from `backbone`.
        self.strict_loading = False

        self.backbone.requires_grad_(False)
        if finetune == "lora":
            with torch.random.fork_rng(devices=[]):  # the adapters' initial weights depend on `seed` alone
                torch.manual_seed(seed)
                self.denoiser.add_adapter(
                    LoraConfig(
                        r=lora_rank,
                        lora_alpha=lora_alpha or lora_rank,
                        lora_dropout=lora_dropout,
                        init_lora_weights="gaussian",
                        target_modules=list(lora_target_modules or backbone.lora_target_modules),
                    )
                )
        else:
            self.denoiser.requires_grad_(True)
        # A plain attribute, not a submodule: outside the optimizer and never in a checkpoint.
        self._reference_copy: nn.Module | None = None
        self._reference_sharded = False  # set once a sharding strategy has partitioned the copy
        if finetune == "full" and self.uses_reference:
            self._reference_copy = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
        if backbone.gradient_checkpointing_by_default if gradient_checkpointing is None else gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()

    # ----------------------------------------------------------------------------------------- set-up
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
        # Device and dtype moves reach the unregistered reference copy too (unless it is CPU-offloaded).
        super()._apply(fn, *args, **kwargs)
        if self._reference_copy is not None and not (self.reference_offload or self._reference_sharded):
            self._reference_copy._apply(fn, *args, **kwargs)
        return self

    # ----------------------------------------------------------------------------------- sharding
    def configure_model(self) -> None:
        """FSDP2 (``ModelParallelStrategy``): shard the denoiser block by block; other strategies: nothing."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if isinstance(self.trainer.strategy, ModelParallelStrategy) and not self._reference_sharded:
            fully_shard_blocks(self.denoiser, self.device_mesh["data_parallel"])

    def on_fit_start(self) -> None:
        """Partition a full fine-tune's frozen reference the way the strategy shards the policy
        (:func:`~lightning_pref.strategies.shard_reference`): ZeRO-3 and FSDP2 never hold a whole copy per rank."""
        if self._reference_copy is None or self._reference_sharded:
            return
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        sharded = shard_reference(self._reference_copy, self.trainer.strategy, mesh)
        if sharded is None:
            return
        if self.reference_offload:
            raise ConfigError(
                "reference_offload=True moves the whole reference between devices, which a sharded reference "
                f"cannot do under {type(self.trainer.strategy).__name__}: remove reference_offload and use the "
                "strategy's parameter offload (examples/strategies/zero3_offload.yaml) instead."
            )
        self._reference_copy, self._reference_sharded = sharded, True

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_reference_copy":  # keep it out of `_modules`
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------------------ the training step
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.preference_step(batch, batch_idx, stage="train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.preference_step(batch, batch_idx, stage="val")

    def preference_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> Tensor:
        random = self.step_randomness(batch, batch_idx, stage)
        pairs = self.prepare_pairs(batch, random)
        noisy = self.noise_pairs(pairs, random)
        errors = self.pair_errors(noisy, pairs.conditioning, batch)
        loss, metrics = self.compute_loss(self.entropy_regularized(errors), batch)
        metrics = {**metrics, **self.cross_method_metrics(errors)}
        self.log_metrics(stage, loss, metrics, batch_size=pairs.latents_w.shape[0])
        if stage == "train":
            self.check_finite_loss(loss, dict(zip(("policy_w", "policy_l", "ref_w", "ref_l"), errors.as_args())))
        return loss

    def step_randomness(self, batch: dict[str, Any], batch_idx: int, stage: str) -> PairRandomness:
        """Per-pair streams named (seed, stage, optimizer step, micro-batch, the pair's index in the global batch).

        Validation names its streams by batch alone, so every evaluation draws the same noise.
        """
        if stage == "train":
            stream = (self.seed, stage, self.global_step, batch_idx % self.trainer.accumulate_grad_batches)
        else:
            stream = (self.seed, stage, batch_idx)
        num_pairs = batch_size_of(batch)
        first = self.global_rank * num_pairs
        return PairRandomness.for_pairs(stream, range(first, first + num_pairs))

    def prepare_pairs(self, batch: dict[str, Any], random: PairRandomness) -> PreferencePairs:
        """Clean latents of winners and losers and the (caption-dropped) prompt conditioning."""
        if "latents_w" in batch and "latents_l" in batch:
            latents_w, latents_l = batch["latents_w"], batch["latents_l"]
            self.backbone.check_batch_media("latents_w", latents_w, latents=True)
        elif "pixels_w" in batch and "pixels_l" in batch:
            self.backbone.check_batch_media("pixels_w", batch["pixels_w"], latents=False)
            pixels = torch.cat([batch["pixels_w"], batch["pixels_l"]])
            latents_w, latents_l = self.backbone.encode_pixels(pixels, random.generators * 2).chunk(2)
        else:
            raise DataError(
                f"{type(self).__name__} needs winner/loser images in the batch as 'pixels_w' and 'pixels_l' "
                f"(or precomputed 'latents_w' and 'latents_l'), but the batch has {sorted(batch)}: check the "
                "DataModule's output or the shard fields it reads."
            )
        return PreferencePairs(latents_w, latents_l, self.prompt_conditioning(batch, random))

    def prompt_conditioning(self, batch: dict[str, Any], random: PairRandomness) -> Conditioning:
        """The batch's prompt conditioning, each row replaced by the empty prompt's with ``caption_dropout``."""
        conditioning = self.backbone.conditioning_for(batch)
        if self.caption_dropout > 0 and self.training:
            conditioning = self.backbone.drop_prompts(conditioning, random.uniform() < self.caption_dropout)
        return conditioning

    def noise_pairs(self, pairs: PreferencePairs, random: PairRandomness) -> NoisyPairs:
        """Draw one (t, eps) per pair and noise winner and loser with it (METHODS.md, shared notation)."""
        t = random.timesteps(self.process)
        noise = random.normal(tuple(pairs.latents_w.shape[1:])).to(pairs.latents_w)
        x0 = torch.cat([pairs.latents_w, pairs.latents_l])
        return self.noised(x0, noise.repeat(2, *([1] * (noise.ndim - 1))), t.repeat(2))

    def noised(self, x0: Tensor, noise: Tensor, t: Tensor) -> NoisyPairs:
        """``x_t`` and the target of clean samples ``x0`` for the given noise and process times."""
        t = t.to(x0.device)
        return NoisyPairs(self.process.add_noise(x0, noise, t), self.process.target(x0, noise, t), t)

    def pair_errors(self, noisy: NoisyPairs, conditioning: Conditioning, batch: dict[str, Any]) -> PairErrors:
        """Per-sample errors of the policy (with grad) and the reference (no grad), one forward each."""
        policy_prediction, policy, reference = self.sample_errors(noisy, concat_conditioning([conditioning] * 2), batch)
        policy_w, policy_l = policy.chunk(2)
        loser_scale = None
        if self.loser_safeguard:
            policy_l, loser_scale = self.safeguard_loser(policy_prediction, noisy, policy_l)
        ref_w, ref_l = reference.chunk(2)
        return PairErrors(policy_w, policy_l, ref_w, ref_l, noisy.timesteps[: policy_w.shape[0]], loser_scale)

    def sample_errors(
        self, noisy: NoisyPairs, conditioning: Conditioning, batch: dict[str, Any]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The policy's prediction, and the per-sample errors of the policy (with grad) and of the reference
        (no grad; zeros for reference-free methods) on a batch of noisy samples, each ``(N,)``."""
        model_t = self.process.model_timesteps(noisy.timesteps)
        prediction = self.backbone.predict(self.denoiser, noisy.x_t, model_t, self.policy_conditioning(conditioning, batch))
        policy = self.denoising_errors(prediction, noisy)
        if not self.uses_reference:
            return prediction, policy, torch.zeros_like(policy)
        with torch.no_grad():
            reference = self.reference_prediction(noisy.x_t, model_t, self.reference_conditioning(conditioning, batch))
        return prediction, policy, self.denoising_errors(reference, noisy)

    def denoising_errors(self, prediction: Tensor, noisy: NoisyPairs) -> Tensor:
        """``mean over non-batch dims of (prediction - target)^2`` in fp32, times the process's weight."""
        error = (prediction.float() - noisy.target.float()).pow(2).flatten(1).mean(1)
        return error * self.process.error_weight(noisy.timesteps).to(error.device)

    def compute_loss(self, errors: PairErrors, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The method's objective. Returns the scalar loss and the metrics to log."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss().")

    # ------------------------------------------------------------------------ cross-method options
    def safeguard_loser(self, prediction: Tensor, noisy: NoisyPairs, policy_l: Tensor) -> tuple[Tensor, Tensor]:
        """The loser's errors with their gradient scaled by the safeguard's ``lambda``, and ``lambda``."""
        residual_w, residual_l = (prediction.detach().float() - noisy.target.float()).chunk(2)
        weight = self.process.error_weight(noisy.timesteps[: policy_l.shape[0]])
        scale = loser_gradient_scale(residual_w, residual_l, self.safeguard_mu, self.safeguard_scope, weight)
        return scale_gradient(policy_l, scale.to(policy_l.device)), scale

    def entropy_regularized(self, errors: PairErrors) -> PairErrors:
        """The errors :meth:`compute_loss` sees: with ``entropy_gamma``, SEE-DPO's flattened reference."""
        if not self.entropy_gamma:
            return errors
        ref_w, ref_l = entropy_regularized_reference(*errors.as_args(), beta=self.beta, gamma=self.entropy_gamma)
        return dataclasses.replace(errors, ref_w=ref_w, ref_l=ref_l)

    def cross_method_metrics(self, errors: PairErrors) -> dict[str, Tensor]:
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
        """The frozen reference's prediction: adapters disabled (LoRA) or the frozen copy (full)."""
        with self.reference_denoiser() as reference:
            return self.backbone.predict(reference, x_t, timesteps, conditioning)

    @contextlib.contextmanager
    def reference_denoiser(self) -> Iterator[nn.Module]:
        """The reference network, ready to call, for the duration of the ``with`` block."""
        if not self.uses_reference:
            raise RuntimeError(
                f"{type(self).__name__} is reference-free: it keeps no reference network. Load the base model "
                "from its pipeline (type(module.backbone)(module.backbone.pretrained)) to compare with it."
            )
        if self.finetune == "lora":
            self.denoiser.disable_adapters()
            try:
                yield self.denoiser
            finally:
                self.denoiser.enable_adapters()
        elif self.reference_offload:
            self._reference_copy.to(self.device)
            try:
                yield self._reference_copy
            finally:
                self._reference_copy.to("cpu")
        else:
            yield self._reference_copy

    def configure_callbacks(self) -> list[pl.Callback]:
        """A checkpoint on SIGTERM (:class:`~lightning_pref.callbacks.SaveOnSigterm`) unless the run has one."""
        from lightning_pref.callbacks import SaveOnSigterm

        if any(isinstance(callback, SaveOnSigterm) for callback in self.trainer.callbacks):
            return []
        return [SaveOnSigterm()]

    # ------------------------------------------------------------------------------ non-finite values
    def check_finite_loss(self, loss: Tensor, terms: dict[str, Tensor]) -> None:
        """Stop (``nonfinite="stop"``) on a NaN or infinite loss, naming the step and the non-finite error terms;
        with ``skip`` the step's gradients are dropped in :meth:`on_before_optimizer_step`."""
        if bool(torch.isfinite(loss)):
            return
        bad = [f"{name} ({int((~torch.isfinite(value)).sum())} of {value.numel()})" for name, value in terms.items()
               if not bool(torch.isfinite(value).all())]
        cause = (f"non-finite errors: {', '.join(bad)}; the inputs or the weights hold NaN/Inf (a corrupt latent, "
                 "or a learning rate that blew the weights up)" if bad else
                 f"every error is finite, so the loss's own options overflow (beta={self.beta})")
        message = f"step {self.global_step}: the loss is {loss.item()}, {cause}."
        if self.nonfinite == "stop":
            raise TrainingError(f"{message} Stopped before the optimizer step; `nonfinite: skip` skips such steps instead.")
        log.warning("%s The optimizer step is skipped.", message)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Before every optimizer step (and before gradient clipping): a NaN or infinite gradient stops the run or
        (``nonfinite="skip"``) removes every gradient, so the optimizer leaves the weights and its state alone."""
        named = [(name, param) for name, param in self.named_parameters() if param.grad is not None]
        if not named or bool(torch.isfinite(torch.nn.utils.get_total_norm([p.grad for _, p in named]))):
            return
        first = next(name for name, param in named if not bool(torch.isfinite(param.grad).all()))
        if self.nonfinite == "stop":
            raise TrainingError(
                f"step {self.global_step}: the gradient of {first} holds NaN/Inf; stopped before the optimizer step "
                "(check the data and the learning rate; `nonfinite: skip` skips such steps instead)."
            )
        log.warning("step %d: the gradient of %s holds NaN/Inf; this optimizer step is skipped.", self.global_step, first)
        for _, param in named:
            param.grad = None
        self.log("train/skipped_step", 1.0, on_step=True, on_epoch=False)

    # --------------------------------------------------------------------------------------- logging
    def log_metrics(self, stage: str, loss: Tensor, metrics: dict[str, Tensor], batch_size: int) -> None:
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, on_step=on_step, on_epoch=not on_step, batch_size=batch_size)
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
        options = {"lr": hp.lr * self.pairs_per_optimizer_step() if hp.scale_lr else hp.lr, "weight_decay": hp.weight_decay}
        if hp.optimizer == "adamw":
            options["betas"] = tuple(hp.adam_betas)
        return options

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, **self.optimizer_options())
        else:
            from transformers.optimization import Adafactor

            optimizer = Adafactor(params, **self.optimizer_options(), scale_parameter=False, relative_step=False, warmup_init=False)
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
        """Keep the trained weights only, and refuse to write any that are NaN or infinite."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            return  # FSDP2's distributed checkpoint reloads the whole module, sharded: keep every key
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
        self.check_resumed_options(checkpoint.get("hyper_parameters") or {})
        if checkpoint.get("optimizer_states"):
            apply_optimizer_options(checkpoint, self.optimizer_options())
        if "state_dict" not in checkpoint:  # DeepSpeed restores the weights through its engine
            return
        missing = self.trained_state_keys() - set(checkpoint["state_dict"])
        if missing:
            raise CheckpointError(
                f"The checkpoint lacks {len(missing)} trained weights of this module (e.g. {sorted(missing)[:3]}): "
                "it was written by a different configuration (finetune, LoRA rank or target modules). Resume "
                "with the configuration that wrote it."
            )

    def check_resumed_options(self, saved: dict[str, Any]) -> None:
        def plain(value: Any) -> Any:
            return list(value) if isinstance(value, (tuple, list)) else value

        changed = {key: (saved[key], value) for key, value in self.hparams.items()
                   if key in saved and not key.startswith("_") and plain(saved[key]) != plain(value)}
        shaping = {key: pair for key, pair in changed.items() if key in TENSOR_SHAPING_OPTIONS}
        if shaping:
            described = ", ".join(f"{key}: {old!r} in the checkpoint, {new!r} in the config" for key, (old, new) in shaping.items())
            raise CheckpointError(
                f"cannot resume: {described}. These options shape the trained tensors: resume with the checkpoint's "
                "values, or start a new run without --ckpt_path."
            )
        for key, (old, new) in changed.items():
            log.info("resuming with %s=%r from the config (the checkpoint trained with %r)", key, new, old)


#: options that decide what the trained tensors are: a resumed run must keep the checkpoint's values
TENSOR_SHAPING_OPTIONS = ("finetune", "lora_rank", "lora_alpha", "lora_target_modules", "optimizer")


def apply_optimizer_options(checkpoint: dict[str, Any], options: dict[str, Any]) -> None:
    """Write this run's ``lr``, ``weight_decay`` and ``betas`` into a checkpoint's optimizer and LR-schedule
    states before Lightning restores them (it would otherwise bring back the old values), keeping the schedule's
    position (the current lr over the base lr)."""
    for state in checkpoint["optimizer_states"]:
        for group in state["param_groups"]:
            position = group["lr"] / group["initial_lr"] if group.get("initial_lr") else 1.0
            group.update({key: value for key, value in options.items() if key in group})
            if "initial_lr" in group:
                group["initial_lr"], group["lr"] = options["lr"], options["lr"] * position
    for schedule in checkpoint.get("lr_schedulers") or []:
        if "base_lrs" in schedule:
            schedule["base_lrs"] = [options["lr"]] * len(schedule["base_lrs"])
