"""SSPO as a module: reference samples from the replayed reference, a fit on unpaired data, its callbacks, refusals."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers.cli import printed_config
from helpers.training import perturb_lora, trainer

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.callbacks import SaveOnSigterm
from lightning_pref.callbacks.replay import RandomCheckpointReplay
from lightning_pref.datamodules import UnpairedDataModule, write_unpaired_shards
from lightning_pref.errors import ConfigError, DataError
from lightning_pref.methods import PairRandomness
from lightning_pref.methods.sspo import SSPO
from lightning_pref.pair_sources import PairSource

PROMPTS = ["a red cat", "a blue dog", "a green circle"]


def test_reference_samples_come_from_the_installed_reference_with_seeds_of_each_pairs_stream(sd_backbone):
    module = SSPO(sd_backbone, reference_steps=3, reference_guidance_scale=2.0)
    perturb_lora(module)  # the policy now differs from the base...
    snapshot = {name: value * 0.5 for name, value in module.trained_weights().items()}
    module.reference.install(snapshot)  # ...and the reference holds a third set of adapter weights
    pixels = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {"pixels": pixels, "prompt": PROMPTS, "key": ["a", "b", "c"]}
    pairs, _ = module.make_pairs(batch, PairRandomness.for_pairs((1, "train", 4, 0), range(3)))

    random = PairRandomness.for_pairs((1, "train", 4, 0), range(3))  # the same streams, by hand
    seeds = [int(torch.randint(2**62, (1,), generator=g)) for g in random.generators]
    settings = dict(decode=False, num_inference_steps=3, guidance_scale=2.0)
    expected = module.generate(PROMPTS, seeds, source="reference", **settings)
    assert torch.equal(pairs["latents_l"], expected)
    assert not torch.allclose(pairs["latents_l"], module.generate(PROMPTS, seeds, source="policy", **settings))
    assert torch.equal(pairs["latents_w"], sd_backbone.encode_pixels(pixels, random.generators))
    assert pairs["prompt"] == PROMPTS and pairs["key"] == ["a", "b", "c"] and "pixels" not in pairs
    assert module.training  # generation restored the train mode


def write_winners(directory, count=8):
    rng = np.random.default_rng(0)
    samples = [
        {"image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "caption": PROMPTS[i % 3]} for i in range(count)
    ]
    write_unpaired_shards(samples, directory)
    return UnpairedDataModule(str(directory), batch_size=4, num_workers=0, batches_per_epoch=4)


class Logged(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append({name: float(value) for name, value in trainer.callback_metrics.items()})


def test_sspo_fits_on_unpaired_winners_logging_the_switch_and_the_drawn_snapshot(tiny_sd, tmp_path):
    module = SSPO(
        StableDiffusionBackbone(str(tiny_sd)),
        finetune="full",
        lr=1e-3,
        reference_steps=2,
        replay_every_n_steps=1,
        replay_pool_size=3,
    )
    logged = Logged()
    fit = trainer(tmp_path, 4, callbacks=[logged])
    before = {name: value.clone() for name, value in module.trained_weights().items()}
    fit.fit(module, datamodule=write_winners(tmp_path / "shards"))
    assert fit.global_step == 4 and len(logged.rows) == 4
    assert sum(isinstance(c, SaveOnSigterm) for c in fit.callbacks) == 1  # the base's callback is kept
    (replay,) = [c for c in fit.callbacks if isinstance(c, RandomCheckpointReplay)]
    assert replay.snapshot_steps == [0, 1, 2] and replay.pool_size == 3  # SSPO's replay options reached it
    for step, row in enumerate(logged.rows):
        assert row["replay/pool_size"] == min(step + 1, 3)
        assert row["replay/snapshot"] == RandomCheckpointReplay.draw_index(module.seed, step, min(step + 1, 3))
        assert 0.0 <= row["train/switched_fraction"] <= 1.0 and np.isfinite(row["train/loss"])
        assert {"train/implicit_acc", "train/winner_error_change", "train/loser_error_change"} <= set(row)
    # at step 0 the reference is the policy itself: Delta_w = 0, never switched, and the loss is log 2
    assert logged.rows[0]["train/switched_fraction"] == 0.0
    assert logged.rows[0]["train/loss"] == pytest.approx(np.log(2), rel=1e-6)
    assert any(not torch.equal(before[name], value) for name, value in module.trained_weights().items())


def test_a_replay_callback_of_the_trainer_is_used_instead_of_adding_one(sd_backbone, tmp_path):
    module = SSPO(sd_backbone)
    own = RandomCheckpointReplay(every_n_steps=5)
    module.trainer = trainer(tmp_path, 1, callbacks=[own])
    added = module.configure_callbacks()
    assert [type(c) for c in added] == [SaveOnSigterm]


def test_bad_options_and_batches_are_refused(sd_backbone):
    with pytest.raises(ConfigError, match="sft_branch"):
        SSPO(sd_backbone, mode="sign", sft_branch="mse")
    with pytest.raises(ConfigError, match="reference_steps"):
        SSPO(sd_backbone, reference_steps=0)
    with pytest.raises(ConfigError, match="replay_pool_size|pool_size"):
        SSPO(sd_backbone, replay_pool_size=0)
    with pytest.raises(ConfigError, match="pair_source"):
        SSPO(sd_backbone, pair_source=PairSource())
    module = SSPO(sd_backbone)
    random = PairRandomness.for_pairs((0,), range(2))
    pair_batch = {"pixels_w": torch.zeros(2, 3, 16, 16), "pixels_l": torch.zeros(2, 3, 16, 16), "prompt": PROMPTS[:2]}
    with pytest.raises(DataError, match="source: winners"):
        module.make_pairs(pair_batch, random)
    with pytest.raises(DataError, match="'prompt'"):
        module.make_pairs({"pixels": torch.zeros(2, 3, 16, 16)}, random)


def test_the_example_configs_parse_with_the_toy_recipe(capsys):
    toy = printed_config("toy/sspo.yaml", capsys)
    model = toy["model"]["init_args"]
    assert (
        toy["model"]["class_path"] == "lightning_pref.methods.sspo.SSPO"
        and toy["data"]["class_path"] == "lightning_pref.datamodules.UnpairedDataModule"
    )
    assert (model["finetune"], model["lr"], model["beta"], model["warmup_steps"]) == ("full", 2e-5, 5000, 20)
    # the toy recipe at 10 winners a step: sampling their counterparts costs most of the step
    assert toy["trainer"]["max_steps"] == 140 and toy["data"]["init_args"]["batch_size"] == 10
    sd15 = printed_config("sd15_sspo.yaml", capsys)
    assert sd15["model"]["class_path"].endswith(".SSPO")
    assert sd15["model"]["init_args"]["backbone"]["class_path"].endswith("StableDiffusionBackbone")
