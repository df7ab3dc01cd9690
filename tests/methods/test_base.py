"""The base module's contract: shared noise, gradients, the reference, checkpoints, resume, errors."""

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers.pairs import pair_loader, random_pairs
from helpers.training import perturb_lora, trainer
from torch.utils.data import DataLoader

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.errors import CheckpointError, DataError
from lightning_pref.methods import DiffusionDPO, PairRandomness, PreferenceDiffusionModule, Samples
from lightning_pref.reference import FrozenCopy


def test_winner_and_loser_share_timestep_and_noise(sd_backbone):
    module = DiffusionDPO(sd_backbone)
    latents = torch.randn(3, 4, 8, 8)
    samples = Samples(torch.cat([latents, latents]), {}, num_pairs=3)
    noisy = module.noise_samples(samples, PairRandomness.for_pairs((0,), range(3)))
    x_w, x_l = noisy.x_t.chunk(2)
    t_w, t_l = noisy.timesteps.chunk(2)
    torch.testing.assert_close(x_w, x_l)  # equal clean latents + shared (t, eps) -> equal x_t
    torch.testing.assert_close(t_w, t_l)
    assert len(t_w.unique()) == 3  # ...while different pairs get different timesteps


def test_every_step_micro_batch_and_pair_draws_its_own_stream(sd_backbone):
    """At 256 micro-batches per optimizer step (the shipped SD1.5 recipe) no two (step, micro-batch, pair) share
    noise; and a pair's stream depends on its global index only, not on how the batch is split over ranks."""
    module = DiffusionDPO(sd_backbone)
    batch = {"prompt": ["a"] * 4}

    def first_draws(step: int, rank: int, batch_idx: int) -> list[float]:
        module._trainer = SimpleNamespace(accumulate_grad_batches=256, global_step=step, global_rank=rank, world_size=2)
        return module.step_randomness(batch, batch_idx, "train").uniform().tolist()

    draws = [
        value
        for step in range(3)
        for batch_idx in range(step * 256, step * 256 + 256)
        for value in first_draws(step, 0, batch_idx)
    ]
    assert len(set(draws)) == len(draws) == 3 * 256 * 4
    one_rank = first_draws(5, 0, 7) + first_draws(5, 1, 7)  # ranks 0 and 1 of 4 pairs each: global pairs 0-7
    module._trainer = SimpleNamespace(accumulate_grad_batches=256, global_step=5, global_rank=0, world_size=1)
    assert module.step_randomness({"prompt": ["a"] * 8}, 7, "train").uniform().tolist() == one_rank
    module._trainer = None


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_only_trainable_parameters_receive_gradients(sd_backbone, finetune):
    module = DiffusionDPO(sd_backbone, finetune=finetune)
    if finetune == "lora":
        perturb_lora(module)
    batch = next(iter(pair_loader()))
    random = PairRandomness.for_pairs((0,), range(len(batch["prompt"])))
    samples = module.prepare_samples(batch, random)
    errors = module.sample_errors(module.noise_samples(samples, random), samples.conditioning, batch)
    loss, _ = module.compute_loss(errors, batch)
    loss.backward()
    with_grad = {name for name, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert with_grad and with_grad <= trainable
    if finetune == "lora":
        assert all("lora_" in name for name in trainable)
    else:
        assert trainable == {f"backbone.denoiser.{name}" for name, _ in module.denoiser.named_parameters()}
    assert not any(name.startswith(("backbone.text_encoder", "backbone.vae")) for name in trainable)


def test_lora_reference_equals_the_base_model(tiny_sd, sd_backbone):
    module = DiffusionDPO(sd_backbone, finetune="lora")
    perturb_lora(module)
    base = StableDiffusionBackbone(str(tiny_sd))
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    conditioning = base.encode_prompts(["a red cat", "a dog"])
    reference = module.reference_prediction(x_t, t, conditioning)
    policy = module.backbone.predict(module.denoiser, x_t, t, conditioning)
    torch.testing.assert_close(reference, base.predict(base.denoiser, x_t, t, conditioning))
    assert not torch.allclose(policy, reference)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_reference_never_changes_while_the_policy_trains(tmp_path, tiny_sd, finetune):
    module = DiffusionDPO(StableDiffusionBackbone(str(tiny_sd)), finetune=finetune, lr=1e-3)
    base = StableDiffusionBackbone(str(tiny_sd))
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    conditioning = base.encode_prompts(["a red cat", "a dog"])
    before_policy = module.backbone.predict(module.denoiser, x_t, t, conditioning).detach()
    trainer(tmp_path, 3).fit(module, pair_loader())
    module.eval()
    expected = base.predict(base.denoiser, x_t, t, conditioning)
    torch.testing.assert_close(module.reference_prediction(x_t, t, conditioning), expected)
    after_policy = module.backbone.predict(module.denoiser, x_t, t, conditioning)
    assert not torch.allclose(after_policy, before_policy)


def test_frozen_copy_is_outside_the_module_and_optimizer(sd_backbone):
    module = DiffusionDPO(sd_backbone, finetune="full")
    assert isinstance(module.reference, FrozenCopy)
    reference_params = {id(p) for p in module.reference.copy.parameters()}
    assert not reference_params & {id(p) for p in module.parameters()}
    assert not any(child is module.reference.copy for child in module.modules())


def test_offloaded_reference_stays_on_cpu_and_matches(sd_backbone):
    module = DiffusionDPO(sd_backbone, finetune="full", reference_offload=True)
    module.to(torch.float64)  # a move the offloaded copy does not follow
    assert next(module.reference.copy.parameters()).dtype == torch.float32
    with module.reference_denoiser() as reference:
        assert reference is module.reference.copy


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_checkpoint_holds_only_trained_weights(tmp_path, sd_backbone, finetune):
    module = DiffusionDPO(sd_backbone, finetune=finetune)
    fit = trainer(tmp_path, 1)
    fit.fit(module, pair_loader(4))
    path = tmp_path / "model.ckpt"
    fit.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert state and all(key.startswith("backbone.denoiser.") for key in state)
    if finetune == "lora":
        assert all("lora_" in key for key in state)
    else:
        assert len(state) == len(module.denoiser.state_dict())


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_sd, finetune):
    """Weights, optimizer moments, the lr schedule and the per-step noise all continue where they stopped.

    Every batch is the same pairs, so the comparison does not depend on where a restarted loader resumes.
    """

    def new_module():
        return DiffusionDPO(
            StableDiffusionBackbone(str(tiny_sd)), finetune=finetune, lr=1e-3, warmup_steps=3, caption_dropout=0.3
        )

    same_batches = DataLoader(random_pairs(4) * 4, batch_size=4)
    straight = new_module()
    trainer(tmp_path / "a", 4).fit(straight, same_batches)

    interrupted = trainer(tmp_path / "b", 2)
    interrupted.fit(new_module(), same_batches)
    interrupted.save_checkpoint(tmp_path / "half.ckpt")
    resumed = new_module()
    continuation = trainer(tmp_path / "b", 4)
    continuation.fit(resumed, same_batches, ckpt_path=tmp_path / "half.ckpt", weights_only=True)

    assert continuation.global_step == 4
    for (name, expected), (_, actual) in zip(straight.denoiser.named_parameters(), resumed.denoiser.named_parameters()):
        if expected.requires_grad:
            torch.testing.assert_close(actual, expected, msg=name)
    assert continuation.optimizers[0].state_dict()["state"]  # optimizer moments restored
    assert continuation.lr_scheduler_configs[0].scheduler.last_epoch == 4


