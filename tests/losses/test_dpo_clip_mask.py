"""DPO-C&M's loss: the masked mean, an all-masked batch, the margin clip, and its option checks."""

import math

import pytest
import torch

from lightning_pref.losses import check_importance_options, dpo_clip_mask_loss

BETA = 10.0
# Two pairs; u = -5 * ((pw - pl) - (rw - rl)) = [-5 * (-0.2), -5 * (0.1)] = [1.0, -0.5]
POLICY_W, POLICY_L = torch.tensor([0.10, 0.50]), torch.tensor([0.30, 0.40])
REF_W, REF_L = torch.tensor([0.20, 0.45]), torch.tensor([0.20, 0.45])
ERRORS = (POLICY_W, POLICY_L, REF_W, REF_L)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_clip_mask_averages_over_unmasked_pairs():
    # pair 0 is kept (both weights >= 0.9); pair 1 is masked by its loser's weight 0.89
    loss, metrics = dpo_clip_mask_loss(*ERRORS, torch.tensor([0.95, 1.0]), torch.tensor([0.9, 0.89]), beta=BETA)
    assert loss.item() == pytest.approx(-log_sigmoid(1.0), rel=1e-6)
    assert metrics["masked_fraction"].item() == 0.5
    assert metrics["reward_margin"].item() == pytest.approx(0.25)  # the shared metrics see every pair


def test_dpo_clip_mask_with_every_pair_masked_is_zero_with_zero_gradient():
    policy_w = POLICY_W.clone().requires_grad_()
    loss, metrics = dpo_clip_mask_loss(policy_w, POLICY_L, REF_W, REF_L, torch.zeros(2), torch.ones(2), beta=BETA)
    loss.backward()
    assert loss.item() == 0.0 and metrics["masked_fraction"].item() == 1.0
    assert torch.equal(policy_w.grad, torch.zeros(2))


def test_dpo_clip_mask_margin_clip_caps_the_loss_and_stops_the_gradient():
    policy_w = POLICY_W.clone().requires_grad_()
    loss, _ = dpo_clip_mask_loss(
        policy_w, POLICY_L, REF_W, REF_L, torch.ones(2), torch.ones(2), beta=BETA, margin_clip=0.25
    )
    loss.backward()
    assert loss.item() == pytest.approx(-(log_sigmoid(0.25) + log_sigmoid(-0.25)) / 2, rel=1e-6)
    assert torch.equal(policy_w.grad, torch.zeros(2))  # both |u| exceed the clip


@pytest.mark.parametrize(
    "options, message",
    [(dict(mask_threshold=1.5), "mask_threshold=1.5"), (dict(margin_clip=0.0), "margin_clip=0.0")],
)
def test_dpo_clip_mask_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        check_importance_options(**options)
