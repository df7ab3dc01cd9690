"""Learned scorers on tiny random CLIP models written to disk and loaded through the real path."""

import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from lightning_pref.errors import ConfigError, MissingFileError
from lightning_pref.rewards import (
    AestheticReward,
    CLIPScoreReward,
    FrameAveragedReward,
    HPSv2Reward,
    ImageRewardReward,
    PickScoreReward,
    WarmthReward,
)
from lightning_pref.rewards.clip import AestheticHead, TensorFeatures
from lightning_pref.tiny.image import PROMPT_TOKENS, TINY_WORDS, build_clip_tokenizer

# fp32 scores of unit vectors: a dot product of D = 16 terms carries a relative error of about D * 2^-24
# (1e-6) per path, times the scale (exp(logit_scale) up to 100): 1e-4 bounds the difference of two paths.
SCORE_TOLERANCE = 1e-4
PROMPTS = ["a red cat", "a photo of a blue dog", "a green square on a circle"]


def write_tiny_clip(path, logit_scale=None, flip_image_embeddings=False):
    """A random CLIP (16-dim embeddings, 32-pixel images, 16 text positions) and its processor, saved as a
    hub checkpoint would be. ``flip_image_embeddings`` negates every image embedding, and so every cosine."""
    tokenizer = build_clip_tokenizer(TINY_WORDS)
    vocab = len(tokenizer)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=PROMPT_TOKENS,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    if logit_scale is not None:
        model.logit_scale.data.fill_(math.log(logit_scale))
    if flip_image_embeddings:
        model.visual_projection.weight.data.neg_()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module", params=[False, True], ids=["positive_cosines", "negative_cosines"])
def tiny_clip_scale_100(tmp_path_factory, request):
    """The same weights with exp(logit_scale) = 100, CLIP's clamp and PickScore_v1's value; random images and
    prompts all have positive cosines on it, and all negative ones with the image embeddings flipped."""
    path = tmp_path_factory.mktemp("tiny_clip_100")
    return write_tiny_clip(path, logit_scale=100.0, flip_image_embeddings=request.param), request.param


