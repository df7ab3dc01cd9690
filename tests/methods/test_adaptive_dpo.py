"""AdaptiveDPO as a module: the annotators' forwards, the warm-up, the EMA updates, resume, the toy world, configs."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers.cli import printed_config
from helpers.pairs import pair_loader, random_pairs
from helpers.steps import batch_of, step_errors
from helpers.training import trainer
from torch.utils.data import DataLoader

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.datamodules import PreferenceDataModule, write_preference_shards
from lightning_pref.errors import CheckpointError, ConfigError
from lightning_pref.methods import DiffusionDPO
from lightning_pref.methods.adaptive_dpo import ANNOTATORS_KEY, AdaptiveDPO
from lightning_pref.toy import BACKGROUNDS, BASE_MODEL_PATH, SHAPES, make_prompt, render
from lightning_pref.toy.preferences import PREFERRED_COLORS


def perturb_policy(module) -> None:
    """Give the policy's LoRA B (zero at first) values of its own, leaving the EMAs' adapters alone."""
    with torch.no_grad():
        for name, param in module.denoiser.named_parameters():
            if "lora_B.default" in name:
                param.normal_(0, 0.1)


def test_the_annotators_predict_on_the_step_s_noisy_inputs_with_their_own_weights(sd_backbone):
    module = AdaptiveDPO(sd_backbone, annotator_warmup_steps=0)
    perturb_policy(module)
    batch = batch_of()
    errors = step_errors(module, batch)
    assert errors.annotators.shape == (2, 8)  # one row per EMA, over [winners; losers]
    # the averages were made from the policy at construction, whose LoRA B was zero: the base model, the reference
    for row in errors.annotators:
        assert torch.equal(row, errors.reference)
    module.annotators.update()  # the first update copies the (perturbed) policy
    errors = step_errors(module, batch)
    for row in errors.annotators:
        assert torch.equal(row, errors.policy.detach())
    assert not errors.annotators.requires_grad
    warming = AdaptiveDPO(StableDiffusionBackbone(sd_backbone.pretrained), annotator_warmup_steps=1)
    assert step_errors(warming, batch).annotators is None  # step 0 is in the warm-up: no EMA forwards


class Recording(AdaptiveDPO):
    """Records, per micro-batch, the optimizer step it belongs to and whether the annotators ran, and the trained
    weights after every optimizer step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.annotated, self.stepped = [], []

    def sample_errors(self, noisy, conditioning, batch):
        errors = super().sample_errors(noisy, conditioning, batch)
        self.annotated.append((self.global_step, errors.annotators is not None))
        return errors

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.stepped.append(
            {name: p.detach().clone() for name, p in self.denoiser.named_parameters() if p.requires_grad}
        )


def test_the_warm_up_counts_optimizer_steps_and_each_optimizer_step_updates_the_emas_once(tiny_sd, tmp_path):
    module = Recording(StableDiffusionBackbone(str(tiny_sd)), lr=1e-3, annotator_warmup_steps=2)
    trainer(tmp_path, 3, accumulate_grad_batches=2).fit(module, pair_loader(12, 2))
    # micro-batches of optimizer steps 0 and 1 run no annotators, whatever the accumulation; step 2's do
    assert module.annotated == [(0, False), (0, False), (1, False), (1, False), (2, True), (2, True)]
    assert module.annotators.updates == len(module.stepped) == 3
    for index, decay in enumerate(module.annotators.decays):
        expected = module.stepped[0]  # the first update copies, then d = min(decay, (1 + n) / (10 + n))
        for n, weights in enumerate(module.stepped[1:], start=1):
            kept = min(decay, (1 + n) / (10 + n))
            expected = {name: kept * expected[name] + (1 - kept) * value for name, value in weights.items()}
        for name, value in module.annotators.averages(index).items():
            torch.testing.assert_close(value, expected[name])


