"""The user branch beside every text cross-attention: zero at the start, exactly the base without user tokens,
Z' = Attn(Q, K_text, V_text) + Attn(Q, e_u W'_k, e_u W'_v) once trained, gradients only where they belong."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from lightning_pref.adapters import (
    UserBranchOff,
    UserConditioned,
    UserCrossAttnProcessor,
    add_user_branch,
    text_cross_attentions,
    with_user,
    without_user,
)
from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.errors import ConfigError

USER_DIM = 6


def noisy_inputs(backbone, rows=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(backbone.latent_shape(rows), generator=generator)
    timesteps = torch.tensor([10, 500, 990][:rows])
    return x_t, timesteps, backbone.encode_prompts(["a red cat", "a blue dog", "a square"][:rows])


def user_tokens(rows=3, tokens=2, seed=1):
    return torch.randn(rows, tokens, USER_DIM, generator=torch.Generator().manual_seed(seed))


def perturb_branch(processors, seed=2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for processor in processors:
            processor.to_v_ip[0].weight.copy_(torch.randn(processor.to_v_ip[0].weight.shape, generator=generator))


def test_every_cross_attention_gets_a_branch_whose_values_start_at_zero(sd_backbone):
    unet = sd_backbone.denoiser
    self_attentions = [m.processor for m in unet.modules() if isinstance(m, Attention) and not m.is_cross_attention]
    processors = add_user_branch(unet, USER_DIM)
    layers = text_cross_attentions(unet)
    assert len(processors) == len(layers) > 0 and [layer.processor for layer in layers] == processors
    for layer, processor in zip(layers, processors):
        assert processor.to_k_ip[0].weight.shape == (layer.to_k.out_features, USER_DIM)
        assert not processor.to_v_ip[0].weight.any() and processor.to_k_ip[0].weight.any()
    assert [m.processor for m in unet.modules() if isinstance(m, Attention) and not m.is_cross_attention] == (
        self_attentions
    )  # self-attention untouched
    names = [name for name, _ in unet.named_parameters() if ".processor." in name]
    assert len(names) == 2 * len(layers) and all(
        name.endswith(("to_k_ip.0.weight", "to_v_ip.0.weight")) for name in names
    )


def test_the_adapted_unet_is_the_base_without_user_tokens_and_at_the_start(tiny_sd):
    base, adapted = StableDiffusionBackbone(str(tiny_sd)), StableDiffusionBackbone(str(tiny_sd))
    processors = add_user_branch(adapted.denoiser, USER_DIM)
    x_t, timesteps, conditioning = noisy_inputs(base)
    with torch.no_grad():
        expected = base.predict(base.denoiser, x_t, timesteps, conditioning)
        assert torch.equal(adapted.predict(adapted.denoiser, x_t, timesteps, conditioning), expected)
        with_tokens = with_user(conditioning, user_tokens())
        assert torch.equal(adapted.predict(adapted.denoiser, x_t, timesteps, with_tokens), expected)  # W'_v = 0
        perturb_branch(processors)
        assert torch.equal(adapted.predict(adapted.denoiser, x_t, timesteps, conditioning), expected)
        assert not torch.allclose(adapted.predict(adapted.denoiser, x_t, timesteps, with_tokens), expected)


def test_one_layer_adds_the_attention_over_the_user_tokens_to_the_text_attention():
    torch.manual_seed(0)
    layer = Attention(query_dim=8, cross_attention_dim=5, heads=2, dim_head=4)
    processor = UserCrossAttnProcessor(inner_dim=8, user_dim=USER_DIM)
    perturb_branch([processor])
    layer.set_processor(processor)
    hidden, text, users = torch.randn(2, 7, 8), torch.randn(2, 3, 5), torch.randn(2, 4, USER_DIM)

    def attention(query, key, value):  # (rows, tokens, 8) -> per head, softmax(q k^T / sqrt(4)) v
        split = [tensor.view(2, -1, 2, 4).transpose(1, 2) for tensor in (query, key, value)]
        weights = (split[0] @ split[1].transpose(-1, -2) / 2.0).softmax(-1)
        return (weights @ split[2]).transpose(1, 2).reshape(2, -1, 8)

    query = layer.to_q(hidden)
    text_part = attention(query, layer.to_k(text), layer.to_v(text))
    user_part = attention(query, processor.to_k_ip[0](users), processor.to_v_ip[0](users))
    expected = layer.to_out[0](text_part + user_part)
    with torch.no_grad():
        torch.testing.assert_close(layer(hidden, encoder_hidden_states=(text, [users])), expected)
        torch.testing.assert_close(layer(hidden, encoder_hidden_states=text), layer.to_out[0](text_part))
    assert user_part.abs().max() > 0.1  # the user branch is not negligible here


def test_gradients_reach_the_branch_and_the_user_tokens_under_gradient_checkpointing(sd_backbone):
    unet = sd_backbone.denoiser
    processors = add_user_branch(unet, USER_DIM)
    unet.enable_gradient_checkpointing()
    unet.train()
    x_t, timesteps, conditioning = noisy_inputs(sd_backbone)
    tokens = user_tokens().requires_grad_(True)
    sd_backbone.predict(unet, x_t, timesteps, with_user(conditioning, tokens)).pow(2).mean().backward()
    assert all(processor.to_v_ip[0].weight.grad.abs().sum() > 0 for processor in processors)
    assert not tokens.grad.any()  # W'_v = 0: the tokens (and W'_k) see no gradient before the first step
    perturb_branch(processors)
    tokens.grad = None
    sd_backbone.predict(unet, x_t, timesteps, with_user(conditioning, tokens)).pow(2).mean().backward()
    assert tokens.grad.abs().sum() > 0 and all(p.to_k_ip[0].weight.grad.abs().sum() > 0 for p in processors)


def test_one_user_embedding_conditions_every_row_of_a_sampler_batch(sd_backbone):
    processors = add_user_branch(sd_backbone.denoiser, USER_DIM)
    perturb_branch(processors)
    x_t, timesteps, conditioning = noisy_inputs(sd_backbone)
    embedding = user_tokens(rows=1)[0]
    with torch.no_grad():
        wrapped = sd_backbone.predict(UserConditioned(sd_backbone.denoiser, embedding), x_t, timesteps, conditioning)
        by_row = with_user(conditioning, embedding.expand(3, -1, -1))
        assert torch.equal(wrapped, sd_backbone.predict(sd_backbone.denoiser, x_t, timesteps, by_row))


def test_the_reference_is_the_unet_without_user_tokens_and_takes_no_snapshot(sd_backbone):
    add_user_branch(sd_backbone.denoiser, USER_DIM)
    reference = UserBranchOff(sd_backbone.denoiser)
    with reference.network(torch.device("cpu")) as network:
        assert network is sd_backbone.denoiser
    conditioning = {"encoder_hidden_states": torch.zeros(1, 2, 3), "user_embedding": torch.zeros(1, 2, USER_DIM)}
    assert set(without_user(conditioning)) == {"encoder_hidden_states"}
    with pytest.raises(ConfigError, match="takes no snapshot"):
        reference.install({})


def test_a_unet_without_cross_attention_and_a_zero_width_are_refused():
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=8,
    )
    with pytest.raises(ConfigError, match="no text cross-attention"):
        add_user_branch(unet, USER_DIM)
    with pytest.raises(ConfigError, match="user_dim=0"):
        add_user_branch(unet, 0)
