"""Hostile configurations and training runs: every one is refused in one line, or stopped before harm.

Through the real ``lightning-pref`` entry point (in this process, and once in a subprocess to see the whole
output), each case asserts exit status 2 and a single ``lightning-pref: error:`` line naming the key and the
fix, with no traceback. The classes covered:

* options that cannot train: ``beta`` negative, zero or NaN; ``lr`` zero, NaN or infinite; a negative
  weight decay or warm-up; a LoRA rank of 0; an unknown ``nonfinite`` mode; an option a method does not
  have a meaning for (SEE-DPO's entropy term on reference-free MaPO);
* commands that do not exist (``test``, ``predict``) and a bad ``plan`` size;
* runs that go wrong: a learning rate that blows the weights up (stopped at the first non-finite loss, and
  no checkpoint ever holds a non-finite weight), a NaN reaching the loss (stopped before the optimizer
  step, weights untouched; or, with ``nonfinite: skip``, the step skipped and the weights untouched);
* resuming with a config whose tensors differ from the checkpoint's (refused), or whose ``lr`` differs
  (applied to the restored optimizer and schedule).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from helpers.cli import LrRecordingDPO, tiny_config, write_config
from helpers.pairs import random_pairs
from helpers.training import trainer as make_trainer
from torch.utils.data import DataLoader

from lightning_pref.cli import main
from lightning_pref.errors import TrainingError
from lightning_pref.methods import DiffusionDPO


def run_main(args: list[str], capsys) -> str:
    """Run ``lightning-pref`` in this process; return its stderr, asserting exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def config(tiny_sd, tiny_shards, tmp_path):
    return str(write_config(tiny_config(tiny_sd, tiny_shards, tmp_path), tmp_path))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.init_args.beta", "-1000"], "beta=-1000.0: use a finite number > 0"),
        (["--model.init_args.beta", "0"], "beta=0.0: use a finite number > 0"),
        (["--model.init_args.beta", ".nan"], "beta=nan: use a finite number > 0"),
        (["--model.init_args.lr", "0"], "lr=0.0: use a finite number > 0"),
        (["--model.init_args.lr", ".inf"], "lr=inf: use a finite number > 0"),
        (["--model.init_args.weight_decay", "-1"], "weight_decay=-1.0"),
        (["--model.init_args.warmup_steps", "-3"], "warmup_steps=-3"),
        (["--model.init_args.lora_rank", "0"], "lora_rank=0: use a rank >= 1"),
        (["--data.init_args.batch_size", "0"], "batch_size=0: use a whole number >= 1"),
        (
            ["--model.class_path", "lightning_pref.methods.MaPO", "--model.init_args.entropy_gamma", "10"],
            "entropy_gamma flattens the reference, and MaPO has none",
        ),
    ],
)
def test_options_that_cannot_train_are_one_line(config, capsys, override, message):
    err = run_main(["fit", "--config", config, *override], capsys)
    assert err.count("\n") == 1 and err.startswith("lightning-pref: error: ") and message in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["test", "--help"], "invalid choice: 'test' (choose from 'fit', 'validate')"),
        (["predict"], "invalid choice: 'predict'"),
        (["plan", "--model", "cogvideox-5b", "--frames", "-5"], "argument --frames: -5 must be >= 1"),
        (["fit", "--model.init_args.nonfinite", "maybe"], "nonfinite"),
    ],
)
def test_commands_and_choices_that_do_not_exist(capsys, args, message):
    err = run_main(args, capsys)
    assert message in err and "Traceback" not in err


def test_the_whole_output_of_a_refused_option_is_one_line(config):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_pref.cli", "fit", "--config", config, "--model.init_args.beta", "-5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        "lightning-pref: error: beta=-5.0: use a finite number > 0."
    ]  # beside Lightning's "Seed set to 0"


# ----------------------------------------------------------------------------------------- runs that go wrong
def test_a_learning_rate_that_blows_up_stops_with_finite_checkpoints_only(config, tmp_path, capsys):
    err = run_main(
        [
            "fit",
            "--config",
            config,
            "--model.init_args.finetune",
            "full",
            "--model.init_args.lr",
            "1e6",
            "--trainer.max_steps",
            "20",
            "--trainer.callbacks",
            "lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.dirpath",
            str(tmp_path / "ckpt"),
            "--trainer.callbacks.every_n_train_steps",
            "1",
            "--trainer.callbacks.save_top_k",
            "-1",
            "--data.init_args.batches_per_epoch",
            "20",
        ],
        capsys,
    )
    assert err.count("\n") == 1 and ("the loss is nan" in err or "holds NaN/Inf" in err), err
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    for path in saved:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(value).all() for value in state.values()), path