def test_a_resumed_run_continues_the_same_annotators(tiny_sd, tmp_path):
    def new_module():
        return AdaptiveDPO(StableDiffusionBackbone(str(tiny_sd)), lr=1e-3, annotator_warmup_steps=1)

    same_batches = DataLoader(random_pairs(4) * 4, batch_size=4)
    straight = new_module()
    trainer(tmp_path / "a", 4).fit(straight, same_batches)

    interrupted = trainer(tmp_path / "b", 2)
    interrupted.fit(new_module(), same_batches)
    interrupted.save_checkpoint(tmp_path / "half.ckpt")
    saved = torch.load(tmp_path / "half.ckpt", weights_only=True)[ANNOTATORS_KEY]  # plain data
    assert saved["updates"] == 2 and not any(".ema_" in key for key in torch.load(tmp_path / "half.ckpt")["state_dict"])
    resumed = new_module()
    trainer(tmp_path / "b", 4).fit(resumed, same_batches, ckpt_path=tmp_path / "half.ckpt", weights_only=True)

    assert resumed.annotators.updates == straight.annotators.updates == 4
    for index in range(2):
        expected = straight.annotators.averages(index)
        for name, value in resumed.annotators.averages(index).items():
            assert torch.equal(value, expected[name]), name
    other = trainer(tmp_path / "c", 1)
    other.fit(DiffusionDPO(StableDiffusionBackbone(str(tiny_sd))), same_batches)
    other.save_checkpoint(tmp_path / "dpo.ckpt")
    with pytest.raises(CheckpointError, match=ANNOTATORS_KEY):
        trainer(tmp_path / "c", 2).fit(new_module(), same_batches, ckpt_path=tmp_path / "dpo.ckpt")


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_the_averages_stay_float32_when_the_module_moves_to_bfloat16(sd_backbone, finetune):
    module = AdaptiveDPO(sd_backbone, finetune=finetune).to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in module.denoiser.parameters() if p.requires_grad)
    for index in range(2):
        assert all(value.dtype == torch.float32 for value in module.annotators.averages(index).values())
    for param in module.parameters():  # what DeepSpeed's bfloat16 engine does to the module it wraps, at fit start
        param.data = param.data.to(torch.bfloat16)
    module.annotators.keep_float32()  # (AdaptiveDPO.on_fit_start, after the strategy's set-up)
    for index in range(2):
        assert all(value.dtype == torch.float32 for value in module.annotators.averages(index).values())


@pytest.mark.parametrize(
    ("options", "key"),
    [
        (dict(annotator_decays=[0.9999, 1.0]), "annotator_decays"),
        (dict(annotator_warmup_steps=-1), "annotator_warmup_steps"),
        (dict(rho=0.0), "rho"),
        (dict(weighting="cubic"), "weighting"),
        (dict(margin="square"), "margin"),
        (dict(entropy_gamma=100.0), "entropy_gamma"),
    ],
)
def test_bad_options_are_refused_naming_the_key(sd_backbone, options, key):
    with pytest.raises(ConfigError, match=key):
        AdaptiveDPO(sd_backbone, **options)


# ------------------------------------------------------------------------------------------- the toy world
def write_rendered_pairs(out, num_pairs, seed=0):
    """Toy pairs whose label is the toy preference alone: one scene (a shape on a background, colour-free prompt,
    the same size and place) rendered in a warm colour (the winner) and in a cool one (the loser)."""
    rng = np.random.default_rng(seed)

    def pairs():
        for index in range(num_pairs):
            shape, background = SHAPES[index % len(SHAPES)], tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
            warm, cool = (colors[rng.integers(len(colors))] for colors in PREFERRED_COLORS.values())
            placement = int(rng.integers(2**31))
            yield {
                "winner": render(shape, warm, background, np.random.default_rng(placement)),
                "loser": render(shape, cool, background, np.random.default_rng(placement)),
                "caption": make_prompt(shape, None, background),
            }

    write_preference_shards(pairs(), out)


