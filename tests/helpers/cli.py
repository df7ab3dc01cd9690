"""Helpers of the command-line tests: a tiny fit config and running ``lightning-pref`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from helpers.processes import REPO
from lightning_pref.methods import DiffusionDPO


def tiny_config(tiny_sd, tiny_shards, tmp_path, **model_options):
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
        },
        "model": {
            "class_path": "lightning_pref.methods.DiffusionDPO",
            "init_args": {
                "backbone": {
                    "class_path": "lightning_pref.backbones.StableDiffusionBackbone",
                    "init_args": {"pretrained": str(tiny_sd)},
                },
                "beta": 1000,
                **model_options,
            },
        },
        "data": {
            "class_path": "lightning_pref.datamodules.PreferenceDataModule",
            "init_args": {
                "train_shards": f"{tiny_shards}/*.tar",
                "batch_size": 2,
                "num_workers": 0,
                "shuffle_buffer": 4,
                "batches_per_epoch": 2,
            },
        },
    }


def run_cli(args, tmp_path, extra_path=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(extra_path or ""), str(REPO)]))}
    return subprocess.run(
        [sys.executable, "-m", "lightning_pref.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_config(config, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class LrRecordingDPO(DiffusionDPO):
    """Diffusion-DPO that records the learning rate and beta its first training step sees (in ``seen``)."""

    seen: dict = {}

    def on_train_batch_start(self, batch, batch_idx):
        type(self).seen = {"lr": self.trainer.optimizers[0].param_groups[0]["lr"], "beta": self.beta}


def printed_config(name, capsys):
    """``examples/<name>`` as the CLI resolves it (``fit --print_config``: no model is built, nothing loaded)."""
    return resolved_config(["fit", "--config", str(REPO / "examples" / name)], capsys)


def resolved_config(args, capsys):
    """The config ``lightning-pref <args> --print_config`` prints, run in this process (no model is built)."""
    import pytest

    from lightning_pref.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    return yaml.safe_load(printed[printed.index("seed_everything") :])  # after any start-up log lines
