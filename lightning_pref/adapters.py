"""Decoupled cross-attention: a user branch beside every text cross-attention of a UNet (PPD's adapter).

IP-Adapter's construction (Ye et al. 2023, arXiv 2308.06721), which PPD (Dang et al., CVPR 2025, arXiv
2501.06655; METHODS.md section 6) uses to inject a user embedding ``e_u`` (``tokens x dim``):

    Z' = Attn(Q, K_text, V_text) + Attn(Q, e_u W'_k, e_u W'_v)

``Q``, ``K_text`` and ``V_text`` are the frozen layer's own; ``W'_k`` and ``W'_v`` (``dim -> inner``, no bias) are
the only new weights, one pair per cross-attention. ``W'_v`` starts at zero, so the new branch adds exactly
``0`` and the adapted UNet computes what the base UNet does, bit for bit, until the first optimizer step.

The user tokens reach the layers the way diffusers' own IP-Adapter passes image tokens: as the tuple
``encoder_hidden_states = (text, [user_tokens])``. A UNet called with a plain text tensor runs every
cross-attention through diffusers' default ``AttnProcessor2_0``: the base model, whatever the new weights
hold. PPD's reference is that call ([`UserBranchOff`][lightning_pref.adapters.UserBranchOff]).

    add_user_branch(unet, user_dim=16)
    conditioning = with_user(text_conditioning, user_tokens)   # the policy's conditioning
    prediction = backbone.predict(unet, x_t, t, conditioning)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0
from torch import Tensor, nn

from lightning_pref.backbones.base import Conditioning
from lightning_pref.errors import ConfigError
from lightning_pref.reference import Reference
from lightning_pref.users import USER_EMBEDDING

TEXT_ONLY = AttnProcessor2_0()


class UserCrossAttnProcessor(IPAdapterAttnProcessor2_0):
    """One cross-attention with its user branch: diffusers' IP-Adapter processor (``to_k_ip[0]`` is ``W'_k``,
    ``to_v_ip[0]`` is ``W'_v``, scale 1) on ``(text, [user_tokens])``, the default processor on plain text.

    Args:
        inner_dim: the attention's ``heads x head_dim`` (its ``to_k`` output width).
        user_dim: the width of the user tokens.
    """

    def __init__(self, inner_dim: int, user_dim: int):
        super().__init__(inner_dim, cross_attention_dim=user_dim, num_tokens=(1,), scale=1.0)
        nn.init.zeros_(self.to_v_ip[0].weight)  # the branch adds exactly 0 at the start

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | tuple[Tensor, list[Tensor]] | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        if isinstance(encoder_hidden_states, tuple):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        # no user tokens: exactly the base layer (IP-Adapter's processor would read the last text token as one)
        return TEXT_ONLY(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def text_cross_attentions(unet: nn.Module) -> list[Attention]:
    """The UNet's cross-attention layers (``attn2`` of every transformer block)."""
    return [module for module in unet.modules() if isinstance(module, Attention) and module.is_cross_attention]


def add_user_branch(unet: nn.Module, user_dim: int) -> list[UserCrossAttnProcessor]:
    """Give every text cross-attention of ``unet`` a user branch for ``user_dim``-wide user tokens (in place).

    The new processors are submodules of their attention layers, so their weights are part of the UNet's
    parameters and state dict (``...attn2.processor.to_k_ip.0.weight``) and follow its device and dtype moves.
    Returns them.
    """
    if user_dim < 1:
        raise ConfigError(f"user_dim={user_dim}: the user embedding needs a width >= 1.")
    layers = text_cross_attentions(unet)
    if not layers:
        raise ConfigError(
            f"{type(unet).__name__} has no text cross-attention to put a user branch beside: PPD needs a UNet "
            "with cross-attention (SD1.5, SDXL), not a transformer of joint attention (SD3, Wan, CogVideoX)."
        )
    processors = []
    for layer in layers:
        reference = layer.to_k.weight
        processor = UserCrossAttnProcessor(layer.to_k.out_features, user_dim).to(reference.device, reference.dtype)
        layer.set_processor(processor)
        processors.append(processor)
    return processors


def with_user(conditioning: Conditioning, user_tokens: Tensor) -> Conditioning:
    """The conditioning with ``user_tokens`` ``(rows, tokens, dim)`` beside the text tokens, in the form the
    adapted cross-attentions read: ``encoder_hidden_states = (text, [user_tokens])``."""
    text = conditioning["encoder_hidden_states"]
    return {**conditioning, "encoder_hidden_states": (text, [user_tokens.to(text.dtype)])}


def without_user(conditioning: Conditioning) -> Conditioning:
    """The conditioning without its user tokens (``user_embedding``): the base model's."""
    return {key: value for key, value in conditioning.items() if key != USER_EMBEDDING}


class UserConditioned(nn.Module):
    """The adapted UNet with one user embedding ``(tokens, dim)`` beside the text of every row it is called on:
    a denoiser for [`Backbone.sample`][lightning_pref.backbones.base.Backbone.sample], whose guided batches hold
    the unconditional and the conditional rows (both see the user)."""

    def __init__(self, unet: nn.Module, user_embedding: Tensor):
        super().__init__()
        self.unet = unet
        self.user_embedding = user_embedding

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, **kwargs) -> tuple:
        tokens = self.user_embedding.to(encoder_hidden_states.device).expand(encoder_hidden_states.shape[0], -1, -1)
        conditioning = with_user({"encoder_hidden_states": encoder_hidden_states}, tokens)
        return self.unet(sample, timestep, encoder_hidden_states=conditioning["encoder_hidden_states"], **kwargs)


class UserBranchOff(Reference):
    """PPD's reference: the policy's own UNet called without user tokens, which is the frozen base UNet (every
    cross-attention runs its default processor; see the module docstring). No second copy of the weights."""

    def __init__(self, unet: nn.Module):
        self.unet = unet

    @contextlib.contextmanager
    def network(self, device: torch.device) -> Iterator[nn.Module]:
        yield self.unet

    def install(self, weights: dict[str, Tensor]) -> None:
        raise ConfigError(
            "PPD's reference is the base UNet without the user branch: it takes no snapshot of trained weights. "
            "Remove the callback or pair source that installs one (checkpoint replay, SPIN-style iterates)."
        )
