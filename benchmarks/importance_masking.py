"""Which timesteps does DPO-C&M's mask remove? The masked fraction per bucket of t on the toy model, per KL scale.

DPO-C&M (arXiv 2505.21893) drops a pair when either branch's importance weight ``w_t`` is below ``tau = 0.9``;
the paper's weights are low at ``t ~ 0..100`` and ``t ~ 1000`` and high around 500. This script measures what
the reconstruction's mask removes on the toy base model (``lightning_pref/toy/base_model``) and toy preference
pairs sampled from it (``lightning_pref/toy/preferences.py``; ``--shards`` reads existing ones instead), for:

* ``mean``: the default, the KL per element (``kl_reduction: mean``, ``kl_scale`` 1);
* ``sum``: the KL of the whole latent (``kl_reduction: sum``);
* ``calibrated t*``: ``calibrate_kl_scale_at: t*``, the scale measured on the pairs so that a typical
  sample's weight at ``t*`` is ``tau`` (one value per ``--calibrate-at``).

For each bucket of ``t`` every pair draws one ``(t, eps)`` inside the bucket; the policy is the base model (the
weights of the first training step). Printed per bucket: the mean weight and the masked fraction of each
setting, then each calibrated setting's measured typical error and scale.

    python benchmarks/importance_masking.py [--pairs 128] [--buckets 10] [--calibrate-at 0.1 0.9] [--shards GLOB]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.datamodules import PreferenceDataModule
from lightning_pref.losses.importance import importance_mask
from lightning_pref.methods.dpo_clip_mask import DPOClipMask
from lightning_pref.seeding import PairRandomness
from lightning_pref.toy import BASE_MODEL_PATH
from lightning_pref.toy.preferences import generate_toy_preferences


def toy_pairs(num_pairs: int, shards: str | None) -> dict:
    """One batch of ``num_pairs`` toy preference pairs: read from ``shards``, or sampled from the toy base model
    and labelled by the toy reward into a temporary directory (seed 0)."""
    if shards is None:
        directory = tempfile.mkdtemp(prefix="importance_masking_")
        generate_toy_preferences(directory, num_pairs=2 * num_pairs, seed=0)  # near-ties are dropped
        shards = f"{directory}/*.tar"
    data = PreferenceDataModule(shards, batch_size=num_pairs, num_workers=0, shuffle_buffer=1, batches_per_epoch=1)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def settings(calibrate_at: list[float]) -> dict[str, DPOClipMask]:
    """One DPO-C&M module per setting, each on its own copy of the toy base model (LoRA at zero: the base)."""
    options = {"mean": {}, "sum": {"kl_reduction": "sum"}}
    options.update({f"calibrated t*={at:g}": {"calibrate_kl_scale_at": at} for at in calibrate_at})
    return {
        name: DPOClipMask(StableDiffusionBackbone(str(BASE_MODEL_PATH)), **kw).eval() for name, kw in options.items()
    }


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=128, help="toy pairs, each drawn once per bucket")
    parser.add_argument("--buckets", type=int, default=10)
    parser.add_argument("--calibrate-at", type=float, nargs="+", default=[0.1], help="t* of the calibrated settings")
    parser.add_argument("--shards", default=None, help="toy preference shards to read (default: sample new ones)")
    args = parser.parse_args()
    start = time.perf_counter()
    batch = toy_pairs(args.pairs, args.shards)
    modules = settings(args.calibrate_at)
    measuring = modules["mean"]  # every module's policy is the base model: one computes the errors for all
    calibration = PairRandomness.for_pairs(("calibration",), range(args.pairs))
    for module in modules.values():
        module.prepare_samples(batch, calibration)  # a calibrated module measures its scale on the first batch

    names = list(modules)
    print(f"\nDPO-C&M's mask on the toy base model (tau {measuring.mask_threshold}, {args.pairs} pairs per bucket)\n")
    print("| t bucket | " + " | ".join(f"w {name} | masked {name}" for name in names) + " |")
    print("| --- |" + " --- | --- |" * len(names))
    for bucket in range(args.buckets):
        low, high = bucket / args.buckets, (bucket + 1) / args.buckets
        measuring.process.timestep_range = (low, high)
        random = PairRandomness.for_pairs(("bucket", bucket), range(args.pairs))
        samples = measuring.prepare_samples(batch, random)
        errors = measuring.sample_errors(measuring.noise_samples(samples, random), samples.conditioning, batch)
        cells = []
        for module in modules.values():
            weight_w, weight_l = module.importance_weights(errors)
            masked = 1 - importance_mask(weight_w, weight_l, module.mask_threshold).mean()
            cells.append(f"{torch.cat([weight_w, weight_l]).mean():.3f} | {masked:.0%}")
        print(f"| {low:.1f}-{high:.1f} | " + " | ".join(cells) + " |")

    print()
    for name, module in modules.items():
        if module.typical_error is not None:
            print(
                f"{name}: t* = {module.calibration_time().item()}, typical per-element error "
                f"{module.typical_error:.4g}, c_t* {module.calibration_coefficient():.4g}, kl_scale {module.kl_scale:.4g}"
            )
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
