"""MaPO's loss against hand-computed values, its bounded score at zero error, and ties."""

import math

import pytest
import torch

from lightning_pref.losses import bounded_likelihood, mapo_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_mapo_matches_hand_computation():
    loss, metrics = mapo_loss(
        torch.tensor([0.2, 1.0]), torch.tensor([0.4, 0.5]), beta=0.1, error_scale=0.5, margin_scale=10.0
    )
    f = lambda e: 0.5 * e / math.expm1(0.5 * e)  # noqa: E731
    margins = [10 * (f(0.2) - f(0.4)), 10 * (f(1.0) - f(0.5))]
    expected = 0.6 - 0.1 * (log_sigmoid(margins[0]) + log_sigmoid(margins[1])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["implicit_acc"].item() == 0.5  # lower winner error wins the first pair, loses the second
    assert metrics["sft_loss"].item() == pytest.approx(0.6)
    assert metrics["winner_mse"].item() == pytest.approx(0.6) and metrics["loser_mse"].item() == pytest.approx(0.45)


def test_mapo_is_smooth_at_zero_error():
    error = torch.tensor([0.0, 1e-6, 1e-3], dtype=torch.float64, requires_grad=True)
    value = bounded_likelihood(error, error_scale=0.5)
    value.sum().backward()
    expected = [1.0] + [0.5 * e / math.expm1(0.5 * e) for e in (1e-6, 1e-3)]
    torch.testing.assert_close(value, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(error.grad, torch.tensor([-0.25, -0.25, -0.25], dtype=torch.float64), atol=1e-4, rtol=0)


def test_mapo_tie_costs_log_2_and_the_margin_term_separates_the_errors():
    policy_w, policy_l = torch.tensor([0.3], requires_grad=True), torch.tensor([0.3], requires_grad=True)
    loss, metrics = mapo_loss(policy_w, policy_l, beta=0.1)
    assert loss.item() == pytest.approx(0.3 + 0.1 * math.log(2), rel=1e-6) and metrics["implicit_acc"].item() == 0.5
    loss.backward()
    assert policy_w.grad.item() > 1.0  # the SFT term (1) plus the margin term lowering the winner's error
    assert policy_l.grad.item() < 0  # the loser's error is pushed up
