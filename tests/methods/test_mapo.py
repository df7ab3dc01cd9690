"""MaPO checks its loss options once, in its constructor: the loss function trusts them on every step."""

import pytest

from lightning_pref.errors import ConfigError
from lightning_pref.methods import MaPO


@pytest.mark.parametrize(
    "options, message",
    [(dict(error_scale=0.0), "error_scale=0.0, margin_scale=None"), (dict(margin_scale=-1.0), "margin_scale=-1.0")],
)
def test_mapo_refuses_bad_loss_options(sd_backbone, options, message):
    with pytest.raises(ConfigError, match=message):
        MaPO(sd_backbone, **options)