def test_checkpoint_from_another_configuration_is_refused(tmp_path, tiny_sd):
    lora = DiffusionDPO(StableDiffusionBackbone(str(tiny_sd)), finetune="lora", lora_rank=4)
    fit = trainer(tmp_path, 1)
    fit.fit(lora, pair_loader(4))
    fit.save_checkpoint(tmp_path / "lora.ckpt")
    full = DiffusionDPO(StableDiffusionBackbone(str(tiny_sd)), finetune="full")
    with pytest.raises(CheckpointError, match="finetune: 'lora' in the checkpoint, 'full' in the config"):
        trainer(tmp_path, 2).fit(full, pair_loader(4), ckpt_path=tmp_path / "lora.ckpt")


def test_missing_batch_field_is_a_clear_error(tmp_path, sd_backbone):
    module = DiffusionDPO(sd_backbone)
    batch = {"pixels_w": torch.zeros(2, 3, 16, 16), "prompt": ["a", "b"]}
    with pytest.raises(DataError, match="'pixels_l'.*DataModule"):
        module.prepare_pairs(batch, PairRandomness.for_pairs((0,), range(2)))
    with pytest.raises(DataError, match="no 'prompt' field"):
        module.prepare_pairs(
            {"pixels_w": batch["pixels_w"], "pixels_l": batch["pixels_w"]}, PairRandomness.for_pairs((0,), range(2))
        )


