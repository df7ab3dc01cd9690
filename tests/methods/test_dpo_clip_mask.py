"""DPOClipMask checks its loss options once, in its constructor (the loss function trusts them on every step);
its toy config."""

import pytest
from helpers.cli import printed_config

from lightning_pref.errors import ConfigError
from lightning_pref.methods import DPOClipMask


@pytest.mark.parametrize(
    "options, message", [(dict(mask_threshold=1.5), "mask_threshold=1.5"), (dict(margin_clip=0.0), "margin_clip=0.0")]
)
def test_dpo_clip_mask_refuses_bad_loss_options(sd_backbone, options, message):
    with pytest.raises(ConfigError, match=message):
        DPOClipMask(sd_backbone, **options)


def test_the_toy_config_parses_with_the_toy_recipe_and_the_calibrated_mask(capsys):
    toy = printed_config("toy/dpo_clip_mask.yaml", capsys)
    model = toy["model"]["init_args"]
    assert toy["model"]["class_path"].endswith(".DPOClipMask")
    assert (model["finetune"], model["lr"], model["beta"], model["warmup_steps"]) == ("full", 2e-5, 5000, 20)
    assert (model["mask_threshold"], model["kl_reduction"], model["calibrate_kl_scale_at"]) == (0.9, "mean", 0.1)
    assert model["kl_scale"] == 1.0  # the calibration sets it
    assert toy["trainer"]["max_steps"] == 140 and toy["data"]["init_args"]["batch_size"] == 16
