"""The toy world's two users, for personalized methods (PPD): user 0 prefers warm colours, user 1 cool ones.

Two kinds of two-user preference shards, each pair with its ``user_id`` (0 or 1) and ``preference`` in the json:

* ``generate_two_user_preferences``: the toy base model's own samples, two per prompt, labelled by the
  pair's user's ``ToyPreferenceReward`` (what ``lightning-pref data toy --users`` writes);
* ``write_rendered_user_pairs``: rendered scenes, no sampling: the prompt's shape on its background drawn
  twice with the same jitter, once in a warm and once in a cool colour, the user's preferred one the winner.
  Cheap and noise-free: for tests and quick demonstrations.

``evaluate_users_against_base`` measures a tuned PPD module the way the toy benchmark measures other methods:
per user, its held-out samples against the base model's from identical noise, under that user's reward.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_pref.adapters import UserConditioned
from lightning_pref.datamodules.shards import write_preference_shards
from lightning_pref.errors import ConfigError
from lightning_pref.generation import evaluating
from lightning_pref.toy.evaluation import compare_with_base, evaluate_against_base, heldout_samples
from lightning_pref.toy.preferences import PREFERRED_COLORS, TRAIN_PROMPTS, generate_toy_preferences, sample_images
from lightning_pref.toy.world import BACKGROUNDS, parse_prompt, render

#: each user's preference; the user id is the position
TWO_USERS: tuple[str, str] = ("warm", "cool")


def generate_two_user_preferences(out_dir: str | Path, num_pairs: int = 1024, **options: Any) -> dict:
    """[`generate_toy_preferences`][lightning_pref.toy.preferences.generate_toy_preferences] for the two users:
    each candidate pair goes to a user drawn uniformly and is labelled by that user's reward."""
    return generate_toy_preferences(out_dir, num_pairs, users=TWO_USERS, **options)


def rendered_user_pairs(num_pairs: int, prompts: Sequence[str] = TRAIN_PROMPTS, seed: int = 0) -> Iterator[dict]:
    """``num_pairs`` rendered pairs (see the module docstring) for users drawn uniformly, as
    ``write_preference_shards`` takes them (``uint8`` arrays and the json fields)."""
    rng = np.random.default_rng([seed, 2])
    for _ in range(num_pairs):
        prompt = prompts[rng.integers(len(prompts))]
        named = parse_prompt(prompt)
        background = named["background"] or tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        user = int(rng.integers(len(TWO_USERS)))
        colors = {preference: palette[rng.integers(len(palette))] for preference, palette in PREFERRED_COLORS.items()}
        jitter = int(rng.integers(2**31))  # the same size and position for both colours
        images = {
            preference: render(named["shape"], color, background, np.random.default_rng(jitter))
            for preference, color in colors.items()
        }
        preferred = TWO_USERS[user]
        (other,) = set(TWO_USERS) - {preferred}
        yield {
            "winner": images[preferred],
            "loser": images[other],
            "caption": prompt,
            "user_id": user,
            "preference": preferred,
            "winner_color": colors[preferred],
            "loser_color": colors[other],
        }


def write_rendered_user_pairs(
    out_dir: str | Path,
    num_pairs: int,
    prompts: Sequence[str] = TRAIN_PROMPTS,
    seed: int = 0,
    samples_per_shard: int = 512,
) -> dict:
    """Write ``num_pairs`` rendered two-user pairs as preference shards; returns (and writes to
    ``out_dir/info.json``) the settings and the count."""
    if num_pairs < 1:
        raise ConfigError(f"num_pairs={num_pairs}: write at least one pair.")
    out_dir = Path(out_dir)
    write_preference_shards(rendered_user_pairs(num_pairs, prompts, seed), out_dir, samples_per_shard=samples_per_shard)
    info = {
        "settings": {"num_pairs": num_pairs, "prompts": list(prompts), "users": list(TWO_USERS), "seed": seed},
        "counts": {"written": num_pairs},
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=2))
    return info


@torch.no_grad()
def evaluate_users_against_base(
    module: Any, base_images: torch.Tensor | None, seeds_per_prompt: int, heldout_pairs: str | Path
) -> dict[str, float]:
    """A two-user PPD ``module`` (a learned table, ``num_users: 2``) measured as the toy benchmark measures every
    method, per user: the user's held-out samples against the base model's from identical noise.

    User 0 (warm, the benchmark's own reward) fills the keys of
    [`evaluate_against_base`][lightning_pref.toy.evaluation.evaluate_against_base] (win rate, rewards, drift on the
    warm-labelled held-out pairs), so the row compares with every other method's. Every user ``i`` adds
    ``user{i}_{preference}_win_rate`` under their own ``ToyPreferenceReward`` and ``user{i}_warmth``.
    ``base_images``: as in ``evaluate_against_base``.
    """
    prompts, seeds = heldout_samples(seeds_per_prompt)
    if base_images is None:
        base_images = sample_images(type(module.backbone)(module.backbone.pretrained).eval(), prompts, seeds)
    with evaluating(module):
        users = [UserConditioned(module.denoiser, module.embedding_of(user)) for user in range(len(TWO_USERS))]
        result = evaluate_against_base(module.backbone, base_images, seeds_per_prompt, heldout_pairs, denoiser=users[0])
        result |= {"user0_warm_win_rate": result["win_rate"], "user0_warmth": result["tuned_warmth"]}
        for user, preference in enumerate(TWO_USERS[1:], start=1):
            tuned_images = sample_images(module.backbone, prompts, seeds, denoiser=users[user])
            scores = compare_with_base(base_images, tuned_images, prompts, preference)
            result |= {
                f"user{user}_{preference}_win_rate": scores["win_rate"],
                f"user{user}_warmth": scores["tuned_warmth"],
            }
    return result
