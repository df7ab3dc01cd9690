"""SPIN-Diffusion: the reference is the previous iterate, the losers are its samples, a resume reuses both."""

import io
import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers.cli import printed_config
from helpers.shards import read_samples
from helpers.training import trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.datamodules import PreferenceDataModule, write_unpaired_shards
from lightning_pref.datamodules.self_play import SelfPlayDataModule
from lightning_pref.errors import ConfigError
from lightning_pref.methods.spin import SPINDiffusion
from lightning_pref.methods.step import Samples
from lightning_pref.seeding import PairRandomness, stream_seed

ITERATIONS, STEPS, BATCH, WINNERS = 2, 3, 4, 8
SAMPLING = dict(sampling_steps=2, guidance_scale=2.0)
STEPS_OF = dict(num_inference_steps=SAMPLING["sampling_steps"], guidance_scale=SAMPLING["guidance_scale"])


@pytest.fixture(scope="module")
def real_winners(tmp_path_factory):
    """Unpaired shards of 8 real 16x16 images with their prompts (2 shards)."""
    rng = np.random.default_rng(0)
    samples = [
        {"image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "caption": f"a red cat {i}"}
        for i in range(WINNERS)
    ]
    out = tmp_path_factory.mktemp("real")
    write_unpaired_shards(samples, out, samples_per_shard=4)
    return out


def spin(tiny_sd, finetune="lora", **options):
    lr = 1e-2 if finetune == "lora" else 1e-3  # large enough that every iterate differs from the last
    settings = dict(
        num_iterations=ITERATIONS, steps_per_iteration=STEPS, beta=100.0, lr=lr, finetune=finetune, **SAMPLING
    )
    return SPINDiffusion(StableDiffusionBackbone(str(tiny_sd)), **{**settings, **options})


def data(real_winners, **options):
    return SelfPlayDataModule(str(real_winners), batch_size=BATCH, num_workers=0, **options)


def spin_trainer(tmp_path, steps=-1, **options):
    return trainer(tmp_path, steps, reload_dataloaders_every_n_epochs=1, **options)


def reference_tensors(module) -> dict[str, torch.Tensor]:
    """The installed reference's tensors, named as ``trained_weights()`` names them."""
    if module.finetune == "full":
        return {name: value.detach().clone() for name, value in module.reference.copy.state_dict().items()}
    return {
        name.replace(".reference.", ".default."): p.detach().clone()
        for name, p in module.denoiser.named_parameters()
        if ".reference." in name
    }


class Record(pl.Callback):
    """The reference each training batch saw, the trained weights at each epoch's end, steps per epoch."""

    def __init__(self):
        self.references, self.iterates, self.steps = {}, {}, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.references.setdefault(trainer.current_epoch, reference_tensors(module))
        assert all(
            torch.equal(v, self.references[trainer.current_epoch][k]) for k, v in reference_tensors(module).items()
        )

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps[trainer.current_epoch] = self.steps.get(trainer.current_epoch, 0) + 1

    def on_train_epoch_end(self, trainer, module):
        self.iterates[trainer.current_epoch] = module.trained_weights()


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected) and actual
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


def iteration_pairs(directory):
    """``[(key, json, tensors)]`` of an iteration's shards, in the order each rank wrote them."""
    return [
        (json.loads(s["json"])["caption"], json.loads(s["json"]), load_safetensors(s["latents.safetensors"]))
        for s in read_samples(directory)
    ]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_every_iteration_trains_against_the_previous_iterate(tiny_sd, real_winners, tmp_path, finetune):
    module = spin(tiny_sd, finetune)
    initial = module.trained_weights()
    record = Record()
    spin_trainer(tmp_path, callbacks=[record]).fit(module, datamodule=data(real_winners))

    assert record.steps == {0: STEPS, 1: STEPS} and module.global_step == ITERATIONS * STEPS  # then it stops
    assert_same_tensors(record.references[0], initial)  # iteration 1: theta_0, the initial weights
    assert_same_tensors(record.references[1], record.iterates[0])  # iteration 2: theta_1, bit for bit
    assert_same_tensors(load_file(tmp_path / "spin" / "iteration-002" / "reference.safetensors"), record.iterates[0])
    assert not all(torch.equal(initial[k], v) for k, v in record.iterates[0].items())  # theta_1 != theta_0
    marker = json.loads((tmp_path / "spin" / "iteration-002" / "complete.json").read_text())
    assert marker["pairs"] == WINNERS and marker["iteration"] == 2


