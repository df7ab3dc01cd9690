"""The shared pieces: the implicit reward margin, the loss of a margin and its variants, the metrics."""

import math

import pytest
import torch

from lightning_pref.losses import (
    check_preference_loss_options,
    implicit_reward_margin,
    pairwise_metrics,
    preference_loss,
)

BETA = 10.0
# Two pairs; u = -5 * ((pw - pl) - (rw - rl)) = [-5 * (-0.2), -5 * (0.1)] = [1.0, -0.5]
POLICY_W, POLICY_L = torch.tensor([0.10, 0.50]), torch.tensor([0.30, 0.40])
REF_W, REF_L = torch.tensor([0.20, 0.45]), torch.tensor([0.20, 0.45])
MARGIN = torch.tensor([1.0, -0.5])


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_margin_matches_hand_computation():
    torch.testing.assert_close(implicit_reward_margin(POLICY_W, POLICY_L, REF_W, REF_L, BETA), MARGIN)


def test_variants_match_hand_computation():
    hinge = preference_loss(MARGIN, BETA, "hinge")
    torch.testing.assert_close(hinge, torch.tensor([0.0, 1.5]))
    ipo = preference_loss(MARGIN, BETA, "ipo")
    torch.testing.assert_close(ipo, torch.tensor([(0.1 - 0.05) ** 2, (-0.05 - 0.05) ** 2]))
    smoothed = preference_loss(MARGIN, BETA, "sigmoid", label_smoothing=0.1)
    expected = [-(0.9 * log_sigmoid(u) + 0.1 * log_sigmoid(-u)) for u in (1.0, -0.5)]
    torch.testing.assert_close(smoothed, torch.tensor(expected))


def test_metrics_are_detached():
    policy_w = POLICY_W.clone().requires_grad_()
    metrics = pairwise_metrics(MARGIN, policy_w, POLICY_L, REF_W, REF_L)
    assert not any(value.requires_grad for value in metrics.values())


@pytest.mark.parametrize(
    "kind, smoothing, message",
    [("logistic", 0.0, "Unknown preference loss kind"), ("hinge", 0.1, "sigmoid' only"), ("sigmoid", 0.7, "[0, 0.5)")],
)
def test_bad_options_raise_clear_errors(kind, smoothing, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        check_preference_loss_options(kind, smoothing)
