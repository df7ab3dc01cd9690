"""What the CogVideoX and Wan2.1 backbone tests share: video pairs, short fits, every method, example configs."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from helpers.processes import REPO
from helpers.training import trainer as cpu_trainer
from lightning_pref import methods
from lightning_pref.cli import main as cli_main
from lightning_pref.methods import DiffusionDPO
from lightning_pref.methods.base import PreferenceDiffusionModule

PROMPTS = ["a red cat", "a blue dog", "a green circle", "a square"]

#: The methods that make their own pairs while training, from other data (real winners, prompts): not run on
#: the video backbones' pair batches here.
MAKE_THEIR_PAIRS = (methods.SSPO, methods.SPINDiffusion, methods.OnlineDPO)
#: The methods defined for UNet backbones only (PPD's user branch sits beside the UNet's cross-attentions) or
#: for DDPM ones only at N times a step's cost (Inversion-DPO inverts every sample; tested on SD1.5 and SDXL).
NOT_ON_VIDEO = (methods.PPD, methods.InversionDPO)
#: Every preference method of the library that trains on pair batches: the modules ``lightning_pref.methods``
#: exports that define a loss (a set: ``SIPO`` is ``SDPO``).
METHODS = sorted(
    {
        method
        for method in (getattr(methods, name) for name in methods.__all__)
        if isinstance(method, type)
        and issubclass(method, PreferenceDiffusionModule)
        and method.compute_loss is not PreferenceDiffusionModule.compute_loss
        and method not in MAKE_THEIR_PAIRS + NOT_ON_VIDEO
    },
    key=lambda method: method.__name__,
)


def video_pairs(num_pairs: int = 2, frames: int = 5, size: int = 16, seed: int = 0) -> list[dict]:
    """Preference pairs of random videos, ``(C, F, H, W)`` in [-1, 1], as the video DataModule yields them."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "pixels_w": torch.rand(3, frames, size, size, generator=generator) * 2 - 1,
            "pixels_l": torch.rand(3, frames, size, size, generator=generator) * 2 - 1,
            "prompt": PROMPTS[i % len(PROMPTS)],
        }
        for i in range(num_pairs)
    ]


def fit(module: PreferenceDiffusionModule, tmp_path: Path, steps: int, data=None) -> pl.Trainer:
    """``steps`` optimizer steps on CPU, on ``data`` (a DataModule) or on random video pairs."""
    trainer = cpu_trainer(tmp_path, steps)
    if data is None:
        trainer.fit(module, train_dataloaders=DataLoader(video_pairs(2 * steps), batch_size=2))
    else:
        trainer.fit(module, datamodule=data)
    return trainer


def parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in module.named_parameters()}


def check_two_step_fit(backbone, finetune: str, tmp_path: Path) -> None:
    """Two Diffusion-DPO steps change the trained weights and leave the reference as it was."""
    module = DiffusionDPO(backbone, finetune=finetune, beta=500.0, lr=1e-3)
    reference = module.reference.copy if finetune == "full" else module.denoiser
    before = parameters(reference)
    fit(module, tmp_path, steps=2)
    assert torch.isfinite(module.trainer.callback_metrics["train/loss"])
    after = parameters(module.denoiser)
    if finetune == "lora":
        trained = [name for name in after if "lora_B" in name]
        assert trained and all(not torch.equal(after[name], before[name]) for name in trained)  # B starts at zero
        frozen = [name for name in after if "lora_" not in name]
        assert all(torch.equal(after[name], before[name]) for name in frozen)  # the reference: adapters off
    else:
        assert any(not torch.equal(after[name], before[name]) for name in after)
        torch.testing.assert_close(parameters(module.reference.copy), before, rtol=0, atol=0)


def check_method_fits_one_step_or_refuses(method: type, backbone, tmp_path: Path) -> None:
    """A one-step fit, or a clear ValueError when the method is not defined for the backbone's process."""
    kind = backbone.process.prediction_type
    if method.supported_prediction_types is not None and kind not in method.supported_prediction_types:
        with pytest.raises(ValueError, match="defined for prediction types"):
            method(backbone)
        return
    module = method(backbone, lr=1e-3)
    fit(module, tmp_path, steps=1)
    assert module.trainer.global_step == 1
    assert torch.isfinite(module.trainer.callback_metrics["train/loss"])


def check_example_config_parses(name: str, capsys, monkeypatch) -> dict:
    """The example config through the CLI's parser (``fit --print_config``: no model is built, nothing is
    downloaded); returns the config as the CLI resolved it."""
    monkeypatch.setattr(sys, "argv", ["lightning-pref"])  # in-process: the CLI reads `args`, not pytest's argv
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(REPO / "examples" / name), "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)
