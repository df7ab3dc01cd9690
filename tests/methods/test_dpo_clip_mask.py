"""DPOClipMask checks its loss options once, in its constructor: the loss function trusts them on every step."""

import pytest

from lightning_pref.errors import ConfigError
from lightning_pref.methods import DPOClipMask


@pytest.mark.parametrize(
    "options, message", [(dict(mask_threshold=1.5), "mask_threshold=1.5"), (dict(margin_clip=0.0), "margin_clip=0.0")]
)
def test_dpo_clip_mask_refuses_bad_loss_options(sd_backbone, options, message):
    with pytest.raises(ConfigError, match=message):
        DPOClipMask(sd_backbone, **options)
