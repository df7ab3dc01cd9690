"""Inversion-DPO as a module: the released loss, the gradient at the start, subsets, the cache, fits, refusals."""

import logging

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from helpers.cli import printed_config
from helpers.pairs import pair_loader
from helpers.steps import batch_of
from helpers.training import perturb_lora, trainer
from safetensors.torch import load
from torch.utils.data import DataLoader

import lightning_pref.methods.inversion_dpo as inversion_module
from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.errors import ConfigError
from lightning_pref.methods import PairRandomness
from lightning_pref.methods.inversion_dpo import InversionDPO
from lightning_pref.pair_sources import PairSource
from lightning_pref.processes import FlowMatchingProcess, ddim_invert

FP32_ULP = 2.0**-23


def step(module, batch, stream=(0,)):
    """One step's (noisy samples, errors, loss, metrics), as the training step computes them."""
    random = PairRandomness.for_pairs(stream, range(len(batch["prompt"])))
    samples = module.prepare_samples(batch, random)
    noisy = module.noise_samples(samples, random)
    errors = module.sample_errors(noisy, samples.conditioning, batch)
    loss, metrics = module.compute_loss(errors, batch)
    return noisy, errors, loss, metrics


def build(tiny_sd, **options):
    """An InversionDPO of its own tiny SD backbone (a backbone takes one module's adapters)."""
    return InversionDPO(StableDiffusionBackbone(str(tiny_sd)), **options)


def latent_batch(num_pairs=2, seed=0):
    """Pairs of precomputed latents of the tiny SD pipeline: the same samples every time they are read."""
    generator = torch.Generator().manual_seed(seed)
    shape = (num_pairs, 4, 8, 8)
    prompts = ["a red cat", "a blue dog", "a green circle", "a square"]
    return {
        "latents_w": torch.randn(shape, generator=generator),
        "latents_l": torch.randn(shape, generator=generator),
        "prompt": [prompts[i % 4] for i in range(num_pairs)],
    }


def gradient_norm(module, loss):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).norm()


# ------------------------------------------------------------------------------ the released code's loss
def released_code_loss(module, latents_w, latents_l, prompt, num_steps, beta, guidance=2.0):
    """The loss of Inversion-DPO's released training step (``train_ddim.py``) for one pair, written from its
    description: ``_next_step_scheduler`` on a fresh ``DDIMScheduler(set_alpha_to_one=False)``, guided predictions
    (here with the empty prompt's encoding as the unconditional branch), the reversed lists, ``1 / (2 abar_t)``."""
    backbone = module.backbone
    scheduler = DDIMScheduler.from_config(
        backbone.process.scheduler_config, set_alpha_to_one=False, steps_offset=0, timestep_spacing="leading"
    )
    scheduler.set_timesteps(num_steps)
    spacing = scheduler.config.num_train_timesteps // num_steps
    context = torch.cat([backbone.encode_prompts([text])["encoder_hidden_states"] for text in ("", prompt)])

    def guided(unet, latent, t):
        prediction = backbone.predict(unet, torch.cat([latent] * 2), t.expand(2), {"encoder_hidden_states": context})
        unconditional, conditional = prediction.chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    def invert(z0):
        latents, reference_noise, latent = [z0], [], z0
        with torch.no_grad(), module.reference_denoiser() as reference:
            for i in range(num_steps):
                t = scheduler.timesteps[num_steps - i - 1]
                noise = guided(reference, latent, t)
                reference_noise.append(noise)
                current, following = int(t) - spacing, int(t)
                alpha = scheduler.alphas_cumprod[current] if current >= 0 else scheduler.final_alpha_cumprod
                alpha_next = scheduler.alphas_cumprod[following]
                clean = (latent - (1 - alpha) ** 0.5 * noise) / alpha**0.5
                latent = alpha_next**0.5 * clean + (1 - alpha_next) ** 0.5 * noise
                latents.append(latent)
        ascending = [scheduler.timesteps[num_steps - i - 1] for i in range(num_steps)]
        policy_noise = [guided(module.denoiser, z, t) for z, t in zip(latents[:-1], ascending)]
        return policy_noise[::-1], reference_noise[::-1]

    policy_w, reference_w = invert(latents_w)
    policy_l, reference_l = invert(latents_l)
    total_w = total_l = 0.0
    for index in range(num_steps):
        alpha = scheduler.alphas_cumprod[int(scheduler.timesteps[index])]
        weight = (1 - alpha) / (2 * (1 - alpha) * alpha)
        total_w = total_w + weight * ((policy_w[index] - reference_w[index]) ** 2).mean()
        total_l = total_l + weight * ((policy_l[index] - reference_l[index]) ** 2).mean()
    return -F.logsigmoid(0.5 * beta * (total_w - total_l) / num_steps)


