"""SEE-DPO's entropy regulariser: the shifted reference gives the SEE margin and a stronger policy gradient."""

import pytest
import torch

from lightning_pref.losses import (
    check_entropy_gamma,
    diffusion_dpo_loss,
    entropy_regularized_reference,
    implicit_reward_margin,
)

BETA = 10.0
# Two pairs; u = -5 * ((pw - pl) - (rw - rl)) = [-5 * (-0.2), -5 * (0.1)] = [1.0, -0.5]
POLICY_W, POLICY_L = torch.tensor([0.10, 0.50]), torch.tensor([0.30, 0.40])
REF_W, REF_L = torch.tensor([0.20, 0.45]), torch.tensor([0.20, 0.45])
ERRORS = (POLICY_W, POLICY_L, REF_W, REF_L)


def test_entropy_regularized_reference_gives_the_see_margin():
    gamma = 4.0
    ref_w, ref_l = entropy_regularized_reference(*ERRORS, beta=BETA, gamma=gamma)
    margin = implicit_reward_margin(POLICY_W, POLICY_L, ref_w, ref_l, BETA)
    d_theta = POLICY_W - POLICY_L
    torch.testing.assert_close(margin, torch.tensor([1.0, -0.5]) - gamma / 2 * d_theta)
    # = -(1/2) [(beta + gamma) D_theta - beta D_ref]
    torch.testing.assert_close(margin, -0.5 * ((BETA + gamma) * d_theta - BETA * (REF_W - REF_L)))
    unchanged = entropy_regularized_reference(*ERRORS, beta=BETA, gamma=0.0)
    torch.testing.assert_close(unchanged, (REF_W, REF_L))
    with pytest.raises(ValueError, match="entropy_gamma=-1.0"):
        check_entropy_gamma(-1.0)


def test_entropy_regularizer_strengthens_the_policy_gradient():
    policy_w = POLICY_W.clone().requires_grad_()
    ref_w, ref_l = entropy_regularized_reference(policy_w, POLICY_L, REF_W, REF_L, beta=BETA, gamma=5.0)
    loss, _ = diffusion_dpo_loss(policy_w, POLICY_L, ref_w, ref_l, beta=BETA)
    loss.backward()
    u = torch.tensor([1.0, -0.5]) - 2.5 * (POLICY_W - POLICY_L)
    # dL/dpw = (beta + gamma)/2 * sigmoid(-u) / B
    torch.testing.assert_close(policy_w.grad, 7.5 * torch.sigmoid(-u) / 2)
