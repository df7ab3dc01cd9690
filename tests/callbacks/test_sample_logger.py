"""SampleLogger: rounds at the right steps, the same samples for the same seeds, the same numbers on two processes
as on one, grids to loggers that take images, a playable mp4 for videos, and the config of its docs page."""

import csv
import json
import re
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from helpers.cli import printed_config
from helpers.pairs import random_pairs
from helpers.processes import REPO, SCRIPTS, finish, script_env
from helpers.training import trainer
from helpers.video import video_pairs
from lightning.pytorch.loggers import CSVLogger, Logger
from PIL import Image
from torch.utils.data import DataLoader

from lightning_pref.backbones import StableDiffusionBackbone, WanBackbone
from lightning_pref.callbacks import sampling
from lightning_pref.callbacks.sampling import SampleLogger, save_video_grid, scores_of
from lightning_pref.errors import ConfigError
from lightning_pref.generation import seeded_noise
from lightning_pref.methods import DiffusionDPO, MaPO
from lightning_pref.rewards import ColorAgreementReward, WarmthReward
from lightning_pref.tiny import write_tiny_wan_pipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
PIXELS = 8  # side of the tiny pixel-space pipeline's images
FP32_EPS = torch.finfo(torch.float32).eps


def fit_with(module, tmp_path, steps, sample_logger, pairs=None, **trainer_options):
    data = DataLoader(pairs or random_pairs(4 * steps, size=PIXELS), batch_size=2)
    trainer(tmp_path, steps, callbacks=[sample_logger], **trainer_options).fit(module, data)


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def sample_metric_rows(metrics_csv) -> list[dict]:
    with open(metrics_csv, newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["samples/warmth/policy"]]


def test_rounds_fall_on_every_nth_optimizer_step_and_when_training_ends(tiny_pixel, tmp_path):
    sample_logger = SampleLogger(
        PROMPTS, every_n_steps=2, scorers=[WarmthReward()], num_inference_steps=2, dirpath=str(tmp_path / "s"), scale=3
    )
    module = DiffusionDPO(StableDiffusionBackbone(str(tiny_pixel)), finetune="lora")
    logger = CSVLogger(tmp_path)
    # 2 micro-batches per optimizer step: a step's second micro-batch must not sample the same step again
    fit_with(module, tmp_path, 5, sample_logger, logger=logger, accumulate_grad_batches=2)

    assert sorted(path.name for path in (tmp_path / "s").iterdir()) == ["step_000002", "step_000004", "step_000005"]
    rows = sample_metric_rows(logger.experiment.metrics_file_path)
    assert [int(row["step"]) for row in rows] == [2, 4, 5]  # one round per step, logged at its optimizer step
    grid = Image.open(tmp_path / "s" / "step_000004" / "grid.png")
    assert grid.size == (len(PROMPTS) * PIXELS * 3, 2 * PIXELS * 3)  # a column per prompt; policy and reference


