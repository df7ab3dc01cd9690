"""Adaptive-DPO's loss: the minority metric, weight and margin by hand, the units, the IPO form, the checks."""

import math
import statistics

import pytest
import torch

from lightning_pref.errors import ConfigError, DataError
from lightning_pref.losses.adaptive_dpo import (
    adaptive_dpo_loss,
    check_adaptive_dpo_options,
    minority_margin,
    minority_metric,
    minority_weight,
)
from lightning_pref.losses.diffusion_dpo import diffusion_dpo_loss

BETA = 10.0
# Four pairs; the policy's logit h = (ref_w - ref_l) - (policy_w - policy_l) = [0.2, -0.1, 0.05, 0.0]
POLICY_W, POLICY_L = [0.10, 0.40, 0.25, 0.30], [0.30, 0.30, 0.30, 0.30]
REF_W, REF_L = [0.20, 0.20, 0.20, 0.20], [0.20, 0.20, 0.20, 0.20]
# Two EMA annotators' errors: winners' rows and losers' rows, (2, 4) each
ANNOTATORS_W = [[0.15, 0.30, 0.20, 0.35], [0.12, 0.45, 0.26, 0.28]]
ANNOTATORS_L = [[0.30, 0.30, 0.30, 0.30], [0.25, 0.20, 0.30, 0.30]]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logits_by_hand() -> list[list[float]]:
    """H, (3, B): the policy's logit first, then each annotator's ``D_ref - D_m``."""
    d_ref = [w - lo for w, lo in zip(REF_W, REF_L)]
    rows = [(POLICY_W, POLICY_L), *zip(ANNOTATORS_W, ANNOTATORS_L)]
    return [[r - (w - lo) for r, w, lo in zip(d_ref, row_w, row_l)] for row_w, row_l in rows]


def metric_by_hand(rows: list[list[float]], rho: float, normalize: bool) -> list[tuple[float, float, float]]:
    """(u_min, b, s) per pair, as METHODS.md section 5 states them, in plain Python."""
    if normalize:
        norms = [math.sqrt(sum(v * v for v in row)) for row in rows]
        rows = [[v / n if n > 0 else 0.0 for v in row] for row, n in zip(rows, norms)]
    result = []
    for column in zip(*rows):
        scaled = [rho * v for v in column]
        b = abs(statistics.fmean(sigmoid(z) for z in scaled) - 1)
        s = min(1.0, statistics.stdev(scaled))  # the unbiased std over annotators
        result.append((b * s, b, s))
    return result


def tensors(*rows):
    return [torch.tensor(row) for row in rows]


@pytest.mark.parametrize(("rho", "normalize"), [(15.0, True), (40.0, False), (3.0, True)])
def test_the_minority_metric_is_confidence_times_stability(rho, normalize):
    rows = logits_by_hand()
    metric = minority_metric(torch.tensor(rows), rho=rho, normalize=normalize)
    expected = metric_by_hand(rows, rho, normalize)
    for got, want in zip((metric.u_min, metric.confidence, metric.stability), zip(*expected)):
        torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)  # fp32 sigmoid and std
    assert 0 < metric.stability.min() and metric.stability.max() <= 1  # this H has spread in every pair


def test_an_all_zero_annotator_row_is_not_0_over_0():
    # an EMA still equal to the reference: its row is zero; the released code divides it by its zero norm (NaN)
    rows = [logits_by_hand()[0], [0.0] * 4, [0.0] * 4]
    metric = minority_metric(torch.tensor(rows), rho=15.0, normalize=True)
    assert all(torch.isfinite(value).all() for value in metric)
    torch.testing.assert_close(metric.u_min, torch.tensor([u for u, _, _ in metric_by_hand(rows, 15.0, True)]))
    # the pair with h = 0 everywhere has b = 1/2 and no spread: u_min = 0
    assert metric.u_min[3].item() == 0.0 and metric.confidence[3].item() == 0.5


def test_the_metric_refuses_one_annotator_and_a_normalised_batch_of_one():
    with pytest.raises(DataError, match="two or more annotators"):
        minority_metric(torch.zeros(1, 4))
    with pytest.raises(DataError, match="normalize_logits: false"):
        minority_metric(torch.ones(3, 1))
    assert minority_metric(torch.ones(3, 1), normalize=False).u_min.shape == (1,)


def test_the_weight_and_the_margin_by_hand_and_without_gradient():
    u_min = torch.tensor([0.0, 0.1, 0.5, 0.9], requires_grad=True)
    linear = minority_weight(u_min, intercept=1.0, scale=10.0, kind="linear")
    quadratic = minority_weight(u_min, intercept=2.0, scale=4.0, kind="quadratic")
    torch.testing.assert_close(linear, torch.tensor([1 / (1 + 10 * u) for u in (0.0, 0.1, 0.5, 0.9)]))
    torch.testing.assert_close(quadratic, torch.tensor([1 / (2 + 4 * u * u) for u in (0.0, 0.1, 0.5, 0.9)]))
    h = torch.tensor([0.2, -0.1, 0.05, 0.0], requires_grad=True)
    mean_h = 0.0375
    for kind, shrink in (("quadratic", lambda u: u * u), ("linear", lambda u: u), ("none", None)):
        gamma = minority_margin(h, u_min, beta=BETA, kind=kind)
        want = [0.0] * 4 if shrink is None else [mean_h - shrink(u) / BETA for u in (0.0, 0.1, 0.5, 0.9)]
        torch.testing.assert_close(gamma, torch.tensor(want))
        assert not gamma.requires_grad
    assert not linear.requires_grad and not quadratic.requires_grad


