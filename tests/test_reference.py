"""The reference component: adapters disabled (LoRA) or a frozen copy (full), and installing a snapshot."""

import pytest
import torch

from lightning_pref.methods import DiffusionDPO
from lightning_pref.reference import AdaptersDisabled, FrozenCopy


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
