"""One training step's pieces, computed outside a trainer: a batch, its per-sample errors, a LoRA gradient."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from helpers.pairs import random_pairs
from lightning_pref.methods import PairRandomness


def batch_of(num_pairs=4, size=16):
    return next(iter(DataLoader(random_pairs(num_pairs, size=size), batch_size=num_pairs)))


def step_errors(module, batch, seed=0):
    """One step's errors, as the training step computes them."""
    random = PairRandomness.for_pairs((seed,), range(len(batch["prompt"])))
    samples = module.prepare_samples(batch, random)
    return module.sample_errors(module.noise_samples(samples, random), samples.conditioning, batch)


def lora_gradient(module, value):
    params = [p for name, p in module.named_parameters() if "lora_B" in name]
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, params, retain_graph=True)])