def test_target_reference_with_sign_code_is_the_released_training_step(sd_backbone):
    module = InversionDPO(sd_backbone, num_inversion_steps=5, target="reference", sign="code", beta=2000.0)
    perturb_lora(module)  # the released loss is log 2 with a zero gradient while policy == reference
    batch = latent_batch(num_pairs=1)  # the released code's batch: one pair
    _, _, loss, _ = step(module, batch)
    expected = released_code_loss(module, batch["latents_w"], batch["latents_l"], batch["prompt"][0], 5, 2000.0)
    assert abs(loss.item() - F.logsigmoid(torch.zeros(())).neg().item()) > 1e-3  # far from log 2: a real test
    # the same fp32 arithmetic in another order: errors of a few ulps of e, D's weights up to 1 / (2 abar_800) ~ 25
    torch.testing.assert_close(loss, expected.reshape(()), rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------ hazard (a): the first step
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_the_default_has_a_gradient_at_the_first_step_and_the_released_target_has_none(tiny_sd, finetune):
    batch = batch_of(2)
    default = build(tiny_sd, finetune=finetune, num_inversion_steps=4)
    _, errors, loss, _ = step(default, batch)
    assert torch.equal(errors.policy, errors.reference)  # policy == reference: the margin is 0...
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    assert gradient_norm(default, loss) > 0  # ...but not its gradient
    released = build(tiny_sd, finetune=finetune, num_inversion_steps=4, target="reference")
    _, errors, loss, _ = step(released, batch)
    assert (errors.reference == 0).all()
    # |e_theta - e_ref|^2 of a policy equal to its reference: zero up to the rounding of forwards over other rows
    # (the inversion's batch is not the policy's), a few ulps of e (|e| < 1 here)
    assert errors.policy.max() < (64 * FP32_ULP) ** 2
    # the gradient is proportional to that residual, the default's to e - eps (of the order of e): 64 ulps is 8e-6
    assert gradient_norm(released, loss) < 1e-4 * gradient_norm(default, step(default, batch)[2])


def test_a_fresh_run_with_the_released_target_is_warned_about(tiny_sd, caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_pref.methods.inversion_dpo"):
        build(tiny_sd, num_inversion_steps=4).on_train_start()
        assert not caplog.records
        build(tiny_sd, num_inversion_steps=4, target="reference").on_train_start()
    assert "exactly zero" in caplog.text


# ------------------------------------------------------------------------------ the points trained on
def test_the_default_trains_on_the_inverted_latents_with_the_noise_that_makes_them(sd_backbone):
    module = InversionDPO(sd_backbone, num_inversion_steps=4)
    batch = latent_batch(num_pairs=2)
    noisy, errors, _, _ = step(module, batch)
    x0 = torch.cat([batch["latents_w"], batch["latents_l"]])
    timesteps = module.process.ddim_inversion_timesteps(4)
    assert noisy.x_t.shape == (2 * 2 * 4, *x0.shape[1:]) and torch.equal(noisy.timesteps, timesteps.repeat(4))
    # step i trains on z_{i+1} of the reference's guided inversion (z_1 = x0: the identity first step)
    conditioning = module.backbone.encode_prompts(batch["prompt"] * 2)
    with module.reference_denoiser() as reference:
        inversion = ddim_invert(
            lambda z, t: module.guided_noise(reference, z, t, conditioning),
            x0,
            timesteps,
            module.process.alphas_cumprod,
        )
    assert torch.equal(noisy.x_t, inversion.latents[:, 1:].flatten(0, 1))
    assert torch.equal(noisy.x_t[::4], x0) and not torch.allclose(noisy.x_t[1::4], x0)
    # and x_t = sqrt(abar) x0 + sqrt(1 - abar) target at every point
    expanded = x0.repeat_interleave(4, 0)
    torch.testing.assert_close(module.process.add_noise(expanded, noisy.target, noisy.timesteps), noisy.x_t)
    assert errors.num_pairs == 2 * 4 and torch.equal(errors.timesteps, timesteps.repeat(2))


def test_sign_code_is_sign_dpo_on_the_exchanged_pair(tiny_sd):
    batch = latent_batch(num_pairs=2)
    swapped = {**batch, "latents_w": batch["latents_l"], "latents_l": batch["latents_w"]}
    code = build(tiny_sd, num_inversion_steps=3, target="reference", sign="code")
    perturb_lora(code)
    dpo = build(tiny_sd, num_inversion_steps=3, target="reference", sign="dpo")
    dpo.load_state_dict(code.state_dict())
    code_loss, dpo_loss = step(code, batch)[2], step(dpo, swapped)[2]
    torch.testing.assert_close(code_loss, dpo_loss, rtol=1e-5, atol=0)  # forwards over exchanged rows
    assert not torch.allclose(code_loss, step(dpo, batch)[2])


def test_a_subset_of_steps_is_drawn_per_pair_from_its_stream_and_shared_by_winner_and_loser(sd_backbone):
    module = InversionDPO(sd_backbone, num_inversion_steps=20, timesteps_per_step=3)
    steps = module.trained_steps(PairRandomness.for_pairs((0, "train", 5, 0), range(8)))
    assert steps.shape == (8, 3) and (steps.diff(1) > 0).all() and steps.min() >= 0 and steps.max() < 20
    assert len({tuple(row.tolist()) for row in steps}) > 1  # the pairs draw their own
    assert torch.equal(steps, module.trained_steps(PairRandomness.for_pairs((0, "train", 5, 0), range(8))))
    # a pair's draw depends on its index in the global batch, not on the rows beside it (ranks, batch split)
    assert torch.equal(steps[5:], module.trained_steps(PairRandomness.for_pairs((0, "train", 5, 0), range(5, 8))))
    assert not torch.equal(steps, module.trained_steps(PairRandomness.for_pairs((0, "train", 6, 0), range(8))))
    noisy = step(module, latent_batch(num_pairs=2))[0]
    winners, losers = noisy.timesteps.chunk(2)
    assert torch.equal(winners, losers) and len(winners) == 2 * 3


def test_a_subset_trains_on_the_very_points_of_the_full_inversion(tiny_sd):
    subset = build(tiny_sd, num_inversion_steps=6, timesteps_per_step=2)
    perturb_lora(subset)
    full = build(tiny_sd, num_inversion_steps=6)
    full.load_state_dict(subset.state_dict())
    batch = latent_batch(num_pairs=2)
    noisy, errors, _, _ = step(subset, batch)
    every, every_errors, _, _ = step(full, batch)
    steps = subset.trained_steps(PairRandomness.for_pairs((0,), range(2))).repeat(2, 1)  # (samples, K)
    rows = (torch.arange(4).unsqueeze(1) * 6 + steps).flatten()
    # the inversion runs over the same rows either way (stopping early after the last step needed)
    assert torch.equal(noisy.x_t, every.x_t[rows]) and torch.equal(noisy.target, every.target[rows])
    # the forwards run over other numbers of rows, which may sum in another order: a few ulps of the error
    torch.testing.assert_close(errors.policy, every_errors.policy[rows], rtol=64 * FP32_ULP, atol=0)
    torch.testing.assert_close(errors.reference, every_errors.reference[rows], rtol=64 * FP32_ULP, atol=0)


def test_the_unguided_branch_and_the_losers_inversion_prompt_are_options(tiny_sd):
    batch = latent_batch(num_pairs=2)
    empty = step(build(tiny_sd, num_inversion_steps=3), batch)[0]
    zeros = step(build(tiny_sd, num_inversion_steps=3, unconditional="zeros"), batch)[0]
    assert not torch.allclose(empty.x_t[2 * 3 :], zeros.x_t[2 * 3 :])
    unconditioned = step(build(tiny_sd, num_inversion_steps=3, loser_inversion_prompt="empty"), batch)[0]
    winners = slice(0, 2 * 3)
    assert torch.equal(unconditioned.x_t[winners], empty.x_t[winners])
    assert not torch.allclose(unconditioned.x_t[2 * 3 :], empty.x_t[2 * 3 :])


def test_a_v_prediction_backbone_trains_in_epsilon_units(tiny_pixel):
    module = InversionDPO(StableDiffusionBackbone(str(tiny_pixel)), num_inversion_steps=3)
    noisy, _, loss, metrics = step(module, batch_of(2, size=8))
    x0 = noisy.x_t.view(4, 3, *noisy.x_t.shape[1:])[:, 0].repeat_interleave(3, 0)  # z_1 = x0
    torch.testing.assert_close(module.process.add_noise(x0, noisy.target, noisy.timesteps), noisy.x_t)
    assert torch.isfinite(loss) and gradient_norm(module, loss) > 0


# ------------------------------------------------------------------------------ the inversion cache
@pytest.fixture
def counted_inversions(monkeypatch):
    """The rows ddim_invert inverts, call by call."""
    calls = []
    real = inversion_module.ddim_invert

    def counting(predict_eps, x0, *args, **kwargs):
        calls.append(x0.shape[0])
        return real(predict_eps, x0, *args, **kwargs)

    monkeypatch.setattr(inversion_module, "ddim_invert", counting)
    return calls


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_a_cached_inversion_is_reused_until_the_reference_changes(tiny_sd, finetune, counted_inversions):
    module = build(tiny_sd, finetune=finetune, num_inversion_steps=4, inversion_cache_size=8)
    plain = build(tiny_sd, finetune=finetune, num_inversion_steps=4)
    batch = latent_batch(num_pairs=2)
    uncached = step(plain, batch)[0]
    counted_inversions.clear()
    first, _, _, metrics = step(module, batch)
    assert counted_inversions == [4] and len(module.inversion_cache) == 4 and metrics["inversion_cached_fraction"] == 0
    assert torch.equal(first.x_t, uncached.x_t) and torch.equal(first.target, uncached.target)  # nothing changes
    with torch.no_grad():  # the policy trains: the reference, and so the cache, stay valid
        for param in module.parameters():
            if param.requires_grad:
                param.add_(0.01)
    again, _, _, metrics = step(module, batch, stream=(1,))
    assert counted_inversions == [4] and metrics["inversion_cached_fraction"] == 1.0
    assert torch.equal(again.x_t, first.x_t)
    module.reference.install(module.trained_weights())  # the reference changes: every entry is stale
    after, _, _, metrics = step(module, batch)
    assert counted_inversions == [4, 4] and metrics["inversion_cached_fraction"] == 0.0
    assert not torch.allclose(after.x_t, first.x_t)
    assert step(module, batch)[3]["inversion_cached_fraction"] == 1.0  # and the new ones are used


def test_the_cache_is_keyed_by_content_and_bounded(sd_backbone, counted_inversions):
    module = InversionDPO(sd_backbone, num_inversion_steps=3, inversion_cache_size=5)
    batch = latent_batch(num_pairs=2)
    step(module, batch)
    changed = {**batch, "latents_l": batch["latents_l"] + 0.5}  # new losers, the same winners
    assert step(module, changed)[3]["inversion_cached_fraction"] == 0.5 and counted_inversions == [4, 2]
    recaptioned = {**batch, "prompt": ["a square", "a square"]}  # every sample's conditioning changes
    assert step(module, recaptioned)[3]["inversion_cached_fraction"] == 0.0
    assert len(module.inversion_cache) == 5  # 10 samples inverted, the 5 most recent kept


def latent_pairs(num_pairs):
    """A loader of ``num_pairs`` precomputed latent pairs, two a batch, in a fixed order."""
    batch = latent_batch(num_pairs)
    pairs = [{key: value[row] for key, value in batch.items()} for row in range(num_pairs)]
    return DataLoader(pairs, batch_size=2)


def fitted(tiny_sd, tmp_path, **options):
    """The trained weights of a two-step LoRA fit on four latent pairs (the same initial adapters every call)."""
    torch.manual_seed(0)
    module = build(tiny_sd, lr=1e-3, num_inversion_steps=4, timesteps_per_step=2, **options)
    trainer(tmp_path, 2).fit(module, train_dataloaders=latent_pairs(4))
    return module.trained_weights(), module.inversion_cache


def test_an_inversion_cache_dir_serves_another_run_the_same_inversions(tiny_sd, tmp_path, counted_inversions):
    plain, _ = fitted(tiny_sd, tmp_path / "plain")
    inverted, plain_calls = sum(counted_inversions), len(counted_inversions)
    store = tmp_path / "inversions"
    cold, cache = fitted(tiny_sd, tmp_path / "cold", inversion_cache_dir=str(store))
    files = sorted(cache.folder.glob("*.safetensors"))
    assert cache.folder.parent == store and len(files) == inverted and len(cache) == 0  # the disk alone (size 0)
    assert set(counted_inversions[plain_calls:]) == {inversion_module.INVERSION_CHUNK}  # in chunks of a fixed size
    calls = len(counted_inversions)
    warm, _ = fitted(tiny_sd, tmp_path / "warm", inversion_cache_dir=str(store))
    assert len(counted_inversions) == calls  # a new run of the same samples and reference inverts none
    for name, value in cold.items():  # and trains as the run that made them, and as one without a cache
        assert torch.equal(warm[name], value), name
        # the plain run inverts a batch at once: its convolutions round differently, by ULPs of the adapters
        torch.testing.assert_close(value, plain[name], rtol=0, atol=1e-4 * plain[name].abs().max().item())
    stored = load(files[0].read_bytes())
    files[0].write_bytes(b"not a safetensors file")  # an unreadable entry is inverted again and rewritten
    again, cache = fitted(tiny_sd, tmp_path / "again", inversion_cache_dir=str(store))
    assert cache.unreadable == 1 and len(counted_inversions) == calls + 1
    assert sorted(cache.folder.glob("*.safetensors")) == files and not list(cache.folder.glob(".*"))
    rewritten = load(files[0].read_bytes())  # in another batch, as the same numbers
    assert stored.keys() == rewritten.keys() and all(torch.equal(rewritten[k], v) for k, v in stored.items())
    assert all(torch.equal(again[name], value) for name, value in cold.items())


def test_an_inversion_cache_dir_has_a_folder_per_reference_and_settings(tiny_sd, tmp_path, counted_inversions):
    store, batch = str(tmp_path / "inversions"), latent_batch(num_pairs=2)
    module = build(tiny_sd, num_inversion_steps=4, inversion_cache_dir=store)
    step(module, batch)
    first = module.inversion_cache.folder
    guided = build(tiny_sd, num_inversion_steps=4, guidance_scale=3.0, inversion_cache_dir=store)
    assert step(guided, batch)[3]["inversion_cached_fraction"] == 0.0 and guided.inversion_cache.folder != first
    with torch.no_grad():  # the policy trains: the reference and its folder stay
        for param in module.parameters():
            if param.requires_grad:
                param.add_(0.01)
    assert step(module, batch)[3]["inversion_cached_fraction"] == 1.0 and module.inversion_cache.folder == first
    module.reference.install(module.trained_weights())  # a new reference: a new folder, every sample inverted
    assert step(module, batch)[3]["inversion_cached_fraction"] == 0.0
    assert module.inversion_cache.folder not in (first, guided.inversion_cache.folder)
    assert len(list((tmp_path / "inversions").iterdir())) == 3


def test_a_cache_is_refused_for_pixels_a_vae_samples_anew_each_step(sd_backbone):
    module = InversionDPO(sd_backbone, num_inversion_steps=3, inversion_cache_size=5)
    with pytest.raises(ConfigError, match="the VAE samples a new latent"):
        step(module, batch_of(2))


# ------------------------------------------------------------------------------ fits
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_a_two_step_fit_trains_the_policy(tiny_sd, tmp_path, finetune):
    module = build(tiny_sd, finetune=finetune, lr=1e-3, num_inversion_steps=4, timesteps_per_step=2)
    before = {name: value.clone() for name, value in module.trained_weights().items()}
    fit = trainer(tmp_path, 2)
    fit.fit(module, train_dataloaders=pair_loader(8, 4))
    assert fit.global_step == 2
    metrics = fit.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and {"train/implicit_acc", "train/reward_margin"} <= set(metrics)
    assert any(not torch.equal(before[name], value) for name, value in module.trained_weights().items())


# ------------------------------------------------------------------------------ refusals and configs
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(sign="plus"), "sign='plus'"),
        (dict(target="noise"), "target='noise'"),
        (dict(sign="code"), "sign='code' with target='inverted_noise'"),
        (dict(num_inversion_steps=0), "num_inversion_steps=0"),
        (dict(num_inversion_steps=1001), "num_inversion_steps=1001"),
        (dict(num_inversion_steps=10, timesteps_per_step=11), "timesteps_per_step=11 exceeds"),
        (dict(timesteps_per_step=0), "timesteps_per_step=0"),
        (dict(guidance_scale=0.5), "guidance_scale=0.5"),
        (dict(unconditional="none"), "unconditional='none'"),
        (dict(loser_inversion_prompt="loser"), "loser_inversion_prompt='loser'"),
        (dict(inversion_cache_size=-1), "inversion_cache_size=-1"),
        (dict(inversion_cache_size=4, pair_source=PairSource()), "set inversion_cache_size: 0"),
        (dict(inversion_cache_dir="inversions", pair_source=PairSource()), "inversion_cache_dir: null"),
        (dict(loser_safeguard=True), "loser_safeguard is not defined for InversionDPO"),
        (dict(entropy_gamma=100.0), "entropy_gamma is not defined for InversionDPO"),
    ],
)
def test_bad_options_are_refused(sd_backbone, options, message):
    with pytest.raises(ConfigError, match=message):
        InversionDPO(sd_backbone, **options)


