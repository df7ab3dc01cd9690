"""Online DPO: fits on prompt batches with a reward, logs its candidates, refreshes its reference; any pairwise
method trains on online pairs; the example configs."""

import copy
import inspect

import lightning.pytorch as pl
import pytest
import torch
from helpers.cli import printed_config
from helpers.training import trainer

from lightning_pref.datamodules.prompts import PromptDataModule
from lightning_pref.errors import ConfigError
from lightning_pref.methods import DMPO
from lightning_pref.methods.online_dpo import OnlineDPO
from lightning_pref.pair_sources import RewardRankedPairs
from lightning_pref.rewards import RewardModel
from lightning_pref.toy.preferences import (
    GUIDANCE_SCALE,
    SAMPLING_STEPS,
    TRAIN_PROMPTS,
    ToyPreferenceReward,
    generate_toy_preferences,
)

SAMPLER = dict(num_inference_steps=2, guidance_scale=2.0)


class TieInSecondGroup(RewardModel):
    """Two prompts of two candidates: the first group ranked (0 < 1), the second an exact tie (0.5, 0.5)."""

    def compute(self, images, prompts):
        return torch.tensor([0.0, 1.0, 0.5, 0.5])


def prompts(batch_size=2, batches=3):
    return PromptDataModule(list(TRAIN_PROMPTS[:4]), batch_size=batch_size, batches_per_epoch=batches)


def trained(module):
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def test_online_dpo_needs_reward_ranked_pairs(sd_backbone):
    with pytest.raises(ConfigError, match="OnlineDPO needs pair_source: lightning_pref.pair_sources.RewardRankedPairs"):
        OnlineDPO(sd_backbone, pair_source=None)


class WeightsAtStep(pl.Callback):
    """The policy's and the reference's weights after the optimizer step that ends at ``step``."""

    def __init__(self, step):
        self.step, self.policy, self.reference = step, None, None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.policy = module.trained_weights()
            self.reference = {k: v.clone() for k, v in module.reference.copy.state_dict().items()}


def test_a_tiny_online_fit_logs_its_candidates_and_refreshes_the_reference_with_the_policy(sd_backbone, tmp_path):
    source = RewardRankedPairs(ToyPreferenceReward(), candidates=2, reference_update_every=2, **SAMPLER)
    module = OnlineDPO(sd_backbone, finetune="full", lr=1e-3, pair_source=source)
    initial = module.trained_weights()
    at_step_1, at_step_2 = WeightsAtStep(1), WeightsAtStep(2)
    fit = trainer(tmp_path, 3, callbacks=[at_step_1, at_step_2])
    fit.fit(module, datamodule=prompts())

    metrics = fit.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0 <= metrics["train/dropped_fraction"] <= 1 and metrics["train/reward_gap"] >= 0
    assert "train/candidate_reward" in metrics and "train/all_near_ties" in metrics
    # No refresh before step 2; at its start the reference took the policy's weights of then, bit for bit.
    assert all(torch.equal(at_step_1.reference[name], initial[name]) for name in initial)
    final = module.trained_weights()
    reference = module.reference.copy.state_dict()
    assert all(torch.equal(reference[name], at_step_2.policy[name]) for name in initial)
    assert any(not torch.equal(reference[name], final[name]) for name in initial)  # step 3 trained past it
    assert any(not torch.equal(reference[name], initial[name]) for name in initial)


def test_a_resumed_run_compares_with_the_refreshed_reference_of_the_uninterrupted_run(sd_backbone, tmp_path):
    """Refresh every 2 steps; a checkpoint after step 3 (refreshed at step 2) resumes with step 2's weights as the
    reference, not the base model's, and its step 4 trains as the uninterrupted run's does."""

    def module():
        source = RewardRankedPairs(ToyPreferenceReward(), candidates=2, reference_update_every=2, **SAMPLER)
        return OnlineDPO(copy.deepcopy(sd_backbone), finetune="full", lr=1e-3, pair_source=source)

    uninterrupted, at_step_3 = module(), WeightsAtStep(3)
    trainer(tmp_path / "whole", 4, callbacks=[at_step_3]).fit(uninterrupted, datamodule=prompts(batches=4))

    first = module()
    fit = trainer(tmp_path / "first", 3)
    fit.fit(first, datamodule=prompts(batches=4))
    fit.save_checkpoint(tmp_path / "step3.ckpt")
    resumed, resumed_at_step_3 = module(), WeightsAtStep(3)

    class ReferenceAtStart(pl.Callback):
        def on_train_start(self, trainer, module):
            self.reference = {k: v.clone() for k, v in module.reference.copy.state_dict().items()}

    at_start = ReferenceAtStart()
    trainer(tmp_path / "resumed", 4, callbacks=[resumed_at_step_3, at_start]).fit(
        resumed, datamodule=prompts(batches=4), ckpt_path=tmp_path / "step3.ckpt"
    )

    assert resumed.pair_source.refreshed_at == 2
    for name, value in at_step_3.reference.items():  # the reference the uninterrupted run trained step 4 against
        assert torch.equal(at_start.reference[name], value), name
    final, resumed_final = uninterrupted.trained_weights(), resumed.trained_weights()
    assert all(torch.equal(final[name], resumed_final[name]) for name in final)


def test_any_pairwise_method_trains_on_online_pairs_and_near_ties_drop_in_the_fit(sd_backbone, tmp_path):
    source = RewardRankedPairs(TieInSecondGroup(), candidates=2, **SAMPLER)
    module = DMPO(sd_backbone, beta=1000, lr=1e-3, pair_source=source)
    before = trained(module)
    fit = trainer(tmp_path, 2)
    fit.fit(module, datamodule=prompts())
    assert torch.isfinite(fit.callback_metrics["train/loss"]) and "train/mean_p" in fit.callback_metrics
    assert fit.callback_metrics["train/dropped_fraction"] == 0.5  # each step trained on its one ranked pair
    assert any(not torch.equal(p, before[name]) for name, p in trained(module).items())


# ----------------------------------------------------------------------------------------------- configs
def test_the_toy_config_makes_the_toy_datas_pairs_on_the_toy_worlds_training_prompts(capsys):
    printed = printed_config("toy/online_dpo.yaml", capsys)
    assert printed["data"]["init_args"]["prompts"] == list(TRAIN_PROMPTS)
    model = printed["model"]["init_args"]
    assert model["backbone"]["init_args"]["pretrained"] == "lightning_pref/toy/base_model"
    assert (model["finetune"], model["lr"], model["beta"], model["warmup_steps"]) == ("full", 2e-5, 5000, 20)
    source = model["pair_source"]["init_args"]
    assert source["reward"]["class_path"] == "lightning_pref.toy.preferences.ToyPreferenceReward"
    # as the offline toy pairs are made: two samples of a prompt at the toy sampler, near-ties dropped
    tie_threshold = inspect.signature(generate_toy_preferences).parameters["tie_threshold"].default
    assert (source["candidates"], source["min_reward_gap"]) == (2, tie_threshold)
    assert (source["num_inference_steps"], source["guidance_scale"]) == (SAMPLING_STEPS, GUIDANCE_SCALE)


def test_the_sd15_config_parses(capsys):
    printed = printed_config("sd15_online_dpo.yaml", capsys)
    assert printed["model"]["class_path"] == "lightning_pref.methods.online_dpo.OnlineDPO"
    assert printed["data"]["class_path"] == "lightning_pref.datamodules.prompts.PromptDataModule"
