"""Diffusion-KTO's loss against hand-computed values, the clamped and detached reference point, ties."""

import math

import pytest
import torch

from lightning_pref.losses import kto_loss

BETA = 10.0


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_matches_hand_computation_with_a_positive_reference_point():
    policy, reference = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.3, 0.2, 0.2])
    desirable = torch.tensor([True, False, False])
    loss, metrics = kto_loss(policy, reference, desirable, beta=BETA, desirable_weight=2.0, undesirable_weight=0.5)
    g, z = [0.2, 0.0, -0.1], (0.2 + 0.0 - 0.1) / 3
    expected = [
        2.0 * (1 - sigmoid(BETA * (g[0] - z))),
        0.5 * (1 - sigmoid(-BETA * (g[1] - z))),
        0.5 * (1 - sigmoid(-BETA * (g[2] - z))),
    ]
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    assert metrics["reference_point"].item() == pytest.approx(z, rel=1e-5)
    assert metrics["kto_acc"].item() == 1.0  # 0.2 > z; 0.0 < z; -0.1 < z
    assert metrics["desirable_reward"].item() == pytest.approx(0.2, rel=1e-5)
    assert metrics["undesirable_reward"].item() == pytest.approx(-0.05, rel=1e-5)


def test_kto_reference_point_is_clamped_at_zero_and_detached():
    policy = torch.tensor([0.4, 0.4], requires_grad=True)
    loss, metrics = kto_loss(policy, torch.tensor([0.2, 0.2]), torch.tensor([True, True]), beta=BETA)
    assert metrics["reference_point"].item() == 0.0  # mean g = -0.2 < 0
    assert "undesirable_reward" not in metrics  # no undesirable sample in this batch
    loss.backward()
    s = sigmoid(BETA * -0.2)
    # with z detached, dL/dpolicy = beta s (1 - s) / N per desirable sample
    torch.testing.assert_close(policy.grad, torch.full((2,), BETA * s * (1 - s) / 2))


def test_kto_a_sample_at_the_reference_point_is_a_tie():
    loss, metrics = kto_loss(
        torch.tensor([0.3]), torch.tensor([0.3]), torch.tensor([False]), beta=BETA, reference_point=torch.tensor(0.0)
    )
    assert loss.item() == 0.5 and metrics["kto_acc"].item() == 0.5
