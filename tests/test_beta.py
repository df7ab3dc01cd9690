"""beta in other tools' units, the fit-start line that prints them, and ``auto_beta``.

The equivalents are checked against latent sizes worked out here from the checkpoints' published configs, and
against the other tools' losses written out here; ``auto_beta`` is checked on tiny fits.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.pairs import random_pairs
from helpers.processes import finish, script_env
from helpers.steps import step_errors
from helpers.training import trainer
from torch.utils.data import DataLoader

from lightning_pref import beta as units
from lightning_pref.backbones import CogVideoXBackbone, StableDiffusionBackbone, WanBackbone
from lightning_pref.errors import ConfigError
from lightning_pref.losses import diffusion_dpo_loss
from lightning_pref.methods import DMPO, DiffusionDPO, MaPO
from lightning_pref.methods.base import AUTO_BETA_KEY
from lightning_pref.tiny import write_tiny_sd_pipeline

# One sample's latent element count, from each family's published configs: latent channels x (frames after the
# VAE's 4x temporal compression) x (pixels / the VAE's spatial factor)^2.
LATENT_ELEMENTS = {
    "sd1.5": 4 * (512 // 8) * (512 // 8),  # 512 px, VAE 8x, 4 channels
    "sdxl": 4 * (1024 // 8) * (1024 // 8),  # 1024 px
    "sd3": 16 * (1024 // 8) * (1024 // 8),  # 16 latent channels
    "flux.1-dev": 64 * (1024 // 16) * (1024 // 16),  # 16 channels packed 2x2: 64 per token, 4096 tokens
    "cogvideox": 16 * ((49 - 1) // 4 + 1) * (480 // 8) * (720 // 8),  # 49 frames 480x720
    "wan2.1": 16 * ((81 - 1) // 4 + 1) * (480 // 8) * (832 // 8),  # 81 frames 480x832
    "wan2.2-a14b": 16 * ((81 - 1) // 4 + 1) * (720 // 8) * (1280 // 8),  # the Wan2.1 VAE at 720x1280
    "wan2.2-ti2v-5b": 48 * ((121 - 1) // 4 + 1) * (704 // 16) * (1280 // 16),  # Wan2.2 VAE: 48 channels, 16x
}


@pytest.mark.parametrize("family", LATENT_ELEMENTS)
def test_equivalents_of_each_family_match_a_hand_computation(family):
    shape, elements = units.PUBLISHED_LATENT_SHAPES[family], LATENT_ELEMENTS[family]
    assert units.latent_elements(shape) == elements
    assert units.summed_error_beta(5000.0, shape) == 5000.0 / elements
    assert units.diffusers_beta(5000.0) == 2500.0  # the research script's default is this library's 5000
    assert units.flow_grpo_beta(100.0) == 100.0
    line = units.beta_equivalents(5000.0, shape)
    assert "beta_dpo 2500 " in line and f"beta {5000.0 / elements:.4g} on an error summed" in line


def test_the_published_shapes_are_the_video_backbones_training_latents():
    """The backbones' own description of the published checkpoints (used by `lightning-pref plan`) agrees."""
    for family, backbone in (("cogvideox", CogVideoXBackbone), ("wan2.1", WanBackbone)):
        video, (temporal, spatial) = backbone.training_video, backbone.vae_compression
        frames = (video.frames - 1) // temporal + 1
        channels = units.PUBLISHED_LATENT_SHAPES[family][0]
        assert units.PUBLISHED_LATENT_SHAPES[family] == (
            channels,
            frames,
            video.height // spatial,
            video.width // spatial,
        )


