"""A procedural world of coloured shapes, small enough to train a text-to-image diffusion model on a CPU.

Every image is 24x24 RGB: one shape of one colour at a jittered position and size on a plain background.
Prompts always name the shape and only sometimes the colour and the background, e.g.
"a red circle on a gray background", "a circle on a white background" or "a circle".

Colour, shape and background are drawn uniformly and independently, whatever the prompt says. A model
trained here therefore draws every colour of the palette for "a circle": colour is the axis a preference
(for instance "warm colours", see [`lightning_pref.rewards.toy`][lightning_pref.rewards.toy]) can move without hurting prompt
agreement. Everything is seeded: the same generator state gives the same prompt and the same pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from lightning_pref.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "cross")
# RGB of each colour: the first three are warm, the last three cool.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 210, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "purple": (130, 60, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
# Every word a prompt can contain: one token each in the toy tokenizer.
WORDS = ("a", "an", "on", "background", *SHAPES, *COLORS, *BACKGROUNDS)

COLOR_NAMED_PROBABILITY = 0.5
BACKGROUND_NAMED_PROBABILITY = 0.5

IMAGE_SIZE = 24
SUPERSAMPLING = 4  # draw at 4x the size, then average down: anti-aliased edges
SHAPE_EXTENT = (0.4, 0.6)  # side of the shape's bounding box, as a fraction of the image side
BORDER_MARGIN = 2  # pixels kept free around the shape, so the image border is pure background


def _check_name(field: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{field}={value!r} is not in the toy world: choose one of {', '.join(allowed)}.")


def make_prompt(shape: str, color: str | None = None, background: str | None = None) -> str:
    """The prompt naming ``shape`` and, when given, its ``color`` and the ``background``."""
    _check_name("shape", shape, SHAPES)
    if color is not None:
        _check_name("color", color, COLORS)
    if background is not None:
        _check_name("background", background, BACKGROUNDS)
    noun_phrase = f"{color} {shape}" if color else shape
    article = "an" if noun_phrase[0] in "aeiou" else "a"
    prompt = f"{article} {noun_phrase}"
    return f"{prompt} on a {background} background" if background else prompt


def parse_prompt(prompt: str) -> dict[str, str | None]:
    """The shape, colour and background a prompt names (``None`` for the ones it leaves out)."""
    words = prompt.lower().split()

    def named(vocabulary) -> str | None:
        found = [word for word in words if word in vocabulary]
        return found[0] if found else None

    return {"shape": named(SHAPES), "color": named(COLORS), "background": named(BACKGROUNDS)}


# Evaluation prompts: every shape, alone and on each background, never with a colour, so the colour is
# the model's (or a preference's) choice. The same strings also occur among the training prompts.
EVAL_PROMPTS: tuple[str, ...] = tuple(
    make_prompt(shape, background=background) for shape in SHAPES for background in (None, *BACKGROUNDS)
)


def render(shape: str, color: str, background: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one shape; ``rng`` jitters its size and position. Returns a ``(size, size, 3)`` uint8 array."""
    _check_name("shape", shape, SHAPES)
    _check_name("color", color, COLORS)
    _check_name("background", background, BACKGROUNDS)
    extent = rng.uniform(*SHAPE_EXTENT) * size
    low, high = BORDER_MARGIN + extent / 2, size - BORDER_MARGIN - extent / 2
    center_x, center_y = rng.uniform(low, high, size=2)

    scale = SUPERSAMPLING
    canvas = Image.new("RGB", (size * scale, size * scale), BACKGROUNDS[background])
    left, top = (center_x - extent / 2) * scale, (center_y - extent / 2) * scale
    right, bottom = (center_x + extent / 2) * scale, (center_y + extent / 2) * scale
    draw, fill = ImageDraw.Draw(canvas), COLORS[color]
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    elif shape == "triangle":  # apex up, base as wide as the shape is tall
        draw.polygon([(center_x * scale, top), (right, bottom), (left, bottom)], fill=fill)
    else:  # cross: two bars a third of the extent thick
        bar = extent * scale / 3
        draw.rectangle((left, top + bar, right, bottom - bar), fill=fill)
        draw.rectangle((left + bar, top, right - bar, bottom), fill=fill)
    return np.array(canvas.resize((size, size), Image.Resampling.BOX))


def sample_scene(rng: np.random.Generator) -> tuple[str, np.ndarray, dict[str, str]]:
    """A random scene: its prompt, its image (24x24x3 uint8) and the attributes actually drawn."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    named_color = color if rng.random() < COLOR_NAMED_PROBABILITY else None
    named_background = background if rng.random() < BACKGROUND_NAMED_PROBABILITY else None
    prompt = make_prompt(shape, named_color, named_background)
    image = render(shape, color, background, rng)
    return prompt, image, {"shape": shape, "color": color, "background": background}


def image_to_pixels(image: np.ndarray) -> torch.Tensor:
    """A ``(H, W, 3)`` uint8 image as the ``(3, H, W)`` float tensor in [-1, 1] diffusion models take."""
    return torch.tensor(image).permute(2, 0, 1).float() / 127.5 - 1.0


class ToySceneDataset(torch.utils.data.Dataset):
    """``num_samples`` random scenes as ``{"pixels": (3, 24, 24) float in [-1, 1], "prompt": str}``.

    Scene ``i`` depends only on ``(seed, i)``, so it is the same in any order, in any worker, on any run.
    """

    def __init__(self, num_samples: int, seed: int = 0):
        if num_samples < 1:
            raise ConfigError(f"num_samples={num_samples}: a ToySceneDataset needs at least one scene.")
        self.num_samples = num_samples
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} is out of range for a dataset of {self.num_samples} scenes.")
        prompt, image, _ = sample_scene(np.random.default_rng([self.seed, index]))
        return {"pixels": image_to_pixels(image), "prompt": prompt}