def test_the_loss_is_the_weighted_shifted_logistic_loss_with_detached_weight_and_margin():
    policy_w = torch.tensor(POLICY_W, dtype=torch.float64, requires_grad=True)
    others = [torch.tensor(row, dtype=torch.float64) for row in (POLICY_L, REF_W, REF_L, ANNOTATORS_W, ANNOTATORS_L)]
    loss, metrics = adaptive_dpo_loss(policy_w, *others, beta=BETA, flipped=torch.tensor([0, 1, 0, 1]))

    rows = logits_by_hand()
    h = rows[0]
    u_min = [u for u, _, _ in metric_by_hand(rows, 15.0, True)]
    weight = [1 / (1 + 10 * u) for u in u_min]
    gamma = [statistics.fmean(h) - u * u / BETA for u in u_min]
    x = [BETA * hi - g for hi, g in zip(h, gamma)]
    assert loss.item() == pytest.approx(statistics.fmean(-w * math.log(sigmoid(xi)) for w, xi in zip(weight, x)))
    assert metrics["weight"].item() == pytest.approx(statistics.fmean(weight))
    assert metrics["u_min"].item() == pytest.approx(statistics.fmean(u_min))
    assert metrics["weight_flipped"].item() == pytest.approx((weight[1] + weight[3]) / 2)
    assert metrics["weight_clean"].item() == pytest.approx((weight[0] + weight[2]) / 2)
    assert metrics["reward_margin"].item() == pytest.approx(BETA * statistics.fmean(h))  # beta * h: no 0.5

    # w and gamma are constants: dL/d policy_w_i = w_i * beta * (1 - sigmoid(x_i)) / B (h falls as policy_w rises);
    # the metric behind w is computed in float32, so the gradient agrees to float32's relative precision
    loss.backward()
    expected = [w * BETA * (1 - sigmoid(xi)) / 4 for w, xi in zip(weight, x)]
    torch.testing.assert_close(policy_w.grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)


def test_without_annotators_and_margin_it_is_diffusion_dpo_at_twice_the_beta():
    errors = tensors(POLICY_W, POLICY_L, REF_W, REF_L)
    loss, metrics = adaptive_dpo_loss(*errors, beta=BETA, margin="none")
    reference, reference_metrics = diffusion_dpo_loss(*errors, beta=2 * BETA)
    torch.testing.assert_close(loss, reference)
    assert metrics["weight"].item() == 1.0 and metrics["u_min"].item() == 0.0
    assert "confidence" not in metrics and "weight_flipped" not in metrics
    del reference_metrics["gradient_factor"]  # Diffusion-DPO's auto_beta statistic, not reported here
    for name, value in reference_metrics.items():
        torch.testing.assert_close(metrics[name], value)
    # the warm-up keeps the margin's batch mean: gamma = mean(h) = 0.0375, the logit beta * h - 0.0375
    warm, warm_metrics = adaptive_dpo_loss(*errors, beta=BETA)
    h = logits_by_hand()[0]
    assert warm.item() == pytest.approx(statistics.fmean(-math.log(sigmoid(BETA * v - 0.0375)) for v in h), rel=1e-6)
    assert warm_metrics["gamma"].item() == pytest.approx(0.0375)


def test_the_ipo_form_regresses_the_shifted_logit_to_its_target():
    errors = tensors(POLICY_W, POLICY_L, REF_W, REF_L)
    annotators = tensors(ANNOTATORS_W, ANNOTATORS_L)
    loss, _ = adaptive_dpo_loss(*errors, *annotators, beta=BETA, loss_type="ipo", ipo_beta=4.0, margin="linear")
    rows = logits_by_hand()
    u_min = [u for u, _, _ in metric_by_hand(rows, 15.0, True)]
    expected = statistics.fmean(
        (1 / (1 + 10 * u)) * (h - (statistics.fmean(rows[0]) - u / BETA) / BETA - 1 / 8) ** 2
        for h, u in zip(rows[0], u_min)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_a_group_missing_from_the_batch_logs_no_mean():
    errors = tensors(POLICY_W, POLICY_L, REF_W, REF_L)
    _, metrics = adaptive_dpo_loss(*errors, beta=BETA, flipped=torch.zeros(4, dtype=torch.bool))
    assert "weight_flipped" not in metrics and metrics["weight_clean"].item() == 1.0


@pytest.mark.parametrize(
    ("options", "key"),
    [
        (dict(rho=0.0), "rho=0.0"),
        (dict(weight_intercept=-1.0), "weight_intercept=-1.0"),
        (dict(weight_scale=-2.0), "weight_scale=-2.0"),
        (dict(weighting="cubic"), "weighting='cubic'"),
        (dict(margin="square"), "margin='square'"),
        (dict(loss_type="hinge"), "loss_type='hinge'"),
        (dict(ipo_beta=float("nan")), "ipo_beta=nan"),
    ],
)
def test_bad_options_are_refused_naming_the_key(options, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
        check_adaptive_dpo_options(**options)
    check_adaptive_dpo_options()  # the defaults pass
