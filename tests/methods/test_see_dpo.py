"""SEE-DPO: the entropy option on any pairwise method, and SEEDPO as Diffusion-DPO with it."""

import torch
from helpers.steps import batch_of, step_errors
from helpers.training import perturb_lora

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.losses import dmpo_loss, entropy_regularized_reference, implicit_reward_margin
from lightning_pref.methods import DMPO, SEEDPO, DiffusionDPO


def test_entropy_option_applies_see_to_another_pairwise_method(sd_backbone):
    module = DMPO(sd_backbone, beta=1000.0, entropy_gamma=200.0)
    perturb_lora(module)
    errors = step_errors(module, batch_of())
    loss, metrics = module.compute_loss(module.entropy_regularized(errors), {})
    see_ref = entropy_regularized_reference(*errors.as_args(), beta=1000.0, gamma=200.0)
    expected, _ = dmpo_loss(errors.policy_w, errors.policy_l, *see_ref, beta=1000.0)
    torch.testing.assert_close(loss, expected)
    margin = implicit_reward_margin(*errors.as_args(), beta=1000.0) - 100.0 * (errors.policy_w - errors.policy_l)
    # the same number computed in another order: terms of size beta * err ~ 1e3 leave fp32 rounding ~1e-4
    torch.testing.assert_close(metrics["reward_margin"], margin.mean(), atol=1e-4, rtol=0)
    # the logged error metrics are those of the true reference, not of the flattened one the loss saw
    true = module.cross_method_metrics(errors)
    torch.testing.assert_close(true["reference_mse"], torch.cat([errors.ref_w, errors.ref_l]).mean())


def test_seedpo_is_diffusion_dpo_with_the_entropy_option(tiny_sd):
    see = SEEDPO(StableDiffusionBackbone(str(tiny_sd)), beta=1000.0, entropy_gamma=300.0)
    dpo = DiffusionDPO(StableDiffusionBackbone(str(tiny_sd)), beta=1000.0, entropy_gamma=300.0)
    perturb_lora(see)
    dpo.load_state_dict(see.state_dict())
    batch = batch_of()
    see_loss = see.compute_loss(see.entropy_regularized(step_errors(see, batch)), batch)[0]
    dpo_loss = dpo.compute_loss(dpo.entropy_regularized(step_errors(dpo, batch)), batch)[0]
    torch.testing.assert_close(see_loss, dpo_loss)
