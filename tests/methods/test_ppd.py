"""PPD as a module: the policy is the reference at step 0, only the user branch trains and is checkpointed, user
dropout, sampling for a user, refusals; on the two-user toy world each user's samples move their way and
interpolating the two users' embeddings moves the reward monotonically."""

import lightning.pytorch as pl
import pytest
import torch
from helpers.cli import printed_config
from helpers.steps import batch_of, step_errors
from helpers.training import trainer

from lightning_pref.backbones import StableDiffusion3Backbone, StableDiffusionBackbone, StableDiffusionXLBackbone
from lightning_pref.datamodules.users import UserPreferenceDataModule
from lightning_pref.errors import ConfigError, DataError
from lightning_pref.methods import PairRandomness
from lightning_pref.methods.ppd import PPD
from lightning_pref.rewards import WarmthReward
from lightning_pref.tiny import write_tiny_sd3_pipeline
from lightning_pref.toy import BASE_MODEL_PATH
from lightning_pref.toy.evaluation import heldout_samples
from lightning_pref.toy.preferences import GUIDANCE_SCALE, HELDOUT_PROMPTS, SAMPLING_STEPS
from lightning_pref.toy.users import evaluate_users_against_base, write_rendered_user_pairs
from lightning_pref.users import interpolate_users

USER_DIM, USER_TOKENS = 6, 2
SAMPLER = dict(num_inference_steps=3, guidance_scale=2.0)


def users_batch(precomputed=False):
    batch = batch_of(num_pairs=4)
    batch["user_id"], batch["key"] = torch.tensor([0, 1, 2, 1]), ["a", "b", "c", "d"]
    if precomputed:
        batch["user_embedding"] = torch.randn(4, USER_TOKENS, USER_DIM, generator=torch.Generator().manual_seed(3))
    return batch


def ppd(backbone, precomputed=False, **options):
    return PPD(backbone, user_dim=USER_DIM, user_tokens=USER_TOKENS, num_users=None if precomputed else 3, **options)


def new_parameter(name):
    return ".processor.to_" in name or name in ("user_table.embeddings.weight", "null_user")


def perturb_branch(module, seed=4):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "to_v_ip" in name:
                param.copy_(torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("precomputed", [False, True], ids=["table", "precomputed"])
def test_at_step_0_the_policy_is_the_reference_exactly(sd_backbone, precomputed):
    module = ppd(sd_backbone, precomputed, caption_dropout=0.5)
    batch = users_batch(precomputed)
    errors = step_errors(module, batch)
    assert torch.equal(errors.policy, errors.reference) and errors.policy.shape == (8,)
    loss, metrics = module.compute_loss(errors, batch)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-6)  # u = 0 for every pair
    assert metrics["implicit_acc"] == 0.5  # ties count one half


def test_sdxl_unets_take_the_user_branch_too(tiny_sdxl):
    module = ppd(StableDiffusionXLBackbone(str(tiny_sdxl)))
    batch = users_batch()
    errors = step_errors(module, batch)
    assert torch.equal(errors.policy, errors.reference)
    perturb_branch(module)
    errors = step_errors(module, batch)
    assert not torch.allclose(errors.policy, errors.reference)


def test_only_the_new_parameters_train_and_receive_gradients(sd_backbone):
    module = ppd(sd_backbone)
    trainable = {name for name, param in module.named_parameters() if param.requires_grad}
    assert trainable and trainable == {name for name, _ in module.named_parameters() if new_parameter(name)}
    assert trainable == module.trained_state_keys() == set(module.trained_weights())
    batch = users_batch()
    module.compute_loss(step_errors(module, batch), batch)[0].backward()
    for name, param in module.named_parameters():
        assert (param.grad is not None) == (name in trainable), name
    assert all(param.grad.abs().sum() > 0 for name, param in module.named_parameters() if "to_v_ip" in name)
    perturb_branch(module)  # once W'_v is non-zero, the keys and the users' embeddings see gradients too
    module.zero_grad()
    module.compute_loss(step_errors(module, batch), batch)[0].backward()
    for name in ("to_k_ip", "user_table"):
        grads = [param.grad for param_name, param in module.named_parameters() if name in param_name]
        assert grads and all(grad.abs().sum() > 0 for grad in grads)


