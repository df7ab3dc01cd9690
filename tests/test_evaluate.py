"""`lightning-pref evaluate` and `sample`: the toy base model against a perturbed copy, under a pinned spec."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from PIL import Image

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.cli import main
from lightning_pref.errors import ConfigError, DataError
from lightning_pref.evaluation import EvaluationSpec, ModelSource, ScorerSpec, evaluate, score, write_media
from lightning_pref.export import build_module
from lightning_pref.generation import generate
from lightning_pref.rewards.toy import WarmthReward
from lightning_pref.toy import BASE_MODEL_PATH
from lightning_pref.toy.preferences import HELDOUT_PROMPTS
from lightning_pref.toy.world import IMAGE_SIZE

SCORERS = [
    ScorerSpec("lightning_pref.rewards.toy.WarmthReward"),
    ScorerSpec("lightning_pref.toy.preferences.ToyPreferenceReward", {"preference": "cool"}),
]
SAMPLER = {"seeds_per_prompt": 2, "first_seed": 7, "num_inference_steps": 3, "guidance_scale": 3.0, "batch_size": 4}


def perturb(unet, seed=0):
    """Add small seeded noise to every weight: a 'tuned' model whose samples differ from the base's."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.02 * parameter.std().nan_to_num() * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(HELDOUT_PROMPTS[:2]) + "\n")
    return path


@pytest.fixture(scope="module")
def tuned_pipeline(tmp_path_factory):
    """A copy of the toy base pipeline with perturbed UNet weights."""
    path = tmp_path_factory.mktemp("tuned") / "pipeline"
    shutil.copytree(BASE_MODEL_PATH, path)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    perturb(unet)
    unet.save_pretrained(path / "unet")
    return path


