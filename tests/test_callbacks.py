import json

import torch
from conftest import random_pairs
from test_module import trainer
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


def test_ema_weights_average_every_optimizer_step_and_replace_the_weights_at_the_end(tmp_path):
    import lightning.pytorch as pl

    from lightning_pref.callbacks import EMAWeights

    class Line(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(3))
            self.seen = []

        def training_step(self, batch, batch_idx):
            return ((self.weight - batch) ** 2).sum()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.seen.append(self.weight.detach().clone())  # after this step's optimizer step

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module, ema = Line(), EMAWeights(decay=0.5)
    batches = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[ema],
    ).fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    expected = module.seen[0]  # the first update copies; then d_n = min(0.5, n / (9 + n))
    for n, weights in enumerate(module.seen[1:], start=2):
        decay = min(0.5, n / (9 + n))
        expected = decay * expected + (1 - decay) * weights
    torch.testing.assert_close(module.weight.detach(), expected)  # the average replaced the trained weights
    restored = EMAWeights(decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 4 and torch.equal(restored.average["weight"], expected)