def test_each_mapping_gives_the_other_tools_loss():
    """The same predictions give the same loss in this library and in each tool's formula, written out here."""
    generator = torch.Generator().manual_seed(0)
    shape, beta, pairs = (4, 8, 8), 5000.0, 3
    # (model: policy, reference) x (member: winner, loser) x pairs x latent
    prediction = torch.randn(2, 2, pairs, *shape, generator=generator, dtype=torch.float64)
    target = prediction + 0.05 * torch.randn(prediction.shape, generator=generator, dtype=torch.float64)
    squared = (prediction - target) ** 2
    mean_error, summed_error = squared.flatten(3).mean(-1), squared.flatten(3).sum(-1)
    ours, _ = diffusion_dpo_loss(*mean_error[0], *mean_error[1], beta=beta)
    ours_ipo, _ = diffusion_dpo_loss(*mean_error[0], *mean_error[1], beta=beta, kind="ipo")

    def ref_minus_model_diff(error):  # diffusers' train_diffusion_dpo.py: logits = ref_diff - model_diff
        (model_w, model_l), (ref_w, ref_l) = error
        return (ref_w - ref_l) - (model_w - model_l)

    beta_dpo = units.diffusers_beta(beta)
    diffusers = -F.logsigmoid(beta_dpo * ref_minus_model_diff(mean_error)).mean()
    diffusers_ipo = ((ref_minus_model_diff(mean_error) - 1 / (2 * beta_dpo)) ** 2).mean()
    # SimpleTuner's Flow-DPO (norm_type "sum"): logits = 0.5 * beta * margin, margin = ref_diff - model_diff
    summed = -F.logsigmoid(0.5 * units.summed_error_beta(beta, shape) * ref_minus_model_diff(summed_error)).mean()
    # flow_grpo: inside_term = -0.5 * beta * (w_diff - l_diff), w_diff = model_w - ref_w, l_diff = model_l - ref_l
    (model_w, model_l), (ref_w, ref_l) = mean_error
    inside_term = -0.5 * units.flow_grpo_beta(beta) * ((model_w - ref_w) - (model_l - ref_l))
    flow_grpo = -F.logsigmoid(inside_term).mean()
    for theirs in (diffusers, summed, flow_grpo):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)  # float64: only reduction order differs
    torch.testing.assert_close(ours_ipo, diffusers_ipo / 4, rtol=1e-12, atol=0)  # METHODS.md section 1


def test_the_fit_start_line_names_the_backbones_latent(tmp_path, tiny_sd, caplog):
    module = DiffusionDPO(StableDiffusionBackbone(str(tiny_sd)), beta=5000.0)
    with caplog.at_level(logging.INFO, logger="lightning_pref.methods.base"):
        trainer(tmp_path, 1).fit(module, DataLoader(random_pairs(2), batch_size=2))
    lines = [record.getMessage() for record in caplog.records if "diffusers' SD research script" in record.getMessage()]
    assert len(lines) == 1
    # the tiny pipeline's UNet: 4 latent channels at sample_size 8
    assert "over the 4x8x8 latent (256 elements)" in lines[0] and f"beta {5000 / 256:.4g} on" in lines[0]
    assert "beta_dpo 2500 " in lines[0] and "flow_grpo's beta 5000 " in lines[0]


# ------------------------------------------------------------------------------------------------ auto_beta
def test_the_rule_holds_beta_at_the_target_and_converges_to_it_on_fixed_margins():
    steer = units.AutoBeta(target=0.2, rate=1.0, min_beta=1.0, max_beta=1e6)
    assert steer.next_beta(1000.0, 0.2) == 1000.0
    assert steer.next_beta(1000.0, 0.5) == 1000.0 * math.exp(0.3) and steer.next_beta(1000.0, 0.1) < 1000.0
    assert steer.next_beta(1000.0, 0.1) == 1000.0 * math.exp(-0.1)
    assert units.AutoBeta(0.2, 100.0, 10.0, 2000.0).next_beta(1000.0, 0.5) == 2000.0  # clipped to max_beta

    # -(D_theta - D_ref), 7 of 8 positive: sigmoid(-u) falls from 1/2 toward 1/8 as beta grows, past 0.2
    margins = torch.tensor([1e-3, 2e-3, -5e-4, 4e-3, 3e-3, 1e-3, 2e-3, 5e-3], dtype=torch.float64)
    beta = 100.0
    for _ in range(500):
        beta = steer.next_beta(beta, torch.sigmoid(-(beta / 2) * margins).mean().item())
    assert torch.sigmoid(-(beta / 2) * margins).mean().item() == pytest.approx(0.2, abs=1e-6)


