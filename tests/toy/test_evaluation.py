"""Did a run align the toy model: the win rate, the drift of the errors and the one-line verdict."""

import pytest

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.toy.evaluation import DRIFT_LIMIT, error_drift, verdict, win_rate_interval
from lightning_pref.toy.preferences import HELDOUT_PROMPTS, generate_toy_preferences


def test_a_model_does_not_drift_from_itself(tiny_pixel, tmp_path):
    generate_toy_preferences(tmp_path, 6, pipeline=tiny_pixel, prompts=HELDOUT_PROMPTS, tie_threshold=0.0)
    backbone = StableDiffusionBackbone(str(tiny_pixel))
    assert error_drift(backbone, StableDiffusionBackbone(str(tiny_pixel)), tmp_path) == {
        "winner_error_change": 0.0,
        "loser_error_change": 0.0,
    }


@pytest.mark.parametrize(
    ("win_rate", "drift", "starts"),
    [
        (0.83, 0.01, "ALIGNED: tuned beats base on 83% [76, 90] of 128"),
        (0.55, 0.0, "NOT ALIGNED (the tuned model does not beat the base)"),
        (0.9, DRIFT_LIMIT + 0.01, "NOT ALIGNED (the model drifted off the data: collapsed)"),
    ],
)
def test_the_verdict_needs_a_win_rate_interval_above_one_half_and_no_collapse(win_rate, drift, starts):
    result = {
        "win_rate": win_rate,
        "samples": 128,
        "base_reward": 1.5,
        "tuned_reward": 1.7,
        "winner_error_change": drift,
        "collapsed": drift > DRIFT_LIMIT,
    }
    assert verdict(result).startswith(starts)


def test_the_win_rate_interval_is_the_normal_approximation():
    low, high = win_rate_interval(0.5, 100)
    assert (round(low, 4), round(high, 4)) == (0.402, 0.598)
