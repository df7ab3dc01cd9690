"""Toy preference data made as in real life: sample the base model, label pairs with a reward, write shards.

For each training prompt the toy base model draws two images from independent noise; a programmatic
reward (``ToyPreferenceReward``) labels the better one the winner, and near-ties are dropped, as
Pick-a-Pic drops its ties. Variants the methods need:

* ``label_noise``: a seeded fraction of pairs has its labels flipped (``label_flipped`` in the json),
  for minority-aware methods (Adaptive-DPO);
* ``users``: several users with their own preferences (``warm`` or ``cool``), ``user_id`` in the json,
  for personalized methods (PPD).

Real winners (``generate_toy_winners``), for the methods that pair a real image with a generated one
(SPIN-Diffusion, SSPO): rendered scenes a preference dataset's winners would be, the named shape in one of
the preferred colours, as unpaired shards.

Shards follow the library's preference format ([`lightning_pref.datamodules.shards`][lightning_pref.datamodules.shards]), so the same
DataModule and configs read them as they read converted Pick-a-Pic.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.datamodules.shards import write_preference_shards, write_unpaired_shards
from lightning_pref.errors import ConfigError
from lightning_pref.generation import generate
from lightning_pref.rewards import ShapeAgreementReward, WarmthReward, WeightedSumReward
from lightning_pref.toy.world import BACKGROUNDS, COLORS, EVAL_PROMPTS, parse_prompt, render

# Colour-free prompts: the base model draws every colour for them, so only a preference decides it.
# Four are held out from training (one per shape) to measure generalization to unseen prompts.
HELDOUT_PROMPTS: tuple[str, ...] = (
    "a circle on a black background",
    "a square",
    "a triangle on a white background",
    "a cross on a gray background",
)
TRAIN_PROMPTS: tuple[str, ...] = tuple(p for p in EVAL_PROMPTS if p not in HELDOUT_PROMPTS)

# Sampler settings shared by data generation, the quickstart and the benchmark. Ten DDIM steps draw the colours
# twenty do on this model (warmth of the same seeds correlates 0.98) in half the time, with somewhat rougher shapes
# (shape agreement 0.90 against 0.98 on the evaluation prompts; six steps: correlation 0.94, shapes 0.86).
SAMPLING_STEPS = 10
GUIDANCE_SCALE = 3.0


class ToyPreferenceReward(WeightedSumReward):
    """The labelling reward: shape agreement plus warmth (``warm``) or minus warmth (``cool``)."""

    def __init__(self, preference: str = "warm"):
        if preference not in ("warm", "cool"):
            raise ConfigError(f"preference={preference!r}: choose 'warm' or 'cool'.")
        sign = 1.0 if preference == "warm" else -1.0
        super().__init__([(WarmthReward(), sign), (ShapeAgreementReward(), 1.0)])


def sample_images(
    backbone: StableDiffusionBackbone,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int = 64,
    denoiser=None,
    progress: str | None = None,
) -> torch.Tensor:
    """Images in [0, 1] for ``prompts``, image ``i`` from the noise of ``seeds[i]``, with the toy world's sampler
    settings; ``progress`` names a progress bar (none when ``None``)."""
    return generate(
        backbone,
        prompts,
        seeds,
        denoiser=denoiser,
        num_inference_steps=SAMPLING_STEPS,
        guidance_scale=GUIDANCE_SCALE,
        batch_size=batch_size,
        progress=progress,
    ).cpu()


def pipeline_sha256(pipeline: str | Path | None = None) -> str:
    """SHA-256 (first 12 hex digits) of a pipeline directory's weights, the toy base model's by default: what
    pairs sampled from it depend on."""
    from lightning_pref.toy import BASE_MODEL_PATH

    root = Path(pipeline or BASE_MODEL_PATH)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.safetensors")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def sampled_from(out_dir: str | Path, pipeline: str | Path | None = None) -> bool:
    """Whether ``out_dir`` holds finished toy pairs (its ``info.json``) sampled from ``pipeline``'s weights as
    they are now, so that cached data go stale when the base model changes."""
    info = Path(out_dir) / "info.json"
    return info.is_file() and json.loads(info.read_text())["settings"].get("pipeline_sha256") == pipeline_sha256(
        pipeline
    )


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def generate_toy_preferences(
    out_dir: str | Path,
    num_pairs: int = 1024,
    *,
    pipeline: str | Path | None = None,
    prompts: Sequence[str] = TRAIN_PROMPTS,
    users: Sequence[str] = ("warm",),
    label_noise: float = 0.0,
    tie_threshold: float = 0.05,
    seed: int = 0,
    batch_size: int = 64,
    samples_per_shard: int = 512,
    progress: bool = False,
) -> dict:
    """Sample ``num_pairs`` candidate pairs from the base model, label them, write shards to ``out_dir``
    (with a progress bar when ``progress``).

    Returns (and writes to ``out_dir/info.json``) the settings and the counts of written and dropped pairs.
    """
    from lightning_pref.toy import BASE_MODEL_PATH

    if not 0.0 <= label_noise < 0.5:
        raise ConfigError(f"label_noise={label_noise}: use a fraction in [0, 0.5).")
    backbone = StableDiffusionBackbone(str(pipeline or BASE_MODEL_PATH)).eval()
    rng = np.random.default_rng(seed)
    pair_prompts = [prompts[i] for i in rng.integers(len(prompts), size=num_pairs)]
    pair_users = rng.integers(len(users), size=num_pairs)
    flips = rng.random(num_pairs) < label_noise
    seeds = rng.integers(2**31, size=(num_pairs, 2))
    images = sample_images(
        backbone,
        pair_prompts * 2,
        list(seeds[:, 0]) + list(seeds[:, 1]),
        batch_size,
        progress=f"sampling {2 * num_pairs} images" if progress else None,
    )
    first, second = images[:num_pairs], images[num_pairs:]
    rewards = {}
    for name in set(users):
        reward = ToyPreferenceReward(name)
        rewards[name] = (reward.score(first, pair_prompts), reward.score(second, pair_prompts))
    counts = {"candidates": num_pairs, "written": 0, "ties_dropped": 0, "flipped": 0}

    def pairs() -> Iterator[dict]:
        first_u8, second_u8 = _to_uint8(first), _to_uint8(second)
        for i in range(num_pairs):
            user = users[pair_users[i]]
            reward_0, reward_1 = (float(r[i]) for r in rewards[user])
            if abs(reward_0 - reward_1) < tie_threshold:
                counts["ties_dropped"] += 1
                continue
            winner, loser = (0, 1) if (reward_0 > reward_1) != bool(flips[i]) else (1, 0)
            candidates, scores = (first_u8[i], second_u8[i]), (reward_0, reward_1)
            counts["written"] += 1
            counts["flipped"] += int(flips[i])
            yield {
                "winner": candidates[winner],
                "loser": candidates[loser],
                "caption": pair_prompts[i],
                "user_id": int(pair_users[i]),
                "preference": user,
                "reward_winner": scores[winner],
                "reward_loser": scores[loser],
                "label_flipped": bool(flips[i]),
            }

    out_dir = Path(out_dir)
    write_preference_shards(pairs(), out_dir, samples_per_shard=samples_per_shard)
    info = {
        "settings": {
            "num_pairs": num_pairs,
            "prompts": list(prompts),
            "users": list(users),
            "label_noise": label_noise,
            "tie_threshold": tie_threshold,
            "seed": seed,
            "sampling_steps": SAMPLING_STEPS,
            "guidance_scale": GUIDANCE_SCALE,
            "pipeline": str(pipeline or "toy base model"),
            "pipeline_sha256": pipeline_sha256(pipeline),
        },
        "counts": counts,
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=2))
    return info


#: the colours each toy preference rewards (lightning_pref.toy.world: the first three are warm, the last three cool)
PREFERRED_COLORS: dict[str, tuple[str, ...]] = {"warm": tuple(COLORS)[:3], "cool": tuple(COLORS)[3:]}


def generate_toy_winners(
    out_dir: str | Path,
    num_samples: int,
    prompts: Sequence[str] = TRAIN_PROMPTS,
    preference: str = "warm",
    seed: int = 0,
    samples_per_shard: int = 512,
) -> dict:
    """Write ``num_samples`` real winners as unpaired shards (``label`` 1): for a prompt drawn uniformly from
    ``prompts``, the rendered scene of the shape it names, in a colour drawn uniformly from the ``preference``'s
    colours (the prompt's own colour if it names one), on its background (a random one if it names none).

    Returns (and writes to ``out_dir/info.json``) the settings and the count.
    """
    if preference not in PREFERRED_COLORS:
        raise ConfigError(f"preference={preference!r}: choose one of {sorted(PREFERRED_COLORS)}.")
    if num_samples < 1:
        raise ConfigError(f"num_samples={num_samples}: write at least one real winner.")
    rng = np.random.default_rng([seed, 1])

    def winners() -> Iterator[dict]:
        for _ in range(num_samples):
            prompt = prompts[rng.integers(len(prompts))]
            named = parse_prompt(prompt)
            palette = PREFERRED_COLORS[preference]
            color = named["color"] or palette[rng.integers(len(palette))]
            background = named["background"] or tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
            image = render(named["shape"], color, background, rng)
            yield {"image": image, "caption": prompt, "label": 1, "color": color, "background": background}

    out_dir = Path(out_dir)
    write_unpaired_shards(winners(), out_dir, samples_per_shard=samples_per_shard)
    info = {
        "settings": {"num_samples": num_samples, "prompts": list(prompts), "preference": preference, "seed": seed},
        "counts": {"written": num_samples},
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=2))
    return info
