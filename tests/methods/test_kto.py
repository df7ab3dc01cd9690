"""Diffusion-KTO as a module: paired and unpaired samples, labels, the reference point across ranks."""

import numpy as np
import pytest
import torch
from helpers.steps import batch_of, step_errors
from helpers.training import trainer

from lightning_pref.errors import DataError
from lightning_pref.methods import DiffusionKTO, PairRandomness, Samples


def test_kto_reads_winners_as_desirable_and_losers_as_undesirable(sd_backbone):
    module = DiffusionKTO(sd_backbone, desirable_weight=2.0)
    errors = step_errors(module, batch_of())
    _, metrics = module.compute_loss(errors, {})
    torch.testing.assert_close(metrics["desirable_reward"], (errors.ref_w - errors.policy_w).mean())
    torch.testing.assert_close(metrics["undesirable_reward"], (errors.ref_l - errors.policy_l).mean())
    assert "implicit_acc" in metrics  # the shared pairwise metrics of the pairs it read


def test_kto_on_unpaired_samples_draws_noise_per_sample_and_routes_labels(sd_backbone, monkeypatch):
    module = DiffusionKTO(sd_backbone, beta=100.0)
    pixels = torch.rand(1, 3, 16, 16).expand(4, 3, 16, 16) * 2 - 1  # one image, four times, same prompt
    batch = {"pixels": pixels, "label": torch.tensor([1, 0, 1, 0]), "prompt": ["a red cat"] * 4}
    logged = {}
    monkeypatch.setattr(
        module, "log_metrics", lambda stage, loss, metrics, batch_size: logged.update(metrics, loss=loss)
    )
    monkeypatch.setattr(
        module, "step_randomness", lambda batch, batch_idx, stage: PairRandomness.for_pairs((3,), range(4))
    )
    loss = module.preference_step(batch, 0, "train")

    random = PairRandomness.for_pairs((3,), range(4))  # the same streams, by hand
    x0 = sd_backbone.encode_pixels(pixels, random.generators)
    conditioning = sd_backbone.encode_prompts(batch["prompt"])
    noisy = module.noise_samples(Samples(x0, conditioning, num_pairs=None), random)
    assert len(noisy.timesteps.unique()) == 4  # each sample its own timestep (and noise)
    errors = module.sample_errors(noisy, conditioning, batch)
    reward = errors.reference - errors.policy
    torch.testing.assert_close(logged["desirable_reward"], reward[[0, 2]].mean())
    torch.testing.assert_close(logged["undesirable_reward"], reward[[1, 3]].mean())
    torch.testing.assert_close(loss, logged["loss"])
    with pytest.raises(DataError, match="without 'label'"):
        module.preference_step({"pixels": pixels, "prompt": batch["prompt"]}, 0, "train")


def test_kto_fits_on_the_unpaired_datamodule(sd_backbone, tmp_path):
    from lightning_pref.datamodules import UnpairedDataModule, write_unpaired_shards

    rng = np.random.default_rng(0)
    samples = [
        {"image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "caption": f"a cat {i}", "label": i % 2}
        for i in range(8)
    ]
    write_unpaired_shards(samples, tmp_path / "shards")
    module = DiffusionKTO(sd_backbone, lr=1e-3)
    before = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    data = UnpairedDataModule(str(tmp_path / "shards"), batch_size=4, num_workers=0, batches_per_epoch=2)
    fit_trainer = trainer(tmp_path, 2)
    fit_trainer.fit(module, datamodule=data)
    assert torch.isfinite(fit_trainer.callback_metrics["train/loss"])
    assert "train/reference_point" in fit_trainer.callback_metrics
    assert any(not torch.equal(p, before[name]) for name, p in module.named_parameters() if p.requires_grad)


def test_kto_reference_point_is_averaged_across_ranks(sd_backbone, monkeypatch):
    """Under DDP every rank uses the mean of the ranks' mean rewards; here a fake second rank holds 0.3."""
    import lightning_pref.strategies as strategies  # where mean_across_ranks reduces

    def all_reduce(value):  # sum over two ranks: this one and a fake one
        value += 0.3

    module = DiffusionKTO(sd_backbone)
    errors = step_errors(module, batch_of())
    monkeypatch.setattr(strategies.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(strategies.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(strategies.dist, "all_reduce", all_reduce)
    _, metrics = module.compute_loss(errors, {})
    local = torch.cat([errors.ref_w - errors.policy_w, errors.ref_l - errors.policy_l]).mean()
    torch.testing.assert_close(metrics["reference_point"], ((local + 0.3) / 2).clamp(min=0))
    assert metrics["reference_point"] > 0