def test_a_flow_matching_backbone_is_refused(sd_backbone):
    sd_backbone.process = FlowMatchingProcess()  # the SD UNet as if it were a flow model
    with pytest.raises(ConfigError, match="predicts 'flow'"):
        InversionDPO(sd_backbone)


def test_the_example_configs_parse(capsys):
    toy = printed_config("toy/inversion_dpo.yaml", capsys)
    model = toy["model"]["init_args"]
    assert toy["model"]["class_path"] == "lightning_pref.methods.inversion_dpo.InversionDPO"
    assert toy["data"]["class_path"] == "lightning_pref.datamodules.PreferenceDataModule"
    # the toy recipe of Diffusion-DPO
    assert (model["finetune"], model["lr"], model["warmup_steps"], model["caption_dropout"]) == ("full", 2e-5, 20, 0.1)
    assert toy["trainer"]["max_steps"] == 140 and toy["data"]["init_args"]["batch_size"] == 16
    assert (model["target"], model["sign"]) == ("inverted_noise", "dpo")
    released = printed_config("toy/inversion_dpo_released.yaml", capsys)
    released_model = released["model"]["init_args"]
    assert (released_model["target"], released_model["sign"]) == ("reference", "code")
    assert {**released_model, "target": "inverted_noise", "sign": "dpo"} == model  # the loss alone differs
    sd15 = printed_config("sd15_inversion_dpo.yaml", capsys)
    sd15_model = sd15["model"]["init_args"]
    assert sd15["model"]["class_path"].endswith(".InversionDPO")
    assert sd15_model["backbone"]["class_path"].endswith("StableDiffusionBackbone")
    assert (sd15_model["num_inversion_steps"], sd15_model["guidance_scale"], sd15_model["beta"]) == (80, 2.0, 2000)
