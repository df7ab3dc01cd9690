"""SDPO's loss: clipped weights inside the margin or outside the log-sigmoid, and its option checks."""

import math

import pytest
import torch

from lightning_pref.losses import check_importance_options, diffusion_dpo_loss, sdpo_loss

BETA = 10.0
# Two pairs; u = -5 * ((pw - pl) - (rw - rl)) = [-5 * (-0.2), -5 * (0.1)] = [1.0, -0.5]
POLICY_W, POLICY_L = torch.tensor([0.10, 0.50]), torch.tensor([0.30, 0.40])
REF_W, REF_L = torch.tensor([0.20, 0.45]), torch.tensor([0.20, 0.45])
ERRORS = (POLICY_W, POLICY_L, REF_W, REF_L)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_sdpo_inside_clips_the_weights_into_the_margin():
    weight_w, weight_l = torch.tensor([0.5, 1.1]), torch.tensor([1.0, 3.0])  # clipped: [0.8, 1.1], [1.0, 1.2]
    loss, metrics = sdpo_loss(*ERRORS, weight_w, weight_l, beta=BETA, mask_threshold=None)
    u0 = -5 * (0.8 * (0.10 - 0.20) - 1.0 * (0.30 - 0.20))  # = 0.9
    u1 = -5 * (1.1 * (0.50 - 0.45) - 1.2 * (0.40 - 0.45))  # = -0.575
    assert metrics["reward_margin"].item() == pytest.approx((u0 + u1) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(-(log_sigmoid(u0) + log_sigmoid(u1)) / 2, rel=1e-6)
    assert metrics["clipped_fraction"].item() == 0.5  # 0.5 and 3.0 lie outside [0.8, 1.2]; 1.0 and 1.1 inside


def test_sdpo_outside_weights_the_per_pair_loss_and_the_mask_averages_over_all_pairs():
    weight_w, weight_l = torch.tensor([0.95, 0.5]), torch.tensor([1.0, 1.0])
    loss, metrics = sdpo_loss(*ERRORS, weight_w, weight_l, beta=BETA, placement="outside")
    # pair 1 masked (0.5 < 0.9); pair 0 weighted by clip(0.95) = 0.95; the mean runs over both pairs
    assert loss.item() == pytest.approx(-0.95 * log_sigmoid(1.0) / 2, rel=1e-6)
    assert metrics["masked_fraction"].item() == 0.5


def test_sdpo_with_unit_weights_is_diffusion_dpo():
    ones = torch.ones(2)
    for placement in ("inside", "outside"):
        loss, _ = sdpo_loss(*ERRORS, ones, ones, beta=BETA, placement=placement)
        assert loss.item() == pytest.approx(diffusion_dpo_loss(*ERRORS, beta=BETA)[0].item(), rel=1e-6)


def test_sdpo_weights_are_stop_gradient():
    weight_w = torch.tensor([1.1, 0.9], requires_grad=True)
    loss, _ = sdpo_loss(*ERRORS, weight_w, torch.ones(2), beta=BETA)
    assert not loss.requires_grad  # errors without grad and detached weights: nothing to differentiate


@pytest.mark.parametrize(
    "options, message",
    [(dict(clip_eps=1.0), "clip_eps=1.0"), (dict(placement="between"), "weight_placement='between'")],
)
def test_sdpo_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        check_importance_options(**options)