class Logged(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append({name: float(value) for name, value in trainer.callback_metrics.items()})
        self.rows[-1]["flipped"] = float(batch["label_flipped"].float().mean())


def test_flipped_pairs_get_a_lower_average_weight_than_clean_ones_on_the_toy_model(tmp_path):
    """The DataModule flips 30% of 512 toy pairs. A short fit follows the toy recipe (full fine-tune, lr 2e-5,
    beta 2500, which is Diffusion-DPO's 5000) for 32 steps of 32 pairs. After the warm-up, each step logs the mean
    weight of its flipped pairs and of its clean ones.

    The clean-minus-flipped difference, averaged over the steps, must exceed three standard errors of that mean
    (the spread of the steps' differences over the square root of their number). A weighting blind to the labels
    would give zero, give or take one standard error. Measured on this seed: clean 0.789, flipped 0.728, a
    difference of 0.062 +- 0.015 (4.1 standard errors; on the earlier 32x32 toy model, 3.6 to 7.1 over four seeds)."""
    write_rendered_pairs(tmp_path / "pairs", 512)
    data = PreferenceDataModule(
        f"{tmp_path}/pairs/*.tar", batch_size=32, num_workers=0, shuffle_buffer=256, label_noise=0.3
    )
    module = AdaptiveDPO(StableDiffusionBackbone(str(BASE_MODEL_PATH)), beta=2500, finetune="full", lr=2e-5)
    logged = Logged()
    trainer(tmp_path, 32, callbacks=[logged]).fit(module, datamodule=data)

    # each of the 512 pairs is flipped with probability 0.3 (a hash of its key), and 32 x 32 draws read them about
    # twice: the flipped fraction is 0.3 give or take sqrt(0.21 / 512) = 0.02; allow 4 of those
    assert np.mean([row["flipped"] for row in logged.rows]) == pytest.approx(0.3, abs=0.08)
    rows = [row for row in logged.rows[module.annotator_warmup_steps :] if 0 < row["flipped"] < 1]
    clean = np.array([row["train/weight_clean"] for row in rows])
    flipped = np.array([row["train/weight_flipped"] for row in rows])
    difference = clean - flipped
    standard_error = difference.std(ddof=1) / np.sqrt(len(difference))
    print(
        f"mean weight over {len(rows)} steps: clean {clean.mean():.3f}, flipped {flipped.mean():.3f}, "
        f"difference {difference.mean():.3f} +- {standard_error:.3f} (one standard error)"
    )
    assert len(rows) == 30 and difference.mean() > 3 * standard_error


# --------------------------------------------------------------------------------------------------- configs
def test_the_example_configs_parse_with_the_toy_recipe_and_the_paper_s_settings(capsys):
    dpo = printed_config("toy/diffusion_dpo.yaml", capsys)
    noisy = printed_config("toy/diffusion_dpo_noisy_labels.yaml", capsys)
    assert (dpo["data"]["init_args"].pop("label_noise"), noisy["data"]["init_args"].pop("label_noise")) == (0.0, 0.3)
    assert noisy["model"] == dpo["model"] and noisy["trainer"] == dpo["trainer"] and noisy["data"] == dpo["data"]

    toy = printed_config("toy/adaptive_dpo.yaml", capsys)
    model = toy["model"]["init_args"]
    assert toy["model"]["class_path"] == "lightning_pref.methods.adaptive_dpo.AdaptiveDPO"
    assert model["beta"] * 2 == dpo["model"]["init_args"]["beta"]  # no 0.5 factor: half of Diffusion-DPO's beta
    for key in ("finetune", "lr", "warmup_steps", "caption_dropout"):
        assert model[key] == dpo["model"]["init_args"][key], key
    assert toy["data"]["class_path"] == dpo["data"]["class_path"]
    assert toy["data"]["init_args"] == {**dpo["data"]["init_args"], "label_noise": 0.3}
    assert toy["trainer"] == dpo["trainer"]

    sd15 = printed_config("sd15_adaptive_dpo.yaml", capsys)
    model = sd15["model"]["init_args"]
    assert sd15["model"]["class_path"] == "lightning_pref.methods.adaptive_dpo.AdaptiveDPO"
    assert (model["finetune"], model["lora_rank"], model["lr"], model["beta"]) == ("lora", 8, 1e-5, 1000)
    assert sd15["data"]["init_args"]["batch_size"] == 16 and sd15["trainer"]["accumulate_grad_batches"] == 2
