"""Rewards for the toy world ([`lightning_pref.toy.world`][lightning_pref.toy.world]), computed from pixels alone.

All of them start by separating the shape from the background: the background colour is the median of
the image's one-pixel border (the world keeps shapes off the border), and a pixel belongs to the shape
when its RGB distance to that colour exceeds ``FOREGROUND_DISTANCE`` (the weakest contrast in the
world, purple on gray, is 0.39) and most of its 3x3 neighbours agree. Everything is vectorised over
the batch: thousands of 24x24 images per second on one CPU core. None of them is differentiable (the
masks are hard): they label preference pairs and measure samples, they do not backpropagate.

* ``WarmthReward``: how warm the shape's colour is, in [0, 1] (red 1, blue close to 0).
* ``ShapeAgreementReward``: 1 when the drawn shape is the one the prompt names, else 0.
* ``ColorAgreementReward``: 1 when the drawn colour is the one the prompt names (or it names none).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_pref.rewards.base import RewardModel
from lightning_pref.toy.world import COLORS, IMAGE_SIZE, SHAPES, parse_prompt, render

FOREGROUND_DISTANCE = 0.25  # RGB distance (channels in [0, 1]) from the background beyond which a pixel is shape
MIN_SHAPE_PIXELS = 4  # fewer foreground pixels than this: nothing is drawn
GRAY_SATURATION = 0.25  # below this HSV saturation a colour is gray: it has no hue and no colour name
FULL_SATURATION = 0.5  # from this saturation on, warmth is the hue's warmth alone
TEMPLATE_GRID = 24  # side of the canonical frame shapes are compared in
TEMPLATE_REACH = 2.5  # the canonical frame spans +-2.5 radii of gyration around the shape's centroid
TEMPLATE_RENDERS = 32  # renders of each shape averaged into its template


def background_colors(images: Tensor) -> Tensor:
    """``(B, 3)``: the per-channel median of each image's one-pixel border."""
    border = torch.cat([images[:, :, 0, :], images[:, :, -1, :], images[:, :, 1:-1, 0], images[:, :, 1:-1, -1]], dim=-1)
    return border.median(dim=-1).values