class Recording(DiffusionDPO):
    """Diffusion-DPO keeping, per training step, the beta it trained with and the mean sigmoid(-u) it saw."""

    def compute_loss(self, errors, batch):
        loss, metrics = super().compute_loss(errors, batch)
        if self.training:
            self.seen = [*getattr(self, "seen", []), (self.beta, metrics["gradient_factor"].item())]
        return loss, metrics


def tied_pairs(num):
    """Precomputed pairs whose loser is the winner: every margin is exactly 0, so every step's mean sigmoid(-u) is
    1/2 whatever the weights."""
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn(4, 8, 8, generator=generator) for _ in range(num)]
    return [{"latents_w": x, "latents_l": x.clone(), "prompt": "a red cat"} for x in latents]


def test_auto_beta_keeps_beta_where_the_target_is_met_and_follows_the_rule_otherwise(tmp_path, tiny_sd):
    kept = Recording(StableDiffusionBackbone(str(tiny_sd)), beta=800.0, auto_beta=True, auto_beta_target=0.5)
    trainer(tmp_path, 3).fit(kept, DataLoader(tied_pairs(4), batch_size=2))
    assert [factor for _, factor in kept.seen] == [0.5] * 3 and kept.beta == 800.0

    rate, target = 0.1, 0.2
    moved = Recording(
        StableDiffusionBackbone(str(tiny_sd)), beta=800.0, auto_beta=True, auto_beta_target=target, auto_beta_rate=rate
    )
    trainer(tmp_path, 3, accumulate_grad_batches=2).fit(moved, DataLoader(tied_pairs(12), batch_size=2))
    step = math.exp(rate * (0.5 - target))  # one optimizer step's factor; beta stays put within a step
    assert [beta for beta, _ in moved.seen] == pytest.approx(
        [800.0, 800.0, 800 * step, 800 * step] + [800 * step**2] * 2
    )
    assert moved.beta == pytest.approx(800.0 * step**3, rel=1e-12)


def fixed_noise_factor(module, batch):
    """The mean sigmoid(-u) of ``module`` at its current beta, on ``batch`` under 4 fixed noise draws."""
    module.eval()
    with torch.no_grad():
        factors = [
            diffusion_dpo_loss(*step_errors(module, batch, seed).as_args(), beta=module.beta)[1]["gradient_factor"]
            for seed in range(4)
        ]
    return torch.stack(factors).mean().item()


def test_auto_beta_moves_the_mean_sigmoid_toward_the_target(tmp_path, tiny_sd):
    """From LoRA's zero start (u = 0: sigmoid(-u) = 1/2) toward 0.2, on the pairs it trains on under fixed noise;
    the same fit at a constant beta stays near 1/2."""
    pairs = random_pairs(4)
    batch = next(iter(DataLoader(pairs, batch_size=4)))
    factors = {}
    for auto_beta in (False, True):
        module = DiffusionDPO(
            StableDiffusionBackbone(str(tiny_sd)), beta=500.0, lr=1e-2, auto_beta=auto_beta, auto_beta_rate=0.5
        )
        assert fixed_noise_factor(module, batch) == 0.5
        trainer(tmp_path, 12).fit(module, DataLoader(pairs * 12, batch_size=4))
        factors[auto_beta] = fixed_noise_factor(module, batch)
    assert module.beta > 500.0
    assert abs(factors[True] - 0.2) < abs(factors[False] - 0.2) - 0.1


