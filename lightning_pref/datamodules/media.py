"""Decoding one sample's media: images (PIL), videos (PyAV), precomputed tensors (safetensors, numpy).

``MediaDecoder`` turns the encoded files of a sample's media roles (``winner`` and ``loser``, or
``image``/``video``) into ``uint8`` pixel tensors, giving every role the same geometry (crop and flip) and,
for videos, the same temporal window. Precomputed samples are loaded as they are. Nothing here unpickles:
tensors come from ``safetensors`` or from ``numpy.load(..., allow_pickle=False)``.

Layouts, per sample: an image is ``(C, H, W)``; a video is ``(C, F, H, W)``, so a batch of videos is
``(B, C, F, H, W)``, the input layout of diffusers' video VAEs (``AutoencoderKLCogVideoX``,
``AutoencoderKLWan``). Pixels stay ``uint8`` until batching, which scales them to [-1, 1].
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from lightning_pref.batch import LATENTS, PIXELS, media_field
from lightning_pref.datamodules.shards import IMAGE_EXTENSIONS, PAIR_ROLES, VIDEO_EXTENSIONS
from lightning_pref.errors import ConfigError

#: the suffix a role's latents carry in a precomputed file (``latents_w`` for the winner): the batch's names
STORED_SUFFIX = {**PAIR_ROLES, "image": "", "video": ""}


class SkipSample(Exception):
    """A sample that cannot be used; the message says why. Counted and logged, never fatal."""


def find_media(sample: dict[str, Any], role: str) -> tuple[str, bytes]:
    """``(extension, bytes)`` of the role's media file in a raw sample."""
    for extension in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
        data = sample.get(f"{role}.{extension}")
        if data is not None:
            return extension, data
    present = sorted(key for key in sample if not key.startswith("__"))
    raise SkipSample(f"no '{role}.<png|jpg|webp|mp4|...>' field (fields: {present})")


# ------------------------------------------------------------------------------------------- images
def image_extension(data: Any) -> str | None:
    """The file extension of encoded image bytes, or ``None`` when they do not decode."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            image.verify()
    except Exception:
        return None
    return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(image_format or "", "jpg")


def open_image(data: bytes, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode image bytes to RGB; JPEGs larger than ``draft_size`` (w, h) decode at a reduced scale."""
    image = Image.open(io.BytesIO(data))
    if draft_size is not None:
        image.draft("RGB", draft_size)  # JPEG only: the smallest DCT scale still covering draft_size
    return image.convert("RGB")


class Geometry:
    """Resize to cover ``resolution``, crop to it, maybe flip: the same for every image of one call.

    Args:
        resolution: ``(height, width)`` or one side of a square; ``None`` keeps the stored size.
        random_crop: a random crop instead of the centre one.
        random_flip: a horizontal flip with probability 0.5.
    """

    def __init__(self, resolution: int | Sequence[int] | None, random_crop: bool = False, random_flip: bool = False):
        if isinstance(resolution, int):
            resolution = (resolution, resolution)
        self.size = tuple(resolution) if resolution is not None else None
        self.random_crop = random_crop
        self.random_flip = random_flip

    @property
    def draft_size(self) -> tuple[int, int] | None:
        return None if self.size is None else (self.size[1], self.size[0])

    def resize(self, image: Image.Image) -> Image.Image:
        if self.size is None:
            return image
        height, width = self.size
        scale = max(height / image.height, width / image.width)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)

    def __call__(self, images: list[Image.Image], rng: np.random.Generator) -> list[torch.Tensor]:
        """``uint8`` ``(3, H, W)`` tensors; images of another size than the first are resized to it."""
        first = self.resize(images[0])
        resized = [first] + [self.resize(image) for image in images[1:]]
        resized = [
            image if image.size == first.size else image.resize(first.size, Image.Resampling.BICUBIC)
            for image in resized
        ]
        height, width = self.size or (first.height, first.width)
        if self.random_crop:
            left, top = int(rng.integers(0, first.width - width + 1)), int(rng.integers(0, first.height - height + 1))
        else:
            left, top = (first.width - width) // 2, (first.height - height) // 2
        flip = bool(self.random_flip and rng.random() < 0.5)
        box = (left, top, left + width, top + height)
        tensors = []
        for image in resized:
            array = np.asarray(image.crop(box))
            if flip:
                array = array[:, ::-1]
            tensors.append(torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))))
        return tensors


