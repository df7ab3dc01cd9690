"""Callbacks: random checkpoint replay, sample grids and sample logs, an average of the weights, and a checkpoint
on SIGTERM."""

from lightning_pref.callbacks.ema import EMAWeights
from lightning_pref.callbacks.interrupt import SaveOnSigterm
from lightning_pref.callbacks.replay import RandomCheckpointReplay
from lightning_pref.callbacks.sampling import SampleGrid, SampleLogger, save_image_grid

__all__ = ["EMAWeights", "RandomCheckpointReplay", "SampleGrid", "SampleLogger", "SaveOnSigterm", "save_image_grid"]
