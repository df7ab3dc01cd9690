"""Did a run align the toy model? What the quickstart prints and the toy benchmark tabulates.

Two measurements, both against the base model loaded afresh from its pipeline (a reference-free method
keeps no copy of it, and a method whose reference moves must not be compared with its own reference):

* **win rate** (``compare_with_base``): base and tuned model sample the held-out prompts (never
  trained on) from identical initial noise; the fraction of samples where the tuned image scores higher
  under ``ToyPreferenceReward("warm")``, ties one half. Also the reward and its two parts, base and tuned.
* **drift** (``error_drift``): the denoising error of the tuned model on held-out preference pairs over
  the base's, minus 1, for winners and losers, on fixed (t, eps) draws. Diffusion-DPO's objective is a
  *difference* of errors, so it can be driven up while both errors rise: the policy then leaves the data
  distribution (doubled shapes, washed-out backgrounds) while its implicit accuracy climbs. A run whose
  winners' error rose by more than ``DRIFT_LIMIT`` is flagged as collapsed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_pref.backbones.base import Backbone
from lightning_pref.batch import pair_media
from lightning_pref.datamodules.preference import PreferenceDataModule
from lightning_pref.losses import win_fraction
from lightning_pref.rewards import ShapeAgreementReward, WarmthReward
from lightning_pref.toy.preferences import HELDOUT_PROMPTS, ToyPreferenceReward, sample_images

#: winners' held-out error may rise at most this much (relative) before a run counts as collapsed
DRIFT_LIMIT = 0.25
#: the first initial-noise seed of the held-out samples (training data uses other seeds)
FIRST_EVAL_SEED = 10_000


def heldout_samples(seeds_per_prompt: int) -> tuple[list[str], list[int]]:
    """Prompts and initial-noise seeds of the held-out evaluation: each held-out prompt ``seeds_per_prompt`` times."""
    prompts = [prompt for prompt in HELDOUT_PROMPTS for _ in range(seeds_per_prompt)]
    seeds = [FIRST_EVAL_SEED + i for _ in HELDOUT_PROMPTS for i in range(seeds_per_prompt)]
    return prompts, seeds


def win_rate(tuned: torch.Tensor, base: torch.Tensor) -> float:
    """Fraction of ``tuned > base`` over paired scores ``(N,)``, ties counting one half."""
    return win_fraction(tuned, base).item()


def compare_with_base(
    base_images: torch.Tensor, tuned_images: torch.Tensor, prompts: Sequence[str], preference: str = "warm"
) -> dict[str, float]:
    """Win rate of tuned over base images drawn from the same noise under ``ToyPreferenceReward(preference)``, and
    the mean reward and its parts of each."""
    reward = ToyPreferenceReward(preference)
    tuned_reward, base_reward = reward.score(tuned_images, prompts), reward.score(base_images, prompts)
    result = {
        "win_rate": win_rate(tuned_reward, base_reward),
        "base_reward": base_reward.mean().item(),
        "tuned_reward": tuned_reward.mean().item(),
    }
    for part in (WarmthReward(), ShapeAgreementReward()):
        result[f"base_{part.name}"] = part.score(base_images, prompts).mean().item()
        result[f"tuned_{part.name}"] = part.score(tuned_images, prompts).mean().item()
    return result


@torch.no_grad()
def error_drift(
    tuned: Backbone,
    base: Backbone,
    pairs: str | Path,
    draws: int = 2,
    seed: int = 0,
    tuned_denoiser: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Relative change of the denoising error, tuned over base, on the held-out pairs in the shards ``pairs``.

    Every pair is noised ``draws`` times with (t, eps) seeded by ``seed`` and its position, the same for both
    models and for winner and loser. Returns ``winner_error_change`` and ``loser_error_change``:
    ``mean err_tuned / mean err_base - 1`` over all winners (losers). ``tuned_denoiser``: the tuned model's
    network when it is not ``tuned.denoiser`` (a PPD user's [`UserConditioned`][lightning_pref.adapters.UserConditioned]).
    """
    denoisers = (tuned.denoiser if tuned_denoiser is None else tuned_denoiser, base.denoiser)
    data = PreferenceDataModule(str(pairs), val_shards=str(pairs), batch_size=64, num_workers=0)
    generator = torch.Generator().manual_seed(seed)
    totals = torch.zeros(2, 2, dtype=torch.float64)  # (tuned, base) x (winners, losers)
    for batch in data.val_dataloader():
        _, winners, losers = pair_media(batch)
        x0 = torch.cat([tuned.encode_pixels(winners), tuned.encode_pixels(losers)])
        conditioning = tuned.encode_prompts(list(batch["prompt"]) * 2)
        for _ in range(draws):
            num_pairs = winners.shape[0]
            t = tuned.process.sample_timesteps(num_pairs, generator).repeat(2)
            noise = torch.randn(x0[:num_pairs].shape, generator=generator).repeat(2, *([1] * (x0.ndim - 1)))
            x_t, target = tuned.process.add_noise(x0, noise, t), tuned.process.target(x0, noise, t)
            model_t = tuned.process.model_timesteps(t)
            for row, (backbone, denoiser) in enumerate(zip((tuned, base), denoisers)):
                error = (
                    (backbone.predict(denoiser, x_t, model_t, conditioning).float() - target).pow(2).flatten(1).mean(1)
                )
                totals[row] += torch.stack([part.sum() for part in error.chunk(2)]).double()
    change = totals[0] / totals[1] - 1
    return {"winner_error_change": change[0].item(), "loser_error_change": change[1].item()}