def test_user_dropout_puts_the_null_embedding_in_place_from_each_pairs_stream(sd_backbone):
    module = ppd(sd_backbone, user_dropout=0.5)
    batch = users_batch()
    stream = (0, "train", 0, 0)
    with torch.no_grad():
        module.null_user.fill_(7.0)
        users = module.prompt_conditioning(batch, PairRandomness.for_pairs(stream, range(4)))["user_embedding"]
        dropped = PairRandomness.for_pairs(stream, range(4)).uniform() < 0.5  # the same streams, by hand
        assert 0 < int(dropped.sum()) < 4
        assert (users[dropped] == 7.0).all()
        assert torch.equal(users[~dropped], module.user_table(batch["user_id"])[~dropped])
        module.eval()
        users = module.prompt_conditioning(batch, PairRandomness.for_pairs(stream, range(4)))["user_embedding"]
        assert torch.equal(users, module.user_table(batch["user_id"]))  # never in evaluation
    assert ppd(sd_backbone, user_dropout=0.0).null_user is None


def test_a_fit_moves_the_user_branch_alone_and_checkpoints_only_it(tiny_sd, tmp_path):
    write_rendered_user_pairs(tmp_path / "pairs", num_pairs=16)
    data = UserPreferenceDataModule(
        str(tmp_path / "pairs"), resolution=16, batch_size=4, num_workers=0, shuffle_buffer=4, batches_per_epoch=3
    )
    module = PPD(
        StableDiffusionBackbone(str(tiny_sd)), user_dim=USER_DIM, user_tokens=USER_TOKENS, num_users=2, lr=1e-2
    )
    before = module.trained_weights()
    fit = trainer(tmp_path, 3)
    fit.fit(module, datamodule=data)
    after = module.trained_weights()
    assert all(
        not torch.equal(before[name], after[name]) for name in after if "to_v_ip" in name or "user_table" in name
    )
    base = StableDiffusionBackbone(str(tiny_sd)).denoiser.state_dict()
    trained = module.denoiser.state_dict()
    assert all(torch.equal(base[name], trained[name]) for name in base)  # the UNet itself is untouched

    fit.save_checkpoint(tmp_path / "ppd.ckpt")
    checkpoint = torch.load(tmp_path / "ppd.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == module.trained_state_keys()
    assert checkpoint["hyper_parameters"]["finetune"] == "user_branch"
    restored = PPD(StableDiffusionBackbone(str(tiny_sd)), user_dim=USER_DIM, user_tokens=USER_TOKENS, num_users=2)
    restored.load_state_dict(checkpoint["state_dict"], strict=False)
    embedding = module.embedding_of(1)
    assert torch.equal(restored.embedding_of(1), embedding)
    samples = module.generate(["a red cat"], [0], user_embedding=embedding, **SAMPLER)
    assert torch.equal(restored.generate(["a red cat"], [0], user_embedding=embedding, **SAMPLER), samples)


def test_sampling_without_a_user_or_before_training_is_the_base_model(tiny_sd):
    base = StableDiffusionBackbone(str(tiny_sd))
    module = PPD(StableDiffusionBackbone(str(tiny_sd)), user_dim=USER_DIM, user_tokens=USER_TOKENS, num_users=2)
    prompts, seeds = ["a red cat", "a blue dog"], [0, 1]
    expected = PPD(base, user_dim=USER_DIM, user_tokens=USER_TOKENS, num_users=2).generate(prompts, seeds, **SAMPLER)
    assert torch.equal(module.generate(prompts, seeds, user_embedding=module.embedding_of(0), **SAMPLER), expected)
    perturb_branch(module)
    assert torch.equal(module.generate(prompts, seeds, **SAMPLER), expected)
    assert torch.equal(module.generate(prompts, seeds, source="reference", **SAMPLER), expected)
    for_user = module.generate(prompts, seeds, user_embedding=module.embedding_of(0), **SAMPLER)
    assert not torch.allclose(for_user, expected)
    assert module.training  # generation restored the train mode
    with pytest.raises(ConfigError, match="source='policy'"):
        module.generate(prompts, seeds, user_embedding=module.embedding_of(0), source="reference")
    with pytest.raises(DataError, match=r"is \(1, 3, 6\), but the module takes \(batch, 2, 6\)"):
        module.generate(prompts, seeds, user_embedding=torch.zeros(3, USER_DIM))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(finetune="lora"), "finetune='lora': PPD trains only its user branch"),
        (dict(finetune="full"), "finetune='full': PPD trains only its user branch"),
        (dict(lora_rank=4), "lora_rank=4: PPD trains only its user branch"),
        (dict(reference_offload=True), "reference_offload=True: PPD trains only its user branch"),
        (dict(entropy_gamma=10.0), "entropy_gamma .SEE-DPO's term. is not available with PPD"),
        (dict(user_dropout=1.0), r"user_dropout=1.0: use a probability in \[0, 1\)"),
        (dict(user_dim=0), "user_dim=0"),
        (dict(num_users=0), "num_users=0"),
    ],
)
def test_options_that_make_no_sense_are_refused_in_one_line(sd_backbone, options, message):
    with pytest.raises(ConfigError, match=message):
        PPD(sd_backbone, **{"user_dim": USER_DIM, **options})


