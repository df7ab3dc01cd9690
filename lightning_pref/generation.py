"""Generation inside the training loop: batched, no-grad sampling from the policy or the reference.

One function, [`generate`][lightning_pref.generation.generate], samples prompts with the backbone's sampling
scheduler and classifier-free guidance, sample ``i`` from the initial noise of ``seeds[i]``
([`seeded_noise`][lightning_pref.generation.seeded_noise]), so the same (prompt, seed) gives the same sample
whatever batch it is drawn in. [`PreferenceDiffusionModule.generate`][lightning_pref.methods.base.PreferenceDiffusionModule.generate]
wraps it for a module: from the policy or from the reference (whatever is installed in it: the base model, a
replayed snapshot, a previous iterate), in eval mode, restoring the train mode and the adapters afterwards.

It makes SPIN-Diffusion's losers, SSPO's reference samples, online DPO's candidates, the sample grids and the
toy evaluation's samples:

    images = module.generate(["a red circle"], seeds=[0], num_inference_steps=10)  # (1, 3, H, W) in [0, 1]
    latents = module.generate(prompts, seeds, source="reference", decode=False)  # the reference's latents
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_pref.backbones.base import Backbone


def seeded_noise(backbone: Backbone, seeds: Sequence[int]) -> Tensor:
    """Initial latent noise, ``(len(seeds), *latent_shape)``: sample ``i`` drawn from a generator seeded with
    ``seeds[i]`` alone, so it does not depend on the batch it is drawn in."""
    shape = backbone.latent_shape(1)[1:]
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds])


@torch.no_grad()
def generate(
    backbone: Backbone,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    denoiser: nn.Module | None = None,
    num_inference_steps: int = 25,
    guidance_scale: float = 5.0,
    batch_size: int = 16,
    decode: bool = True,
    progress: str | None = None,
) -> Tensor:
    """Sample ``prompts`` (one each) with ``denoiser`` (default: the backbone's), ``batch_size`` at a time.

    Returns pixels in [0, 1], or with ``decode=False`` the clean latents (the training step's input, so a
    generated sample need not go through the VAE twice). ``progress`` names a progress bar (none when ``None``).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt.")
    outputs = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None, leave=False):
        chunk = slice(start, start + batch_size)
        outputs.append(
            backbone.sample(
                list(prompts[chunk]),
                denoiser=denoiser,
                initial_noise=seeded_noise(backbone, seeds[chunk]),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                decode=decode,
            )
        )
    return torch.cat(outputs)


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the duration of a ``with`` block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
