"""Inversion-DPO's loss: Diffusion-DPO at one step of weight 1, the per-step weight 1/(2 abar), the two signs."""

import pytest
import torch
import torch.nn.functional as F

from lightning_pref.errors import ConfigError
from lightning_pref.losses import diffusion_dpo_loss
from lightning_pref.losses.inversion_dpo import check_inversion_sign, inversion_dpo_loss


def errors(num_pairs=5, steps=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(num_pairs, steps, generator=generator) for _ in range(4)]


def test_one_step_of_weight_one_is_diffusion_dpo():
    policy_w, policy_l, ref_w, ref_l = errors(steps=1)
    half = torch.full((5, 1), 0.5)  # 1 / (2 abar) = 1
    loss, metrics = inversion_dpo_loss(policy_w, policy_l, ref_w, ref_l, half, beta=3.0, sign="dpo")
    expected, expected_metrics = diffusion_dpo_loss(
        policy_w.flatten(), policy_l.flatten(), ref_w.flatten(), ref_l.flatten(), beta=3.0
    )
    torch.testing.assert_close(loss, expected)
    del expected_metrics["gradient_factor"]  # Diffusion-DPO's auto_beta statistic, not reported here
    assert metrics.keys() == expected_metrics.keys()
    for name, value in expected_metrics.items():
        torch.testing.assert_close(metrics[name], value)


def test_the_code_sign_is_the_dpo_sign_with_winner_and_loser_exchanged():
    policy_w, policy_l, ref_w, ref_l = errors()
    abar = torch.rand(5, 4, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    code, code_metrics = inversion_dpo_loss(policy_w, policy_l, ref_w, ref_l, abar, beta=2.0, sign="code")
    swapped, swapped_metrics = inversion_dpo_loss(policy_l, policy_w, ref_l, ref_w, abar, beta=2.0, sign="dpo")
    torch.testing.assert_close(code, swapped)
    torch.testing.assert_close(code_metrics["reward_margin"], swapped_metrics["reward_margin"])
    dpo, _ = inversion_dpo_loss(policy_w, policy_l, ref_w, ref_l, abar, beta=2.0, sign="dpo")
    assert not torch.allclose(code, dpo)


def test_steps_are_weighted_by_one_over_twice_abar_and_averaged():
    policy_w, policy_l, ref_w, ref_l = errors()
    abar = torch.rand(5, 4, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05
    loss, _ = inversion_dpo_loss(policy_w, policy_l, ref_w, ref_l, abar, beta=4.0)
    # halving every abar doubles every weight, as doubling beta does
    doubled, _ = inversion_dpo_loss(policy_w, policy_l, ref_w, ref_l, abar / 2, beta=2.0)
    torch.testing.assert_close(loss, doubled)
    # the mean over steps: every step twice is the same loss
    twice = [torch.cat([e, e], 1) for e in (policy_w, policy_l, ref_w, ref_l)]
    torch.testing.assert_close(inversion_dpo_loss(*twice, torch.cat([abar, abar], 1), beta=4.0)[0], loss)
    # one pair, two steps, by hand: u = -(beta/2) * mean_k (d_k / (2 abar_k))
    d = (policy_w - ref_w) - (policy_l - ref_l)
    margin = -2.0 * (d / (2 * abar)).mean(1)
    torch.testing.assert_close(loss, -F.logsigmoid(margin).mean())


@pytest.mark.parametrize("sign, winner_gradient", [("dpo", 1.0), ("code", -1.0)])
def test_which_way_each_sign_pushes_the_winner_error(sign, winner_gradient):
    """``dpo`` lowers the winner's error relative to the loser's; ``code`` raises it."""
    policy_w, policy_l, ref_w, ref_l = errors(num_pairs=1, steps=2)
    policy_w.requires_grad_(True)
    loss, _ = inversion_dpo_loss(policy_w, policy_l, ref_w, ref_l, torch.full((1, 2), 0.25), beta=1.0, sign=sign)
    (gradient,) = torch.autograd.grad(loss, policy_w)
    assert (torch.sign(gradient) == winner_gradient).all()


def test_an_unknown_sign_is_refused():
    check_inversion_sign("dpo")
    check_inversion_sign("code")
    with pytest.raises(ConfigError, match="sign='plus'"):
        check_inversion_sign("plus")