@pytest.fixture(scope="module")
def tuned_checkpoint(tmp_path_factory):
    """A full fine-tune's config and checkpoint holding the same perturbed weights as ``tuned_pipeline``."""
    root = tmp_path_factory.mktemp("run")
    backbone = {
        "class_path": "lightning_pref.backbones.StableDiffusionBackbone",
        "init_args": {"pretrained": str(BASE_MODEL_PATH)},
    }
    model = {
        "class_path": "lightning_pref.methods.DiffusionDPO",
        "init_args": {"backbone": backbone, "finetune": "full"},
    }
    (root / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    module = build_module(root / "config.yaml")
    perturb(module.denoiser)
    state = module.state_dict()
    torch.save({"state_dict": {key: state[key] for key in module.trained_state_keys()}}, root / "last.ckpt")
    return root / "config.yaml", root / "last.ckpt"


def spec_of(prompts_file, **options):
    return EvaluationSpec(str(prompts_file), **{**SAMPLER, **options})


def test_the_json_is_byte_identical_on_a_rerun_and_its_numbers_follow_from_the_scores(
    prompts_file, tuned_pipeline, tmp_path
):
    tuned, base = ModelSource(str(tuned_pipeline)), ModelSource(str(BASE_MODEL_PATH))
    result = evaluate(tuned, base, spec_of(prompts_file), SCORERS, tmp_path / "first.json")
    evaluate(tuned, base, spec_of(prompts_file), SCORERS, tmp_path / "second.json")
    assert (tmp_path / "first.json").read_bytes() == (tmp_path / "second.json").read_bytes()
    assert json.loads((tmp_path / "first.json").read_text()) == result

    # sample j of every prompt starts from the noise of seed first_seed + j, for both models: rescoring samples
    # generated here from those seeds gives the written scores
    prompts = [prompt for prompt in HELDOUT_PROMPTS[:2] for _ in range(2)]
    seeds = [7, 8, 7, 8]
    for role, path in (("base", BASE_MODEL_PATH), ("tuned", tuned_pipeline)):
        images = generate(
            StableDiffusionBackbone(str(path)).eval(), prompts, seeds, num_inference_steps=3, guidance_scale=3.0
        )
        written = [value for entry in result["prompts"] for value in entry["scores"]["warmth"][role]]
        torch.testing.assert_close(torch.tensor(written), WarmthReward().score(images, prompts), rtol=0, atol=1e-6)

    assert [entry["seeds"] for entry in result["prompts"]] == [[7, 8], [7, 8]]
    for name, numbers in result["summary"].items():
        tuned_scores = np.array([value for entry in result["prompts"] for value in entry["scores"][name]["tuned"]])
        base_scores = np.array([value for entry in result["prompts"] for value in entry["scores"][name]["base"]])
        rate = np.mean((tuned_scores > base_scores) + 0.5 * (tuned_scores == base_scores))
        half = 1.96 * math.sqrt(max(rate * (1 - rate), 1e-12) / 4)
        assert numbers["samples"] == 4
        assert numbers["tuned_mean"] == pytest.approx(tuned_scores.mean(), abs=1e-12)
        assert numbers["base_mean"] == pytest.approx(base_scores.mean(), abs=1e-12)
        assert numbers["win_rate"] == pytest.approx(rate, abs=1e-12)
        assert numbers["win_rate_interval"] == pytest.approx([rate - half, rate + half], abs=1e-12)
    assert not np.array_equal(tuned_scores, base_scores)  # the perturbation changed the samples


def test_the_output_records_the_resolved_spec_scorers_and_versions(prompts_file, tuned_pipeline, tmp_path):
    result = evaluate(
        ModelSource(str(tuned_pipeline)), ModelSource(str(BASE_MODEL_PATH)), spec_of(prompts_file), SCORERS[:1]
    )
    spec = result["spec"]
    assert spec["prompt_format"] == "text" and spec["resolution"] == [IMAGE_SIZE, IMAGE_SIZE] and spec["frames"] is None
    assert len(spec["prompts_sha256"]) == 64 and spec["num_inference_steps"] == 3
    assert result["scorers"] == [
        {
            "name": "warmth",
            "class_path": "lightning_pref.rewards.toy.WarmthReward",
            "init_args": {},
            "versions": {"lightning_pref": "0.1.0"},
        }
    ]
    assert {"torch", "diffusers", "transformers"} <= set(result["library_versions"])
    assert result["models"]["tuned"]["backbone"] == "lightning_pref.backbones.StableDiffusionBackbone"

    # the written spec reads back as the spec it ran under, and pins the prompt file's content
    (tmp_path / "out.json").write_text(json.dumps(result))
    assert EvaluationSpec.from_file(tmp_path / "out.json") == EvaluationSpec(**{**spec, "frames": None, "fps": 8})
    changed = tmp_path / "prompts.txt"
    changed.write_text("a cross\n")
    with pytest.raises(DataError, match="is not the file the spec was written with"):
        EvaluationSpec.from_file(tmp_path / "out.json", prompts=str(changed)).read_prompts()
    with pytest.raises(ConfigError, match=rf"resolution=\[64, 64\]: the model samples \[{IMAGE_SIZE}, {IMAGE_SIZE}\]"):
        evaluate(
            ModelSource(str(tuned_pipeline)),
            ModelSource(str(BASE_MODEL_PATH)),
            spec_of(prompts_file, resolution=(64, 64)),
            SCORERS[:1],
        )


def test_a_checkpoint_is_compared_with_its_configs_backbone_through_the_command_line(
    prompts_file, tuned_pipeline, tuned_checkpoint, tmp_path, capsys
):
    config, checkpoint = tuned_checkpoint
    flags = ["--prompts", str(prompts_file), "--seeds-per-prompt", "2", "--first-seed", "7", "--steps", "3"]
    flags += ["--guidance-scale", "3.0", "--batch-size", "4", "--scorer", "lightning_pref.rewards.toy.WarmthReward"]
    main(
        ["evaluate", "--tuned", str(checkpoint), "--config", str(config), *flags, "--out", str(tmp_path / "ckpt.json")]
    )
    assert "warmth: tuned" in capsys.readouterr().out
    from_checkpoint = json.loads((tmp_path / "ckpt.json").read_text())
    assert from_checkpoint["models"] == {
        "tuned": {"checkpoint": str(checkpoint), "config": str(config)},
        "base": {
            "pipeline": str(BASE_MODEL_PATH),
            "backbone": "lightning_pref.backbones.StableDiffusionBackbone",
            "backbone_args": {},
        },
    }
    # the same weights as a pipeline directory score the same, against the same base
    main(
        [
            "evaluate",
            "--tuned",
            str(tuned_pipeline),
            "--base",
            str(BASE_MODEL_PATH),
            *flags,
            "--out",
            str(tmp_path / "dir.json"),
        ]
    )
    from_pipeline = json.loads((tmp_path / "dir.json").read_text())
    assert from_pipeline["prompts"] == from_checkpoint["prompts"]
    assert from_pipeline["summary"] == from_checkpoint["summary"]
    # an earlier output's spec reruns it: the same bytes
    rerun = ["--spec", str(tmp_path / "dir.json"), "--scorer", "lightning_pref.rewards.toy.WarmthReward"]
    main(
        [
            "evaluate",
            "--tuned",
            str(tuned_pipeline),
            "--base",
            str(BASE_MODEL_PATH),
            *rerun,
            "--out",
            str(tmp_path / "again.json"),
        ]
    )
    assert (tmp_path / "again.json").read_bytes() == (tmp_path / "dir.json").read_bytes()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--scorer", "lightning_pref.rewards.toy.Nothing"],
            "--scorer 'lightning_pref.rewards.toy.Nothing' is not an importable RewardModel",
        ),
        (["--scorer", "lightning_pref.rewards.toy.WarmthReward={bad"], "the init args after '=' are not JSON"),
        (
            [
                "--scorer",
                "lightning_pref.rewards.toy.WarmthReward",
                "--scorer",
                "lightning_pref.rewards.toy.WarmthReward",
            ],
            "two scorers are named 'warmth'",
        ),
        (
            ["--scorer", "lightning_pref.rewards.toy.WarmthReward", "--seeds-per-prompt", "0"],
            "seeds_per_prompt=0: use a whole number >= 1",
        ),
    ],
)
def test_mistakes_on_the_command_line_are_one_line_naming_the_option(
    prompts_file, tuned_pipeline, extra, message, capsys
):
    with pytest.raises(SystemExit) as exit:
        main(
            [
                "evaluate",
                "--tuned",
                str(tuned_pipeline),
                "--prompts",
                str(prompts_file),
                "--out",
                "unused.json",
                "--base",
                str(BASE_MODEL_PATH),
                *extra,
            ]
        )
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_a_pipeline_without_a_base_is_refused_by_name(prompts_file, tuned_pipeline, tuned_checkpoint):
    with pytest.raises(ConfigError, match="is a pipeline, which does not record its base: give the base model"):
        evaluate(ModelSource(str(tuned_pipeline)), None, spec_of(prompts_file), SCORERS[:1])
    _, checkpoint = tuned_checkpoint
    with pytest.raises(FileNotFoundError, match=r"last\.ckpt is not a diffusers pipeline directory .*\(--config"):
        ModelSource(str(checkpoint))


