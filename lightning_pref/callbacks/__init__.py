"""Callbacks: sample grids and a checkpoint on SIGTERM (random checkpoint replay and EMA are to come)."""

from lightning_pref.callbacks.interrupt import SaveOnSigterm
from lightning_pref.callbacks.sampling import SampleGrid, save_image_grid

__all__ = ["SampleGrid", "SaveOnSigterm", "save_image_grid"]