def test_the_losers_of_iteration_k_are_samples_of_iterate_k_minus_1(tiny_sd, real_winners, tmp_path):
    module = spin(tiny_sd, seed=3)
    spin_trainer(tmp_path).fit(module, datamodule=data(real_winners))
    first, second = (iteration_pairs(tmp_path / "spin" / f"iteration-00{k}") for k in (1, 2))
    assert len(second) == WINNERS and len({meta["caption"] for _, meta, _ in second}) == WINNERS  # each once

    # A fresh policy holding the saved theta_1 regenerates the losers from the stored seeds, batch by batch.
    fresh = spin(tiny_sd)
    weights = load_file(tmp_path / "spin" / "iteration-002" / "reference.safetensors")
    with torch.no_grad():
        for name, p in fresh.denoiser.named_parameters():
            if name in weights:
                p.copy_(weights[name])
    captions = [caption for caption, _, _ in second]
    seeds = [meta["loser_seed"] for _, meta, _ in second]
    key_of = {f"a red cat {i}": f"samples-{i:09d}" for i in range(WINNERS)}
    assert seeds == [stream_seed(3, "spin-loser", 2, key_of[caption]) for caption in captions]
    stored = torch.stack([tensors["latents_l"] for _, _, tensors in second])
    again = torch.cat(
        [
            fresh.generate(captions[i : i + BATCH], seeds[i : i + BATCH], decode=False, batch_size=BATCH, **STEPS_OF)
            for i in range(0, WINNERS, BATCH)
        ]
    )
    assert torch.equal(again, stored)
    # ... and neither theta_0 (iteration 1's sampler, same seeds) nor the final weights give them.
    base = torch.cat(
        [
            spin(tiny_sd).generate(captions[i : i + BATCH], seeds[i : i + BATCH], decode=False, **STEPS_OF)
            for i in range(0, WINNERS, BATCH)
        ]
    )
    final = module.generate(captions[:BATCH], seeds[:BATCH], decode=False, **STEPS_OF)
    assert (base - stored).abs().max() > 1e-3 and (final - stored[:BATCH]).abs().max() > 1e-3
    # The winners are the real images' latents (the VAE posterior's mode), the same in every iteration.
    real = {json.loads(s["json"])["caption"]: s["image.png"] for s in read_samples(real_winners)}
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(real[c])))) for c in captions])
    expected = module.backbone.encode_pixels(pixels.permute(0, 3, 1, 2).float() / 127.5 - 1)
    torch.testing.assert_close(torch.stack([tensors["latents_w"] for _, _, tensors in second]), expected)
    winners_1 = {meta["caption"]: tensors["latents_w"] for _, meta, tensors in first}
    for caption, _, tensors in second:
        assert torch.equal(tensors["latents_w"], winners_1[caption])


def test_a_resume_inside_an_iteration_reuses_its_pairs_and_reference(tiny_sd, real_winners, tmp_path):
    saving = ModelCheckpoint(tmp_path / "checkpoints", every_n_train_steps=1, save_top_k=-1)
    spin_trainer(tmp_path, steps=STEPS + 1, enable_checkpointing=True, callbacks=[saving]).fit(
        spin(tiny_sd), datamodule=data(real_winners)
    )
    checkpoint = next((tmp_path / "checkpoints").glob(f"*step={STEPS + 1}*"))  # one step into iteration 2
    iteration = tmp_path / "spin" / "iteration-002"
    files = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in iteration.iterdir()}

    resumed_module, record = spin(tiny_sd), Record()

    def no_generation(*args, **kwargs):
        raise AssertionError("the resumed run generated samples")

    resumed_module.generate = no_generation
    spin_trainer(tmp_path, callbacks=[record]).fit(resumed_module, datamodule=data(real_winners), ckpt_path=checkpoint)

    assert {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in iteration.iterdir()} == files
    assert record.steps == {1: STEPS - 1} and resumed_module.global_step == ITERATIONS * STEPS  # the same budget
    assert_same_tensors(record.references[1], load_file(iteration / "reference.safetensors"))

    uninterrupted = spin(tiny_sd)
    spin_trainer(tmp_path / "uninterrupted").fit(uninterrupted, datamodule=data(real_winners))
    assert_same_tensors(resumed_module.trained_weights(), uninterrupted.trained_weights())