def test_auto_beta_resumes_with_the_steered_beta(tmp_path, tiny_sd):
    def new_module():
        return DiffusionDPO(
            StableDiffusionBackbone(str(tiny_sd)), beta=500.0, lr=1e-3, auto_beta=True, auto_beta_rate=0.5
        )

    same_batches = DataLoader(random_pairs(4) * 4, batch_size=4)
    straight = new_module()
    trainer(tmp_path / "a", 4).fit(straight, same_batches)

    first_half = new_module()
    interrupted = trainer(tmp_path / "b", 2)
    interrupted.fit(first_half, same_batches)
    interrupted.save_checkpoint(tmp_path / "half.ckpt")
    saved = torch.load(tmp_path / "half.ckpt", weights_only=True)
    assert type(saved[AUTO_BETA_KEY]) is float and saved[AUTO_BETA_KEY] == first_half.beta != 500.0

    resumed = new_module()
    trainer(tmp_path / "b", 4).fit(resumed, same_batches, ckpt_path=tmp_path / "half.ckpt", weights_only=True)
    assert resumed.beta == straight.beta != first_half.beta


def test_auto_beta_is_the_same_on_both_ranks_and_follows_their_mean(tmp_path):
    """Two DDP processes train on different pairs, so each sees its own mean sigmoid(-u); both steer beta by the
    mean of the two (this file's ``__main__`` is the rank script: Lightning re-executes it for rank 1)."""
    pipeline = write_tiny_sd_pipeline(tmp_path / "pipeline")
    command = [sys.executable, __file__, str(pipeline), str(tmp_path)]
    process = subprocess.Popen(
        command,
        env=script_env(PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = finish(process)
    assert process.returncode == 0, output[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["beta"] == ranks[1]["beta"] != 800.0
    assert ranks[0]["factors"] != ranks[1]["factors"]  # each rank's own pairs
    beta = 800.0
    for factor_0, factor_1 in zip(ranks[0]["factors"], ranks[1]["factors"]):
        beta = min(max(beta * math.exp(DDP_RATE * ((factor_0 + factor_1) / 2 - 0.2)), 80.0), 8000.0)
    assert ranks[0]["beta"] == pytest.approx(beta, rel=1e-6)  # float32 all-reduce of the factor


@pytest.mark.parametrize(
    ("method", "options"),
    [(DiffusionDPO, {"loss_type": "hinge"}), (DMPO, {}), (MaPO, {"beta": 0.1})],
    ids=["hinge", "dmpo", "mapo"],
)
def test_auto_beta_is_refused_where_the_loss_has_no_sigmoid_of_the_dpo_logit(sd_backbone, method, options):
    named = "loss_type='hinge' has none" if method is DiffusionDPO else f"{method.__name__}'s loss has no such logit"
    with pytest.raises(ConfigError, match=f"auto_beta steers .*{named}"):
        method(sd_backbone, auto_beta=True, **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"auto_beta_target": 0.7}, r"auto_beta_target=0.7: use a mean sigmoid\(-u\) in \(0, 0.5\]"),
        ({"auto_beta_rate": 0.0}, "auto_beta_rate=0.0: use a finite number > 0"),
        ({"auto_beta_min": 10.0, "auto_beta_max": 5.0}, "auto_beta_min=10.0, auto_beta_max=5.0"),
    ],
)
def test_bad_auto_beta_options_are_refused(sd_backbone, options, message):
    with pytest.raises(ConfigError, match=message):
        DiffusionDPO(sd_backbone, auto_beta=True, **options)


DDP_RATE = 0.5


def run_rank(pipeline: str, out: str) -> None:
    """One rank of ``test_auto_beta_is_the_same_on_both_ranks_and_follows_their_mean``: 3 steps of DDP on CPU, 2 pairs
    per rank (Lightning's distributed sampler gives the ranks different pairs); writes ``rank{r}.json``."""
    module = Recording(StableDiffusionBackbone(pipeline), beta=800.0, lr=1e-2, auto_beta=True, auto_beta_rate=DDP_RATE)
    fit = trainer(Path(out), 3, strategy="ddp", devices=2)
    fit.fit(module, DataLoader(random_pairs(12), batch_size=2))
    record = {"beta": module.beta, "factors": [factor for _, factor in module.seen]}
    (Path(out) / f"rank{fit.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    run_rank(*sys.argv[1:3])