def test_the_same_seeds_give_the_same_samples_in_two_runs_and_the_reference_row_is_the_seeded_base_model(
    tiny_pixel, tmp_path
):
    def run(name):
        directory = tmp_path / name
        sample_logger = SampleLogger(
            PROMPTS, seed=4, every_n_steps=1, num_inference_steps=2, batch_size=len(PROMPTS), dirpath=str(directory)
        )
        module = DiffusionDPO(StableDiffusionBackbone(str(tiny_pixel)), finetune="full", lr=1e-2)
        fit_with(module, tmp_path / f"{name}-root", 2, sample_logger)
        return directory

    first, second = run("first"), run("second")
    for step in ("step_000001", "step_000002"):
        assert (first / step / "grid.png").read_bytes() == (second / step / "grid.png").read_bytes()
    grid = png(first / "step_000002" / "grid.png")
    policy_row, reference_row = grid[:PIXELS], grid[PIXELS:]
    assert not np.array_equal(policy_row, reference_row)  # the policy has trained away from the reference
    base = StableDiffusionBackbone(str(tiny_pixel))
    expected = base.sample(PROMPTS, initial_noise=seeded_noise(base, [4, 5, 6]), num_inference_steps=2)
    expected_row = (torch.cat(list(expected), dim=-1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(reference_row, expected_row)


def test_two_processes_log_the_same_scores_and_win_rates_as_one(tiny_pixel, tmp_path):
    runs = {devices: tmp_path / f"devices{devices}" for devices in (1, 2)}
    launches = []
    for devices, out in runs.items():  # both at once: the machine's two cores
        out.mkdir()
        command = [sys.executable, str(SCRIPTS / "sample_logger_fit.py"), str(tiny_pixel), str(out)]
        launches.append(
            subprocess.Popen(
                [*command, "--devices", str(devices)],
                env=script_env(),
                cwd=out,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    for launch in launches:
        output = finish(launch)
        assert launch.returncode == 0, output[-4000:]
    one, two = (runs[devices] / "lightning_logs" / "version_0" for devices in (1, 2))
    for step in ("step_000002", "step_000003"):  # every 2 steps, and the end of the 3-step fit
        # The same networks sample every prompt alone from its seed: the same images, bit for bit...
        assert (one / "samples" / step / "grid.png").read_bytes() == (two / "samples" / step / "grid.png").read_bytes()
        single, double = (json.loads((run / "samples" / step / "scores.json").read_text()) for run in (one, two))
        assert single["samples"] == double["samples"]  # ...the same per-prompt scores, gathered in prompt order
        samples = single["samples"]
        count = len(samples)
        assert count == 5  # 5 prompts over 2 ranks: rank 1's share is padded, and the padding counts for nothing
        # the policy is not the reference, so the win rates are not all ties
        assert any(s["policy"]["warmth"] != s["reference"]["warmth"] for s in samples)
        for scorer in ("warmth", "color_agreement"):
            policy = torch.tensor([s["policy"][scorer] for s in samples], dtype=torch.float64)
            reference = torch.tensor([s["reference"][scorer] for s in samples], dtype=torch.float64)
            wins = (policy > reference).double() + 0.5 * (policy == reference).double()
            expected = {"policy": policy.mean(), "reference": reference.mean(), "win_rate": wins.mean()}
            for quantity, value in expected.items():
                name = f"samples/{scorer}/{quantity}"
                # an fp32 mean of `count` values in [0, 1]: summed in another order, it moves by < count * eps
                assert single["metrics"][name] == pytest.approx(value.item(), abs=count * FP32_EPS)
                assert double["metrics"][name] == pytest.approx(single["metrics"][name], abs=count * FP32_EPS)
            # a win rate is a mean of halves over 5 prompts: exact in any order
            assert double["metrics"][f"samples/{scorer}/win_rate"] == single["metrics"][f"samples/{scorer}/win_rate"]
    for run in (one, two):  # the logger's numbers are the files' numbers
        rows = sample_metric_rows(run / "metrics.csv")
        assert [int(row["step"]) for row in rows] == [2, 3]
        for row in rows:
            metrics = json.loads((run / "samples" / f"step_{int(row['step']):06d}" / "scores.json").read_text())
            assert {name: float(row[name]) for name in metrics["metrics"]} == metrics["metrics"]


class RecordingLogger(Logger):
    """A logger that keeps the metrics it is given."""

    name, version = "recording", 0

    def __init__(self):
        super().__init__()
        self.images, self.metrics = [], []

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, metrics))


class TensorBoardStyleLogger(RecordingLogger):
    """Takes images through its experiment's ``add_image``, as TensorBoard's logger does."""

    @property
    def experiment(self):
        return self

    def add_image(self, tag, image, global_step):
        self.images.append((tag, image, global_step))


class WandbStyleLogger(RecordingLogger):
    """Takes images through its own ``log_image``, as W&B's logger does."""

    def log_image(self, key, images, step):
        self.images.append((key, images[0], step))


def test_loggers_that_take_images_get_the_grid_as_written(tiny_pixel, tmp_path):
    tensorboard, wandb = TensorBoardStyleLogger(), WandbStyleLogger()
    sample_logger = SampleLogger(PROMPTS, every_n_steps=None, num_inference_steps=2, dirpath=str(tmp_path / "s"))
    module = DiffusionDPO(StableDiffusionBackbone(str(tiny_pixel)), finetune="lora")
    fit_with(module, tmp_path, 1, sample_logger, logger=[tensorboard, wandb])

    written = png(tmp_path / "s" / "step_000001" / "grid.png")
    ((tag, image, step),) = tensorboard.images
    assert (tag, step, tuple(image.shape)) == ("samples/grid", 1, (3, 2 * PIXELS, len(PROMPTS) * PIXELS))
    np.testing.assert_array_equal((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), written)
    ((tag, image, step),) = wandb.images
    assert (tag, step) == ("samples/grid", 1)
    np.testing.assert_array_equal(image, written)
    assert not any("samples/" in name for _, metrics in tensorboard.metrics for name in metrics)  # no scorers


def test_a_reference_free_method_logs_its_policy_alone(tiny_pixel, tmp_path):
    sample_logger = SampleLogger(
        PROMPTS, every_n_steps=None, scorers=[WarmthReward()], num_inference_steps=2, dirpath=str(tmp_path / "s")
    )
    fit_with(MaPO(StableDiffusionBackbone(str(tiny_pixel)), finetune="lora"), tmp_path, 1, sample_logger)
    scores = json.loads((tmp_path / "s" / "step_000001" / "scores.json").read_text())
    assert list(scores["metrics"]) == ["samples/warmth/policy"]
    assert Image.open(tmp_path / "s" / "step_000001" / "grid.png").size == (len(PROMPTS) * PIXELS, PIXELS)


def test_videos_write_a_playable_mp4_of_every_frame_and_score_the_mean_over_frames(tmp_path):
    pipeline = write_tiny_wan_pipeline(tmp_path / "wan")
    backbone = WanBackbone(str(pipeline), num_frames=5, height=16, width=16)
    prompts = ["a red circle", "a square"]
    sample_logger = SampleLogger(
        prompts,
        every_n_steps=None,
        scorers=[WarmthReward()],
        num_inference_steps=2,
        dirpath=str(tmp_path / "s"),
        scale=2,
    )
    fit_with(DiffusionDPO(backbone, finetune="lora"), tmp_path, 1, sample_logger, pairs=video_pairs(2))

    with av.open(str(tmp_path / "s" / "step_000001" / "grid.mp4")) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 5  # every frame of the 5-frame videos
    assert frames[0].shape == (2 * 16 * 2, len(prompts) * 16 * 2, 3)  # policy and reference rows, upscaled twice
    strip = Image.open(tmp_path / "s" / "step_000001" / "grid.png")
    assert strip.size == (len(prompts) * 5 * 16 * 2, 2 * 16 * 2)  # filmstrips of all 5 frames (max_frames 8)

    videos = torch.rand(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    per_frame = torch.stack([WarmthReward().score(videos[:, :, f], prompts) for f in range(4)], dim=1)
    torch.testing.assert_close(scores_of(WarmthReward(), videos, prompts), per_frame.mean(dim=1))


def test_an_odd_sized_video_grid_is_padded_to_even_sides(tmp_path):
    videos = torch.rand(3, 3, 2, 5, 7, generator=torch.Generator().manual_seed(0))  # 3 videos of 5 x 7 pixels
    path = save_video_grid([videos], tmp_path / "grid.mp4")
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 2 and frames[0].shape == (6, 22, 3)  # 5 x 21 padded to 6 x 22


@pytest.mark.parametrize("delay, shown", [(0.0, True), (sampling.PROGRESS_DELAY, False)])
def test_a_progress_bar_shows_once_a_round_has_run_for_the_delay(
    tiny_pixel, tmp_path, capsys, monkeypatch, delay, shown
):
    monkeypatch.setattr(sampling, "PROGRESS_DELAY", delay)  # the default: a round of a tiny model ends before it
    sample_logger = SampleLogger(PROMPTS, every_n_steps=None, num_inference_steps=2, dirpath=str(tmp_path / "s"))
    module = DiffusionDPO(StableDiffusionBackbone(str(tiny_pixel)), finetune="lora")
    fit_with(module, tmp_path, 1, sample_logger, enable_progress_bar=True)
    assert ("samples at step 1" in capsys.readouterr().err) == shown


@pytest.mark.parametrize(
    "options, key",
    [
        ({"prompts": []}, "prompts"),
        ({"prompts": "a red circle"}, "prompts"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"scale": 1.5}, "scale"),
        ({"fps": 0}, "fps"),
        ({"scorers": [WarmthReward(), WarmthReward()]}, "scorers"),
        ({"scorers": [ColorAgreementReward, WarmthReward()]}, "scorers"),
    ],
)
def test_options_a_user_can_get_wrong_are_refused_naming_the_key(options, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        SampleLogger(**{"prompts": PROMPTS, **options})


def test_the_config_on_the_reading_a_run_page_parses(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-pref"])  # in-process: the CLI reads `args`, not pytest's argv
    page = (REPO / "docs" / "guides" / "reading-a-run.md").read_text()
    (block,) = re.findall(r"```yaml\n(# A toy run with a SampleLogger.*?)```", page, flags=re.DOTALL)
    path = tmp_path / "sample_logger.yaml"
    path.write_text(block)
    config = printed_config(str(path), capsys)  # an absolute path: not under examples/
    (callback,) = config["trainer"]["callbacks"]
    assert callback["class_path"] == "lightning_pref.callbacks.SampleLogger"
    options = callback["init_args"]
    assert [scorer["class_path"] for scorer in options["scorers"]] == [
        "lightning_pref.rewards.WarmthReward",
        "lightning_pref.rewards.ShapeAgreementReward",
    ]
    assert options["every_n_steps"] == 20 and len(options["prompts"]) == 4
    SampleLogger(**{key: value for key, value in options.items() if key != "scorers"})  # the values pass its checks