def random_images(count, height=40, width=48, seed=0):
    """Images whose values are whole multiples of 1/255 (what a PNG holds) and larger than the model's 32
    pixels and not square, so the processor resizes and crops."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, height, width), generator=generator).float() / 255


def as_pil(images):
    return [Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()) for image in images]


def test_pickscore_preference_between_two_images_matches_transformers(tiny_clip):
    reward = PickScoreReward(model=str(tiny_clip), processor=None, batch_size=3)
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    for index, prompt in enumerate(PROMPTS):
        pair = random_images(2, seed=index)
        ours = reward.score(pair, [prompt, prompt])
        inputs = processor(text=[prompt], images=as_pil(pair), return_tensors="pt", padding=True)
        with torch.no_grad():
            direct = model(**inputs).logits_per_text[0]  # exp(logit_scale) * cos, the authors' computation
        torch.testing.assert_close(ours, direct, atol=SCORE_TOLERANCE, rtol=0)
        torch.testing.assert_close(ours.softmax(0), direct.softmax(0), atol=SCORE_TOLERANCE, rtol=0)


def test_scores_do_not_depend_on_the_batch_size_or_keep_gradients(tiny_clip):
    images = random_images(5).requires_grad_()
    prompts = [PROMPTS[i % 3] for i in range(5)]
    one_at_a_time = PickScoreReward(model=str(tiny_clip), processor=None, batch_size=1)
    all_at_once = PickScoreReward(model=str(tiny_clip), processor=None, batch_size=8)
    scores = all_at_once.score(images, prompts)
    torch.testing.assert_close(one_at_a_time.score(images, prompts), scores, atol=SCORE_TOLERANCE, rtol=0)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and not scores.requires_grad
    assert not any(p.requires_grad for p in all_at_once.parameters())


def test_a_scorer_stays_in_eval_mode_inside_a_module_put_in_training_mode(tiny_clip):
    holder = torch.nn.ModuleDict({"reward": PickScoreReward(model=str(tiny_clip), processor=None)}).train()
    assert not any(module.training for module in holder["reward"].modules())


def test_dtype_option_sets_the_model_dtype_and_scores_stay_float32(tiny_clip):
    reward = PickScoreReward(model=str(tiny_clip), processor=None, dtype="bfloat16")
    assert reward.model.dtype == torch.bfloat16
    scores = reward.score(random_images(2), PROMPTS[:2])
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    with pytest.raises(ConfigError, match="dtype='float8'"):
        PickScoreReward(model=str(tiny_clip), processor=None, dtype="float8")


def test_a_missing_model_directory_names_the_key(tmp_path):
    with pytest.raises(MissingFileError, match="model='/nowhere/clip'"):
        PickScoreReward(model="/nowhere/clip", processor=None)
    with pytest.raises(MissingFileError, match="processor='./no/such/processor'"):
        CLIPScoreReward(model=str(tmp_path), processor="./no/such/processor")


def test_clip_score_per_image_matches_torchmetrics_and_the_definition(tiny_clip):
    reward = CLIPScoreReward(model=str(tiny_clip), batch_size=2)
    images, prompts = random_images(3), PROMPTS
    scores = reward.score(images, prompts)
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    metric = CLIPScore(model_name_or_path=lambda: (TensorFeatures(model), processor))
    for image, prompt, score in zip(images, prompts, scores):
        metric.reset()
        metric.update((image * 255).round().to(torch.uint8)[None], [prompt])
        torch.testing.assert_close(score, metric.compute(), atol=SCORE_TOLERANCE, rtol=0)
    inputs = processor(text=prompts, images=as_pil(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        cosine = F.cosine_similarity(
            model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output,
            model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).pooler_output,
        )
    torch.testing.assert_close(scores, (100 * cosine).clamp(min=0), atol=SCORE_TOLERANCE, rtol=0)


def test_clip_score_is_pickscore_clamped_at_zero_on_the_same_weights_at_scale_100(tiny_clip_scale_100):
    path, flipped = tiny_clip_scale_100
    images = random_images(6, seed=3)
    prompts = [PROMPTS[i % 3] for i in range(6)]
    pickscore = PickScoreReward(model=str(path), processor=None).score(images, prompts)
    clip_score = CLIPScoreReward(model=str(path)).score(images, prompts)
    assert ((pickscore < 0) == flipped).all()  # each variant on one side of the clamp
    torch.testing.assert_close(clip_score, pickscore.clamp(min=0), atol=SCORE_TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def aesthetic_head(tiny_clip, tmp_path_factory):
    """A random head in the upstream layout for the tiny CLIP's 16-dim embeddings, as safetensors and .pth."""
    torch.manual_seed(1)
    head = AestheticHead(16)
    folder = tmp_path_factory.mktemp("aesthetic")
    save_file(head.state_dict(), folder / "head.safetensors")
    torch.save(head.state_dict(), folder / "head.pth")
    return head.eval(), folder


def test_aesthetic_score_is_the_head_on_the_unit_norm_image_embedding(tiny_clip, aesthetic_head):
    head, folder = aesthetic_head
    images = random_images(4)
    from_safetensors = AestheticReward(head=str(folder / "head.safetensors"), model=str(tiny_clip), batch_size=3)
    from_pth = AestheticReward(head=str(folder / "head.pth"), model=str(tiny_clip), batch_size=3)
    scores = from_safetensors.score(images, ["a cat"] * 4)
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        embeddings = model.get_image_features(**processor(images=as_pil(images), return_tensors="pt")).pooler_output
        direct = head(F.normalize(embeddings, dim=-1))
    # the head's 1024-wide first layer adds its own fp32 rounding on top of the embedding's
    torch.testing.assert_close(scores, direct, atol=SCORE_TOLERANCE, rtol=0)
    torch.testing.assert_close(from_pth.score(images, ["a cat"] * 4), scores, atol=0, rtol=0)
    torch.testing.assert_close(from_safetensors.score(images, PROMPTS + ["a dog"]), scores, atol=0, rtol=0)
    from_safetensors.train()  # dropout stays off
    torch.testing.assert_close(from_safetensors.score(images, ["a cat"] * 4), scores, atol=0, rtol=0)


