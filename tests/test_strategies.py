"""DDP, DeepSpeed ZeRO-2/3 and FSDP2 on two CPU processes (gloo), and a simulated two-node run.

Each run is ``tests/scripts/distributed_fit.py`` in subprocesses (Lightning's launchers re-execute the script for
every rank). The same global batch of 4 pairs is split across processes, and every pair draws its noise from
its own seeded stream, so every per-sample error (and the mean loss over ranks) must equal the single-process
one at every step, up to fp32 rounding (``ERROR_RTOL``, below); a resumed run repeats the uninterrupted one
bit for bit.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from helpers.cli import resolved_config, tiny_config, write_config
from helpers.distributed import BETA, fit, write_run_config
from helpers.processes import REPO, SCRIPTS, script_env
from safetensors.torch import load_file

from lightning_pref.export import export
from lightning_pref.tiny import (
    write_tiny_cogvideox_pipeline,
    write_tiny_sd3_pipeline,
    write_tiny_wan22_pipeline,
    write_tiny_wan_pipeline,
)
from lightning_pref.tiny.image import write_tiny_flux_pipeline

# One process with the global batch of 4 pairs and 2 processes with 2 pairs each compute the same per-sample
# errors up to fp32 rounding: a different batch composition changes the reduction order inside convolutions and
# matmuls, which moves each output by a few units in the last place, and an error is a mean over outputs. With
# every part in fp32 (the T5 encoders too) and SGD (see ``helpers.distributed.RecordingDPO``), the differences measured on
# every strategy and backbone here stay below 1e-6 relative over 4 steps; ERROR_RTOL (84 fp32 ulps) bounds them.
ERROR_RTOL = 1e-5


def global_errors(records: list[dict], step: str) -> dict[str, list[float]]:
    """One step's per-sample errors of the whole global batch: rank ``r`` holds the ``r``-th slice of the pairs."""
    return {
        name: [value for record in records for value in record["errors"][step][name]]
        for name in records[0]["errors"][step]
    }


def mean_losses(records: list[dict]) -> dict[str, float]:
    """The global-batch loss of each step: the mean of the ranks' losses (equal per-rank batches)."""
    return {step: sum(r["losses"][step] for r in records) / len(records) for step in records[0]["losses"]}


def assert_same_run(records: list[dict], expected: list[dict]) -> None:
    """Every step's per-sample errors within ``ERROR_RTOL``, and the loss within what those errors allow: the
    loss is 1-Lipschitz in ``u = -(beta/2) (D_theta - D_ref)``, a signed sum of four errors per pair."""
    losses, expected_losses = mean_losses(records), mean_losses(expected)
    assert losses.keys() <= expected_losses.keys()
    for step in losses:
        actual, wanted = global_errors(records, step), global_errors(expected, step)
        for name in wanted:
            torch.testing.assert_close(
                torch.tensor(actual[name]),
                torch.tensor(wanted[name]),
                rtol=ERROR_RTOL,
                atol=0,
                msg=f"step {step} {name}",
            )
        largest = max(abs(value) for values in wanted.values() for value in values)
        assert abs(losses[step] - expected_losses[step]) <= BETA / 2 * 4 * ERROR_RTOL * largest, (
            step,
            losses,
            expected_losses,
        )


@pytest.fixture(scope="module")
def pipeline(tiny_pixel_sd):
    return tiny_pixel_sd


@pytest.fixture(scope="module")
def single_process(distributed_run):
    """The single-process runs every multi-process run must reproduce, per fine-tuning mode."""
    return {finetune: distributed_run("single", finetune)[0] for finetune in ("full", "lora")}


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "fsdp2"])
def test_two_processes_match_one_save_and_resume(pipeline, single_process, distributed_run, tmp_path, strategy):
    records, run = distributed_run(strategy)
    assert_same_run(records, single_process["full"])
    losses = mean_losses(records)
    assert losses["4"] != losses["1"]  # it trained
    assert (run / "samples" / "before_after.png").exists()  # sampling with sharded weights did not hang
    for record in records:
        assert record["reference_change"] == 0.0  # the frozen reference never moved
        if strategy in ("zero3", "fsdp2"):  # partitioned, not silently replicated
            assert record["reference_sharded"]
            assert record["reference_local"] < 0.6 * record["reference_total"]
        else:
            assert record["reference_local"] == record["reference_total"]

    checkpoints = run / "checkpoints"
    resumed = fit(pipeline, tmp_path / "resumed", strategy, "full", devices=2, resume=checkpoints / "step=2.ckpt")
    assert list(mean_losses(resumed)) == ["3", "4"]  # continues at step 3...
    for step in ("3", "4"):  # ...exactly where the uninterrupted run went: the same processes, bit for bit
        assert global_errors(resumed, step) == global_errors(records, step)
        assert mean_losses(resumed)[step] == losses[step]

    # The last checkpoint, consolidated into a diffusers UNet, holds exactly the weights training ended with.
    exported = export(write_run_config(pipeline, tmp_path, "full"), checkpoints / "step=4.ckpt", tmp_path / "exported")
    final = load_file(run / "final_denoiser.safetensors")
    unet = UNet2DConditionModel.from_pretrained(exported / "unet")
    assert unet.state_dict().keys() == final.keys()
    for key, value in unet.state_dict().items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=0)
    assert (exported / "model_index.json").exists() and (exported / "text_encoder").is_dir()  # a whole pipeline


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_lora_reference_is_the_sharded_policy_without_adapters(single_process, distributed_run, strategy):
    records, _ = distributed_run(strategy, "lora")
    assert_same_run(records, single_process["lora"])
    assert all(record["reference_change"] == 0.0 and not record["reference_sharded"] for record in records)


