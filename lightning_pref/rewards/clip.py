"""CLIP-based scorers: PickScore, CLIP score and the LAION aesthetic predictor.

Each loads a transformers ``CLIPModel`` and its ``CLIPProcessor`` from a hub id or a local directory (what
``save_pretrained`` writes), never with ``trust_remote_code``. Images go through the processor as 8-bit
``PIL`` images, exactly as the published scores were computed from image files; the embeddings are computed
on the scorer's device in its ``dtype``, and compared in float32. See the guide "Reward models" for units.

Example:
    >>> reward = PickScoreReward()  # yuvalkirstain/PickScore_v1 with the CLIP-H processor  # doctest: +SKIP
    >>> reward.score(images, prompts)  # (B,), about 18 to 23 for Stable Diffusion samples  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file
from torch import Tensor, nn
from torchmetrics.functional.multimodal.clip_score import _clip_score_update
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor

from lightning_pref.errors import ConfigError, MissingFileError
from lightning_pref.rewards.learned import LearnedReward, check_pretrained, pil_images, quantized, reward_dtype


def projected(features: Tensor | object) -> Tensor:
    """The projected embeddings that ``get_image_features`` / ``get_text_features`` return: the tensor itself
    (transformers 4) or the output's ``pooler_output`` (transformers 5)."""
    return features if isinstance(features, Tensor) else features.pooler_output


def load_clip(model: str, processor: str | None, dtype: str) -> tuple[CLIPModel, CLIPProcessor]:
    """A frozen ``CLIPModel`` in ``dtype`` and the processor from ``processor`` (default: ``model``'s own)."""
    check_pretrained("model", model)
    check_pretrained("processor", processor or model)
    clip = CLIPModel.from_pretrained(model).to(reward_dtype(dtype)).requires_grad_(False).eval()
    return clip, CLIPProcessor.from_pretrained(processor or model)


