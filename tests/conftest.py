"""Shared fixtures: tiny pipelines written to temporary directories and loaded like real checkpoints."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.datamodules import write_preference_shards
from lightning_pref.tiny import write_tiny_sd_pipeline

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))  # the machine's two cores


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny SD1.5-style pipeline (8x8x4 latents, 16x16 pixels)."""
    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sdxl"), variant="sdxl")


@pytest.fixture(scope="session")
def tiny_pixel(tmp_path_factory):
    """A tiny pixel-space pipeline (no VAE), v-prediction."""
    return write_tiny_sd_pipeline(
        tmp_path_factory.mktemp("tiny_pixel"), pixel_space=True, prediction_type="v_prediction"
    )


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """Preference shards of 16x16 PNG pairs in the library's shard format (3 shards of 8 pairs)."""
    rng = np.random.default_rng(0)
    pairs = (
        {
            "winner": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            "loser": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            "caption": f"a red cat {i}",
        }
        for i in range(24)
    )
    out = tmp_path_factory.mktemp("shards")
    write_preference_shards(pairs, out, samples_per_shard=8)
    return out


@pytest.fixture
def sd_backbone(tiny_sd):
    return StableDiffusionBackbone(str(tiny_sd))


@pytest.fixture(scope="session")
def tiny_pixel_sd(tmp_path_factory):
    """A tiny pixel-space SD pipeline (8x8 pixels, epsilon): what ``scripts/distributed_fit.py`` trains."""
    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_pixel_sd"), pixel_space=True)


@pytest.fixture(scope="session")
def distributed_run(tiny_pixel_sd, tmp_path_factory):
    """``distributed_run(strategy, finetune="full")``: the per-rank records and the output folder of a 4-step
    ``scripts/distributed_fit.py`` run on ``tiny_pixel_sd`` (two processes unless ``strategy`` is ``single``),
    run once per session: the strategy tests and the hostile-checkpoint tests read the same runs."""
    from helpers.distributed import fit

    runs = {}

    def run(strategy: str, finetune: str = "full"):
        if (strategy, finetune) not in runs:
            out = tmp_path_factory.mktemp(f"{strategy}-{finetune}") / "run"
            devices = 1 if strategy == "single" else 2
            runs[strategy, finetune] = fit(tiny_pixel_sd, out, strategy, finetune, devices=devices), out
        return runs[strategy, finetune]

    return run