def test_method_refuses_a_backbone_it_is_not_defined_for(sd_backbone):
    class FlowOnlyDPO(DiffusionDPO):
        supported_prediction_types = ("flow",)

    with pytest.raises(ValueError, match="FlowOnlyDPO is defined for prediction types.*predicts 'epsilon'"):
        FlowOnlyDPO(sd_backbone)


def test_bad_module_options_are_clear_errors(sd_backbone):
    with pytest.raises(ValueError, match="reference_offload=True needs finetune='full'"):
        DiffusionDPO(sd_backbone, reference_offload=True)
    with pytest.raises(ValueError, match="loss kind 'logistic'"):
        DiffusionDPO(sd_backbone, loss_type="logistic")
    with pytest.raises(ValueError, match="caption_dropout"):
        DiffusionDPO(sd_backbone, caption_dropout=1.5)


def test_scale_lr_multiplies_by_pairs_per_optimizer_step(tmp_path, sd_backbone):
    class Data(pl.LightningDataModule):
        batch_size = 2

        def train_dataloader(self):
            return DataLoader(random_pairs(8), batch_size=self.batch_size)

    module = DiffusionDPO(sd_backbone, lr=1e-8, scale_lr=True)
    fit = trainer(tmp_path, 1, accumulate_grad_batches=3)
    fit.fit(module, datamodule=Data())
    assert fit.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(1e-8 * 2 * 3)


def test_base_module_requires_a_loss(sd_backbone):
    module = PreferenceDiffusionModule(sd_backbone)
    with pytest.raises(NotImplementedError, match="compute_loss"):
        module.compute_loss(None, {})


def test_bf16_mixed_precision_and_gradient_checkpointing_train(tmp_path, sd_backbone):
    module = DiffusionDPO(sd_backbone, finetune="full", gradient_checkpointing=True, lr=1e-3)
    assert module.denoiser.is_gradient_checkpointing
    before = {name: p.detach().clone() for name, p in module.denoiser.named_parameters()}
    fit = trainer(tmp_path, 2, precision="bf16-mixed")
    fit.fit(module, pair_loader(8))
    assert torch.isfinite(fit.callback_metrics["train/loss"])
    assert any(not torch.equal(before[name], p) for name, p in module.denoiser.named_parameters())
    assert next(module.denoiser.parameters()).dtype == torch.float32  # master weights stay fp32


def test_adafactor_optimizer(tmp_path, sd_backbone):
    module = DiffusionDPO(sd_backbone, optimizer="adafactor", lr=1e-3)
    fit = trainer(tmp_path, 1)
    fit.fit(module, pair_loader(4))
    assert type(fit.optimizers[0]).__name__ == "Adafactor"


def test_gradient_checkpointing_follows_the_backbone_unless_set(sd_backbone, tmp_path):
    from lightning_pref.backbones import CogVideoXBackbone
    from lightning_pref.tiny import write_tiny_cogvideox_pipeline

    video = CogVideoXBackbone(str(write_tiny_cogvideox_pipeline(tmp_path / "cog")))
    assert DiffusionDPO(video).denoiser.gradient_checkpointing  # billion-parameter family: on by default
    assert not DiffusionDPO(
        CogVideoXBackbone(str(tmp_path / "cog")), gradient_checkpointing=False
    ).denoiser.gradient_checkpointing
    assert not any(getattr(m, "gradient_checkpointing", False) for m in DiffusionDPO(sd_backbone).denoiser.modules())


@pytest.mark.parametrize("progress_bar", [True, False])
def test_the_metrics_are_logged_on_the_steps_the_logger_writes_and_the_loss_every_step_a_bar_shows(
    sd_backbone, tmp_path, progress_bar
):
    class RecordingDPO(DiffusionDPO):
        def log(self, name, value, *args, **kwargs):
            self.logged.append((self.global_step, name))
            super().log(name, value, *args, **kwargs)

    module = RecordingDPO(sd_backbone)
    module.logged = []
    fit = trainer(tmp_path, 6, log_every_n_steps=3, enable_progress_bar=progress_bar)
    fit.fit(module, pair_loader(num_pairs=12, batch_size=2))
    # Lightning writes after optimizer steps 3 and 6 (global_step 2 and 5 while they train)
    assert sorted({step for step, name in module.logged if name == "train/implicit_acc"}) == [2, 5]
    loss_steps = [step for step, name in module.logged if name == "train/loss"]
    assert loss_steps == (list(range(6)) if progress_bar else [2, 5])
