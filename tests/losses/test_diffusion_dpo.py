"""Diffusion-DPO's loss against hand-computed values, ties, and the direction of its gradient."""

import math

import pytest
import torch

from lightning_pref.losses import diffusion_dpo_loss

BETA = 10.0
# Two pairs; u = -5 * ((pw - pl) - (rw - rl)) = [-5 * (-0.2), -5 * (0.1)] = [1.0, -0.5]
POLICY_W, POLICY_L = torch.tensor([0.10, 0.50]), torch.tensor([0.30, 0.40])
REF_W, REF_L = torch.tensor([0.20, 0.45]), torch.tensor([0.20, 0.45])


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_sigmoid_loss_matches_hand_computation():
    loss, metrics = diffusion_dpo_loss(POLICY_W, POLICY_L, REF_W, REF_L, BETA)
    expected = -(log_sigmoid(1.0) + log_sigmoid(-0.5)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["implicit_acc"].item() == 0.5
    assert metrics["reward_margin"].item() == pytest.approx(0.25, rel=1e-6)
    assert metrics["policy_mse"].item() == pytest.approx((0.1 + 0.5 + 0.3 + 0.4) / 4, rel=1e-6)
    assert metrics["reference_mse"].item() == pytest.approx((0.2 + 0.45) / 2, rel=1e-6)
    assert metrics["winner_error_change"].item() == pytest.approx((-0.1 + 0.05) / 2, rel=1e-5)
    assert metrics["loser_error_change"].item() == pytest.approx((0.1 - 0.05) / 2, rel=1e-5)


def test_ties_count_half_and_zero_margin_loss_is_log2():
    equal = torch.tensor([0.3, 0.3])
    loss, metrics = diffusion_dpo_loss(equal, equal, equal, equal, BETA)
    assert metrics["implicit_acc"].item() == 0.5
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_gradient_lowers_winner_error_and_raises_loser_error():
    policy_w = torch.tensor([0.2], requires_grad=True)
    policy_l = torch.tensor([0.2], requires_grad=True)
    loss, _ = diffusion_dpo_loss(policy_w, policy_l, torch.tensor([0.2]), torch.tensor([0.2]), BETA)
    loss.backward()
    # dL/dpw = beta/2 * sigmoid(-u) = 5 * 0.5 at u = 0
    assert policy_w.grad.item() == pytest.approx(2.5)
    assert policy_l.grad.item() == pytest.approx(-2.5)
