"""User embeddings: who a pair's user is, as the tokens PPD's user branch attends to.

PPD (Dang et al., CVPR 2025, arXiv 2501.06655; METHODS.md section 6, ``[secondary]``) conditions the
denoiser on a user embedding ``e_u``, a sequence of ``tokens x dim`` vectors. Three sources, one shape:

* **precomputed** (the paper): a vision-language model read a few of the user's pairs offline; every pair
  carries its user's embedding as the shard member ``user_embedding.npy`` (a float array, ``tokens x dim``),
  which [`UserPreferenceDataModule`][lightning_pref.datamodules.users.UserPreferenceDataModule] puts in the
  batch as ``user_embedding`` ``(B, tokens, dim)``;
* **an encoder** behind the [`UserEncoder`][lightning_pref.users.UserEncoder] interface: ``k`` examples
  ``(caption, preferred, dispreferred)`` of one user in, ``e_u`` out.
  [`VisionLanguageUserEncoder`][lightning_pref.users.VisionLanguageUserEncoder] is the paper's kind (a
  transformers vision-language model, intermediate hidden states); it embeds held-out users from their few
  examples, at generation time or offline for the shards;
* **a learned table** [`UserTable`][lightning_pref.users.UserTable]: one trained embedding per ``user_id``, for
  small experiments where every user is seen in training (no generalization to new users).

[`interpolate_users`][lightning_pref.users.interpolate_users] mixes two users' embeddings; the paper reports
that interpolating embeddings interpolates the rewards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from lightning_pref.errors import ConfigError, DataError, check_whole_numbers

#: the batch field (and, with ``.npy``, the shard member) holding each pair's user embedding
USER_EMBEDDING = "user_embedding"


def check_user_embeddings(embeddings: Any, tokens: int, dim: int) -> Tensor:
    """A batch's ``user_embedding``: a finite float tensor ``(B, tokens, dim)``, or a ``DataError`` naming the field."""
    expected = f"(batch, {tokens}, {dim})"
    if not isinstance(embeddings, Tensor) or not embeddings.is_floating_point():
        kind = embeddings.dtype if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise DataError(f"the batch's '{USER_EMBEDDING}' is {kind}, not a float tensor {expected}.")
    if embeddings.ndim != 3 or tuple(embeddings.shape[1:]) != (tokens, dim):
        raise DataError(
            f"the batch's '{USER_EMBEDDING}' is {tuple(embeddings.shape)}, but the module takes {expected} "
            "(user_tokens x user_dim): set them to the embeddings' shape, or rewrite the embeddings."
        )
    if not bool(torch.isfinite(embeddings).all()):
        raise DataError(f"the batch's '{USER_EMBEDDING}' holds NaN or infinite values: rewrite the embeddings.")
    return embeddings


def interpolate_users(e_a: Tensor, e_b: Tensor, weight: float) -> Tensor:
    """``(1 - weight) * e_a + weight * e_b``: user ``a`` at weight 0, user ``b`` at weight 1.

    Example:
        >>> import torch
        >>> interpolate_users(torch.zeros(1, 2), torch.ones(1, 2), 0.25)
        tensor([[0.2500, 0.2500]])
    """
    if e_a.shape != e_b.shape:
        raise ConfigError(
            f"interpolate_users: the embeddings are {tuple(e_a.shape)} and {tuple(e_b.shape)}; give two of one shape."
        )
    return torch.lerp(e_a, e_b.to(e_a), weight)


class UserTable(nn.Module):
    """A learned embedding ``(tokens, dim)`` per user id ``0 .. num_users - 1``, drawn from N(0, 1) at the start.

    Example:
        >>> table = UserTable(num_users=2, tokens=1, dim=4)
        >>> table(torch.tensor([1, 0, 1])).shape
        torch.Size([3, 1, 4])
    """

    def __init__(self, num_users: int, tokens: int, dim: int):
        super().__init__()
        check_whole_numbers(num_users=num_users, user_tokens=tokens, user_dim=dim)
        self.num_users, self.tokens, self.dim = num_users, tokens, dim
        self.embeddings = nn.Embedding(num_users, tokens * dim)

    def forward(self, user_ids: Tensor) -> Tensor:
        outside = (user_ids < 0) | (user_ids >= self.num_users)
        if bool(outside.any()):
            first, last = user_ids[outside][0].item(), self.num_users - 1
            raise DataError(
                f"the batch's 'user_id' holds {first}, outside the table's users 0..{last}: set num_users to the "
                "number of users, or number the users from 0 (a json without user_id reads as -1)."
            )
        return self.embeddings(user_ids.long()).view(-1, self.tokens, self.dim)


@dataclass
class UserExample:
    """One preference of a user: the prompt, the image they preferred and the one they did not."""

    caption: str
    preferred: Image.Image
    dispreferred: Image.Image