def nan_batch():
    batch = next(iter(DataLoader(random_pairs(2), batch_size=2)))
    batch["pixels_w"][0, 0, 0, 0] = float("nan")
    return batch


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_nan_reaching_the_loss_never_touches_the_weights(sd_backbone, tmp_path, mode):

    module = DiffusionDPO(sd_backbone, finetune="full", nonfinite=mode)
    before = {name: value.clone() for name, value in module.denoiser.state_dict().items()}
    trainer = make_trainer(tmp_path, 2)
    batches = [nan_batch(), nan_batch()]
    if mode == "stop":
        with pytest.raises(TrainingError, match=r"step 0: the loss is nan, non-finite errors: policy_w \(1 of 2\)"):
            trainer.fit(module, DataLoader(batches, batch_size=None))
    else:
        trainer.fit(module, DataLoader(batches, batch_size=None))
        assert trainer.global_step == 2  # the steps ran, the optimizer skipped them
        assert trainer.callback_metrics["train/skipped_step"] == 1.0
    after = module.denoiser.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_nan_gradient_behind_a_finite_loss_never_touches_the_weights(sd_backbone, tmp_path, mode):
    module = DiffusionDPO(sd_backbone, finetune="lora", nonfinite=mode)
    name, poisoned = next((n, p) for n, p in module.named_parameters() if "lora_B" in n)
    poisoned.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = make_trainer(tmp_path, 2)
    batches = list(DataLoader(random_pairs(4), batch_size=2))
    if mode == "stop":
        with pytest.raises(TrainingError, match=rf"step 0: the gradient of {re.escape(name)} holds NaN/Inf"):
            trainer.fit(module, DataLoader(batches, batch_size=None))
    else:
        trainer.fit(module, DataLoader(batches, batch_size=None))
        assert trainer.global_step == 2 and trainer.callback_metrics["train/skipped_step"] == 1.0
    assert all(torch.equal(before[n], p) for n, p in module.named_parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------- resuming
def test_resuming_refuses_other_tensors_and_applies_a_new_lr(config, tmp_path, capsys):
    main(
        [
            "fit",
            "--config",
            config,
            "--trainer.max_steps",
            "2",
            "--trainer.enable_checkpointing",
            "true",
            "--trainer.callbacks",
            "lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.dirpath",
            str(tmp_path / "ckpt"),
        ]
    )
    checkpoint = next((tmp_path / "ckpt").glob("*.ckpt"))
    err = run_main(
        [
            "fit",
            "--config",
            config,
            "--model.init_args.lora_rank",
            "4",
            "--ckpt_path",
            str(checkpoint),
            "--trainer.max_steps",
            "3",
        ],
        capsys,
    )
    assert "lora_rank: 8 in the checkpoint, 4 in the config" in err and err.count("\n") == 1

    main(
        [
            "fit",
            "--config",
            config,
            "--model.class_path",
            "helpers.cli.LrRecordingDPO",
            "--model.init_args.lr",
            "0.5",
            "--model.init_args.beta",
            "5",
            "--ckpt_path",
            str(checkpoint),
            "--trainer.max_steps",
            "3",
        ]
    )
    assert LrRecordingDPO.seen == {"lr": 0.5, "beta": 5.0}


def test_checkpoints_are_written_atomically_and_a_failed_write_is_an_error(tiny_sd, tmp_path, monkeypatch):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_pref.backbones import StableDiffusionBackbone
    from lightning_pref.errors import CheckpointError

    def fit(dirpath):
        trainer = pl.Trainer(
            max_steps=2,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=[ModelCheckpoint(dirpath=dirpath, every_n_train_steps=1, save_top_k=-1)],
        )
        trainer.fit(DiffusionDPO(StableDiffusionBackbone(str(tiny_sd))), DataLoader(random_pairs(4), batch_size=2))
        return trainer

    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"could not write the checkpoint .*a_file"):
        fit(tmp_path / "a_file" / "checkpoints")

    fit(tmp_path / "good")
    written = {path.name: path.read_bytes() for path in (tmp_path / "good").iterdir()}
    assert sorted(written) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]  # no leftover partial files

    def dies_mid_write(obj, file, *args, **kwargs):  # a crash while writing: half a file, then the error
        with open(file, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(CheckpointError, match="No space left on device"):
        fit(tmp_path / "good")
    assert {path.name: path.read_bytes() for path in (tmp_path / "good").iterdir()} == written  # the old ones, intact