def test_sample_writes_a_png_per_sample_a_grid_and_the_spec(prompts_file, tuned_pipeline, tmp_path):
    main(
        [
            "sample",
            "--model",
            str(tuned_pipeline),
            "--prompts",
            str(prompts_file),
            "--seeds-per-prompt",
            "2",
            "--first-seed",
            "7",
            "--steps",
            "3",
            "--guidance-scale",
            "3.0",
            "--batch-size",
            "3",
            "--out",
            str(tmp_path),
        ]
    )
    written = json.loads((tmp_path / "samples.json").read_text())
    assert [(sample["prompt"], sample["seed"]) for sample in written["samples"]] == [
        (HELDOUT_PROMPTS[0], 7),
        (HELDOUT_PROMPTS[0], 8),
        (HELDOUT_PROMPTS[1], 7),
        (HELDOUT_PROMPTS[1], 8),
    ]
    assert written["spec"]["resolution"] == [IMAGE_SIZE, IMAGE_SIZE] and written["spec"]["batch_size"] == 3
    backbone = StableDiffusionBackbone(str(tuned_pipeline)).eval()
    prompts = [sample["prompt"] for sample in written["samples"]]
    images = generate(backbone, prompts, [7, 8, 7, 8], num_inference_steps=3, guidance_scale=3.0, batch_size=3)
    expected = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    for sample, pixels in zip(written["samples"], expected):
        assert np.array_equal(np.asarray(Image.open(tmp_path / sample["file"])), pixels)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * IMAGE_SIZE, 2 * IMAGE_SIZE, 3)  # a row per prompt, a column per seed
    assert np.array_equal(grid[IMAGE_SIZE:, :IMAGE_SIZE], expected[2])


