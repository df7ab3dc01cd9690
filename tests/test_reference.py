"""The reference component: adapters disabled (LoRA) or a frozen copy (full), installing a snapshot, EMA copies."""

import io

import pytest
import torch

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.errors import CheckpointError, ConfigError
from lightning_pref.methods import DiffusionDPO
from lightning_pref.reference import AdaptersDisabled, EMACopies, FrozenCopy


def perturb_trained(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.denoiser.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def predictions(module, sd_backbone):
    x_t, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([100, 700])
    conditioning = sd_backbone.encode_prompts(["a red cat", "a dog"])
    policy = module.backbone.predict(module.denoiser, x_t, t, conditioning).detach()
    return policy, module.reference_prediction(x_t, t, conditioning)


@pytest.mark.parametrize(("finetune", "kind"), [("lora", AdaptersDisabled), ("full", FrozenCopy)])
def test_an_installed_snapshot_is_the_reference_until_the_next(sd_backbone, finetune, kind):
    module = DiffusionDPO(sd_backbone, finetune=finetune)
    assert isinstance(module.reference, kind)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    perturb_trained(module, seed=0)
    snapshot = module.trained_weights()
    assert all(value.device.type == "cpu" for value in snapshot.values())
    module.reference.install(snapshot)
    policy, reference = predictions(module, sd_backbone)
    torch.testing.assert_close(reference, policy, rtol=0, atol=0)  # the snapshot's weights, bit for bit

    perturb_trained(module, seed=1)  # the policy moves on; the installed reference does not
    moved, still = predictions(module, sd_backbone)
    assert not torch.allclose(moved, policy)
    torch.testing.assert_close(still, reference, rtol=0, atol=0)
    assert {name for name, p in module.named_parameters() if p.requires_grad} == trainable  # nothing new trains
    assert module.trained_state_keys() >= trainable and not any(
        ".reference." in key for key in module.trained_state_keys()
    )

    module.reference.install(module.trained_weights())  # a second install replaces the first
    policy, reference = predictions(module, sd_backbone)
    torch.testing.assert_close(reference, policy, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ EMA copies
def trained_parameters(module):
    return {name: p for name, p in module.denoiser.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_ema_copies_start_as_the_policy_and_follow_diffusers_schedule(sd_backbone, finetune):
    module = DiffusionDPO(sd_backbone, finetune=finetune)
    trainable = set(trained_parameters(module))
    rng_state = torch.random.get_rng_state()
    emas = EMACopies(module.denoiser, decays=(0.9999, 0.5), lora=finetune == "lora")
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the new adapters' init drew from a forked stream
    assert set(trained_parameters(module)) == trainable  # nothing new trains, nothing new is checkpointed
    assert not any(".ema_" in key for key in module.trained_state_keys())
    x_t, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([100, 700])
    conditioning = sd_backbone.encode_prompts(["a red cat", "a dog"])

    def policy_prediction():
        return module.backbone.predict(module.denoiser, x_t, t, conditioning).detach()

    perturb_trained(module, seed=0)  # (a LoRA's B starts at zero: give the policy weights of its own)
    start = policy_prediction()
    for index in range(2):  # before any update an average is the weights it was made from: not yet the policy
        assert not torch.allclose(emas.predict(index, sd_backbone, x_t, t, conditioning), start)

    history, expected = [], [dict(), dict()]
    for step in range(12):
        if step:
            perturb_trained(module, seed=step)
        weights = {name: p.detach().clone() for name, p in trained_parameters(module).items()}
        history.append(weights)
        emas.update()
        for index, decay in enumerate(emas.decays):
            kept = 0.0 if step == 0 else min(decay, (1 + step) / (10 + step))  # the first update copies
            expected[index] = {
                name: value.clone() if step == 0 else kept * expected[index][name] + (1 - kept) * value
                for name, value in weights.items()
            }
    assert emas.updates == 12
    assert EMACopies.decay_at(0.5, 11) == 0.5 and EMACopies.decay_at(0.9999, 11) == pytest.approx(12 / 21)
    for index in range(2):
        averages = emas.averages(index)
        assert averages.keys() == trainable and all(value.dtype == torch.float32 for value in averages.values())
        for name, value in averages.items():
            torch.testing.assert_close(value, expected[index][name])
    # a prediction of average i is the policy's prediction with the average's weights in place of its own
    with torch.no_grad():
        for index in range(2):
            prediction = emas.predict(index, sd_backbone, x_t, t, conditioning)
            for name, param in trained_parameters(module).items():
                param.copy_(emas.averages(index)[name])
            torch.testing.assert_close(prediction, policy_prediction(), rtol=0, atol=0)
            for name, param in trained_parameters(module).items():
                param.copy_(history[-1][name])
    assert set(trained_parameters(module)) == trainable  # the policy's adapter is active and trainable again
    assert not torch.allclose(
        emas.predict(0, sd_backbone, x_t, t, conditioning), emas.predict(1, sd_backbone, x_t, t, conditioning)
    )


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_ema_copies_round_trip_through_their_plain_state(sd_backbone, tiny_sd, finetune):
    module = DiffusionDPO(sd_backbone, finetune=finetune)
    emas = EMACopies(module.denoiser, decays=(0.9, 0.5), lora=finetune == "lora")
    perturb_trained(module, seed=0)
    emas.update()
    perturb_trained(module, seed=1)
    emas.update()
    state = emas.state_dict()
    assert state["updates"] == 2 and state["decays"] == [0.9, 0.5]
    assert all(
        t.device.type == "cpu" and t.dtype == torch.float32 for average in state["averages"] for t in average.values()
    )
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # plain tensors, ints and lists: no pickle of objects

    fresh_module = DiffusionDPO(StableDiffusionBackbone(str(tiny_sd)), finetune=finetune)
    fresh = EMACopies(fresh_module.denoiser, decays=(0.9, 0.5), lora=finetune == "lora")
    fresh.load_state_dict(loaded)
    assert fresh.updates == 2
    for index in range(2):
        for name, value in fresh.averages(index).items():
            assert torch.equal(value, emas.averages(index)[name])
    with pytest.raises(CheckpointError, match="annotator_decays"):
        fresh.load_state_dict({**loaded, "decays": [0.99, 0.5]})


def test_ema_copies_refuse_bad_decays_and_partitioned_weights(sd_backbone):
    module = DiffusionDPO(sd_backbone)
    for decays in ([], [1.0], [0.9, -0.1]):
        with pytest.raises(ConfigError, match=r"decays=.*\[0, 1\)"):
            EMACopies(module.denoiser, decays=decays)
    emas = EMACopies(module.denoiser)
    emas.check_strategy()  # whole weights: fine
    next(iter(trained_parameters(module).values())).ds_id = 0  # what ZeRO-3 marks a partitioned parameter with
    with pytest.raises(ConfigError, match="ZeRO-3 or FSDP2"):
        emas.check_strategy()
