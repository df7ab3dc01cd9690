"""Generation in the loop: seeded per sample, from the policy or the reference, modes and adapters restored."""

import pytest
import torch
from helpers.training import perturb_lora

from lightning_pref.errors import ConfigError
from lightning_pref.generation import generate, seeded_noise
from lightning_pref.methods import DiffusionDPO

PROMPTS = ["a red circle", "a blue square", "a cross"]
SETTINGS = dict(num_inference_steps=3, guidance_scale=3.0)


def test_each_sample_s_noise_depends_on_its_seed_alone(sd_backbone):
    together = seeded_noise(sd_backbone, [5, 6, 7])
    assert together.shape == (3, *sd_backbone.latent_shape(1)[1:])
    assert torch.equal(together[1:], seeded_noise(sd_backbone, [6, 7]))  # not on the batch it is drawn in
    assert not torch.equal(together[0], together[1])


def test_generation_is_reproducible_and_batch_size_only_regroups_it(sd_backbone):
    sd_backbone.eval()
    images = generate(sd_backbone, PROMPTS, [0, 1, 2], batch_size=3, **SETTINGS)
    assert images.shape == (3, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, generate(sd_backbone, PROMPTS, [0, 1, 2], batch_size=3, **SETTINGS))
    # One at a time: the same per-sample math; only the kernels' blocking of the batch differs (fp32 rounding).
    one_by_one = generate(sd_backbone, PROMPTS, [0, 1, 2], batch_size=1, **SETTINGS)
    torch.testing.assert_close(one_by_one, images, rtol=0, atol=1e-4)
    latents = generate(sd_backbone, PROMPTS[:2], [0, 1], decode=False, **SETTINGS)
    assert latents.shape == sd_backbone.latent_shape(2)
    with pytest.raises(ValueError, match="3 prompts but 2 seeds"):
        generate(sd_backbone, PROMPTS, [0, 1], **SETTINGS)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_a_module_generates_from_its_policy_or_its_reference_and_restores_its_state(sd_backbone, finetune):
    module = DiffusionDPO(sd_backbone, finetune=finetune).train()
    if finetune == "lora":
        perturb_lora(module)
    else:
        with torch.no_grad():
            next(module.denoiser.parameters()).add_(0.5)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    policy = module.generate(PROMPTS, [0, 1, 2], **SETTINGS)
    reference = module.generate(PROMPTS, [0, 1, 2], source="reference", **SETTINGS)
    with module.reference_denoiser() as network:
        expected = generate(module.backbone.eval(), PROMPTS, [0, 1, 2], denoiser=network, **SETTINGS)
    module.train()
    assert torch.equal(reference, expected) and not torch.allclose(policy, reference)
    # back in train mode, with the policy's adapters active and trainable: the policy samples what it did
    assert module.training and module.denoiser.training
    assert {name for name, p in module.named_parameters() if p.requires_grad} == trainable
    assert torch.equal(module.generate(PROMPTS, [0, 1, 2], **SETTINGS), policy)
    with pytest.raises(ConfigError, match="source='ema'"):
        module.generate(PROMPTS, [0, 1, 2], source="ema")