def foreground_masks(images: Tensor) -> Tensor:
    """``(B, H, W)`` bool: the pixels farther than ``FOREGROUND_DISTANCE`` from the background colour,
    cleaned by a 3x3 majority vote so that isolated noisy pixels neither join nor hole the shape."""
    distance = (images - background_colors(images)[:, :, None, None]).norm(dim=1)
    far = (distance > FOREGROUND_DISTANCE).float()[:, None]
    votes = F.avg_pool2d(far, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return votes[:, 0] > 0.5


def foreground_colors(images: Tensor) -> tuple[Tensor, Tensor]:
    """The mean RGB of each image's shape ``(B, 3)``, and whether a shape was found at all ``(B,)``."""
    masks = foreground_masks(images)
    pixel_counts = masks.sum(dim=(1, 2))
    colors = (images * masks[:, None]).sum(dim=(2, 3)) / pixel_counts.clamp(min=1)[:, None]
    return colors, pixel_counts >= MIN_SHAPE_PIXELS


def hue_and_saturation(rgb: Tensor) -> tuple[Tensor, Tensor]:
    """HSV hue in degrees [0, 360) and saturation in [0, 1] of colours ``(..., 3)`` in [0, 1]."""
    red, green, blue = rgb.unbind(-1)
    brightest, darkest = rgb.max(dim=-1).values, rgb.min(dim=-1).values
    chroma = (brightest - darkest).clamp(min=1e-6)
    sector = torch.where(
        brightest == red,
        ((green - blue) / chroma) % 6,
        torch.where(brightest == green, (blue - red) / chroma + 2, (red - green) / chroma + 4),
    )
    saturation = (brightest - darkest) / brightest.clamp(min=1e-6)
    return 60 * sector, saturation


def hue_warmth(hue: Tensor) -> Tensor:
    """Warmth of a hue in [0, 1]: 1 at red (0 degrees), falling linearly through orange, yellow and green to
    0 at blue (240 degrees), then rising again through purple and magenta back to red."""
    return torch.where(hue <= 240, 1 - hue / 240, (hue - 240) / 120)


def classify_colors(images: Tensor) -> Tensor:
    """``(B,)`` index into ``COLORS`` (lightning_pref.toy.world) of the palette hue nearest the shape's
    hue; -1 when no shape is found or it is gray. Hue ignores blending with the world's gray-level
    backgrounds, so anti-aliased edges do not shift it."""
    colors, found = foreground_colors(images)
    hue, saturation = hue_and_saturation(colors)
    palette = torch.tensor(list(COLORS.values()), dtype=images.dtype, device=images.device) / 255
    palette_hue, _ = hue_and_saturation(palette)
    difference = (hue[:, None] - palette_hue[None, :]).abs()
    angular_distance = torch.minimum(difference, 360 - difference)
    nearest = angular_distance.argmin(dim=1)
    return torch.where(found & (saturation >= GRAY_SATURATION), nearest, -1)


def normalize_masks(masks: Tensor) -> Tensor:
    """Resample masks ``(B, H, W)`` into a canonical ``TEMPLATE_GRID`` square frame centred on each shape's
    centroid and scaled by its radius of gyration, so position and size no longer matter."""
    masks = masks.float()
    _, height, width = masks.shape
    ys = torch.arange(height, dtype=masks.dtype, device=masks.device)[:, None] + 0.5
    xs = torch.arange(width, dtype=masks.dtype, device=masks.device)[None, :] + 0.5
    area = masks.sum(dim=(1, 2)).clamp(min=1)
    center_y = (masks * ys).sum(dim=(1, 2)) / area
    center_x = (masks * xs).sum(dim=(1, 2)) / area
    squared_radius = masks * ((ys - center_y[:, None, None]) ** 2 + (xs - center_x[:, None, None]) ** 2)
    gyration = (squared_radius.sum(dim=(1, 2)) / area).sqrt().clamp(min=0.5)
    offsets = torch.linspace(-TEMPLATE_REACH, TEMPLATE_REACH, TEMPLATE_GRID, device=masks.device)
    sample_x = center_x[:, None] + gyration[:, None] * offsets  # (B, G) pixel coordinates
    sample_y = center_y[:, None] + gyration[:, None] * offsets
    grid = torch.stack(  # grid_sample wants (x, y) in [-1, 1], pixel i spanning [i, i + 1]
        [
            (2 * sample_x / width - 1)[:, None, :].expand(-1, TEMPLATE_GRID, -1),
            (2 * sample_y / height - 1)[:, :, None].expand(-1, -1, TEMPLATE_GRID),
        ],
        dim=-1,
    )
    return F.grid_sample(masks[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


@functools.lru_cache(maxsize=4)
def shape_templates(size: int) -> Tensor:
    """``(len(SHAPES), G, G)``: each shape's normalised foreground mask, averaged over ``TEMPLATE_RENDERS``
    renders at the images' own ``size``. Templates pass through the same 3x3 clean-up as the images, so
    the rounding it gives a small shape's corners (a cross's notches) is in its template too."""
    rng = np.random.default_rng(0)
    templates = []
    for shape in SHAPES:
        renders = np.stack([render(shape, "red", "white", rng, size=size) for _ in range(TEMPLATE_RENDERS)])
        images = torch.from_numpy(renders).permute(0, 3, 1, 2).float() / 255
        templates.append(normalize_masks(foreground_masks(images)).mean(dim=0))
    return torch.stack(templates)


def classify_shapes(images: Tensor) -> Tensor:
    """``(B,)`` index into ``SHAPES`` (lightning_pref.toy.world) of the template that overlaps the
    normalised foreground mask best (intersection over union); -1 when no shape is found. The templates are
    drawn at the images' size, or at the world's ``IMAGE_SIZE`` for smaller images (too small to draw in)."""
    masks = foreground_masks(images)
    normalized = normalize_masks(masks)[:, None]  # (B, 1, G, G)
    templates = shape_templates(max(images.shape[-1], IMAGE_SIZE)).to(normalized)[None]  # (1, S, G, G)
    intersection = torch.minimum(normalized, templates).sum(dim=(2, 3))
    union = torch.maximum(normalized, templates).sum(dim=(2, 3))
    best = (intersection / union.clamp(min=1e-6)).argmax(dim=1)
    return torch.where(masks.sum(dim=(1, 2)) >= MIN_SHAPE_PIXELS, best, -1)


def _named(prompts: list[str], field: str) -> list[str | None]:
    return [parse_prompt(prompt)[field] for prompt in prompts]


class WarmthReward(RewardModel):
    """How warm the shape's colour is, in [0, 1]; the prompt is ignored.

    ``warmth = 0.5 + min(1, saturation / FULL_SATURATION) * (hue_warmth(hue) - 0.5)`` of the shape's mean
    colour: the hue's warmth (``hue_warmth``) for any clearly coloured shape, fading to a neutral 0.5
    as the colour turns gray. An image with no shape scores 0.5. The world's palette scores red 1.00,
    orange 0.87, yellow 0.78, green 0.44, purple 0.25, blue 0.07.
    """

    name = "warmth"

    def compute(self, images: Tensor, prompts: list[str]) -> Tensor:
        colors, found = foreground_colors(images)
        hue, saturation = hue_and_saturation(colors)
        colorfulness = (saturation / FULL_SATURATION).clamp(max=1)
        warmth = 0.5 + colorfulness * (hue_warmth(hue) - 0.5)
        return torch.where(found, warmth, 0.5)


class ShapeAgreementReward(RewardModel):
    """1 when the shape drawn (``classify_shapes``) is the shape the prompt names, else 0."""

    name = "shape_agreement"

    def compute(self, images: Tensor, prompts: list[str]) -> Tensor:
        named = _named(prompts, "shape")
        if None in named:
            prompt = prompts[named.index(None)]
            raise ValueError(
                f"prompt {prompt!r} names no shape: ShapeAgreementReward needs toy-world prompts naming one of "
                f"{', '.join(SHAPES)}."
            )
        expected = torch.tensor([SHAPES.index(shape) for shape in named], device=images.device)
        return (classify_shapes(images) == expected).float()


class ColorAgreementReward(RewardModel):
    """1 when the colour drawn (``classify_colors``) is the colour the prompt names, else 0; prompts
    naming no colour score 1 for any image."""

    name = "color_agreement"

    def compute(self, images: Tensor, prompts: list[str]) -> Tensor:
        palette = list(COLORS)
        expected = torch.tensor(
            [palette.index(color) if color else -1 for color in _named(prompts, "color")], device=images.device
        )
        agrees = classify_colors(images) == expected
        return torch.where(expected < 0, True, agrees).float()
