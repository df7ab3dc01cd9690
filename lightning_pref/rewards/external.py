"""Thin adapters for scorers that come with their own packages: HPSv2 and ImageReward.

Neither package runs beside this library's pinned dependencies, so neither is in the ``eval`` extra (the
guide "Reward models" says why): ``hpsv2`` (and its fork ``hpsv2x``) pins ``pytest==7.2.0`` and
``protobuf<4``, and the ``hpsv2`` 1.2.0 wheel lacks its tokenizer's vocabulary file; ``image-reward`` 1.5
imports ``apply_chunking_to_forward`` and ``find_pruneable_heads_and_indices`` from
``transformers.modeling_utils``, which transformers 5 no longer has. In an environment where a package does
import, its adapter loads the model with the package's own loader and scores through the package's own
preprocessing, one call per distinct prompt; without it, building the adapter raises one ``ConfigError``
line saying what to install. The packages read their checkpoints with ``torch.load`` (``weights_only`` by
default since torch 2.6) and download them from the hub themselves.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

from lightning_pref.errors import ConfigError
from lightning_pref.rewards.learned import LearnedReward, pil_images

#: the HPSv2 checkpoints the ``hpsv2`` package knows (``hps_version``)
HPS_VERSIONS = ("v2.0", "v2.1")


def import_scorer_package(module: str, reward: str, install: str) -> ModuleType:
    """``import module``, or a ``ConfigError`` naming ``reward`` and what to ``install``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(
            f"{reward} needs the {module} package, which cannot be imported here ({error}): {install}; it is "
            "not in the eval extra because it does not run beside the pinned dependencies (see the guide "
            "'Reward models')."
        ) from None


def scores_per_prompt(images: Tensor, prompts: list[str], score_images) -> Tensor:
    """``(B,)`` scores from ``score_images(prompt, pil_images) -> sequence of floats``, called once per distinct
    prompt with that prompt's images, put back in the input order."""
    pictures = pil_images(images)
    scores = torch.zeros(len(images))
    for prompt in dict.fromkeys(prompts):
        rows = [row for row, other in enumerate(prompts) if other == prompt]
        scores[rows] = torch.as_tensor(score_images(prompt, [pictures[row] for row in rows]), dtype=torch.float32)
    return scores


class HPSv2Reward(LearnedReward):
    """Human Preference Score v2 (Wu et al., "Human Preference Score v2: A Solid Benchmark for Evaluating Human
    Preferences of Text-to-Image Synthesis", arXiv 2306.09341) through the ``hpsv2`` package's ``score``:
    ``cos(E_img, E_txt)`` of an OpenCLIP ViT-H/14 fine-tuned on HPD v2, about 0.25 to 0.30 for good samples
    (papers often print it times 100).

    The package picks its device itself (CUDA when available) and keeps its model in a module-level cache,
    so this adapter holds no weights and does not follow ``.to(device)``.

    Args:
        version: the checkpoint, ``v2.0`` or ``v2.1`` (the package downloads it from the hub).
        batch_size: images per call of the package (it scores them one by one).
    """

    name = "hpsv2"

    def __init__(self, version: str = "v2.1", batch_size: int = 16):
        super().__init__(batch_size)
        if version not in HPS_VERSIONS:
            raise ConfigError(f"version={version!r}: choose one of {', '.join(HPS_VERSIONS)}.")
        self.version = version
        self.package = import_scorer_package(
            "hpsv2", type(self).__name__, "pip install hpsv2x (the fork that ships the tokenizer vocabulary)"
        )

    def score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        def score_images(prompt, pictures):
            return [float(score) for score in self.package.score(pictures, prompt, hps_version=self.version)]

        return scores_per_prompt(images, prompts, score_images)


class ImageRewardReward(LearnedReward):
    """ImageReward (Xu et al., "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
    Generation", arXiv 2304.05977) through the ``ImageReward`` package: a BLIP cross-encoder with an MLP
    head, standardised on the authors' data (mean 0, standard deviation 1; good samples are above 0).

    The loaded model is a submodule, so it follows ``.to(device)``; its inputs follow it.

    Args:
        model: ``ImageReward-v1.0`` (downloaded by the package) or the path of a local checkpoint.
        download_root: where the package keeps its downloads (``None``: its default, ``~/.cache/ImageReward``).
        batch_size: images per call of the package.
    """

    name = "image_reward"

    def __init__(self, model: str = "ImageReward-v1.0", download_root: str | None = None, batch_size: int = 16):
        super().__init__(batch_size)
        package = import_scorer_package("ImageReward", type(self).__name__, "pip install image-reward 'transformers<5'")
        self.model = package.load(model, device="cpu", download_root=download_root).requires_grad_(False).eval()

    def score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        self.model.device = self.device  # the package moves its inputs to this attribute

        def score_images(prompt, pictures):
            return torch.as_tensor(self.model.score(prompt, pictures)).reshape(-1)  # a float for one image

        return scores_per_prompt(images, prompts, score_images)
