"""MaPO as a module: options checked once, no reference copy, one forward per step."""

import pytest
from helpers.pairs import random_pairs
from helpers.training import trainer
from torch.utils.data import DataLoader

from lightning_pref.errors import ConfigError
from lightning_pref.methods import MaPO


@pytest.mark.parametrize(
    "options, message",
    [(dict(error_scale=0.0), "error_scale=0.0, margin_scale=None"), (dict(margin_scale=-1.0), "margin_scale=-1.0")],
)
def test_mapo_refuses_bad_loss_options(sd_backbone, options, message):
    with pytest.raises(ConfigError, match=message):
        MaPO(sd_backbone, **options)


def test_mapo_builds_no_reference_copy(sd_backbone):
    module = MaPO(sd_backbone, finetune="full")
    assert module.reference is None
    assert not any(name.startswith("_reference") for name, _ in module.named_modules())


def test_mapo_runs_one_forward_and_never_the_reference(tmp_path, sd_backbone):
    module = MaPO(sd_backbone)
    forwards = []
    module.denoiser.register_forward_hook(lambda *args: forwards.append(1))

    def no_reference(*args, **kwargs):
        raise AssertionError("MaPO called the reference")

    module.reference_prediction = no_reference
    module.reference_denoiser = no_reference
    trainer(tmp_path, 2).fit(module, DataLoader(random_pairs(8), batch_size=4))
    assert len(forwards) == 2  # one policy forward per step
    with pytest.raises(RuntimeError, match="reference-free"):
        with MaPO.reference_denoiser(module):
            pass
