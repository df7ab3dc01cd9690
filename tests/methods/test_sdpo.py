"""SDPO checks its loss options once, in its constructor: the loss function trusts them on every step."""

import pytest

from lightning_pref.errors import ConfigError
from lightning_pref.methods import SDPO, SIPO


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(clip_eps=1.0), "clip_eps=1.0"),
        (dict(weight_placement="between"), "weight_placement='between'"),
        (dict(mask_threshold=-0.1), "mask_threshold=-0.1"),
    ],
)
def test_sdpo_refuses_bad_loss_options(sd_backbone, options, message):
    with pytest.raises(ConfigError, match=message):
        SDPO(sd_backbone, **options)


def test_sipo_is_sdpo():
    assert SIPO is SDPO