class CLIPReward(LearnedReward):
    """Base of the scorers that compare a CLIP model's unit-norm image and text embeddings.

    Args:
        model: hub id or local directory of the ``CLIPModel``.
        processor: hub id or directory of its ``CLIPProcessor`` (image preprocessing and tokenizer);
            ``None``: the model's own.
        dtype: the model's dtype (``float32``, ``bfloat16``, ``float16``); embeddings are compared in float32.
        batch_size: images per forward pass.
    """

    def __init__(self, model: str, processor: str | None = None, dtype: str = "float32", batch_size: int = 16):
        super().__init__(batch_size)
        self.model, self.processor = load_clip(model, processor, dtype)

    def image_embeddings(self, images: Tensor) -> Tensor:
        """``(B, D)`` unit-norm image embeddings of ``(B, 3, H, W)`` images in [0, 1]."""
        inputs = self.processor.image_processor(images=pil_images(images), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
        return F.normalize(projected(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """``(B, D)`` unit-norm embeddings of ``prompts`` (each distinct prompt encoded once), truncated to the
        text encoder's positions as the processor does."""
        distinct = list(dict.fromkeys(prompts))
        tokens = self.processor.tokenizer(
            distinct,
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.device)
        features = projected(self.model.get_text_features(**tokens)).float()
        return F.normalize(features, dim=-1)[[distinct.index(prompt) for prompt in prompts]]


class PickScoreReward(CLIPReward):
    """PickScore (Kirstain et al., "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image
    Generation", arXiv 2305.01569): a CLIP-H fine-tuned on Pick-a-Pic's human preferences.

    ``score = exp(logit_scale) * cos(E_img(image), E_txt(prompt))``, the paper's scoring function (its learned
    temperature ``T = exp(logit_scale)``, about 100 in ``PickScore_v1``). The preference between two images
    for one prompt is the softmax of their scores, as the authors' example computes it. Unlike CLIP score,
    nothing is clamped: scores may be negative on a model other than PickScore_v1.

    Args:
        model: ``yuvalkirstain/PickScore_v1``, or a local copy.
        processor: the authors pair it with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
            (224 pixels, bicubic resize of the short side, centre crop).
        dtype, batch_size: see [`CLIPReward`][lightning_pref.rewards.clip.CLIPReward].
    """

    name = "pickscore"

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        dtype: str = "float32",
        batch_size: int = 16,
    ):
        super().__init__(model, processor, dtype, batch_size)

    def score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        cosine = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(dim=-1)
        return self.model.logit_scale.exp().float() * cosine


class TensorFeatures(nn.Module):
    """A ``CLIPModel`` the way torchmetrics' ``CLIPScore`` calls it: ``get_image_features`` and
    ``get_text_features`` return the projected embeddings as float32 tensors (transformers 5 returns output
    objects, which torchmetrics 1.9 cannot normalise), and pixels are cast to the model's dtype."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads the text encoder's positions from it

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return projected(self.model.get_image_features(pixel_values=pixel_values.to(self.model.dtype))).float()

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return projected(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)).float()


class CLIPScoreReward(LearnedReward):
    """CLIP score (Hessel et al., "CLIPScore: A Reference-free Evaluation Metric for Image Captioning", arXiv
    2104.08718) as torchmetrics' ``CLIPScore`` computes it, but per image: ``100 * max(cos, 0)``.

    The model lives in a ``torchmetrics.multimodal.CLIPScore`` (``self.metric``) and each batch goes through
    torchmetrics' own per-sample step, so the pixels, tokens (longer prompts are cut at the text encoder's
    positions, as torchmetrics cuts them) and cosines are torchmetrics'. torchmetrics clamps the *mean* at 0;
    here each image's score is clamped, which gives the same mean whenever no cosine is negative (the case for
    real CLIP models and captions). Against PickScore: on the same weights, with ``exp(logit_scale) = 100``
    (what CLIP's training clamps it to), ``clip_score = max(pickscore, 0)``; with different weights the two
    are different models on one scale of ``100 * cos``.

    Args:
        model: hub id or local directory of the ``CLIPModel`` (torchmetrics' default,
            ``openai/clip-vit-large-patch14``).
        processor: its ``CLIPProcessor``; ``None``: the model's own.
        dtype, batch_size: see [`CLIPReward`][lightning_pref.rewards.clip.CLIPReward].
    """

    name = "clip_score"

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        dtype: str = "float32",
        batch_size: int = 16,
    ):
        super().__init__(batch_size)
        clip, clip_processor = load_clip(model, processor, dtype)
        self.metric = CLIPScore(model_name_or_path=lambda: (TensorFeatures(clip), clip_processor))

    def score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        # torchmetrics takes 0-255 (3, H, W) images, and moves its model to their device: keep them on the scorer's
        pixels = list(quantized(images).to(self.device))
        scores, _ = _clip_score_update(pixels, prompts, self.metric.model, self.metric.processor)
        return scores.clamp(min=0)


#: the aesthetic head's hidden widths, in the order of the improved aesthetic predictor's ``MLP``
AESTHETIC_HIDDEN = (1024, 128, 64, 16)


class AestheticHead(nn.Module):
    """The MLP of the LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor,
    ``MLP`` in ``simple_inference.py``), layer for layer so its state dict loads unchanged:

    ``Linear(D, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
    Linear(64, 16), Linear(16, 1)``, no activations; keys ``layers.{0,2,4,6,7}.{weight,bias}``. ``D`` is the CLIP
    embedding width (768 for ViT-L/14).
    """

    def __init__(self, embedding_dim: int):
        super().__init__()
        first, second, third, fourth = AESTHETIC_HIDDEN
        self.layers = nn.Sequential(
            nn.Linear(embedding_dim, first),
            nn.Dropout(0.2),
            nn.Linear(first, second),
            nn.Dropout(0.2),
            nn.Linear(second, third),
            nn.Dropout(0.1),
            nn.Linear(third, fourth),
            nn.Linear(fourth, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        """``(B,)`` scores of ``(B, D)`` unit-norm embeddings."""
        return self.layers(embeddings)[:, 0]


def read_head_weights(head: str) -> dict[str, Tensor]:
    """The head's state dict from a local ``.safetensors`` or ``.pth``/``.pt`` file (read with
    ``torch.load(weights_only=True)``: tensors only, no pickled code), or from a hub file given as
    ``namespace/name/filename``."""
    path = Path(head).expanduser()
    if not path.is_file():
        if head.startswith((".", "/", "~")) or head.count("/") < 2:
            raise MissingFileError(
                f"head={head!r} is neither a local file nor a hub file ('namespace/name/filename'): check the path."
            )
        namespace, name, filename = head.split("/", 2)
        path = Path(hf_hub_download(f"{namespace}/{name}", filename))
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix in (".pth", ".pt"):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise ConfigError(f"head={head!r}: give the head as a .safetensors file or a .pth/.pt state dict.")


class AestheticReward(CLIPReward):
    """The LAION improved aesthetic predictor (Schuhmann, christophschuhmann/improved-aesthetic-predictor):
    ``score = MLP(E_img(image) / |E_img(image)|)``, the MLP of
    [`AestheticHead`][lightning_pref.rewards.clip.AestheticHead] on the unit-norm CLIP image embedding. The
    prompt is ignored. Scores are on the 1-10 scale of the ratings it was fitted to (AVA, Simulacra, LAION
    logos); the original ran CLIP in float16 on the GPU, so ``dtype="float16"`` follows it more closely.

    Args:
        head: the head's weights: a local ``.safetensors`` file, a ``.pth``/``.pt`` state dict (the upstream
            ``sac+logos+ava1-l14-linearMSE.pth``), or a hub file ``namespace/name/filename``.
        model: the CLIP the head was fitted on: ``openai/clip-vit-large-patch14`` for the upstream heads.
        processor, dtype, batch_size: see [`CLIPReward`][lightning_pref.rewards.clip.CLIPReward].
    """

    name = "aesthetic"

    def __init__(
        self,
        head: str,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        dtype: str = "float32",
        batch_size: int = 16,
    ):
        super().__init__(model, processor, dtype, batch_size)
        weights = read_head_weights(head)
        if "layers.0.weight" not in weights:
            raise ConfigError(
                f"head={head!r} holds {sorted(weights)[:4]}...: expected the improved aesthetic predictor's keys "
                "layers.{0,2,4,6,7}.{weight,bias} (see AestheticHead)."
            )
        embedding_dim = weights["layers.0.weight"].shape[1]
        if embedding_dim != self.model.config.projection_dim:
            raise ConfigError(
                f"head={head!r} takes {embedding_dim}-dim embeddings but model={model!r} gives "
                f"{self.model.config.projection_dim}: use the CLIP the head was fitted on "
                "(openai/clip-vit-large-patch14 for the upstream heads)."
            )
        self.head = AestheticHead(embedding_dim)
        try:
            self.head.load_state_dict(weights)
        except RuntimeError as error:
            raise ConfigError(
                f"head={head!r} does not have the improved aesthetic predictor's layout (see AestheticHead): "
                f"{str(error).splitlines()[-1].strip()}"
            ) from None
        self.head.requires_grad_(False).eval()

    def score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.head(self.image_embeddings(images))