def test_a_backbone_without_a_unet_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="beside the text cross-attentions of a UNet"):
        PPD(StableDiffusion3Backbone(str(write_tiny_sd3_pipeline(tmp_path, with_t5=False))), user_dim=USER_DIM)


def test_batches_without_usable_users_are_refused_naming_the_field(sd_backbone):
    random = PairRandomness.for_pairs((0,), range(4))
    batch = users_batch()
    with pytest.raises(DataError, match="precomputed 'user_embedding'.*user-embeddings.*num_users"):
        ppd(sd_backbone, precomputed=True).prompt_conditioning(batch, random)
    with pytest.raises(DataError, match=r"'user_embedding' is \(4, 1, 6\)"):
        ppd(sd_backbone, precomputed=True).prompt_conditioning(
            {**batch, "user_embedding": torch.zeros(4, 1, 6)}, random
        )
    table = ppd(sd_backbone)
    with pytest.raises(DataError, match="looks each pair's user up by 'user_id'"):
        table.prompt_conditioning({key: value for key, value in batch.items() if key != "user_id"}, random)
    with pytest.raises(DataError, match="'user_id' holds 7, outside the table's users 0..2"):
        table.prompt_conditioning({**batch, "user_id": torch.tensor([0, 7, 1, 1])}, random)
    with pytest.raises(ConfigError, match="takes no snapshot"):
        table.reference.install(table.trained_weights())


def test_the_example_configs_parse(capsys):
    toy = printed_config("toy/ppd.yaml", capsys)
    model, data = toy["model"]["init_args"], toy["data"]
    assert toy["model"]["class_path"] == "lightning_pref.methods.ppd.PPD"
    assert data["class_path"] == "lightning_pref.datamodules.users.UserPreferenceDataModule"
    assert model["num_users"] == 2 and model["finetune"] == "user_branch"
    sd15 = printed_config("sd15_ppd.yaml", capsys)
    model = sd15["model"]["init_args"]
    assert model["num_users"] is None and model["user_dim"] == 896 and model["lr"] == 1e-5
    assert sd15["data"]["init_args"]["user_embeddings"] is True
    assert model["backbone"]["class_path"].endswith("StableDiffusionBackbone")


# ------------------------------------------------------------------------------------- the two-user toy world
def two_user_ppd(shards):
    """PPD with a learned table on rendered two-user pairs (user 0 warm, user 1 cool): 30 steps of 16 pairs."""
    write_rendered_user_pairs(shards, num_pairs=480)
    data = UserPreferenceDataModule(str(shards), batch_size=16, num_workers=0, shuffle_buffer=64, batches_per_epoch=30)
    module = PPD(
        StableDiffusionBackbone(str(BASE_MODEL_PATH)), user_dim=16, user_tokens=4, num_users=2, lr=1e-2, seed=1
    )
    pl.seed_everything(0)
    trainer(shards, 30).fit(module, datamodule=data)
    return module


def test_each_user_moves_their_way_and_interpolating_the_two_moves_the_reward_monotonically(tmp_path):
    toy_ppd = two_user_ppd(tmp_path / "train")
    write_rendered_user_pairs(tmp_path / "heldout", num_pairs=8, prompts=HELDOUT_PROMPTS)
    result = evaluate_users_against_base(toy_ppd, None, seeds_per_prompt=4, heldout_pairs=tmp_path / "heldout")
    assert result["user0_warmth"] == result["tuned_warmth"] > result["base_warmth"] > result["user1_warmth"]
    assert result["user0_warm_win_rate"] == result["win_rate"] > 0.5 and result["user1_cool_win_rate"] > 0.5
    assert {"winner_error_change", "loser_error_change", "collapsed"} <= result.keys()

    warm, cool = toy_ppd.embedding_of(0), toy_ppd.embedding_of(1)
    prompts, seeds = heldout_samples(4)  # the same prompts and noise as evaluate_users_against_base's
    settings = dict(num_inference_steps=SAMPLING_STEPS, guidance_scale=GUIDANCE_SCALE)
    between = [
        WarmthReward()
        .score(
            toy_ppd.generate(prompts, seeds, user_embedding=interpolate_users(warm, cool, weight), **settings), prompts
        )
        .mean()
        .item()
        for weight in (0.25, 0.5, 0.75)
    ]
    warmth = [result["user0_warmth"], *between, result["user1_warmth"]]  # weights 0, 0.25, 0.5, 0.75, 1
    assert all(earlier > later for earlier, later in zip(warmth, warmth[1:])), warmth
