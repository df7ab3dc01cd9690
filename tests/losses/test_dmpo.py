"""DMPO's loss: the Bernoulli KL by hand, stability, the gradient's target, and the check of alpha."""

import math

import pytest
import torch

from lightning_pref.losses import check_dmpo_alpha, dmpo_loss

BETA = 10.0
# Two pairs; u = -5 * ((pw - pl) - (rw - rl)) = [-5 * (-0.2), -5 * (0.1)] = [1.0, -0.5]
POLICY_W, POLICY_L = torch.tensor([0.10, 0.50]), torch.tensor([0.30, 0.40])
REF_W, REF_L = torch.tensor([0.20, 0.45]), torch.tensor([0.20, 0.45])
ERRORS = (POLICY_W, POLICY_L, REF_W, REF_L)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dmpo_matches_the_bernoulli_kl_by_hand():
    loss, metrics = dmpo_loss(*ERRORS, beta=BETA, alpha=0.1)
    q = 0.9
    expected = [
        sigmoid(u) * math.log(sigmoid(u) / q) + (1 - sigmoid(u)) * math.log((1 - sigmoid(u)) / (1 - q))
        for u in (1.0, -0.5)
    ]
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert metrics["mean_p"].item() == pytest.approx((sigmoid(1.0) + sigmoid(-0.5)) / 2, rel=1e-6)
    assert metrics["target_p"].item() == pytest.approx(0.9)


def test_dmpo_is_stable_for_huge_margins_and_a_tie_is_finite():
    big = torch.tensor([1e4, -1e4])
    loss, _ = dmpo_loss(torch.zeros(2), torch.zeros(2), -2 * big / BETA, torch.zeros(2), beta=BETA, alpha=0.01)
    # u = +1e4: p = 1, KL = -log(0.99); u = -1e4: p = 0, KL = -log(0.01)
    assert loss.item() == pytest.approx((-math.log(0.99) - math.log(0.01)) / 2, rel=1e-5)
    tie, metrics = dmpo_loss(*(torch.zeros(1),) * 4, beta=BETA, alpha=0.01)
    assert metrics["implicit_acc"].item() == 0.5
    assert tie.item() == pytest.approx(0.5 * math.log(0.5 / 0.99) + 0.5 * math.log(0.5 / 0.01), rel=1e-6)


def dmpo_margin_gradient(u: float, alpha: float) -> float:
    """dL/du, through the policy's winner error (u = -(beta/2) pw when the other errors are zero)."""
    policy_w = torch.tensor([-2 * u / BETA], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    dmpo_loss(policy_w, zero, zero, zero, beta=BETA, alpha=alpha)[0].backward()
    return policy_w.grad.item() / (-BETA / 2)


@pytest.mark.parametrize("alpha", [0.01, 0.3])
def test_dmpo_gradient_vanishes_at_the_target_and_pushes_back_past_it(alpha):
    target = math.log((1 - alpha) / alpha)  # logit(1 - alpha)
    assert abs(dmpo_margin_gradient(target, alpha)) < 1e-9
    assert dmpo_margin_gradient(target - 1, alpha) < 0  # descent raises u below the target...
    assert dmpo_margin_gradient(target + 1, alpha) > 0  # ...and lowers it above
    p = sigmoid(target + 1)
    assert dmpo_margin_gradient(target + 1, alpha) == pytest.approx(p * (1 - p) * 1.0, rel=1e-6)  # p(1-p)(u - logit q)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1e-9, 1.0, 1.5])
def test_dmpo_rejects_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match=rf"alpha={alpha}.*\[1e-6, 1\)"):
        check_dmpo_alpha(alpha)
