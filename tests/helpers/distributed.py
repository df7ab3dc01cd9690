"""The runs of ``tests/scripts/distributed_fit.py``: what they train, and launching them on N processes.

Every run fits Diffusion-DPO with plain SGD on the same global batch of 4 pairs, split evenly across the
processes, so one process and N compute the same per-sample errors up to fp32 rounding.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from helpers.processes import SCRIPTS, finish, script_env
from lightning_pref.backbones import (
    CogVideoXBackbone,
    FluxBackbone,
    StableDiffusion3Backbone,
    StableDiffusionBackbone,
    Wan22Backbone,
    WanBackbone,
)
from lightning_pref.methods import DiffusionDPO

GLOBAL_BATCH = 4  # pairs per optimizer step, split evenly across the processes
BETA = 500.0


BACKBONES = {  # backbone class and the pixel shape of one image or video of its tiny pipeline
    "sd": (StableDiffusionBackbone, (3, 8, 8)),
    "sd3": (StableDiffusion3Backbone, (3, 16, 16)),
    "flux": (FluxBackbone, (3, 16, 16)),
    "cogvideox": (CogVideoXBackbone, (3, 5, 16, 16)),
    "wan": (WanBackbone, (3, 5, 16, 16)),
    "wan22_a14b": (Wan22Backbone, (3, 5, 16, 16)),  # two experts, both trained, samples routed by timestep
}


def global_batch(pixel_shape: tuple[int, ...]) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    prompts = ["a red cat", "a blue dog", "a green circle", "a square"]
    return [
        {
            "pixels_w": torch.rand(pixel_shape, generator=generator) * 2 - 1,
            "pixels_l": torch.rand(pixel_shape, generator=generator) * 2 - 1,
            "prompt": prompt,
        }
        for prompt in prompts
    ]


class RecordingDPO(DiffusionDPO):
    """Diffusion-DPO that keeps each step's per-sample errors (``errors_by_step``), trained with plain SGD.

    SGD moves the weights by ``lr * gradient``, so a rounding difference between two runs stays a rounding
    difference in the next step's weights; AdamW divides each gradient by its running RMS, which turns a
    gradient that is zero up to rounding into a full ``lr``-sized step of either sign.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.errors_by_step: dict[int, dict[str, list[float]]] = {}

    def compute_loss(self, errors, batch):
        self.errors_by_step[self.global_step + 1] = {
            name: value.detach().float().tolist()
            for name, value in zip(("policy_w", "policy_l", "ref_w", "ref_l"), errors.as_args())
        }
        return super().compute_loss(errors, batch)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def training_module(pipeline: str, backbone: str = "sd", finetune: str = "full") -> RecordingDPO:
    """The module every run of ``scripts/distributed_fit.py`` trains (tests rebuild it to load its checkpoints)."""
    # All in float32 (the T5 encoders default to bfloat16), so one process and N differ by fp32 rounding alone.
    options = {} if backbone == "sd" else {"text_encoder_dtype": "float32"}
    return RecordingDPO(BACKBONES[backbone][0](str(pipeline), **options), beta=BETA, finetune=finetune, lr=1e-3, seed=7)


def fit(
    pipeline: Path,
    out: Path,
    strategy: str,
    finetune: str,
    devices: int = 1,
    nodes: int = 1,
    resume: Path | None = None,
    backbone: str = "sd",
    precision: str = "32-true",
):
    """Run the script (one launch per node) and return the per-rank records, rank 0 first."""
    out.mkdir(parents=True)
    command = [
        sys.executable,
        str(SCRIPTS / "distributed_fit.py"),
        str(pipeline),
        str(out),
        "--strategy",
        strategy,
        "--finetune",
        finetune,
        "--devices",
        str(devices),
        "--nodes",
        str(nodes),
        "--backbone",
        backbone,
        "--precision",
        precision,
    ]
    if resume is not None:
        command += ["--resume", str(resume)]
    env = script_env()
    launches = [
        subprocess.Popen(
            command,
            env={**env, "NODE_RANK": str(node)},
            cwd=out,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for node in range(nodes)
    ]
    for launch in launches:
        output = finish(launch)
        assert launch.returncode == 0, output[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(devices * nodes)]


def write_run_config(pipeline: Path, directory: Path, finetune: str) -> Path:
    """The model section of a config equivalent to the script's module."""
    backbone = {
        "class_path": "lightning_pref.backbones.StableDiffusionBackbone",
        "init_args": {"pretrained": str(pipeline)},
    }
    model = {
        "class_path": "lightning_pref.methods.DiffusionDPO",
        "init_args": {"backbone": backbone, "beta": BETA, "finetune": finetune, "lr": 1e-3, "seed": 7},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({"model": model}))
    return path