def test_videos_go_to_a_video_scorer_given_with_nested_init_args():
    generator = torch.Generator().manual_seed(0)
    videos = torch.rand(2, 3, 5, 16, 16, generator=generator)
    videos[:, :, :, 4:12, 4:12] = torch.rand(2, 3, 5, 1, 1, generator=generator)  # a coloured square per frame
    prompts = ["a square", "a red square"]
    nested = {"image_reward": {"class_path": "lightning_pref.rewards.toy.WarmthReward"}}
    scorer = ScorerSpec.parse(f"lightning_pref.rewards.video.FrameAveragedReward={json.dumps(nested)}").load()
    per_frame = torch.stack([WarmthReward().score(videos[:, :, f], prompts) for f in range(5)], dim=1)
    torch.testing.assert_close(score(scorer, videos, prompts), per_frame.mean(1), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="'warmth' does not score videos .*FrameAveragedReward"):
        score(WarmthReward(), videos, prompts)


def test_the_help_lists_every_subcommand(capsys):
    main(["--help"])
    listed = {
        line.split()[0] for line in capsys.readouterr().out.split("commands:")[1].splitlines() if line.startswith("  ")
    }
    assert listed == {"fit", "validate", "data", "plan", "export", "plot", "evaluate", "sample"}
    for command in ("evaluate", "sample"):
        with pytest.raises(SystemExit) as exit:
            main([command, "--help"])
        assert exit.value.code == 0 and "--prompts" in capsys.readouterr().out


def test_a_video_sample_is_a_looping_gif_at_the_specs_frame_rate(tmp_path):
    video = torch.zeros(3, 4, 8, 8)
    video[0, 1], video[1, 2], video[2, 3] = 1.0, 1.0, 1.0  # black, red, green, blue frames
    write_media(video, tmp_path / "video.gif", fps=5)
    gif = Image.open(tmp_path / "video.gif")
    assert gif.n_frames == 4 and gif.info["duration"] == 200 and gif.info["loop"] == 0
    for frame, color in enumerate([(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        gif.seek(frame)
        assert gif.convert("RGB").getpixel((3, 3)) == color


def test_every_familys_pipeline_directory_finds_its_backbone(tmp_path):
    from lightning_pref.tiny import (
        write_tiny_cogvideox_pipeline,
        write_tiny_flux_pipeline,
        write_tiny_sd3_pipeline,
        write_tiny_wan22_pipeline,
        write_tiny_wan_pipeline,
    )

    pipelines = {
        "StableDiffusionBackbone": BASE_MODEL_PATH,
        "StableDiffusion3Backbone": write_tiny_sd3_pipeline(tmp_path / "sd3"),
        "FluxBackbone": write_tiny_flux_pipeline(tmp_path / "flux"),
        "CogVideoXBackbone": write_tiny_cogvideox_pipeline(tmp_path / "cogvideox"),
        "WanBackbone": write_tiny_wan_pipeline(tmp_path / "wan21"),
    }
    for layout in ("ti2v5b", "a14b"):
        pipelines[f"Wan22Backbone ({layout})"] = write_tiny_wan22_pipeline(tmp_path / layout, layout=layout)
    for backbone, path in pipelines.items():
        found = ModelSource(str(path)).backbone_class_path()
        assert found == f"lightning_pref.backbones.{backbone.split(' ')[0]}", (backbone, found)
