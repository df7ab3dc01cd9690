"""The loser-gradient safeguard: lambda by hand, its option checks, and the first-order guarantee it gives."""

import pytest
import torch

from lightning_pref.losses import (
    check_safeguard_options,
    diffusion_dpo_loss,
    implicit_reward_margin,
    loser_gradient_scale,
    scale_gradient,
)

BETA = 10.0


def test_loser_gradient_scale_by_hand():
    r_w = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    r_l = torch.tensor([[2.0, 0.0], [-1.0, 0.0]])
    # pair 0: |g_w|^2 = 1, g_l.g_w = 2 -> 0.1 * 1 / 2; pair 1: g_l.g_w = -1 < 0 -> 1
    torch.testing.assert_close(loser_gradient_scale(r_w, r_l, mu=0.9, scope="pair"), torch.tensor([0.05, 1.0]))
    # batch: |g_w|^2 = 3, g_l.g_w = 2 - 1 = 1 -> clamp(0.1 * 3, 0, 1)
    torch.testing.assert_close(loser_gradient_scale(r_w, r_l, mu=0.9, scope="batch"), torch.tensor([0.3, 0.3]))
    # mu = 0 and a weakly aligned loser: the bound exceeds 1 and is clamped
    torch.testing.assert_close(loser_gradient_scale(r_w, r_l, mu=0.0, scope="batch"), torch.tensor([1.0, 1.0]))
    # the process's error weights enter squared: pair 1 weighted 2 -> |g_w|^2 = 1 + 8, g_l.g_w = 2 - 4 < 0 -> 1
    weighted = loser_gradient_scale(r_w, r_l, mu=0.9, scope="batch", sample_weight=torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(weighted, torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize(
    "mu, scope, message", [(1.5, "batch", "safeguard_mu=1.5"), (0.5, "sample", "safeguard_scope='sample'")]
)
def test_loser_gradient_scale_bad_options(mu, scope, message):
    with pytest.raises(ValueError, match=message):
        check_safeguard_options(mu, scope)


def output_space_winner_change(residual_w, residual_l, ref_w, ref_l, safeguard: str | None, mu=0.9):
    """The first-order change of each pair's winner error when the update acts on the shared output.

    Output-space approximation of the paper: winner and loser predictions of a pair share coordinates, so
    the update of the output is ``-(dL/dpred_w + dL/dpred_l)``; the winner's error changes by its gradient
    dotted with that update. Returns the change per pair, ``(B,)``, and the loss.
    """
    pred_w = residual_w.clone().requires_grad_()  # target 0: the prediction is the residual
    pred_l = residual_l.clone().requires_grad_()
    err_w, err_l = pred_w.pow(2).mean(1), pred_l.pow(2).mean(1)
    if safeguard is not None:
        err_l = scale_gradient(err_l, loser_gradient_scale(pred_w, pred_l, mu=mu, scope=safeguard))
    loss, _ = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta=BETA)
    grad_w, grad_l = torch.autograd.grad(loss, [pred_w, pred_l])
    update = -(grad_w + grad_l)
    winner_gradient = 2 * residual_w / residual_w.shape[1]
    return (winner_gradient * update).sum(1), loss.detach()


def aligned_residuals(num_pairs=6, elements=16, seed=0):
    """Losers whose residual points the winner's way, but larger: Diffusion-DPO then raises the winner error."""
    generator = torch.Generator().manual_seed(seed)
    residual_w = torch.randn(num_pairs, elements, generator=generator, dtype=torch.float64)
    residual_l = 2 * residual_w + 0.3 * torch.randn(num_pairs, elements, generator=generator, dtype=torch.float64)
    return residual_w, residual_l


def test_without_the_safeguard_the_winner_error_can_rise():
    residual_w, residual_l = aligned_residuals()
    zero = torch.zeros(6, dtype=torch.float64)
    change, _ = output_space_winner_change(residual_w, residual_l, zero, zero, safeguard=None)
    assert (change > 0).all()  # the control case: the property below is not automatic


def test_pair_safeguard_never_raises_a_winner_error_to_first_order():
    residual_w, residual_l = aligned_residuals()
    generator = torch.Generator().manual_seed(1)
    ref_w, ref_l = (
        torch.rand(6, generator=generator, dtype=torch.float64),
        torch.rand(6, generator=generator, dtype=torch.float64),
    )
    change, loss = output_space_winner_change(residual_w, residual_l, ref_w, ref_l, safeguard="pair")
    assert (change < 0).all()
    # the bound of the paper: change <= -mu * (per-pair loss weight) * |g_w|^2, with weight (beta/2) sigmoid(-u) / B
    err_w, err_l = residual_w.pow(2).mean(1), residual_l.pow(2).mean(1)
    u = implicit_reward_margin(err_w, err_l, ref_w, ref_l, BETA)
    bound = -0.9 * (BETA / 2) * torch.sigmoid(-u) / 6 * (2 * residual_w / 16).pow(2).sum(1)
    assert (change <= bound + 1e-12).all()
    unguarded_loss = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta=BETA)[0]
    assert loss.item() == pytest.approx(unguarded_loss.item(), rel=1e-12)  # the loss value is untouched


def test_batch_safeguard_keeps_the_mean_winner_error_from_rising():
    """The official (batch) rule guarantees the batch-mean winner error when the pairs weigh alike (u equal)."""
    residual_w, residual_l = aligned_residuals()
    ref_w, ref_l = residual_w.pow(2).mean(1), residual_l.pow(2).mean(1)  # policy == reference: u = 0 for all
    change, _ = output_space_winner_change(residual_w, residual_l, ref_w, ref_l, safeguard="batch")
    assert change.sum() < 0
    unguarded, _ = output_space_winner_change(residual_w, residual_l, ref_w, ref_l, safeguard=None)
    assert unguarded.sum() > 0
