"""Stable Diffusion 3 and 3.5: an MMDiT (``SD3Transformer2DModel``) trained by rectified flow.

SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis") conditions
on three text encoders: the penultimate hidden states of CLIP-L and CLIP-G, concatenated on channels and
zero-padded to T5's width, then concatenated with T5's hidden states on the sequence axis; and the two CLIPs'
pooled projections, concatenated. T5 is optional: a pipeline saved without it (``text_encoder_3: [null,
null]``) conditions on zeros in its place, as diffusers' ``StableDiffusion3Pipeline`` does.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

from lightning_pref.backbones.base import Backbone, Conditioning
from lightning_pref.backbones.image import MMDiTMixin
from lightning_pref.backbones.loading import frozen, has_component, read_model_index, torch_dtype
from lightning_pref.processes import FlowMatchingProcess


class StableDiffusion3Backbone(MMDiTMixin, Backbone):
    """SD3/SD3.5 pipeline: flow matching ``x_t = (1 - s) x0 + s eps``, velocity target ``eps - x0``.

    The noise process comes from the checkpoint's ``FlowMatchEulerDiscreteScheduler`` config (its ``shift``,
    3 for SD3 and SD3.5) and, by default, draws ``s`` from SD3's logit-normal distribution (Esser et al. 2024)
    before the shift, as SD3 was trained.

    Args:
        pretrained: hub id or local path of a diffusers SD3 pipeline.
        revision, variant: passed to every ``from_pretrained``.
        max_sequence_length: T5 tokens (at most the T5 tokenizer's ``model_max_length``); also the length of
            the zeros standing for T5 in a pipeline without it. 256, as the SD3 pipeline.
        timestep_range, time_sampling, logit_mean, logit_std, error_weighting: noise-process options
            ([`FlowMatchingProcess`][lightning_pref.processes.FlowMatchingProcess]).
        text_encoder_dtype: dtype the frozen T5 is held in (``bfloat16`` by default: T5-XXL's 4.7B weights take
            9.5 GB instead of 19 GB on every GPU); its states reach the denoiser in the denoiser's dtype.
    """

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        variant: str | None = None,
        max_sequence_length: int = 256,
        timestep_range: tuple[float, float] = (0.0, 1.0),
        time_sampling: Literal["uniform", "logit_normal"] = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        error_weighting: Literal["constant", "eps_equivalent"] = "constant",
        text_encoder_dtype: str = "bfloat16",
    ):
        super().__init__()
        self.pretrained = pretrained
        self.max_sequence_length = max_sequence_length
        index = read_model_index(pretrained, revision)
        load = dict(revision=revision, variant=variant)
        self.denoiser = SD3Transformer2DModel.from_pretrained(pretrained, subfolder="transformer", **load)
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer", revision=revision)
        self.tokenizer_2 = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", revision=revision)
        self.text_encoder = frozen(
            CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder="text_encoder", **load)
        )
        self.text_encoder_2 = frozen(
            CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder="text_encoder_2", **load)
        )
        self.tokenizer_3 = self.text_encoder_3 = None
        if has_component(index, "text_encoder_3"):
            self.tokenizer_3 = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer_3", revision=revision)
            self.text_encoder_3 = frozen(
                T5EncoderModel.from_pretrained(
                    pretrained, subfolder="text_encoder_3", torch_dtype=torch_dtype(text_encoder_dtype), **load
                )
            )
        self.vae = frozen(AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **load))
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            pretrained, subfolder="scheduler", revision=revision
        )
        self.process = FlowMatchingProcess.from_scheduler_config(
            scheduler.config,
            timestep_range=timestep_range,
            time_sampling=time_sampling,
            logit_mean=logit_mean,
            logit_std=logit_std,
            error_weighting=error_weighting,
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        clip_l = self.text_encoder(self.tokenize(self.tokenizer, prompts), output_hidden_states=True)
        clip_g = self.text_encoder_2(self.tokenize(self.tokenizer_2, prompts), output_hidden_states=True)
        clip_hidden = torch.cat([clip_l.hidden_states[-2], clip_g.hidden_states[-2]], dim=-1)
        t5_hidden = self.encode_t5(prompts).to(clip_hidden.dtype)
        clip_hidden = F.pad(clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip_hidden, t5_hidden], dim=-2),
            "pooled_projections": torch.cat([clip_l.text_embeds, clip_g.text_embeds], dim=-1),
        }

    def encode_t5(self, prompts: list[str]) -> Tensor:
        """T5's last hidden states, or zeros of the transformer's ``joint_attention_dim`` without T5."""
        if self.text_encoder_3 is None:
            width = self.denoiser.config.joint_attention_dim
            return torch.zeros(len(prompts), self.max_sequence_length, width, device=self.device)
        return self.t5_hidden_states(self.tokenizer_3, self.text_encoder_3, prompts)

    def predict(self, denoiser: nn.Module, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        """The velocity ``eps - x0``; ``timesteps`` are ``s * 1000``, as the scheduler hands them out."""
        return denoiser(
            hidden_states=x_t,
            timestep=timesteps,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            pooled_projections=conditioning["pooled_projections"],
            return_dict=False,
        )[0]