def test_aesthetic_head_of_the_wrong_width_or_layout_is_refused(tiny_clip, tmp_path):
    save_file(AestheticHead(768).state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(ConfigError, match="takes 768-dim embeddings but model=.* gives 16"):
        AestheticReward(head=str(tmp_path / "wide.safetensors"), model=str(tiny_clip))
    save_file({"weight": torch.zeros(1, 16), "bias": torch.zeros(1)}, tmp_path / "linear.safetensors")
    with pytest.raises(ConfigError, match="layers"):
        AestheticReward(head=str(tmp_path / "linear.safetensors"), model=str(tiny_clip))
    with pytest.raises(MissingFileError, match="head='./missing.pth'"):
        AestheticReward(head="./missing.pth", model=str(tiny_clip))


def test_frame_averaged_reward_is_the_mean_over_sampled_frames():
    torch.manual_seed(0)
    videos = torch.rand(2, 3, 5, 16, 16)  # (B, 3, F, H, W)
    prompts = ["a red circle", "a blue square"]
    warmth = WarmthReward()
    per_frame = torch.stack([warmth.score(videos[:, :, f], prompts) for f in range(5)], dim=1)  # (B, F)
    torch.testing.assert_close(FrameAveragedReward(warmth).score(videos, prompts), per_frame.mean(1))
    first_middle_last = FrameAveragedReward(warmth, frames=3).score(videos, prompts)
    torch.testing.assert_close(first_middle_last, per_frame[:, [0, 2, 4]].mean(1))
    frames_second = FrameAveragedReward(warmth, frames=3, layout="BFCHW").score(videos.transpose(1, 2), prompts)
    torch.testing.assert_close(frames_second, first_middle_last)
    with pytest.raises(ValueError, match=r"\(batch, 3, frames, height, width\)"):
        FrameAveragedReward(warmth).score(videos[:, :, 0], prompts)
    with pytest.raises(ValueError, match="one prompt per image"):
        FrameAveragedReward(warmth).score(videos, prompts[:1])


def test_frame_averaged_pickscore_batches_frames_with_their_video_prompt(tiny_clip):
    videos = random_images(6, seed=4).view(2, 3, 3, 40, 48).transpose(1, 2)  # (B, 3, F, H, W)
    prompts = PROMPTS[:2]
    pickscore = PickScoreReward(model=str(tiny_clip), processor=None, batch_size=4)
    per_frame = torch.stack([pickscore.score(videos[:, :, f], prompts) for f in range(3)], dim=1)
    scores = FrameAveragedReward(pickscore).score(videos, prompts)
    torch.testing.assert_close(scores, per_frame.mean(1), atol=SCORE_TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    ("reward", "package", "install"),
    [(HPSv2Reward, "hpsv2", "hpsv2x"), (ImageRewardReward, "ImageReward", "image-reward")],
)
def test_an_adapter_without_its_package_says_what_to_install(monkeypatch, reward, package, install):
    monkeypatch.setitem(sys.modules, package, None)  # import fails, as where the package is absent
    with pytest.raises(ConfigError, match=f"{reward.__name__} needs the {package} package.*pip install {install}"):
        reward()


def mean_pixel_with_prompt_length(prompt, pictures):
    """A stand-in scorer whose score shows which pixels and prompt it was called with."""
    return [float(np.asarray(picture).mean()) + 1000 * len(prompt) for picture in pictures]


def test_adapters_call_their_package_once_per_prompt_and_keep_the_input_order(monkeypatch):
    calls = []
    hpsv2 = types.ModuleType("hpsv2")
    hpsv2.score = lambda pictures, prompt, hps_version: (
        calls.append(prompt) or np.array(mean_pixel_with_prompt_length(prompt, pictures))
    )
    monkeypatch.setitem(sys.modules, "hpsv2", hpsv2)

    class FakeImageReward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def score(self, prompt, pictures):
            values = mean_pixel_with_prompt_length(prompt, pictures)
            return values if len(values) > 1 else values[0]  # the package returns a float for one image

    image_reward = types.ModuleType("ImageReward")
    image_reward.load = lambda name, device, download_root: FakeImageReward()
    monkeypatch.setitem(sys.modules, "ImageReward", image_reward)

    images = random_images(5, seed=5)
    prompts = ["a cat", "a dog on a square", "a cat", "a red circle", "a cat"]
    expected = torch.tensor(
        [(image * 255).round().mean().item() + 1000 * len(prompt) for image, prompt in zip(images, prompts)]
    )
    torch.testing.assert_close(HPSv2Reward(batch_size=8).score(images, prompts), expected)
    assert calls == ["a cat", "a dog on a square", "a red circle"]
    torch.testing.assert_close(ImageRewardReward(batch_size=2).score(images, prompts), expected)
    with pytest.raises(ConfigError, match="version='v3'"):
        HPSv2Reward(version="v3")
