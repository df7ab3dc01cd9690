"""DiffusionDPO checks its loss options once, in its constructor: the loss function trusts them on every step."""

import pytest

from lightning_pref.errors import ConfigError
from lightning_pref.methods import DiffusionDPO


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(loss_type="logistic"), "Unknown preference loss kind 'logistic'"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing applies to loss kind 'sigmoid' only"),
        (dict(label_smoothing=0.7), r"label_smoothing=0.7: use a value in \[0, 0.5\)"),
    ],
)
def test_diffusion_dpo_refuses_bad_loss_options(sd_backbone, options, message):
    with pytest.raises(ConfigError, match=message):
        DiffusionDPO(sd_backbone, **options)