def evaluate_against_base(
    tuned: Backbone,
    base_images: torch.Tensor | None,
    seeds_per_prompt: int,
    heldout_pairs: str | Path,
    progress: bool = False,
    denoiser: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Win rate, rewards and drift of ``tuned`` against the base model of its pipeline (``tuned.pretrained``).

    ``base_images``: the base model's held-out samples when already drawn (the benchmark draws them once for
    every method and seed); ``None`` samples them here. ``denoiser``: the tuned network when it is not
    ``tuned.denoiser`` (see [`error_drift`][lightning_pref.toy.evaluation.error_drift]).
    """
    base = type(tuned)(tuned.pretrained).eval()
    prompts, seeds = heldout_samples(seeds_per_prompt)
    if base_images is None:
        base_images = sample_images(base, prompts, seeds, progress="sampling the base model" if progress else None)
    tuned_images = sample_images(
        tuned, prompts, seeds, denoiser=denoiser, progress="sampling the tuned model" if progress else None
    )
    result = compare_with_base(base_images, tuned_images, prompts)
    result["samples"] = len(prompts)
    result.update(error_drift(tuned, base, heldout_pairs, tuned_denoiser=denoiser))
    result["collapsed"] = result["winner_error_change"] > DRIFT_LIMIT
    return result


def verdict(result: dict[str, float]) -> str:
    """One line: whether the run aligned -- the tuned model beats the base on the held-out samples (95%
    interval above one half) without collapsing -- with the win rate, the reward and the winners' drift."""
    low, high = win_rate_interval(result["win_rate"], result["samples"])
    beats_base, collapsed = low > 0.5, result["collapsed"]
    why = (
        ""
        if beats_base and not collapsed
        else (
            " (the model drifted off the data: collapsed)" if collapsed else " (the tuned model does not beat the base)"
        )
    )
    return (
        f"{'ALIGNED' if beats_base and not collapsed else 'NOT ALIGNED'}{why}: tuned beats base on "
        f"{100 * result['win_rate']:.0f}% [{100 * low:.0f}, {100 * high:.0f}] of {result['samples']} held-out samples; "
        f"reward {result['base_reward']:.3f} -> {result['tuned_reward']:.3f}; held-out winners' error "
        f"{100 * result['winner_error_change']:+.1f}% vs base (collapsed beyond +{100 * DRIFT_LIMIT:.0f}%)"
    )


def win_rate_interval(rate: float, samples: int) -> tuple[float, float]:
    """The 95% normal-approximation interval of a win rate over ``samples`` independent paired samples."""
    half = 1.96 * math.sqrt(max(rate * (1 - rate), 1e-12) / samples)
    return rate - half, rate + half
