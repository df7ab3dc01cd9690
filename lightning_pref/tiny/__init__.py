"""Tiny pipelines of every backbone family, written from configs, offline, in well under a second.

Tests and benchmarks never download weights: they write a complete diffusers pipeline directory and load it
back through the same ``from_pretrained`` path a real checkpoint takes.
"""

from lightning_pref.tiny.image import write_tiny_flux_pipeline, write_tiny_sd3_pipeline, write_tiny_sd_pipeline
from lightning_pref.tiny.video import write_tiny_cogvideox_pipeline, write_tiny_wan22_pipeline, write_tiny_wan_pipeline

__all__ = [
    "write_tiny_cogvideox_pipeline",
    "write_tiny_flux_pipeline",
    "write_tiny_sd3_pipeline",
    "write_tiny_sd_pipeline",
    "write_tiny_wan22_pipeline",
    "write_tiny_wan_pipeline",
]
