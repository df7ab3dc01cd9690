"""Video preference pairs: ``winner.mp4`` and ``loser.mp4`` (any container PyAV reads) plus ``json``.

Frames are decoded with PyAV. Each pair gets one frame window, the same for both videos: ``num_frames``
frames, every ``frame_stride``-th frame or resampled to ``fps`` frames per second, starting at the first
frame or (``random_temporal_crop``) anywhere the window fits in the shorter video. A pair too short for the
window is skipped and counted.

Batches hold ``pixels_w``, ``pixels_l`` as ``(B, C, F, H, W)`` in [-1, 1], the layout diffusers' video VAEs
take (``AutoencoderKLCogVideoX``, ``AutoencoderKLWan``); a backbone whose denoiser wants ``(B, F, C, H, W)``
(CogVideoX) permutes its latents. The other fields are those of
[`PreferenceDataModule`][lightning_pref.datamodules.preference.PreferenceDataModule].
"""

from __future__ import annotations

from lightning_pref.datamodules.preference import PreferenceDataModule


class VideoPreferenceDataModule(PreferenceDataModule):
    """[`PreferenceDataModule`][lightning_pref.datamodules.preference.PreferenceDataModule] for video pairs.

    Args:
        train_shards: shard paths (shards from ``lightning-pref data video-pairs``).
        num_frames: frames per video.
        frame_stride: take every ``frame_stride``-th frame (ignored when ``fps`` is set).
        fps: resample to this many frames per second instead (the same times in both videos).
        random_temporal_crop: a random window start in training (validation starts at the first frame).
        resolution: ``(height, width)`` or one side of a square; frames are resized to cover it and cropped.
        **kwargs: every other option of [`PreferenceDataModule`][lightning_pref.datamodules.preference.PreferenceDataModule].
    """

    def __init__(
        self,
        train_shards: str,
        *,
        num_frames: int = 16,
        frame_stride: int = 1,
        fps: float | None = None,
        random_temporal_crop: bool = False,
        resolution: int | tuple[int, int] | None = None,
        **kwargs,
    ):
        super().__init__(
            train_shards,
            num_frames=num_frames,
            frame_stride=frame_stride,
            fps=fps,
            random_temporal_crop=random_temporal_crop,
            resolution=resolution,
            **kwargs,
        )
