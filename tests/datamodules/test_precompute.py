"""Precomputed latents and prompt embeddings: what the shards hold, and that training on them is the same."""

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers.shards import read_samples
from helpers.training import trainer as make_trainer
from safetensors.torch import load as load_safetensors

from lightning_pref.backbones import StableDiffusionBackbone, StableDiffusionXLBackbone
from lightning_pref.data_commands import data_main
from lightning_pref.datamodules import PreferenceDataModule, UnpairedDataModule, write_unpaired_shards
from lightning_pref.datamodules.precompute import load_backbone, precompute_shards
from lightning_pref.methods import DiffusionDPO


@pytest.mark.parametrize("variant", ["sd", "sdxl"])
def test_shards_hold_posterior_mode_latents_and_the_prompt_tensors(variant, tiny_sd, tiny_sdxl, tiny_shards, tmp_path):
    backbone = (
        StableDiffusionBackbone(str(tiny_sd)) if variant == "sd" else StableDiffusionXLBackbone(str(tiny_sdxl))
    ).eval()
    counts = precompute_shards(backbone, str(tiny_shards), tmp_path, batch_size=5, dtype="float32")
    assert counts == {"shards": 3, "shards_already_done": 0, "written": 24, "skipped": 0}
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == sorted(p.name for p in tiny_shards.glob("*.tar"))
    source, stored = read_samples(tiny_shards)[0], read_samples(tmp_path)[0]
    assert stored["json"] == source["json"]
    tensors = load_safetensors(stored["latents.safetensors"])
    assert set(tensors) == {"latents_w", "latents_l", *backbone.prompt_keys}
    batch = next(
        iter(
            PreferenceDataModule(
                str(tiny_shards), val_shards=str(tiny_shards), batch_size=1, num_workers=0
            ).val_dataloader()
        )
    )
    torch.testing.assert_close(tensors["latents_w"], backbone.encode_pixels(batch["pixels_w"])[0], atol=1e-5, rtol=1e-4)
    prompts = backbone.encode_prompts(batch["prompt"])
    for key in backbone.prompt_keys:
        torch.testing.assert_close(tensors[key], prompts[key][0], atol=1e-5, rtol=1e-4)
    assert set(load_safetensors((tmp_path / "empty_prompt.safetensors").read_bytes())) == set(backbone.prompt_keys)
    assert json.loads((tmp_path / "precompute.json").read_text())["latents"] == "posterior mode"


class PairAtATimeBackbone(StableDiffusionBackbone):
    """Encodes pixels to the VAE posterior's mode (what the precompute stores, instead of a sample), one pair
    ``[winner; loser]`` at a time, and prompts one at a time: exactly the encoder calls the precompute makes at
    batch size 1, so both paths give the same latents and embeddings bit for bit (no batch-dependent rounding)."""

    def encode_pixels(self, pixels, generator=None):
        winners, losers = pixels.chunk(2)
        pairs = [super(PairAtATimeBackbone, self).encode_pixels(torch.stack(pair)) for pair in zip(winners, losers)]
        return torch.cat([torch.stack([pair[0] for pair in pairs]), torch.stack([pair[1] for pair in pairs])])

    def encode_prompts(self, prompts):
        parts = [super(PairAtATimeBackbone, self).encode_prompts([prompt]) for prompt in prompts]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def fit_losses(backbone, shards, tmp_path):
    record = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            record.append((batch["key"], "latents_w" in batch, outputs["loss"].item()))

    data = PreferenceDataModule(str(shards), batch_size=4, num_workers=0, shuffle_buffer=8, batches_per_epoch=3)
    trainer = make_trainer(tmp_path, 3, callbacks=[Record()])
    module = DiffusionDPO(backbone, lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero (loss = log 2 for any data): give the policy an offset
        for name, param in module.denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    trainer.fit(module, datamodule=data)
    return record


def test_a_run_on_precomputed_latents_matches_the_run_that_encodes(tiny_sd, tiny_shards, tmp_path):
    precompute_shards(
        StableDiffusionBackbone(str(tiny_sd)), str(tiny_shards), tmp_path / "latents", dtype="float32", batch_size=1
    )
    on_pixels = fit_losses(PairAtATimeBackbone(str(tiny_sd)), tiny_shards, tmp_path)
    on_latents = fit_losses(StableDiffusionBackbone(str(tiny_sd)), tmp_path / "latents", tmp_path)
    assert [keys for keys, _, _ in on_pixels] == [keys for keys, _, _ in on_latents]  # the same pairs, in order
    assert [precomputed for _, precomputed, _ in on_latents] == [True] * 3
    assert [precomputed for _, precomputed, _ in on_pixels] == [False] * 3
    # the same encoder outputs bit for bit (see PairAtATimeBackbone), so the same training, bit for bit
    assert [loss for *_, loss in on_latents] == [loss for *_, loss in on_pixels]


def test_command_line_npy_files_and_resume(tiny_sd, tiny_shards, tmp_path, capsys):
    args = [
        "precompute",
        "--backbone",
        "StableDiffusionBackbone",
        "--pretrained",
        str(tiny_sd),
        "--in",
        str(tiny_shards),
        "--out",
        str(tmp_path),
        "--format",
        "npy",
        "--dtype",
        "float16",
        "--batch-size",
        "8",
    ]
    data_main(args)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 24
    stored = read_samples(tmp_path)[0]
    assert {"latents_w.npy", "latents_l.npy", "encoder_hidden_states.npy", "json"} == set(stored)
    batch = next(
        iter(PreferenceDataModule(str(tmp_path), batch_size=4, num_workers=0, batches_per_epoch=1).train_dataloader())
    )
    assert batch["latents_w"].shape == (4, 4, 8, 8) and batch["latents_w"].dtype == torch.float32
    assert batch["encoder_hidden_states"].shape[0] == 4 and "pixels_w" not in batch
    data_main(args)  # a rerun skips finished shards
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shards_already_done"] == 3


def test_backbone_from_a_fit_config(tiny_sd, tmp_path):
    config = tmp_path / "fit.yaml"
    config.write_text(
        f"model:\n  init_args:\n    backbone:\n      class_path: lightning_pref.backbones.StableDiffusionBackbone\n"
        f"      init_args:\n        pretrained: {tiny_sd}\n"
    )
    assert isinstance(load_backbone(str(config)), StableDiffusionBackbone)
    with pytest.raises(ValueError, match="no such class"):
        load_backbone("NoSuchBackbone", str(tiny_sd))


def test_unpaired_shards_precompute_to_single_latents(sd_backbone, tmp_path):
    write_unpaired_shards(
        [{"image": np.zeros((16, 16, 3), np.uint8), "caption": "a cat", "label": i % 2} for i in range(3)],
        tmp_path / "px",
    )
    precompute_shards(sd_backbone, str(tmp_path / "px"), tmp_path / "latents")
    data = UnpairedDataModule(
        str(tmp_path / "latents"), val_shards=str(tmp_path / "latents"), batch_size=3, num_workers=0
    )
    batch = next(iter(data.val_dataloader()))
    assert batch["latents"].shape == (3, 4, 8, 8) and batch["label"].tolist() == [0, 1, 0]