def test_a_second_noise_for_the_loser_keeps_the_shared_timestep(tiny_sd):
    latents = torch.randn(4, 4, 8, 8)
    samples = Samples(latents, {}, num_pairs=2)
    shared = spin(tiny_sd).noise_samples(samples, PairRandomness.for_pairs((0,), range(2)))
    separate = spin(tiny_sd, shared_noise=False).noise_samples(samples, PairRandomness.for_pairs((0,), range(2)))
    assert torch.equal(shared.noise[:2], shared.noise[2:]) and torch.equal(shared.noise, shared.noise)
    assert torch.equal(separate.noise[:2], shared.noise[:2]) and not torch.equal(separate.noise[2:], separate.noise[:2])
    assert torch.equal(separate.timesteps, shared.timesteps) and torch.equal(
        separate.timesteps[:2], separate.timesteps[2:]
    )
    torch.testing.assert_close(
        separate.x_t, spin(tiny_sd).process.add_noise(latents, separate.noise, separate.timesteps)
    )


def test_options_and_setups_that_cannot_self_play_are_refused(tiny_sd, real_winners, tmp_path, tiny_shards):
    for options, key in (
        ({"num_iterations": 0}, "num_iterations"),
        ({"steps_per_iteration": 1.5}, "steps_per_iteration"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"shard_dtype": "int8"}, "shard_dtype"),
    ):
        with pytest.raises(ConfigError, match=key):
            spin(tiny_sd, **options)
    with pytest.raises(ConfigError, match="batches_per_epoch"):
        data(real_winners, batches_per_epoch=10)
    with pytest.raises(ConfigError, match="source"):
        data(real_winners, source="pairs")
    offline = PreferenceDataModule(str(tiny_shards), batch_size=BATCH, num_workers=0, batches_per_epoch=1)
    with pytest.raises(ConfigError, match="SelfPlayDataModule"):
        spin_trainer(tmp_path).fit(spin(tiny_sd), datamodule=offline)
    with pytest.raises(ConfigError, match="reload_dataloaders_every_n_epochs"):
        trainer(tmp_path, -1).fit(spin(tiny_sd), datamodule=data(real_winners))


