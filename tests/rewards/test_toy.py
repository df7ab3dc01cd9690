import numpy as np
import pytest
import torch

from lightning_pref.rewards import (
    ColorAgreementReward,
    RewardModel,
    ShapeAgreementReward,
    WarmthReward,
    WeightedSumReward,
)
from lightning_pref.rewards.toy import classify_colors, classify_shapes
from lightning_pref.toy.world import BACKGROUNDS, COLORS, IMAGE_SIZE, SHAPES, make_prompt, render


def rendered_batch(count: int, seed: int = 0, size: int = IMAGE_SIZE):
    """``count`` random renders as (B, 3, IMAGE_SIZE, IMAGE_SIZE) in [0, 1], with the shapes and colours drawn."""
    rng = np.random.default_rng(seed)
    shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=count)]
    colors = [list(COLORS)[i] for i in rng.integers(len(COLORS), size=count)]
    backgrounds = [list(BACKGROUNDS)[i] for i in rng.integers(len(BACKGROUNDS), size=count)]
    images = np.stack([render(s, c, b, rng, size=size) for s, c, b in zip(shapes, colors, backgrounds)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, shapes, colors


@pytest.mark.parametrize("size", [IMAGE_SIZE, 32])
def test_shapes_and_colours_of_renders_are_classified_correctly(size):
    images, shapes, colors = rendered_batch(400, size=size)
    drawn = torch.tensor([SHAPES.index(s) for s in shapes])
    shape_correct = classify_shapes(images) == drawn
    color_accuracy = (classify_colors(images) == torch.tensor([list(COLORS).index(c) for c in colors])).float().mean()
    # every shape, the cross included: at small sizes the 3x3 clean-up rounds its notches towards a circle
    assert all(shape_correct[drawn == index].float().mean() > 0.95 for index in range(len(SHAPES)))
    assert color_accuracy > 0.95


def test_shape_classification_survives_mild_pixel_noise():
    images, shapes, _ = rendered_batch(200, seed=1)
    noisy = (images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    accuracy = (classify_shapes(noisy) == torch.tensor([SHAPES.index(s) for s in shapes])).float().mean()
    assert accuracy > 0.9


def test_agreement_rewards_are_one_for_the_named_attributes_and_zero_otherwise():
    images, shapes, colors = rendered_batch(100, seed=2)
    right = [make_prompt(shape, color) for shape, color in zip(shapes, colors)]
    wrong = [make_prompt(SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]) for shape in shapes]
    assert ShapeAgreementReward()(images, right).mean() > 0.95
    assert ShapeAgreementReward()(images, wrong).mean() < 0.05
    assert ColorAgreementReward()(images, right).mean() > 0.95
    assert (ColorAgreementReward()(images, [make_prompt(shape) for shape in shapes]) == 1).all()


def test_warmth_orders_the_palette_from_red_to_blue():
    rng = np.random.default_rng(3)
    warmth = {}
    for color in COLORS:
        images = np.stack([render(shape, color, background, rng) for shape in SHAPES for background in BACKGROUNDS])
        batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        scores = WarmthReward()(batch, ["a circle"] * len(batch))
        assert scores.max() - scores.min() < 0.02, f"{color}: warmth should not depend on shape or background"
        warmth[color] = scores.mean().item()
    assert warmth["red"] > warmth["orange"] > warmth["yellow"] > warmth["green"] > warmth["blue"]
    assert (
        min(warmth["red"], warmth["orange"], warmth["yellow"])
        > 0.5
        > max(warmth["green"], warmth["blue"], warmth["purple"])
    )


def test_an_empty_or_gray_image_has_neutral_warmth_and_no_shape():
    blank = torch.full((2, 3, 32, 32), 0.5)
    blank[1, :, 8:24, 8:24] = 0.9  # a light gray square on gray: a shape, but no colour
    assert torch.allclose(WarmthReward()(blank, ["a square"] * 2), torch.tensor(0.5))
    assert classify_shapes(blank[:1]).item() == -1
    assert ShapeAgreementReward()(blank, ["a square"] * 2).tolist() == [0.0, 1.0]


def test_rewards_return_one_float_per_image():
    images, shapes, _ = rendered_batch(5)
    prompts = [make_prompt(shape) for shape in shapes]
    for reward in (WarmthReward(), ShapeAgreementReward(), ColorAgreementReward()):
        scores = reward.score(images, prompts)
        assert isinstance(reward, RewardModel) and reward.name
        assert scores.shape == (5,) and scores.dtype == torch.float32


def test_weighted_sum_adds_weighted_terms():
    images, shapes, _ = rendered_batch(6)
    prompts = [make_prompt(shape) for shape in shapes]
    combined = WeightedSumReward([(WarmthReward(), 2.0), (ShapeAgreementReward(), 0.5)])
    expected = 2.0 * WarmthReward()(images, prompts) + 0.5 * ShapeAgreementReward()(images, prompts)
    assert torch.allclose(combined(images, prompts), expected)
    assert combined.name == "2 * warmth + 0.5 * shape_agreement"
    with pytest.raises(ValueError, match="terms is empty"):
        WeightedSumReward([])


def test_inputs_are_validated_with_a_clear_message():
    reward = WarmthReward()
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 1\].*\(images \+ 1\)"):
        reward(images * 2 - 1, ["a circle"] * 2)
    with pytest.raises(ValueError, match="uint8"):
        reward((images * 255).byte(), ["a circle"] * 2)
    with pytest.raises(ValueError, match="batch, 3, height, width"):
        reward(images[0], ["a circle"])
    with pytest.raises(ValueError, match="1 prompts for 2 images"):
        reward(images, ["a circle"])
    with pytest.raises(ValueError, match="names no shape"):
        ShapeAgreementReward()(images, ["a photo", "a circle"])
