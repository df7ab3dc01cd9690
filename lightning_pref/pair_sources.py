"""Where a step's pairs come from, independent of which loss trains on them.

Offline pairs come from shards (a pair batch from a DataModule). A [`PairSource`][lightning_pref.pair_sources.PairSource]
makes them during training instead: given a batch of prompts (the online DataModule's, say), it returns a pair
batch of the library's schema ([`lightning_pref.batch`][lightning_pref.batch]), usually with generated
``latents_w`` and ``latents_l``. Any pairwise method takes one as its ``pair_source`` option, so every pairwise
loss of the library runs on offline shards or on pairs made while training:

    model:
      class_path: lightning_pref.methods.DMPO
      init_args:
        pair_source:
          class_path: lightning_pref.pair_sources.RewardRankedPairs
          init_args: {reward: {class_path: lightning_pref.rewards.WarmthReward}, candidates: 4}

[`RewardRankedPairs`][lightning_pref.pair_sources.RewardRankedPairs] is the online recipe of flow_grpo,
verl-omni and Flow-Factory turned into preference pairs: sample ``K`` candidates per prompt, score them with a
reward, train on the best against the worst.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from lightning_pref.batch import KEY, LATENTS, LOSER, PROMPT, WINNER, media_field, pair_media, sample_media
from lightning_pref.errors import ConfigError, DataError, check_whole_numbers
from lightning_pref.rewards import RewardModel
from lightning_pref.seeding import PairRandomness, stream_seed

if TYPE_CHECKING:
    from lightning_pref.methods.base import PreferenceDiffusionModule

#: the checkpoint entry holding the pair source's ``checkpoint_state``
PAIR_SOURCE_KEY = "pair_source"


class PairSource(nn.Module):
    """Interface: turn a training batch into a pair batch. A module, so what it holds (a reward model) follows
    the LightningModule's device; frozen, so it is never trained and its weights (a reward model's) are never
    written to a checkpoint. What it needs to resume goes there through ``checkpoint_state``.

    A source that keeps only some rows of ``batch`` (dropped near-ties, say) returns their streams
    (``random.rows(kept)``), so every pair keeps the noise stream of the row it was made from.
    """

    def pairs(
        self, module: PreferenceDiffusionModule, batch: dict[str, Any], random: PairRandomness
    ) -> tuple[dict[str, Any], PairRandomness]:
        """The pair batch the step trains on, and the streams of its rows. ``random`` holds the step's per-row
        streams of ``batch``."""
        raise NotImplementedError

    def checkpoint_state(self) -> dict[str, Any]:
        """What a resumed run needs to go on as the uninterrupted one would (plain tensors and numbers, saved in
        the module's checkpoint); nothing by default."""
        return {}

    def restore(self, module: PreferenceDiffusionModule, state: dict[str, Any]) -> None:
        """Take back what ``checkpoint_state`` saved (called while ``module`` loads its checkpoint)."""


class RewardRankedPairs(PairSource):
    """Pairs ranked by a reward: per prompt, ``candidates`` samples; the best is the winner, the worst the loser.

    For each prompt of the batch (a [`PromptDataModule`][lightning_pref.datamodules.prompts.PromptDataModule]
    batch), ``candidates`` samples are generated from the policy or the reference (``sample_from``), decoded to
    pixels and scored by ``reward``. The pair is the group's reward argmax (winner) and argmin (loser) as the
    generated latents (no re-encoding), with the prompts, keys and the two rewards (``reward_w``, ``reward_l``).
    A group whose reward gap (max minus min) is at most ``min_reward_gap`` is a near-tie and is dropped, as offline data drops its ties. When every group of a micro-batch is a near-tie,
    the group with the largest gap is kept, so the step still has a pair to train on and every DDP rank still
    runs its backward (a rank without a loss would hang the others); ``all_near_ties`` counts such micro-batches.

    Candidate ``k`` of a prompt starts from the noise of ``stream_seed("candidates", draw, k)``, where ``draw`` is
    the first number of the prompt's own stream of the step (named by the module's seed, the stage, the optimizer
    step, the micro-batch and the prompt's index in the global batch; see
    [`step_randomness`][lightning_pref.methods.base.PreferenceDiffusionModule.step_randomness]): candidates differ
    by seed, every rank and a resumed run draw the same ones, and no two prompts or steps share them.

    Logged (``train/`` on the steps the logger writes, or ``val/``): ``candidate_reward`` (mean reward of all candidates), ``reward_gap`` (mean
    best-minus-worst gap over the groups), ``dropped_fraction`` (near-tie groups over groups, a kept last group included) and
    ``all_near_ties`` (1 for a micro-batch of near-ties only).

    Args:
        reward: scores pixels in [0, 1] against prompts ([`RewardModel`][lightning_pref.rewards.RewardModel]).
        candidates: samples per prompt, ``K >= 2``.
        sample_from: ``policy`` (on-policy, flow_grpo's choice) or ``reference`` (whatever weights it holds).
        min_reward_gap: groups whose reward gap is at most this are dropped (0 drops exact ties only).
        num_inference_steps, guidance_scale, generation_batch_size: the sampler's settings
            ([`generate`][lightning_pref.generation.generate]).
        reference_update_every: every this many optimizer steps, the policy's weights become the reference
            (flow_grpo's ``ref_update_step``); ``None``: the reference stays the base model. The weights last
            installed are kept as CPU copies and saved in checkpoints (one more copy of the trained tensors:
            the adapters under LoRA, the denoiser in a full fine-tune), so a resumed run compares with the same
            reference as the uninterrupted one.
    """

    def __init__(
        self,
        reward: RewardModel,
        candidates: int = 4,
        sample_from: Literal["policy", "reference"] = "policy",
        min_reward_gap: float = 0.0,
        num_inference_steps: int = 25,
        guidance_scale: float = 5.0,
        generation_batch_size: int = 16,
        reference_update_every: int | None = None,
    ):
        super().__init__()
        if not isinstance(reward, RewardModel):
            raise ConfigError(
                f"reward={type(reward).__name__}: give a lightning_pref.rewards.RewardModel (e.g. "
                "lightning_pref.rewards.WarmthReward, or your subclass)."
            )
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 2:
            raise ConfigError(f"candidates={candidates!r}: a pair needs at least 2 candidates per prompt.")
        if sample_from not in ("policy", "reference"):
            raise ConfigError(f"sample_from={sample_from!r}: choose 'policy' or 'reference'.")
        if min_reward_gap < 0:
            raise ConfigError(f"min_reward_gap={min_reward_gap}: use a gap >= 0 (0 drops exact ties only).")
        check_whole_numbers(num_inference_steps=num_inference_steps, generation_batch_size=generation_batch_size)
        if reference_update_every is not None and (
            isinstance(reference_update_every, bool)
            or not isinstance(reference_update_every, int)
            or reference_update_every < 1
        ):
            raise ConfigError(
                f"reference_update_every={reference_update_every!r}: use a number of optimizer steps >= 1, or null."
            )
        self.reward = reward
        self.candidates = candidates
        self.sample_from = sample_from
        self.min_reward_gap = min_reward_gap
        self.sampler_settings = dict(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=generation_batch_size
        )
        self.reference_update_every = reference_update_every
        #: the optimizer step whose weights the reference last received (``-1``: none yet), and those weights
        self.refreshed_at = -1
        self.reference_weights: dict[str, Tensor] = {}

    def pairs(
        self, module: PreferenceDiffusionModule, batch: dict[str, Any], random: PairRandomness
    ) -> tuple[dict[str, Any], PairRandomness]:
        prompts = prompts_of(batch)
        self.refresh_reference(module)
        repeated = [prompt for prompt in prompts for _ in range(self.candidates)]  # prompt-major, as the seeds
        latents = module.generate(
            repeated,
            self.candidate_seeds(random),
            source=self.sample_from,
            decode=False,
            **self.sampler_settings,
        )
        pixels = ((module.backbone.decode_latents(latents).float() + 1) / 2).clamp(0, 1)
        rewards = self.reward.score(pixels, repeated)
        groups = rewards.float().reshape(len(prompts), self.candidates)
        winners, losers, gaps = groups.argmax(dim=1), groups.argmin(dim=1), groups.amax(dim=1) - groups.amin(dim=1)
        near_ties = gaps <= self.min_reward_gap
        kept = (~near_ties).nonzero().flatten() if not near_ties.all() else gaps.argmax().reshape(1)
        self.log_candidates(module, groups, gaps, near_ties)

        rows = kept.tolist()
        grouped = latents.reshape(len(prompts), self.candidates, *latents.shape[1:])
        pair_batch = {
            media_field(LATENTS, WINNER): grouped[kept, winners[kept]],
            media_field(LATENTS, LOSER): grouped[kept, losers[kept]],
            PROMPT: [prompts[row] for row in rows],
            "reward_w": groups[kept, winners[kept]],
            "reward_l": groups[kept, losers[kept]],
        }
        if KEY in batch:
            pair_batch[KEY] = [batch[KEY][row] for row in rows]
        return pair_batch, random.rows(rows)

    def candidate_seeds(self, random: PairRandomness) -> list[int]:
        """``K`` seeds per prompt, prompt-major: candidate ``k`` of prompt ``i`` at ``i * K + k``."""
        draws = [int(torch.randint(0, 2**62, (1,), generator=generator)) for generator in random.generators]
        return [stream_seed("candidates", draw, k) for draw in draws for k in range(self.candidates)]

    def refresh_reference(self, module: PreferenceDiffusionModule) -> None:
        """Every ``reference_update_every`` optimizer steps (once per step, whatever the accumulation), install the
        policy's weights as the reference."""
        every, step = self.reference_update_every, module.global_step
        if every is None or step == 0 or step % every or step == self.refreshed_at:
            return
        if module.reference is None:
            raise ConfigError(
                f"reference_update_every={every}: {type(module).__name__} has no reference to refresh; remove the option."
            )
        self.reference_weights = module.trained_weights()
        module.reference.install(self.reference_weights)
        self.refreshed_at = step

    def checkpoint_state(self) -> dict[str, Any]:
        """The last refresh's step and weights (nothing before the first refresh: the reference is the base)."""
        if self.refreshed_at < 0:
            return {}
        return {"refreshed_at": self.refreshed_at, "reference_weights": self.reference_weights}

    def restore(self, module: PreferenceDiffusionModule, state: dict[str, Any]) -> None:
        """Install the saved refresh's weights as the reference again."""
        if not state:
            return
        self.reference_weights, self.refreshed_at = state["reference_weights"], int(state["refreshed_at"])
        module.checked_reference().install(self.reference_weights)

    def log_candidates(
        self, module: PreferenceDiffusionModule, groups: Tensor, gaps: Tensor, near_ties: Tensor
    ) -> None:
        stage = "train" if module.training else "val"
        if stage == "train" and not module.logs_this_step():
            return
        metrics = {
            "candidate_reward": groups.mean(),
            "reward_gap": gaps.mean(),
            "dropped_fraction": near_ties.float().mean(),
            "all_near_ties": near_ties.all().float(),
        }
        for name, value in metrics.items():
            module.log(
                f"{stage}/{name}", value, on_step=stage == "train", on_epoch=stage != "train", batch_size=len(gaps)
            )


def prompts_of(batch: dict[str, Any]) -> list[str]:
    """The prompts of a prompt batch; a batch of pairs or samples is refused (its pairs come from shards)."""
    media = pair_media(batch) or sample_media(batch)
    if media is not None or not isinstance(batch.get(PROMPT), (list, tuple)):
        held = f"{media[0]} (a batch of pairs or samples)" if media is not None else f"the fields {sorted(batch)}"
        raise DataError(
            f"RewardRankedPairs makes its pairs from prompts, but the batch holds {held}: train on a "
            "lightning_pref.datamodules.prompts.PromptDataModule, or remove pair_source to train on the shards' pairs."
        )
    return list(batch[PROMPT])
