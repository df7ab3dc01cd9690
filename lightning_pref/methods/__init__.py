"""Preference methods: one LightningModule per method on
[`PreferenceDiffusionModule`][lightning_pref.methods.base.PreferenceDiffusionModule]."""

from lightning_pref.methods.adaptive_dpo import AdaptiveDPO
from lightning_pref.methods.base import PreferenceDiffusionModule
from lightning_pref.methods.diffusion_dpo import DiffusionDPO
from lightning_pref.methods.dmpo import DMPO
from lightning_pref.methods.dpo_clip_mask import DPOClipMask
from lightning_pref.methods.importance import ImportanceWeightedModule
from lightning_pref.methods.inversion_dpo import InversionDPO
from lightning_pref.methods.kto import DiffusionKTO
from lightning_pref.methods.mapo import MaPO
from lightning_pref.methods.online_dpo import OnlineDPO
from lightning_pref.methods.ppd import PPD
from lightning_pref.methods.sdpo import SDPO, SIPO
from lightning_pref.methods.see_dpo import SEEDPO
from lightning_pref.methods.spin import SPINDiffusion
from lightning_pref.methods.sspo import SSPO
from lightning_pref.methods.step import NoisySamples, SampleErrors, Samples
from lightning_pref.seeding import PairRandomness

__all__ = [
    "AdaptiveDPO",
    "DMPO",
    "DPOClipMask",
    "DiffusionDPO",
    "DiffusionKTO",
    "ImportanceWeightedModule",
    "InversionDPO",
    "MaPO",
    "NoisySamples",
    "OnlineDPO",
    "PPD",
    "PairRandomness",
    "PreferenceDiffusionModule",
    "SDPO",
    "SEEDPO",
    "SIPO",
    "SPINDiffusion",
    "SSPO",
    "SampleErrors",
    "Samples",
]