def test_data_without_real_winners_is_refused(tiny_sd, tiny_shards, tmp_path):
    rng = np.random.default_rng(0)
    labelled = [{"image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "caption": "a cat", "label": 0}]
    write_unpaired_shards(labelled, tmp_path / "undesirable")
    with pytest.raises(ConfigError, match="label=0"):
        spin_trainer(tmp_path).fit(spin(tiny_sd), datamodule=data(tmp_path / "undesirable"))
    with pytest.raises(ConfigError, match="no real winner"):  # preference shards read as unpaired: nothing to read
        spin_trainer(tmp_path).fit(spin(tiny_sd), datamodule=data(tiny_shards))


def test_a_sharded_full_reference_is_refused_before_anything_is_generated(tiny_sd, real_winners, tmp_path):
    module = spin(tiny_sd, "full")
    module.reference.sharded = True  # as ZeRO-3 / FSDP2 leave it
    with pytest.raises(ConfigError, match="ZeRO-3 or FSDP2"):
        spin_trainer(tmp_path).fit(module, datamodule=data(real_winners))
    assert not list((tmp_path / "spin" / "iteration-001").glob("*.tar"))


def test_an_iteration_made_with_other_settings_is_refused(tiny_sd, real_winners, tmp_path):
    spin_trainer(tmp_path).fit(spin(tiny_sd, num_iterations=1), datamodule=data(real_winners))
    with pytest.raises(ConfigError, match="seed: 0 there, 1 now"):
        spin_trainer(tmp_path).fit(spin(tiny_sd, num_iterations=1, seed=1), datamodule=data(real_winners))


DDP_SCRIPT = """
import hashlib, json, os, sys
import lightning.pytorch as pl
from helpers.training import trainer
from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.datamodules.self_play import SelfPlayDataModule
from lightning_pref.methods.spin import SPINDiffusion

pipeline, real, out, failing_rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


class Failing(SPINDiffusion):
    def generate(self, *args, **kwargs):
        if self.global_rank == failing_rank:
            raise RuntimeError("this rank fails to generate")
        return super().generate(*args, **kwargs)


class Record(pl.Callback):
    def on_train_epoch_start(self, trainer, module):
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for n, p in
                                         sorted(module.denoiser.named_parameters()) if ".reference." in n))
        with open(os.path.join(out, f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.json"), "w") as f:
            json.dump({"reference": digest.hexdigest()}, f)


module = Failing(StableDiffusionBackbone(pipeline), num_iterations=2, steps_per_iteration=2, beta=100.0, lr=1e-2,
                 sampling_steps=2, guidance_scale=2.0)
data = SelfPlayDataModule(real, batch_size=2, num_workers=0)
trainer(out, -1, strategy="ddp", devices=2, reload_dataloaders_every_n_epochs=1, callbacks=[Record()]).fit(module, datamodule=data)
"""


@pytest.mark.parametrize("failing_rank", [-1, 1])
def test_two_processes_share_the_reference_and_a_failing_rank_stops_both(tiny_sd, real_winners, tmp_path, failing_rank):
    import subprocess
    import sys

    from helpers.processes import finish, script_env

    script = tmp_path / "spin_ddp.py"
    script.write_text(DDP_SCRIPT)
    process = subprocess.Popen(
        [sys.executable, str(script), str(tiny_sd), str(real_winners), str(tmp_path), str(failing_rank)],
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = finish(process, timeout=120)
    if failing_rank >= 0:  # every rank stopped (no hang), with the failing rank's error
        assert process.returncode != 0 and "this rank fails to generate" in output
        assert not (tmp_path / "spin" / "iteration-001" / "complete.json").exists()
        return
    assert process.returncode == 0, output[-3000:]
    for epoch in (0, 1):
        digests = {json.loads((tmp_path / f"rank{r}-epoch{epoch}.json").read_text())["reference"] for r in (0, 1)}
        assert len(digests) == 1  # the same reference on both ranks
    pairs = iteration_pairs(tmp_path / "spin" / "iteration-002")
    assert sorted(caption for caption, _, _ in pairs) == sorted(f"a red cat {i}" for i in range(WINNERS))
    assert {path.name.split("-")[1] for path in (tmp_path / "spin" / "iteration-002").glob("*.tar")} == {
        "rank000",
        "rank001",
    }  # each rank generated its own share


def test_the_example_configs_parse_with_the_toy_recipe(capsys):
    toy = printed_config("toy/spin_diffusion.yaml", capsys)
    model = toy["model"]["init_args"]
    assert (
        toy["model"]["class_path"] == "lightning_pref.methods.spin.SPINDiffusion"
        and toy["data"]["class_path"] == "lightning_pref.datamodules.self_play.SelfPlayDataModule"
    )
    assert (model["finetune"], model["lr"], model["beta"], model["warmup_steps"]) == ("full", 2e-5, 5000, 20)
    # the toy recipe at 10 pairs a step: generating each iteration's losers costs about as much as training on them
    assert toy["trainer"]["max_steps"] == 140 and toy["data"]["init_args"]["batch_size"] == 10
    sd15 = printed_config("sd15_spin_diffusion.yaml", capsys)
    assert sd15["model"]["class_path"].endswith(".SPINDiffusion")
    assert sd15["model"]["init_args"]["backbone"]["class_path"].endswith("StableDiffusionBackbone")
