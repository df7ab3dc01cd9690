"""SSPO: Self-Sampling Preference Optimization (Zhang et al., arXiv 2410.05255; v1 "SePPO"), METHODS.md section 9.

``[secondary]``: from summaries of the paper only; every guess is an option, named as such below.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_pref.batch import LATENTS, LOSER, PIXELS, PROMPT, WINNER, media_field, pair_media, sample_media
from lightning_pref.callbacks.replay import RandomCheckpointReplay, WhenFull
from lightning_pref.errors import ConfigError, DataError, check_whole_numbers
from lightning_pref.losses.sspo import SftBranch, SwitchMode, check_sspo_options, sspo_loss
from lightning_pref.methods.base import PreferenceDiffusionModule
from lightning_pref.methods.step import SampleErrors
from lightning_pref.seeding import PairRandomness


class SSPO(PreferenceDiffusionModule):
    """SSPO ``[secondary]``: Diffusion-DPO with no paired losers. Per step, for a batch of winners ``w`` (real
    images with their prompts):

    1. **Random Checkpoint Replay**: the reference is a snapshot drawn uniformly from the initial model and the
       snapshots taken every ``replay_every_n_steps`` updates
       ([`RandomCheckpointReplay`][lightning_pref.callbacks.replay.RandomCheckpointReplay], added unless the
       trainer has one);
    2. the reference generates the *reference sample* ``x_ref`` for each winner's prompt (``make_pairs``), which
       takes the loser's place: the pair ``(w, x_ref)`` shares one timestep and noise;
    3. **Self-Sampling Regularization** ([`sspo_loss`][lightning_pref.losses.sspo.sspo_loss]): where the snapshot
       denoises ``w`` better than the policy (``Delta_w > 0``), ``x_ref`` is presumed a winner and the sample
       switches from DPO to an SFT-like term on ``w``.

    Data: unpaired batches of [`UnpairedDataModule`][lightning_pref.datamodules.unpaired.UnpairedDataModule]
    (``pixels`` or ``latents`` and ``prompt``; ``source: winners`` reads the winners of preference shards).

    Args:
        mode: ``switch`` (default, ``s = 1[Delta_w <= 0]``) or ``sign`` (v1, ``s = +1 / -1``).
        sft_branch: the switched samples' term: ``anchored`` (``-log sigmoid(-(beta/2) Delta_w)``, default) or
            ``mse`` (plain ``err_theta(w)``), ``switch`` mode only ``[reconstructed]``.
        reference_steps, reference_guidance_scale: the reference sampler's steps and classifier-free guidance
            scale (the summaries give neither) ``[reconstructed]``.
        generation_batch_size: reference samples generated per forward batch.
        replay_every_n_steps, replay_pool_size, replay_when_full, replay_draw_every_n_steps: the options of the
            replay callback SSPO adds (the paper: a snapshot every 30 updates, 7 in all; see the callback for
            what each guess is).
        **kwargs: the options of [`PreferenceDiffusionModule`][lightning_pref.methods.base.PreferenceDiffusionModule]
            (``beta``: Diffusion-DPO's units; the summaries give no value, the default is Diffusion-DPO's 5000).
    """

    def __init__(
        self,
        *args: Any,
        mode: SwitchMode = "switch",
        sft_branch: SftBranch = "anchored",
        reference_steps: int = 25,
        reference_guidance_scale: float = 5.0,
        generation_batch_size: int = 16,
        replay_every_n_steps: int = 30,
        replay_pool_size: int = 7,
        replay_when_full: WhenFull = "stop",
        replay_draw_every_n_steps: int = 1,
        **kwargs: Any,
    ):
        check_sspo_options(mode, sft_branch)
        check_whole_numbers(reference_steps=reference_steps, generation_batch_size=generation_batch_size)
        if kwargs.get("pair_source") is not None:
            raise ConfigError(
                "SSPO makes its own pairs (the data's winner and the replayed reference's sample): remove pair_source."
            )
        self.replay = RandomCheckpointReplay(
            replay_every_n_steps, replay_pool_size, replay_when_full, replay_draw_every_n_steps
        )  # checks the replay options before the model loads; added in configure_callbacks
        super().__init__(*args, **kwargs)
        self.mode = mode
        self.sft_branch = sft_branch
        self.reference_steps = reference_steps
        self.reference_guidance_scale = reference_guidance_scale
        self.generation_batch_size = generation_batch_size

    def make_pairs(self, batch: dict[str, Any], random: PairRandomness) -> tuple[dict[str, Any], PairRandomness]:
        """The pair batch ``{latents_w: the winners' latents, latents_l: x_ref, prompt, ...}``.

        Pixels are encoded with each pair's generator. Reference sample ``i`` starts from the noise of a seed drawn
        from pair ``i``'s stream (seed, stage, optimizer step, micro-batch, the pair's index in the global batch;
        [`PairRandomness`][lightning_pref.seeding.PairRandomness]), so every rank and a resumed run generate
        the same ``x_ref``.
        """
        if pair_media(batch) is not None:
            raise DataError(
                "SSPO trains on winners alone and generates their counterparts, but the batch holds pairs: use "
                "UnpairedDataModule (source: winners reads the winners of preference shards)."
            )
        media = sample_media(batch)
        if media is None or PROMPT not in batch:
            raise DataError(
                f"SSPO needs 'pixels' (or 'latents') and 'prompt' in the batch, but it has {sorted(batch)}: use "
                "UnpairedDataModule, whose samples carry their caption."
            )
        kind, samples = media
        self.backbone.check_batch_media(kind, samples, latents=kind == LATENTS)
        seeds = [int(torch.randint(2**62, (1,), generator=generator)) for generator in random.generators]
        winners = self.backbone.encode_pixels(samples, random.generators) if kind == PIXELS else samples
        reference_samples = self.generate(
            list(batch[PROMPT]),
            seeds,
            source="reference",
            decode=False,
            num_inference_steps=self.reference_steps,
            guidance_scale=self.reference_guidance_scale,
            batch_size=self.generation_batch_size,
        ).to(winners)
        if reference_samples.shape != winners.shape:
            raise DataError(
                f"the winners' latents are {tuple(winners.shape[1:])} but the backbone samples "
                f"{tuple(reference_samples.shape[1:])}: give the DataModule the backbone's resolution."
            )
        shared = {name: value for name, value in batch.items() if name != kind}
        pairs = {**shared, media_field(LATENTS, WINNER): winners, media_field(LATENTS, LOSER): reference_samples}
        return pairs, random

    def compute_loss(self, errors: SampleErrors, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        return sspo_loss(*errors.as_args(), beta=self.beta, mode=self.mode, sft_branch=self.sft_branch)

    def configure_callbacks(self) -> list[pl.Callback]:
        """The base's callbacks and, unless the trainer has one, the replay callback of this module's options."""
        callbacks = super().configure_callbacks()
        if not any(isinstance(callback, RandomCheckpointReplay) for callback in self.trainer.callbacks):
            callbacks.append(self.replay)
        return callbacks
