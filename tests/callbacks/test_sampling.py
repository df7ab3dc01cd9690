"""SampleGrid: the before/after grid with rewards, and videos as filmstrips."""

import json

import torch
from helpers.pairs import random_pairs
from helpers.training import trainer
from torch.utils.data import DataLoader

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.callbacks import SampleGrid
from lightning_pref.methods import DiffusionDPO
from lightning_pref.rewards import WarmthReward


def test_sample_grid_writes_before_after_and_rewards(tmp_path, tiny_pixel):
    prompts = ["a red cat", "a dog"]
    grid = SampleGrid(
        prompts, seed=5, num_inference_steps=2, dirpath=str(tmp_path / "samples"), scale=2, reward=WarmthReward()
    )
    module = DiffusionDPO(StableDiffusionBackbone(str(tiny_pixel)), finetune="full", lr=1e-2)
    reference = StableDiffusionBackbone(str(tiny_pixel))
    trainer(tmp_path, 2, callbacks=[grid]).fit(module, DataLoader(random_pairs(4, size=8), batch_size=2))

    for name in ("before.png", "after.png", "before_after.png"):
        assert (tmp_path / "samples" / name).exists()
    summary = json.loads((tmp_path / "samples" / "rewards.json").read_text())
    assert [image["seed"] for image in summary["per_image"]] == [5, 6]
    assert summary["reward"] == "warmth" and 0 <= summary["win_rate"] <= 1
    # "before" is the untouched base model sampled from the seeds' noise
    noise = torch.stack(
        [torch.randn(reference.latent_shape(1)[1:], generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    )
    expected = reference.sample(prompts, initial_noise=noise, num_inference_steps=2)
    torch.testing.assert_close(grid.before, expected)
    assert summary["mean_before"] == WarmthReward().score(expected, prompts).mean().item()


def test_videos_are_saved_as_filmstrips_of_evenly_spaced_frames(tmp_path):
    from PIL import Image

    from lightning_pref.callbacks.sampling import filmstrips, save_image_grid

    videos = torch.arange(5.0).div(4).reshape(1, 1, 5, 1, 1).expand(2, 3, 5, 2, 2)  # frame f is f / 4 everywhere
    strips = filmstrips(videos, max_frames=3)  # frames 0, 2, 4
    assert strips.shape == (2, 3, 2, 6)
    assert strips[0, 0, 0].tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    path = save_image_grid([videos, videos], tmp_path / "grid.png", max_frames=3)
    assert Image.open(path).size == (2 * 6, 2 * 2)  # two videos per row, two rows