class UserEncoder:
    """Interface: ``encode`` turns ``k`` examples of one user into their embedding ``(tokens, dim)``."""

    #: the embedding's shape, ``(tokens, dim)``
    tokens: int
    dim: int

    def encode(self, examples: Sequence[UserExample]) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement encode(examples).")


#: what the vision-language model is asked before it reads a user's examples ``[reconstructed]``
DEFAULT_INSTRUCTION = (
    "Here are image pairs a user compared: for each prompt, the image they preferred, then the one they did not. "
    "Describe what this user prefers."
)


class VisionLanguageUserEncoder(UserEncoder):
    """User embeddings from a transformers vision-language model (PPD: LLaVA-OneVision) ``[secondary]``.

    The model reads one chat turn: ``instruction``, then per example ``Prompt: <caption>``, ``Preferred:``
    with the image, ``Dispreferred:`` with the image. The embedding is the hidden states of layer
    ``hidden_layer`` at the last ``tokens`` positions. The paper takes "intermediate hidden states"; which layer
    and which positions, and the wording, are not given: all three are options ``[reconstructed]``.

    Args:
        pretrained: hub id or local directory of a model ``AutoModelForImageTextToText`` loads, with its
            processor (which must have a chat template); ``trust_remote_code`` stays off.
        hidden_layer: index into the model's hidden states (0: the embeddings); ``None``: the middle layer.
        tokens: how many final positions make the embedding.
        instruction: the text before the examples.
        revision: the hub revision.
        dtype: the model's dtype (``float32``, ``bfloat16``, ...); embeddings are returned in float32.
        device: where the model runs.

    Example (with the model of the paper):
        encoder = VisionLanguageUserEncoder("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", tokens=16)
        e_u = encoder.encode([UserExample("a cat", preferred_image, dispreferred_image), ...])  # (16, 896)
    """

    def __init__(
        self,
        pretrained: str,
        *,
        hidden_layer: int | None = None,
        tokens: int = 16,
        instruction: str = DEFAULT_INSTRUCTION,
        revision: str | None = None,
        dtype: str = "float32",
        device: str = "cpu",
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from lightning_pref.backbones.loading import torch_dtype

        check_whole_numbers(tokens=tokens)
        self.processor = AutoProcessor.from_pretrained(pretrained, revision=revision, trust_remote_code=False)
        if not getattr(self.processor, "chat_template", None):
            raise ConfigError(
                f"the processor of {pretrained!r} has no chat template: use a chat (instruction-tuned) "
                "vision-language model, or save a chat_template with its processor."
            )
        self.model = AutoModelForImageTextToText.from_pretrained(
            pretrained, revision=revision, trust_remote_code=False, dtype=torch_dtype(dtype)
        )
        self.model.requires_grad_(False).eval().to(device)
        layers = self.model.config.get_text_config().num_hidden_layers
        self.hidden_layer = layers // 2 if hidden_layer is None else hidden_layer
        if not -(layers + 1) <= self.hidden_layer <= layers:
            raise ConfigError(f"hidden_layer={hidden_layer}: the model has hidden states 0..{layers}.")
        self.tokens = tokens
        self.dim = self.model.config.get_text_config().hidden_size
        self.instruction = instruction

    def conversation(self, examples: Sequence[UserExample]) -> list[dict[str, Any]]:
        """The chat turn the model reads (images as placeholders, in the order of ``images``)."""
        content: list[dict[str, str]] = [{"type": "text", "text": self.instruction}]
        for example in examples:
            content += [
                {"type": "text", "text": f"Prompt: {example.caption}\nPreferred:"},
                {"type": "image"},
                {"type": "text", "text": "Dispreferred:"},
                {"type": "image"},
            ]
        return [{"role": "user", "content": content}]

    @torch.no_grad()
    def encode(self, examples: Sequence[UserExample]) -> Tensor:
        if not examples:
            raise ConfigError("encode needs at least one example of the user (the paper uses 4).")
        text = self.processor.apply_chat_template(
            self.conversation(examples), add_generation_prompt=True, tokenize=False
        )
        images = [image.convert("RGB") for example in examples for image in (example.preferred, example.dispreferred)]
        # nested: all images belong to one prompt (LLaVA-OneVision then reads them in its multi-image mode)
        inputs = self.processor(text=[text], images=[images], return_tensors="pt").to(self.model.device)
        length = int(inputs["input_ids"].shape[1])
        if length < self.tokens:
            raise ConfigError(f"tokens={self.tokens}, but the model read only {length} positions: take fewer tokens.")
        hidden = self.model(**inputs, output_hidden_states=True).hidden_states[self.hidden_layer]
        return hidden[0, -self.tokens :].float().cpu()
