r"""Reward evaluation of a tuned model against its base under a pinned spec, and sampling a prompt file.

Reported reward numbers reproduce only when everything that produced them is written down: the prompts
(file, reader and content hash), the seeds, the sampler, the resolution and, for videos, the frames. An
[`EvaluationSpec`][lightning_pref.evaluation.EvaluationSpec] holds all of it, and
[`evaluate`][lightning_pref.evaluation.evaluate] writes it into its JSON beside the scores:

    lightning-pref evaluate --tuned run/checkpoints/last.ckpt --config run/config.yaml \
        --prompts PartiPrompts.tsv --seeds-per-prompt 2 --steps 50 --guidance-scale 7.5 \
        --scorer lightning_pref.rewards.toy.WarmthReward \
        --scorer 'lightning_pref.toy.preferences.ToyPreferenceReward={"preference": "warm"}' --out eval.json
    lightning-pref evaluate --spec eval.json --tuned ... --scorer ...     # the same spec again, checked
    lightning-pref sample --model run/checkpoints/last.ckpt --config run/config.yaml --prompts p.txt --out samples

Sample ``j`` of every prompt starts from the initial noise of seed ``first_seed + j``
([`seeded_noise`][lightning_pref.generation.seeded_noise]), for the tuned model and its base alike, so each
tuned sample has a base sample from the same noise. Each scorer (a
[`RewardModel`][lightning_pref.rewards.RewardModel], named by class path and init arguments, so a new scorer
needs no code here) scores both; the win rate of tuned over base is the fraction of samples where the tuned
one scores higher, ties one half, with a 95% normal-approximation interval
([`win_rate_interval`][lightning_pref.toy.evaluation.win_rate_interval]: ``p +- 1.96 sqrt(p (1 - p) / n)``,
samples counted as independent). Videos go to the scorer as they are: give a video reward (an image reward
averaged over frames: ``lightning_pref.rewards.video.FrameAveragedReward``).

A model is a diffusers pipeline directory (its backbone chosen from ``model_index.json``, or given), or a
training checkpoint with its run's ``config.yaml``, read as ``lightning-pref export`` reads them (plain data
only; [`lightning_pref.checkpoints`][lightning_pref.checkpoints]). A checkpoint's base is the backbone its
config names; a pipeline's base must be given. Run twice on the same inputs, the JSON is byte-identical: it
holds no time (the command prints the time taken).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from lightning_pref.backbones.base import Backbone
from lightning_pref.backbones.loading import read_model_index
from lightning_pref.backbones.wan import release_of
from lightning_pref.errors import ConfigError, DataError, MissingFileError, check_whole_numbers
from lightning_pref.generation import generate
from lightning_pref.losses import win_fraction
from lightning_pref.prompt_sets import prompt_format, read_prompt_set
from lightning_pref.rewards.base import RewardModel
from lightning_pref.toy.evaluation import win_rate_interval

#: the ``schema`` field of the files this module writes
EVALUATION_SCHEMA = "lightning-pref-evaluation/1"
SAMPLES_SCHEMA = "lightning-pref-samples/1"
#: the backbone each diffusers pipeline class loads with
PIPELINE_BACKBONES = {
    "StableDiffusionPipeline": "lightning_pref.backbones.StableDiffusionBackbone",
    "StableDiffusionXLPipeline": "lightning_pref.backbones.StableDiffusionXLBackbone",
    "StableDiffusion3Pipeline": "lightning_pref.backbones.StableDiffusion3Backbone",
    "FluxPipeline": "lightning_pref.backbones.FluxBackbone",
    "CogVideoXPipeline": "lightning_pref.backbones.CogVideoXBackbone",
    "WanPipeline": "lightning_pref.backbones.WanBackbone",
}
#: libraries whose versions every output records
RECORDED_LIBRARIES = ("lightning_pref", "torch", "diffusers", "transformers", "numpy")
#: at most this many prompts (rows) in the grid ``sample`` writes
GRID_PROMPTS = 16


# ----------------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class EvaluationSpec:
    """Everything the samples depend on. Written, resolved, into every output; a written spec reads back.

    Args:
        prompts: the prompt file ([`lightning_pref.prompt_sets`][lightning_pref.prompt_sets]).
        prompt_format: its reader (``text``, ``pickapic``, ``parti``, ``hpsv2``, ``vbench``); default by extension.
        prompts_sha256: the file's SHA-256; when given, a file with other content is refused (a written spec
            always holds it).
        max_prompts: evaluate the first ``max_prompts`` prompts only (``None``: all).
        seeds_per_prompt: samples per prompt; sample ``j`` starts from the noise of seed ``first_seed + j``.
        first_seed: see ``seeds_per_prompt``.
        num_inference_steps, guidance_scale: the sampler (the backbone's sampling scheduler, classifier-free guidance).
        resolution: ``(height, width)`` in pixels the samples must have; ``None``: whatever the model samples
            (models sample at their native size; set a Wan backbone's size with its ``height`` and ``width``).
            A written spec holds the resolution sampled.
        frames: the frames a video must have (``None``: the model's; set Wan's with its ``num_frames``); ``None``
            for image models.
        fps: frame rate of written videos (``sample``'s GIFs); recorded for videos only.
        batch_size: samples per generator call. In exact arithmetic it changes nothing (each sample's noise
            is its own); batched kernels may change the last bits, so it is pinned too.
    """

    prompts: str
    prompt_format: str | None = None
    prompts_sha256: str | None = None
    max_prompts: int | None = None
    seeds_per_prompt: int = 1
    first_seed: int = 0
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    resolution: tuple[int, int] | None = None
    frames: int | None = None
    fps: int = 8
    batch_size: int = 16

    def __post_init__(self):
        check_whole_numbers(
            seeds_per_prompt=self.seeds_per_prompt,
            num_inference_steps=self.num_inference_steps,
            fps=self.fps,
            batch_size=self.batch_size,
        )
        check_whole_numbers(least=0, first_seed=self.first_seed)
        if self.max_prompts is not None:
            check_whole_numbers(max_prompts=self.max_prompts)
        if self.frames is not None:
            check_whole_numbers(frames=self.frames)
        if self.resolution is not None:
            if len(self.resolution) != 2:
                raise ConfigError(f"resolution={self.resolution!r}: give (height, width) in pixels.")
            check_whole_numbers(height=self.resolution[0], width=self.resolution[1])
            object.__setattr__(self, "resolution", tuple(self.resolution))  # a list read from JSON or YAML
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)):
            raise ConfigError(f"guidance_scale={self.guidance_scale!r}: give a number (1.0 turns guidance off).")
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        object.__setattr__(self, "prompt_format", prompt_format(self.prompts, self.prompt_format))

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> EvaluationSpec:
        """The spec of a JSON or YAML file: a spec, or the ``spec`` of an output this module wrote (its ``null``
        fields read as the defaults); ``overrides`` replace some of its fields."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"spec file {path} does not exist: check the path.")
        content = yaml.safe_load(path.read_text())  # JSON is YAML
        content = content.get("spec", content) if isinstance(content, dict) else content
        known = {spec_field.name for spec_field in dataclasses.fields(cls)}
        if not isinstance(content, dict):
            raise ConfigError(
                f"spec file {path} holds a {type(content).__name__}: write the spec's fields as a mapping."
            )
        if set(content) - known:
            raise ConfigError(
                f"spec file {path}: unknown fields {sorted(set(content) - known)}; a spec has the fields {sorted(known)}."
            )
        given = {name: value for name, value in content.items() if value is not None}  # None: the default
        return cls(**{**given, **overrides})

    def read_prompts(self) -> list[str]:
        """The prompts, refused when the file's hash is not ``prompts_sha256``."""
        digest = sha256_of(Path(self.prompts)) if Path(self.prompts).is_file() else None
        if self.prompts_sha256 is not None and digest != self.prompts_sha256:
            raise DataError(
                f"prompts file {self.prompts} has SHA-256 {digest}, but the spec pins {self.prompts_sha256}: it "
                "is not the file the spec was written with; restore that file, or drop prompts_sha256."
            )
        return read_prompt_set(self.prompts, self.prompt_format)[: self.max_prompts]

    def seeds(self) -> list[int]:
        """The initial-noise seeds of each prompt's samples."""
        return [self.first_seed + j for j in range(self.seeds_per_prompt)]

    def check_media(self, media: Tensor) -> None:
        """Refuse samples (``(B, 3, H, W)`` images or ``(B, 3, F, H, W)`` videos) of another size than pinned."""
        if media.ndim == 4 and self.frames is not None:
            raise ConfigError(f"frames={self.frames}: the model samples images; remove frames from the spec.")
        if self.resolution is not None and tuple(media.shape[-2:]) != self.resolution:
            raise ConfigError(
                f"resolution={list(self.resolution)}: the model samples {list(media.shape[-2:])} (height, width); "
                "set the spec's resolution to that, or configure the backbone to sample the pinned size."
            )
        if media.ndim == 5 and self.frames is not None and media.shape[2] != self.frames:
            raise ConfigError(
                f"frames={self.frames}: the model samples {media.shape[2]}-frame videos; set frames to "
                f"{media.shape[2]}, or configure the backbone to sample {self.frames}."
            )

    def resolved(self, media: Tensor) -> dict[str, Any]:
        """The spec as written: with the prompt file's hash and the size of ``media`` (samples drawn under it)."""
        videos = media.ndim == 5
        return {
            **dataclasses.asdict(self),
            "prompts_sha256": sha256_of(Path(self.prompts)),
            "resolution": list(media.shape[-2:]),
            "frames": media.shape[2] if videos else None,
            "fps": self.fps if videos else None,
        }


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------- classes by path
def import_class(class_path: str, option: str, base: type, example: str) -> type:
    """The class at ``class_path`` (``package.module.Class``), which must subclass ``base``; ``option`` and
    ``example`` (a valid class path) word the error."""
    module_name, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError):
        found = None
    if not (isinstance(found, type) and issubclass(found, base)):
        raise ConfigError(
            f"{option} {class_path!r} is not an importable {base.__name__} subclass: give its full class path, "
            f"e.g. {example}."
        )
    return found


def parse_class_and_args(text: str, option: str) -> tuple[str, dict[str, Any]]:
    """``CLASS_PATH`` or ``CLASS_PATH={"json": "init args"}`` (the command line's way to name a class)."""
    class_path, _, arguments = text.partition("=")
    try:
        init_args = json.loads(arguments) if arguments else {}
    except json.JSONDecodeError as error:
        raise ConfigError(f"{option} {text!r}: the init args after '=' are not JSON ({error.msg}).") from None
    if not isinstance(init_args, dict):
        raise ConfigError(f"{option} {text!r}: the init args after '=' must be a JSON object, e.g. '{{\"key\": 1}}'.")
    return class_path.strip(), init_args


def versions_of(*modules: str) -> dict[str, str]:
    """Installed versions of the distributions providing the top-level ``modules`` (``unknown`` when none)."""
    distributions = importlib.metadata.packages_distributions()
    found = {}
    for module in modules:
        top = module.split(".")[0]
        for distribution in distributions.get(top, [top]):
            try:
                found[distribution] = importlib.metadata.version(distribution)
            except importlib.metadata.PackageNotFoundError:
                found[distribution] = "unknown"
    return found


@dataclass(frozen=True)
class ScorerSpec:
    """A scorer by class path and init arguments, e.g. ``ScorerSpec("lightning_pref.rewards.toy.WarmthReward")``."""

    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> ScorerSpec:
        """From the command line's ``CLASS_PATH`` or ``CLASS_PATH={"json": "init args"}``."""
        return cls(*parse_class_and_args(text, "--scorer"))

    def load(self) -> RewardModel:
        """The scorer, built as configs build classes: an init arg that is itself a class is given as
        ``{"class_path": ..., "init_args": {...}}`` (e.g. the image reward a video reward averages over frames)."""
        from jsonargparse import ArgumentParser

        import_class(
            self.class_path, "--scorer", RewardModel, "lightning_pref.rewards.toy.WarmthReward"
        )  # a clear error before jsonargparse's
        parser = ArgumentParser()
        parser.add_argument("--scorer", type=RewardModel)
        config = parser.parse_object({"scorer": {"class_path": self.class_path, "init_args": self.init_args}})
        return parser.instantiate(config).scorer.eval()

    def record(self, scorer: RewardModel) -> dict[str, Any]:
        """What the output says of the scorer: name, class, init args and its package's version."""
        return {
            "name": scorer.name,
            "class_path": self.class_path,
            "init_args": self.init_args,
            "versions": versions_of(self.class_path),
        }


# ------------------------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class ModelSource:
    """A model to sample: a diffusers pipeline directory, or a training checkpoint with its run's config.

    Args:
        path: the pipeline (a local directory or a hub id), or the checkpoint (``.ckpt``, ZeRO or FSDP2 directory).
        config: the run's ``config.yaml``, for a checkpoint (``None``: ``path`` is a pipeline).
        backbone: for a pipeline, the backbone's class path (``None``: chosen by its ``model_index.json``).
        backbone_args: further init args of that backbone (e.g. a Wan backbone's ``num_frames``).
    """

    path: str
    config: str | None = None
    backbone: str | None = None
    backbone_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.config is not None and (self.backbone is not None or self.backbone_args):
            raise ConfigError(
                f"{self.path}: a checkpoint's backbone is the one its config {self.config} names; drop the backbone."
            )
        local = Path(self.path)
        if self.config is None and local.exists() and not (local / "model_index.json").is_file():
            raise MissingFileError(
                f"{self.path} is not a diffusers pipeline directory (no model_index.json); for a training "
                "checkpoint also give its run's config (--config run/config.yaml)."
            )

    def base(self) -> ModelSource:
        """A checkpoint's base: the backbone its config names, as a pipeline source."""
        if self.config is None:
            raise ConfigError(
                f"{self.path} is a pipeline, which does not record its base: give the base model (--base DIR)."
            )
        config = yaml.safe_load(Path(self.config).read_text()) or {}
        backbone = (config.get("model") or {}).get("init_args", {}).get("backbone")
        if not isinstance(backbone, dict) or "pretrained" not in (backbone.get("init_args") or {}):
            raise ConfigError(
                f"{self.config} has no model.init_args.backbone with a 'pretrained' path: pass the config.yaml the "
                "fit wrote, or give the base model (--base DIR)."
            )
        class_path = backbone["class_path"]
        init_args = dict(backbone["init_args"])
        return ModelSource(
            init_args.pop("pretrained"),
            backbone=class_path if "." in class_path else f"lightning_pref.backbones.{class_path}",
            backbone_args=init_args,
        )

    def backbone_class_path(self) -> str:
        if self.backbone is not None:
            return self.backbone
        index = read_model_index(self.path)
        pipeline = index.get("_class_name")
        if pipeline not in PIPELINE_BACKBONES:
            raise ConfigError(
                f"{self.path}: no backbone is known for the pipeline class {pipeline!r}; give one (--backbone "
                f"CLASS_PATH), e.g. {PIPELINE_BACKBONES['StableDiffusionPipeline']}."
            )
        if pipeline == "WanPipeline" and release_of(index) == "2.2":
            return "lightning_pref.backbones.Wan22Backbone"
        return PIPELINE_BACKBONES[pipeline]

    def load(self, trust_pickle: bool = False) -> tuple[Backbone, nn.Module]:
        """The backbone and the denoiser to sample with (the trained policy for a checkpoint), in eval mode."""
        if self.config is None:
            backbone_class = import_class(
                self.backbone_class_path(), "--backbone", Backbone, PIPELINE_BACKBONES["StableDiffusionPipeline"]
            )
            backbone = backbone_class(self.path, **self.backbone_args).eval()
            return backbone, backbone.denoiser
        from lightning_pref.export import build_module, load_trained_weights, read_trained_weights

        state = read_trained_weights(Path(self.path), trust_pickle, "--trust-pickled-checkpoint")  # fail fast
        module = build_module(Path(self.config))
        load_trained_weights(module, state)
        return module.backbone.eval(), module.denoiser

    def record(self) -> dict[str, Any]:
        if self.config is not None:
            return {"checkpoint": self.path, "config": self.config}
        return {"pipeline": self.path, "backbone": self.backbone_class_path(), "backbone_args": self.backbone_args}


# ----------------------------------------------------------------------------------------------- sampling
def samples_of(prompts: Sequence[str], spec: EvaluationSpec) -> tuple[list[str], list[int]]:
    """Every sample's prompt and seed: each prompt ``seeds_per_prompt`` times, in order."""
    seeds = spec.seeds()
    return [prompt for prompt in prompts for _ in seeds], [seed for _ in prompts for seed in seeds]


def sample_batches(
    model: tuple[Backbone, nn.Module], prompts: list[str], seeds: list[int], spec: EvaluationSpec, device: str
) -> Iterator[Tensor]:
    """The samples, ``spec.batch_size`` at a time, in [0, 1] on the CPU, each batch checked against the spec."""
    backbone, denoiser = model
    backbone.to(device)
    for start in range(0, len(prompts), spec.batch_size):
        chunk = slice(start, start + spec.batch_size)
        media = generate(
            backbone,
            prompts[chunk],
            seeds[chunk],
            denoiser=denoiser,
            num_inference_steps=spec.num_inference_steps,
            guidance_scale=spec.guidance_scale,
            batch_size=spec.batch_size,
        ).cpu()
        spec.check_media(media)
        yield media


@torch.no_grad()
def score(scorer: RewardModel, media: Tensor, prompts: list[str]) -> Tensor:
    """``(B,)`` scores of images ``(B, 3, H, W)`` or videos ``(B, 3, F, H, W)``, on the CPU."""
    device = next(iter(scorer.parameters()), media).device
    try:
        return scorer.score(media.to(device), prompts).float().cpu()
    except ValueError as error:
        if media.ndim != 5:
            raise
        raise ConfigError(
            f"--scorer {scorer.name!r} does not score videos ({error}): give a video reward, e.g. an image reward "
            "averaged over frames, lightning_pref.rewards.video.FrameAveragedReward."
        ) from error


def scored_samples(
    model: tuple[Backbone, nn.Module],
    prompts: list[str],
    seeds: list[int],
    spec: EvaluationSpec,
    scorers: dict[str, RewardModel],
    device: str,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every scorer's ``(N,)`` scores of the model's samples, and the spec resolved on them."""
    scores: dict[str, list[Tensor]] = {name: [] for name in scorers}
    for start, media in zip(
        range(0, len(prompts), spec.batch_size), sample_batches(model, prompts, seeds, spec, device)
    ):
        for name, scorer in scorers.items():
            scores[name].append(score(scorer, media, prompts[start : start + len(media)]))
    return {name: torch.cat(parts) for name, parts in scores.items()}, spec.resolved(media)


# --------------------------------------------------------------------------------------------- evaluation
def evaluate(
    tuned: ModelSource,
    base: ModelSource | None,
    spec: EvaluationSpec,
    scorers: Sequence[ScorerSpec],
    out: str | Path | None = None,
    *,
    device: str = "cpu",
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Sample the spec's prompts from ``tuned`` and ``base`` (default: ``tuned.base()``) with identical seeds,
    score both with every scorer, and return (and write to ``out`` as JSON) the result:

    * ``schema``: ``"lightning-pref-evaluation/1"``;
    * ``spec``: the spec resolved (prompt file hash, the resolution and frames sampled);
    * ``models``: ``tuned`` and ``base``, as given; ``scorers``: name, class path, init args, versions;
    * ``library_versions``: of the libraries sampling depends on;
    * ``summary``: per scorer, ``samples``, ``tuned_mean``, ``base_mean``, ``win_rate`` (tuned over base, ties
      one half) and ``win_rate_interval`` (95%);
    * ``prompts``: per prompt, its ``seeds`` and per scorer the ``tuned`` and ``base`` scores of its samples.

    The models are loaded one after the other (one in memory at a time); ``trust_pickle`` unpickles a
    checkpoint without restriction (only for one your own run wrote).
    """
    if not scorers:
        raise ConfigError("scorers: give at least one (--scorer CLASS_PATH).")
    base = base if base is not None else tuned.base()
    loaded = {}
    for scorer_spec in scorers:
        scorer = scorer_spec.load().to(device)
        if scorer.name in loaded:
            raise ConfigError(f"two scorers are named {scorer.name!r}: give each scorer once.")
        loaded[scorer.name] = (scorer_spec, scorer)
    scorer_models = {name: scorer for name, (_, scorer) in loaded.items()}
    prompts = spec.read_prompts()
    sample_prompts, seeds = samples_of(prompts, spec)
    scores, resolved = {}, None
    for role, source in (("base", base), ("tuned", tuned)):
        scores[role], resolved = scored_samples(
            source.load(trust_pickle), sample_prompts, seeds, spec, scorer_models, device
        )
    count = len(spec.seeds())
    result = {
        "schema": EVALUATION_SCHEMA,
        "spec": resolved,
        "models": {"tuned": tuned.record(), "base": base.record()},
        "scorers": [scorer_spec.record(scorer) for scorer_spec, scorer in loaded.values()],
        "library_versions": versions_of(*RECORDED_LIBRARIES),
        "summary": {name: summary(scores["tuned"][name], scores["base"][name]) for name in loaded},
        "prompts": [
            {
                "prompt": prompt,
                "seeds": spec.seeds(),
                "scores": {
                    name: {role: scores[role][name][i * count : (i + 1) * count].tolist() for role in ("tuned", "base")}
                    for name in loaded
                },
            }
            for i, prompt in enumerate(prompts)
        ],
    }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def summary(tuned: Tensor, base: Tensor) -> dict[str, Any]:
    """Means, the win rate of ``tuned`` over ``base`` (paired ``(N,)`` scores; ties one half) and its 95% interval."""
    rate = win_fraction(tuned, base).item()
    return {
        "samples": len(tuned),
        "tuned_mean": tuned.double().mean().item(),
        "base_mean": base.double().mean().item(),
        "win_rate": rate,
        "win_rate_interval": list(win_rate_interval(rate, len(tuned))),
    }


# ------------------------------------------------------------------------------------------------ sampling
def write_samples(
    model: ModelSource,
    spec: EvaluationSpec,
    out: str | Path,
    *,
    scale: int = 1,
    device: str = "cpu",
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Sample the spec's prompts from ``model`` into ``out``: one PNG per image (a GIF at ``spec.fps`` per
    video), ``grid.png`` (a row per prompt, the first ``GRID_PROMPTS`` prompts; ``scale`` times upscaled)
    and ``samples.json`` (schema, resolved spec, model, library versions, each sample's prompt, seed and file)."""
    from lightning_pref.callbacks.sampling import save_image_grid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = spec.read_prompts()
    sample_prompts, seeds = samples_of(prompts, spec)
    records, grid_rows, row = [], [], []
    for media in sample_batches(model.load(trust_pickle), sample_prompts, seeds, spec, device):
        for sample in media:
            index = len(records)
            file = f"{index:05d}_seed{seeds[index]}.{'gif' if sample.ndim == 4 else 'png'}"
            write_media(sample, out / file, spec.fps)
            records.append({"prompt": sample_prompts[index], "seed": seeds[index], "file": file})
            row.append(sample)
            if len(row) == spec.seeds_per_prompt:
                if len(grid_rows) < GRID_PROMPTS:
                    grid_rows.append(torch.stack(row))
                row = []
    save_image_grid(grid_rows, out / "grid.png", scale)
    result = {
        "schema": SAMPLES_SCHEMA,
        "spec": spec.resolved(media),
        "model": model.record(),
        "library_versions": versions_of(*RECORDED_LIBRARIES),
        "samples": records,
    }
    (out / "samples.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def write_media(sample: Tensor, path: Path, fps: int) -> None:
    """An image ``(3, H, W)`` as PNG, or a video ``(3, F, H, W)`` as a looping GIF at ``fps``; values in [0, 1]."""
    from PIL import Image

    frames = sample if sample.ndim == 4 else sample[:, None]
    pixels = (frames.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).numpy()  # (F, H, W, 3)
    images = [Image.fromarray(frame) for frame in pixels]
    if sample.ndim == 3:
        images[0].save(path)
    else:
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


# ----------------------------------------------------------------------------------------- command line
def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    spec = parser.add_argument_group("the spec (every flag given overrides --spec)")
    spec.add_argument("--spec", type=Path, help="a spec file, or an earlier output (its 'spec' is read)")
    spec.add_argument("--prompts", help="the prompt file (.txt, .parquet, .tsv, .json)")
    spec.add_argument("--prompt-format", choices=["text", "pickapic", "parti", "hpsv2", "vbench"])
    spec.add_argument("--max-prompts", type=int, help="only the first N prompts")
    spec.add_argument("--seeds-per-prompt", type=int, help="samples per prompt (default 1)")
    spec.add_argument("--first-seed", type=int, help="seed of each prompt's first sample (default 0)")
    spec.add_argument("--steps", type=int, dest="num_inference_steps", help="sampling steps (default 25)")
    spec.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default 5.0)")
    spec.add_argument("--resolution", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), help="pixels to require")
    spec.add_argument("--frames", type=int, help="video frames to require")
    spec.add_argument("--fps", type=int, help="frame rate of written videos (default 8)")
    spec.add_argument("--batch-size", type=int, help="samples per generator call (default 16)")


def spec_from(options: argparse.Namespace) -> EvaluationSpec:
    names = [
        spec_field.name for spec_field in dataclasses.fields(EvaluationSpec) if spec_field.name != "prompts_sha256"
    ]
    given = {name: getattr(options, name) for name in names if getattr(options, name, None) is not None}
    if options.spec is not None:
        return EvaluationSpec.from_file(options.spec, **given)
    if "prompts" not in given:
        raise ConfigError("--prompts: give the prompt file (or --spec with an earlier spec).")
    return EvaluationSpec(**given)


def add_model_arguments(parser: argparse.ArgumentParser, flag: str, what: str) -> None:
    parser.add_argument(flag, required=flag != "--base", help=f"{what}: a diffusers pipeline directory or a checkpoint")
    name = flag.removeprefix("--")
    prefix = "" if name in ("tuned", "model") else f"{name}-"
    parser.add_argument(f"--{prefix}config", help=f"the run's config.yaml, when {flag} is a checkpoint")
    parser.add_argument(
        f"--{prefix}backbone",
        help=f"for a pipeline {flag}: CLASS_PATH or CLASS_PATH=JSON_INIT_ARGS (default: from model_index.json)",
    )


def model_from(options: argparse.Namespace, name: str, prefix: str = "") -> ModelSource | None:
    path = getattr(options, name)
    if path is None:
        return None
    backbone = getattr(options, f"{prefix}backbone")
    class_path, init_args = parse_class_and_args(backbone, "--backbone") if backbone else (None, {})
    return ModelSource(path, getattr(options, f"{prefix}config"), class_path, init_args)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="where to sample and score (default cpu)")
    parser.add_argument(
        "--trust-pickled-checkpoint",
        action="store_true",
        help="unpickle a checkpoint without restriction: only for one your own run wrote",
    )


def evaluate_main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-pref evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser, "--tuned", "the tuned model")
    add_model_arguments(parser, "--base", "the base model (default for a checkpoint: its config's backbone)")
    parser.add_argument(
        "--scorer",
        action="append",
        required=True,
        help='a RewardModel: CLASS_PATH or CLASS_PATH={"json": "init args"}; repeat for several',
    )
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write")
    add_spec_arguments(parser)
    add_run_arguments(parser)
    options = parser.parse_args(args)
    started = time.perf_counter()
    result = evaluate(
        model_from(options, "tuned"),
        model_from(options, "base", "base_"),
        spec_from(options),
        [ScorerSpec.parse(text) for text in options.scorer],
        options.out,
        device=options.device,
        trust_pickle=options.trust_pickled_checkpoint,
    )
    for name, numbers in result["summary"].items():
        low, high = numbers["win_rate_interval"]
        print(
            f"{name}: tuned {numbers['tuned_mean']:.4f} vs base {numbers['base_mean']:.4f}; tuned wins "
            f"{100 * numbers['win_rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] of {numbers['samples']} samples"
        )
    print(f"wrote {options.out} in {time.perf_counter() - started:.1f} s")


def sample_main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-pref sample",
        description="Sample a prompt file from a pipeline directory or a training checkpoint: a PNG per image (GIF "
        "per video), grid.png and samples.json (the resolved spec and each sample's prompt and seed).",
    )
    add_model_arguments(parser, "--model", "the model")
    parser.add_argument("--out", type=Path, required=True, help="the directory to write")
    parser.add_argument("--scale", type=int, default=1, help="nearest-neighbour upscaling of grid.png")
    add_spec_arguments(parser)
    add_run_arguments(parser)
    options = parser.parse_args(args)
    started = time.perf_counter()
    result = write_samples(
        model_from(options, "model"),
        spec_from(options),
        options.out,
        scale=options.scale,
        device=options.device,
        trust_pickle=options.trust_pickled_checkpoint,
    )
    print(f"wrote {len(result['samples'])} samples to {options.out} in {time.perf_counter() - started:.1f} s")
