"""SSPO's Self-Sampling Regularization: the per-sample switch of each mode and SFT branch, on constructed errors."""

import math

import pytest
import torch

from lightning_pref.errors import ConfigError
from lightning_pref.losses.sspo import check_sspo_options, sspo_loss

BETA = 10.0
# Delta_w = policy_w - ref_w: negative, zero (a tie: not switched, s = 1[Delta_w <= 0]) and positive (switched)
POLICY_W = [0.10, 0.20, 0.30, 0.25]
REF_W = [0.20, 0.20, 0.20, 0.20]
POLICY_REF = [0.30, 0.10, 0.20, 0.50]
REF_REF = [0.20, 0.30, 0.40, 0.10]


def errors(requires_grad=False):
    return [torch.tensor(values, requires_grad=requires_grad) for values in (POLICY_W, POLICY_REF, REF_W, REF_REF)]


def expected_sample_loss(policy_w, policy_ref, ref_w, ref_ref, mode, sft_branch):
    """The METHODS.md section 9 rule for one sample, in plain Python."""
    delta_w, delta_ref = policy_w - ref_w, policy_ref - ref_ref
    switched = delta_w > 0
    if switched and sft_branch == "mse":
        return policy_w
    if mode == "switch":
        s = 0.0 if switched else 1.0
    else:
        s = -1.0 if switched else 1.0
    margin = -(BETA / 2) * (delta_w - s * delta_ref)
    return math.log1p(math.exp(-margin))  # -log sigmoid(margin)


@pytest.mark.parametrize(("mode", "sft_branch"), [("switch", "anchored"), ("switch", "mse"), ("sign", "anchored")])
def test_each_sample_follows_the_switch_of_its_own_winner_error_change(mode, sft_branch):
    rows = list(zip(POLICY_W, POLICY_REF, REF_W, REF_REF))
    for row in rows:  # one sample at a time: the loss of that sample alone
        loss, _ = sspo_loss(*(torch.tensor([value]) for value in row), beta=BETA, mode=mode, sft_branch=sft_branch)
        assert loss.item() == pytest.approx(expected_sample_loss(*row, mode, sft_branch), rel=1e-6)
    loss, metrics = sspo_loss(*errors(), beta=BETA, mode=mode, sft_branch=sft_branch)
    mean = sum(expected_sample_loss(*row, mode, sft_branch) for row in rows) / len(rows)
    assert loss.item() == pytest.approx(mean, rel=1e-6)
    assert metrics["switched_fraction"].item() == 0.5  # samples 3 and 4; the tie (sample 2) is not switched


def test_gradients_show_which_samples_learn_from_the_reference_sample():
    # switch mode: a switched sample ignores x_ref; the others push x_ref's error up (a loser)
    policy_w, policy_ref, ref_w, ref_ref = errors(requires_grad=True)
    sspo_loss(policy_w, policy_ref, ref_w, ref_ref, beta=BETA, mode="switch")[0].backward()
    switched = torch.tensor([False, False, True, True])
    assert (policy_ref.grad[switched] == 0).all() and (policy_ref.grad[~switched] < 0).all()
    assert (policy_w.grad > 0).all()  # every sample lowers the winner's error
    # sign mode: a switched sample pushes x_ref's error down with the winner's (x_ref presumed a winner)
    policy_w, policy_ref, ref_w, ref_ref = errors(requires_grad=True)
    sspo_loss(policy_w, policy_ref, ref_w, ref_ref, beta=BETA, mode="sign")[0].backward()
    assert (policy_ref.grad[switched] > 0).all() and (policy_ref.grad[~switched] < 0).all()
    # mse branch: a switched sample's gradient is that of err_theta(w) / B
    policy_w, policy_ref, ref_w, ref_ref = errors(requires_grad=True)
    sspo_loss(policy_w, policy_ref, ref_w, ref_ref, beta=BETA, sft_branch="mse")[0].backward()
    assert torch.equal(policy_w.grad[switched], torch.full((2,), 0.25))
    assert (policy_ref.grad[switched] == 0).all()


def test_metrics_are_the_pairwise_ones_of_the_winner_and_the_reference_sample():
    _, metrics = sspo_loss(*errors(), beta=BETA)
    policy_w, policy_ref, ref_w, ref_ref = errors()
    assert metrics["winner_error_change"].item() == pytest.approx((policy_w - ref_w).mean().item())
    assert metrics["loser_error_change"].item() == pytest.approx((policy_ref - ref_ref).mean().item())
    assert {"implicit_acc", "reward_margin", "policy_mse", "reference_mse", "switched_fraction"} <= set(metrics)


@pytest.mark.parametrize(
    ("mode", "sft_branch", "key"),
    [("both", "anchored", "mode="), ("switch", "l1", "sft_branch="), ("sign", "mse", "mse")],
)
def test_bad_options_are_refused_naming_the_key(mode, sft_branch, key):
    with pytest.raises(ConfigError, match=key):
        check_sspo_options(mode, sft_branch)
