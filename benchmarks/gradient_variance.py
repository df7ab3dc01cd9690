"""Do importance weights lower the gradient's variance? DPO-C&M and SDPO against Diffusion-DPO, per timestep bucket.

The claim of arXiv 2505.21893: weighting (SDPO) or masking (DPO-C&M) timesteps by the per-step importance
weight ``w_t = p_theta(x_prev | x_t) / q(x_prev | x_t, x0)`` makes the preference gradient less noisy. This
script measures it on the tiny SD-style model with LoRA (its ``lora_B`` perturbed so policy != reference) and
fixed random preference pairs. For each bucket of ``t`` it draws ``--draws`` times a fresh ``(t, eps)`` per
pair inside the bucket, runs one policy and one reference forward (``sample_errors``), and takes the gradient of
each method's own ``compute_loss`` on those errors with respect to the LoRA weights: every method sees the
same draws, so the ratios are paired comparisons.

The importance settings: the defaults (the KL per element, ``tau = 0.9``), the KL of the whole latent with
``tau = 0.1``, and the KL scale calibrated so a typical weight is ``tau = 0.9`` at ``t = 100``
(``calibrate_kl_scale_at: 0.1``, measured on the pairs with the perturbed policy). Printed per bucket, for each:

* ``w``: the mean importance weight; ``masked``: the fraction of pairs DPO-C&M drops;
* ``var``: the gradient's variance over draws (trace of the covariance / number of weights), for
  Diffusion-DPO, and as ratios ``C&M / DPO`` and ``SDPO / DPO``;
* ``nsr``: the noise-to-signal ratio ``trace(cov) / |mean gradient|^2`` of each method -- masking lowers
  ``var`` trivially by zeroing pairs, so ``nsr`` is the fairer comparison.

    python benchmarks/gradient_variance.py [--draws 8] [--pairs 8] [--buckets 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.methods import SDPO, DiffusionDPO, DPOClipMask, PairRandomness
from lightning_pref.tiny import write_tiny_sd_pipeline

BETA = 2000.0
SETTINGS = {  # name -> importance options shared by DPO-C&M and SDPO
    "kl_reduction=mean, tau=0.9 (defaults)": dict(kl_reduction="mean", mask_threshold=0.9),
    "kl_reduction=sum, tau=0.1": dict(kl_reduction="sum", mask_threshold=0.1),
    "calibrate_kl_scale_at=0.1, tau=0.9": dict(calibrate_kl_scale_at=0.1, mask_threshold=0.9),
}


def make_modules(pipeline: str, options: dict) -> dict[str, torch.nn.Module]:
    """The three methods, each with the same LoRA (``lora_B`` perturbed), the policy. Only Diffusion-DPO's network
    runs in the draws; DPO-C&M's and SDPO's measure their calibrated KL scale, when they have one."""
    modules = {
        "dpo": DiffusionDPO(StableDiffusionBackbone(pipeline), beta=BETA),
        "cm": DPOClipMask(StableDiffusionBackbone(pipeline), beta=BETA, **options),
        "sdpo": SDPO(StableDiffusionBackbone(pipeline), beta=BETA, **options),
    }
    with torch.no_grad():
        for module in modules.values():
            generator = torch.Generator().manual_seed(1)
            for name, param in module.denoiser.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return modules


def precomputed_batch(module, num_pairs: int) -> dict:
    """Random preference pairs as latents and prompt embeddings, so each draw skips the encoders."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(2 * num_pairs, 3, 16, 16, generator=generator) * 2 - 1
    with torch.no_grad():
        latents_w, latents_l = module.backbone.encode_pixels(pixels, generator).chunk(2)
        prompts = (["a red cat", "a blue dog", "a green circle", "a square"] * num_pairs)[:num_pairs]
        return {"latents_w": latents_w, "latents_l": latents_l, **module.backbone.encode_prompts(prompts)}


def lora_gradients(modules: dict, batch: dict, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Each method's LoRA gradient on one shared draw: one forward, then each method's own ``compute_loss``."""
    network = modules["dpo"]
    params = [p for p in network.parameters() if p.requires_grad]
    num_pairs = batch["latents_w"].shape[0]
    random = PairRandomness.for_pairs((seed,), range(num_pairs))
    samples = network.prepare_samples(batch, random)
    errors = network.sample_errors(network.noise_samples(samples, random), samples.conditioning, batch)
    gradients, metrics = {}, {}
    for name, module in modules.items():
        loss, metrics[name] = module.compute_loss(errors, batch)
        gradients[name] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])
    return gradients, metrics["cm"]


def spread(gradients: torch.Tensor) -> tuple[float, float]:
    """(variance per weight, noise-to-signal ratio) of gradient draws ``(K, P)``."""
    variance = gradients.var(0).sum()
    signal = gradients.mean(0).pow(2).sum()
    return (variance / gradients.shape[1]).item(), (variance / signal).item() if signal > 0 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=8, help="noise draws per bucket and method")
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per draw")
    parser.add_argument("--buckets", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    pipeline = str(write_tiny_sd_pipeline(tempfile.mkdtemp(prefix="gradient_variance_")))
    start = time.perf_counter()
    for setting, options in SETTINGS.items():
        modules = make_modules(pipeline, options)
        batch = precomputed_batch(modules["dpo"], args.pairs)
        for name in ("cm", "sdpo"):  # a calibrated module measures its scale on the first batch it prepares
            modules[name].prepare_samples(batch, PairRandomness.for_pairs(("calibration",), range(args.pairs)))
        scale = f", kl_scale {modules['cm'].kl_scale:.4g}" if modules["cm"].typical_error is not None else ""
        print(f"\n## {setting}   (beta {BETA:g}, {args.pairs} pairs x {args.draws} draws per bucket{scale})\n")
        print("| t bucket | w | masked | var DPO | var C&M / DPO | var SDPO / DPO | nsr DPO | nsr C&M | nsr SDPO |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for bucket in range(args.buckets):
            low, high = bucket / args.buckets, (bucket + 1) / args.buckets
            for module in modules.values():
                module.process.timestep_range = (low, high)
            draws = [lora_gradients(modules, batch, seed=bucket * 10_000 + draw) for draw in range(args.draws)]
            (var_dpo, nsr_dpo), (var_cm, nsr_cm), (var_sdpo, nsr_sdpo) = (
                spread(torch.stack([gradients[name] for gradients, _ in draws])) for name in ("dpo", "cm", "sdpo")
            )
            weight = (
                sum((m["importance_weight_w"] + m["importance_weight_l"]).item() / 2 for _, m in draws) / args.draws
            )
            masked = sum(m["masked_fraction"].item() for _, m in draws) / args.draws
            print(
                f"| {low:.1f}-{high:.1f} | {weight:.3f} | {masked:.0%} "
                f"| {var_dpo:.3e} | {var_cm / var_dpo:.3f} | {var_sdpo / var_dpo:.3f} "
                f"| {nsr_dpo:.2f} | {nsr_cm:.2f} | {nsr_sdpo:.2f} |"
            )
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
