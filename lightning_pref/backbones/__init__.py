"""Model families behind one interface (``Backbone``)."""

from lightning_pref.backbones.base import Backbone, Conditioning, concat_conditioning
from lightning_pref.backbones.cogvideox import CogVideoXBackbone
from lightning_pref.backbones.flux import FluxBackbone
from lightning_pref.backbones.sd3 import StableDiffusion3Backbone
from lightning_pref.backbones.stable_diffusion import StableDiffusionBackbone, StableDiffusionXLBackbone
from lightning_pref.backbones.wan import Wan22Backbone, WanBackbone, WanExperts

__all__ = [
    "Backbone",
    "CogVideoXBackbone",
    "Conditioning",
    "FluxBackbone",
    "StableDiffusion3Backbone",
    "StableDiffusionBackbone",
    "StableDiffusionXLBackbone",
    "Wan22Backbone",
    "WanBackbone",
    "WanExperts",
    "concat_conditioning",
]