@pytest.mark.parametrize(
    ("backbone", "strategy"),
    [("cogvideox", "zero3"), ("wan", "fsdp2"), ("sd3", "zero3"), ("flux", "fsdp2"), ("wan22_a14b", "fsdp2")],
)
def test_video_and_flow_backbones_shard_and_match_one_process(tmp_path, backbone, strategy):
    """Wan2.2 A14B: each rank's samples reach one expert or both as their times fall, and FSDP2 gathers every
    block of both experts on every rank (``WanExperts`` runs an expert no sample reaches on one token). With
    these streams, each of the 4 steps leaves one rank with samples of one expert only (the high-noise expert in
    steps 1-2, the low-noise one in steps 3-4)."""
    writer = {
        "cogvideox": write_tiny_cogvideox_pipeline,
        "wan": write_tiny_wan_pipeline,
        "sd3": write_tiny_sd3_pipeline,
        "flux": write_tiny_flux_pipeline,
        "wan22_a14b": lambda path: write_tiny_wan22_pipeline(path, layout="a14b"),
    }[backbone]
    pipeline = writer(tmp_path / "pipeline")
    single = fit(pipeline, tmp_path / "single", "single", "full", backbone=backbone)
    records = fit(pipeline, tmp_path / "run", strategy, "full", devices=2, backbone=backbone)
    assert_same_run(records, single)
    for record in records:
        assert record["reference_sharded"] and record["reference_local"] < 0.7 * record["reference_total"]
        assert record["reference_change"] == 0.0


def test_a_zero2_bf16_full_fine_tune_runs_its_replicated_reference_in_bf16(pipeline, tmp_path):
    records = fit(pipeline, tmp_path / "run", "zero2", "full", devices=2, precision="bf16-mixed")
    losses = mean_losses(records)
    assert all(math.isfinite(loss) for loss in losses.values()) and losses["4"] != losses["1"]
    assert all(
        record["reference_change"] == 0.0 and record["reference_dtype"] == "torch.bfloat16" for record in records
    )


def test_two_simulated_nodes_match_one_process(pipeline, single_process, tmp_path):
    records = fit(pipeline, tmp_path / "run", "ddp", "full", devices=1, nodes=2)
    assert_same_run(records, single_process["full"])


PRESETS = sorted((REPO / "examples" / "strategies").glob("*.yaml"))


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / "cli_entry.py"), *args],
        cwd=cwd,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_strategy_preset_composes_with_a_run_config(tiny_sd, tiny_shards, tmp_path, capsys):
    config = write_config(tiny_config(tiny_sd, tiny_shards, tmp_path), tmp_path)
    assert {preset.stem for preset in PRESETS} >= {"ddp", "zero2", "zero2_offload", "zero3", "zero3_offload", "fsdp2"}
    for preset in PRESETS:
        strategy = resolved_config(["fit", "--config", str(config), "--config", str(preset)], capsys)["trainer"][
            "strategy"
        ]
        wanted = yaml.safe_load(preset.read_text())["trainer"]["strategy"]
        if isinstance(wanted, str):
            assert strategy == wanted
        else:  # the printed config spells out every default besides the preset's choices
            assert strategy["class_path"] == wanted["class_path"]
            assert strategy["init_args"].items() >= wanted["init_args"].items()


def test_zero2_preset_fits_on_two_processes_through_the_cli(tiny_sd, tiny_shards, tmp_path):
    config = write_config(tiny_config(tiny_sd, tiny_shards, tmp_path), tmp_path)
    preset = [p for p in PRESETS if p.stem == "zero2"][0]
    result = cli(
        [
            "fit",
            "--config",
            str(config),
            "--config",
            str(preset),
            "--trainer.devices",
            "2",
            "--trainer.precision",
            "32",
            "--trainer.enable_checkpointing",
            "true",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "latest").exists()  # a DeepSpeed checkpoint directory


def test_torchrun_launch_script_runs_two_simulated_nodes(tiny_sd, tiny_shards, tmp_path):
    config = write_config(tiny_config(tiny_sd, tiny_shards, tmp_path), tmp_path)
    preset = [p for p in PRESETS if p.stem == "ddp"][0]
    script = REPO / "examples" / "launch" / "torchrun.sh"
    env = script_env(
        NNODES="2",
        GPUS_PER_NODE="1",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        PYTHONPATH=str(REPO),
    )
    nodes = [
        subprocess.Popen(
            [
                "bash",
                str(script),
                str(config),
                str(preset),
                "--trainer.accelerator",
                "cpu",
                "--trainer.precision",
                "32",
            ],
            env={**env, "NODE_RANK": str(node)},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]  # one job of two processes, one per node
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in metrics.splitlines()[0] and len(metrics.splitlines()) == 3  # header + 2 steps, from rank 0