# ------------------------------------------------------------------------------------------- videos
def video_frame_times(data: bytes) -> list[float]:
    """Presentation times (seconds) of every frame of the first video stream, read without decoding."""
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise SkipSample("the file has no video stream")
        stream = container.streams.video[0]
        times = sorted(
            float(packet.pts * stream.time_base)
            for packet in container.demux(stream)
            if packet.pts is not None and packet.size
        )
    if not times:
        raise SkipSample("the video has no frames")
    return times


def decode_frames(data: bytes, indices: Sequence[int]) -> list[Image.Image]:
    """The frames at ``indices`` (in presentation order) as RGB images; decoding stops after the last one."""
    import av

    wanted, frames = set(indices), {}
    with av.open(io.BytesIO(data)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                frames[index] = frame.to_image()
            if index >= max(wanted):
                break
    missing = wanted - set(frames)
    if missing:
        raise SkipSample(f"video ends before frame {min(missing)}")
    return [frames[index] for index in indices]


def encode_video(
    frames: np.ndarray | Sequence[np.ndarray], fps: float = 8, codec: str = "libx264", container: str = "mp4"
) -> bytes:
    """Encode ``uint8`` frames ``(F, H, W, 3)`` (even H and W) to video bytes with PyAV."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = np.asarray(frames[0]).shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            output.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame, dtype=np.uint8), format="rgb24")))
        output.mux(stream.encode())
    return buffer.getvalue()


@dataclass
class FrameSampling:
    """Which frames of a video to use: ``num_frames``, every ``frame_stride``-th frame or ``fps`` frames per
    second, in one window that starts at the first frame or, with ``random_start``, anywhere it fits.

    The window is chosen once per sample and applied to all of its videos (winner and loser): with
    ``frame_stride`` it is the same frame indices, with ``fps`` the same times.
    """

    num_frames: int
    frame_stride: int = 1
    fps: float | None = None
    random_start: bool = False

    def __post_init__(self):
        if self.num_frames < 1 or self.frame_stride < 1:
            raise ConfigError(f"num_frames={self.num_frames}, frame_stride={self.frame_stride}: both must be >= 1.")
        if self.fps is not None and (self.fps <= 0 or self.frame_stride != 1):
            raise ConfigError(
                f"fps={self.fps}, frame_stride={self.frame_stride}: give a positive fps or a frame_stride, not both."
            )

    def indices(self, frame_times: list[list[float]], rng: np.random.Generator) -> list[list[int]]:
        """Frame indices of each video for one shared window."""
        if self.fps is None:
            span = (self.num_frames - 1) * self.frame_stride + 1
            available = min(len(times) for times in frame_times)
            if available < span:
                raise SkipSample(
                    f"video has {available} frames; {self.num_frames} frames at stride {self.frame_stride} need {span} "
                    "(lower num_frames or frame_stride)"
                )
            start = int(rng.integers(0, available - span + 1)) if self.random_start else 0
            return [[start + i * self.frame_stride for i in range(self.num_frames)] for _ in frame_times]
        window = (self.num_frames - 1) / self.fps
        available = min(times[-1] - times[0] for times in frame_times)
        if available + 1e-6 < window:
            raise SkipSample(
                f"video lasts {available:.2f} s; {self.num_frames} frames at {self.fps} fps need {window:.2f} s"
            )
        offset = float(rng.uniform(0, available - window)) if self.random_start else 0.0
        return [
            [bisect.bisect_right(times, times[0] + offset + i / self.fps + 1e-6) - 1 for i in range(self.num_frames)]
            for times in frame_times
        ]


def decoded(name: str, decode: Callable[..., Any], data: bytes, *args: Any) -> Any:
    """``decode(data, *args)``; a failure becomes a ``SkipSample`` naming the field."""
    try:
        return decode(data, *args)
    except SkipSample as error:
        raise SkipSample(f"{name}: {error}") from None
    except Exception as error:  # noqa: BLE001 -- decoders raise many types on corrupt input
        raise SkipSample(f"{name} does not decode ({type(error).__name__}: {error})") from None


# ------------------------------------------------------------------------------------- precomputed
def load_tensors(sample: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The precomputed tensors of a raw sample (``latents.safetensors`` or ``<name>.npy`` files), as float32
    where they are floating point; ``None`` when the sample holds none. A tensor with a NaN or an infinity
    skips the sample: one such latent would turn every trained weight NaN in a single step."""
    if "latents.safetensors" in sample:
        tensors = load_safetensors(sample["latents.safetensors"])
    else:
        names = [key for key in sample if key.endswith(".npy")]
        if not names:
            return None
        tensors = {
            name[: -len(".npy")]: torch.from_numpy(np.load(io.BytesIO(sample[name]), allow_pickle=False))
            for name in names
        }
    tensors = {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in tensors.items()}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SkipSample(f"its precomputed '{name}' holds NaN or infinite values")
    return tensors


class MediaDecoder:
    """The media of a raw sample's roles as tensors named ``pixels<suffix>`` or ``latents<suffix>``.

    Args:
        geometry: resize, crop and flip, shared by all images (and all frames) of a sample.
        frames: frame sampling for videos; ``None`` refuses videos.
    """

    def __init__(self, geometry: Geometry, frames: FrameSampling | None = None):
        self.geometry = geometry
        self.frames = frames

    def __call__(
        self, sample: dict[str, Any], roles: dict[str, str], rng: np.random.Generator
    ) -> dict[str, torch.Tensor]:
        """``roles`` maps each media role to the suffix of its output (``{"winner": "_w", "loser": "_l"}``)."""
        tensors = load_tensors(sample)
        if tensors is not None:
            return self.precomputed(tensors, roles)
        files = {}
        for role in roles:
            extension, data = find_media(sample, role)
            files[f"{role}.{extension}"] = data
        kinds = {name.rsplit(".", 1)[1] in VIDEO_EXTENSIONS for name in files}
        if kinds == {True}:
            pixels = self.videos(files, rng)
        elif kinds == {False}:
            pixels = self.geometry(
                [decoded(name, open_image, data, self.geometry.draft_size) for name, data in files.items()], rng
            )
        else:
            raise SkipSample("mixes an image and a video")
        return {media_field(PIXELS, suffix): tensor for suffix, tensor in zip(roles.values(), pixels)}

    def videos(self, videos: dict[str, bytes], rng: np.random.Generator) -> list[torch.Tensor]:
        if self.frames is None:
            raise SkipSample(
                "holds a video, but the DataModule has no num_frames: use VideoPreferenceDataModule or set num_frames"
            )
        windows = self.frames.indices([decoded(name, video_frame_times, data) for name, data in videos.items()], rng)
        clips = [decoded(name, decode_frames, data, indices) for (name, data), indices in zip(videos.items(), windows)]
        flat = self.geometry([frame for clip in clips for frame in clip], rng)
        count = self.frames.num_frames
        return [torch.stack(flat[i * count : (i + 1) * count], dim=1) for i in range(len(videos))]  # (C, F, H, W)

    @staticmethod
    def precomputed(tensors: dict[str, torch.Tensor], roles: dict[str, str]) -> dict[str, torch.Tensor]:
        stored = {role: media_field(LATENTS, STORED_SUFFIX[role]) for role in roles}
        missing = sorted(set(stored.values()) - set(tensors))
        if missing:
            raise SkipSample(f"precomputed tensors lack {missing} (they hold {sorted(tensors)})")
        out = {name: tensor for name, tensor in tensors.items() if not name.startswith(LATENTS)}
        out.update({media_field(LATENTS, suffix): tensors[stored[role]] for role, suffix in roles.items()})
        return out
