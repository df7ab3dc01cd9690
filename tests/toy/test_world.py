import numpy as np
import pytest
import torch

from lightning_pref.toy.world import (
    BACKGROUNDS,
    COLORS,
    EVAL_PROMPTS,
    IMAGE_SIZE,
    SHAPES,
    WORDS,
    ToySceneDataset,
    make_prompt,
    parse_prompt,
    render,
    sample_scene,
)


def test_render_is_deterministic_given_the_generator_state():
    first = render("triangle", "orange", "gray", np.random.default_rng(7))
    second = render("triangle", "orange", "gray", np.random.default_rng(7))
    other = render("triangle", "orange", "gray", np.random.default_rng(8))
    assert first.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_render_draws_the_colour_on_the_background_and_keeps_the_border_clear():
    image = render("square", "blue", "white", np.random.default_rng(0))
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    assert (border == BACKGROUNDS["white"]).all()
    pixels = image.reshape(-1, 3)
    assert (pixels == COLORS["blue"]).all(axis=1).sum() > 50


def test_render_rejects_unknown_names():
    with pytest.raises(ValueError, match="shape='star'.*circle"):
        render("star", "red", "white", np.random.default_rng(0))
    with pytest.raises(ValueError, match="color='pink'"):
        make_prompt("circle", "pink")


def test_prompts_read_naturally_and_parse_back():
    assert make_prompt("circle", "red", "gray") == "a red circle on a gray background"
    assert make_prompt("cross", "orange") == "an orange cross"
    assert make_prompt("square", background="black") == "a square on a black background"
    assert parse_prompt("a circle on a white background") == {"shape": "circle", "color": None, "background": "white"}


def test_every_prompt_word_is_in_the_vocabulary():
    rng = np.random.default_rng(0)
    for _ in range(200):
        prompt, _, _ = sample_scene(rng)
        assert set(prompt.split()) <= set(WORDS)


def test_scene_prompts_agree_with_the_attributes_drawn():
    rng = np.random.default_rng(1)
    color_named = 0
    for _ in range(300):
        prompt, image, attributes = sample_scene(rng)
        named = parse_prompt(prompt)
        assert named["shape"] == attributes["shape"]
        assert named["color"] in (None, attributes["color"])
        assert named["background"] in (None, attributes["background"])
        assert (image[0, 0] == BACKGROUNDS[attributes["background"]]).all()
        color_named += named["color"] is not None
    assert 100 < color_named < 200  # the colour is named about half the time


def test_colour_free_prompts_cover_the_whole_palette_uniformly():
    rng = np.random.default_rng(2)
    colors = [
        attributes["color"]
        for prompt, _, attributes in (sample_scene(rng) for _ in range(1200))
        if parse_prompt(prompt)["color"] is None
    ]
    counts = np.array([colors.count(color) for color in COLORS])
    assert (counts > 0.6 * len(colors) / len(COLORS)).all(), dict(zip(COLORS, counts))


def test_eval_prompts_name_every_shape_and_no_colour():
    assert len(set(EVAL_PROMPTS)) == len(EVAL_PROMPTS)
    assert {parse_prompt(prompt)["shape"] for prompt in EVAL_PROMPTS} == set(SHAPES)
    assert all(parse_prompt(prompt)["color"] is None for prompt in EVAL_PROMPTS)


def test_dataset_yields_pixels_in_range_and_is_reproducible():
    dataset = ToySceneDataset(num_samples=8, seed=3)
    item = dataset[5]
    assert set(item) == {"pixels", "prompt"}
    assert item["pixels"].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and item["pixels"].dtype == torch.float32
    assert item["pixels"].min() >= -1 and item["pixels"].max() <= 1
    assert torch.equal(item["pixels"], ToySceneDataset(num_samples=8, seed=3)[5]["pixels"])
    assert not torch.equal(item["pixels"], ToySceneDataset(num_samples=8, seed=4)[5]["pixels"])
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["pixels"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and len(batch["prompt"]) == 4


def test_dataset_rejects_bad_sizes_and_indices():
    with pytest.raises(ValueError, match="num_samples=0"):
        ToySceneDataset(num_samples=0)
    with pytest.raises(IndexError):
        ToySceneDataset(num_samples=2)[2]
