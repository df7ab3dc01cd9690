"""`lightning-pref plan`: counts on the meta device match real models, DeepSpeed's estimators are used as they
are, and the memory terms move the way the strategies say they should."""

from __future__ import annotations

import dataclasses
import json

import diffusers
import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from peft import LoraConfig
from torch import nn

from lightning_pref import plan
from lightning_pref.cli import main

TINY = {
    "cogvideox": {
        **plan.PRESETS["cogvideox-5b"],
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "num_layers": 2,
        "text_embed_dim": 32,
        "time_embed_dim": 16,
    },
    "wan": {
        **plan.PRESETS["wan2.1-1.3b"],
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "num_layers": 2,
        "text_dim": 32,
        "ffn_dim": 64,
        "freq_dim": 16,
    },
    "flux": {
        **plan.PRESETS["flux.1-dev"],
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "axes_dims_rope": [4, 6, 6],
        "num_layers": 1,
        "num_single_layers": 2,
        "in_channels": 16,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 16,
    },
}
TINY_SHAPE = plan.VideoShape(frames=9, height=32, width=48, text_tokens=7)  # 3x4x6 latents
#: tokens in a block's hidden states: video latent frames x (4/2) x (6/2); FLUX's image tokens, (4/2) x (6/2)
TINY_TOKENS = {"cogvideox": 3 * 2 * 3, "wan": 3 * 2 * 3, "flux": 2 * 3}


def real_model(config: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(diffusers, config["_class_name"]).from_config(config)
    return plan.to_training_dtype(model, dtype).train()


def real_inputs(meta_inputs: dict) -> dict:
    """The recipe's meta inputs as zero tensors on the CPU."""

    def real(value):
        if isinstance(value, tuple):
            return tuple(real(item) for item in value)
        return torch.zeros(value.shape, dtype=value.dtype)

    return {key: real(value) for key, value in meta_inputs.items()}


@pytest.mark.parametrize("family", TINY)
def test_meta_counts_equal_real_counts(family):
    config = TINY[family]
    assert plan.parameter_counts(plan.build_on_meta(config)) == plan.parameter_counts(real_model(config))


@pytest.mark.parametrize("family", TINY)
def test_lora_count_matches_peft_on_the_real_model_and_the_linear_shapes(family):
    config, rank = TINY[family], 4
    meta = plan.add_lora(plan.build_on_meta(config), rank, plan.LORA_TARGETS)

    real = real_model(config).requires_grad_(False)
    adapted = [
        module
        for name, module in real.named_modules()
        if isinstance(module, nn.Linear)
        and any(name == target or name.endswith("." + target) for target in plan.LORA_TARGETS)
    ]
    real.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(plan.LORA_TARGETS)))

    from_shapes = sum(rank * (linear.in_features + linear.out_features) for linear in adapted)
    peft_count = sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert plan.parameter_counts(meta, trainable_only=True)[0] == peft_count == from_shapes > 0


class StorageLedger(plan.SavedTensorLedger):
    """Counts by the real storage a saved tensor lives in, instead of ``_base`` identity (real tensors only)."""

    def __init__(self, model):
        super().__init__(model)
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def add(self, tensor, region=None):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self.parameters or storage.data_ptr() in self.counted:
            return
        self.counted[storage.data_ptr()] = tensor
        region = self.region if region is None else region
        self.bytes[region] = self.bytes.get(region, 0) + storage.nbytes()


@pytest.mark.parametrize("finetune", plan.FINETUNES)
@pytest.mark.parametrize("family", TINY)
def test_activations_measured_on_meta_equal_the_real_forward(family, finetune, monkeypatch):
    """fp32, where the CPU's layer-norm statistics have the dtype CUDA gives them (fp32) in bf16 too."""
    config = TINY[family]
    recipe = plan.INPUT_RECIPES[config["_class_name"]]
    meta = plan.build_on_meta(config, torch.float32)
    real = real_model(config)
    if finetune == "lora":
        plan.add_lora(meta, 4, plan.LORA_TARGETS)
        real.requires_grad_(False).add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(plan.LORA_TARGETS)))
    inputs = recipe.build(meta, TINY_SHAPE, 2)

    on_meta = plan.measure_activations(meta, inputs)
    on_cpu = plan.measure_activations(real, real_inputs(inputs))
    monkeypatch.setattr(plan, "SavedTensorLedger", StorageLedger)
    by_storage = plan.measure_activations(real, real_inputs(inputs))
    assert on_meta == on_cpu == by_storage
    assert on_meta.tokens == TINY_TOKENS[family]
    assert on_meta.block_inputs > 0 and on_meta.one_block > 0


def test_activations_grow_with_the_batch_and_shared_tensors_count_once():
    """Per-sample tensors grow with the batch; the rotary embeddings every block shares are counted once."""
    model = plan.build_on_meta(TINY["cogvideox"])
    one, two, three = (
        plan.measure_activations(model, plan.cogvideox_inputs(model, TINY_SHAPE, samples)) for samples in (1, 2, 3)
    )
    rotary = 2 * 18 * 16 * 4  # cos and sin, (tokens, head dim), fp32
    assert three.block_inputs - two.block_inputs == two.block_inputs - one.block_inputs == one.block_inputs - rotary
    assert two.one_block == 2 * one.one_block


@pytest.mark.parametrize("strategy", plan.STRATEGIES)
@pytest.mark.parametrize(("gpus", "nodes"), [(1, 1), (8, 1), (8, 2)])
def test_model_states_are_deepspeeds_estimates(strategy, gpus, nodes):
    trained, largest = 5_000_000_000, 40_000_000
    offload = strategy.endswith("_offload")
    if strategy == "ddp":
        expected = (
            estimate_zero2_model_states_mem_needs(trained, 1, 1, cpu_offload=False)[1],
            estimate_zero2_model_states_mem_needs(trained, gpus, nodes, cpu_offload=False)[0],
        )
    elif strategy.startswith("zero2"):
        cpu, gpu = estimate_zero2_model_states_mem_needs(trained, gpus, nodes, cpu_offload=offload)
        expected = (gpu, cpu)
    else:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            trained, largest, gpus, nodes, cpu_offload=offload, cpu_offload_params=offload
        )
        expected = (gpu, cpu)
    assert plan.model_states(trained, largest, strategy, gpus, nodes) == expected
    if strategy == "ddp":  # nothing partitioned: 2 bytes of half weights + 18 of gradients, master weights, Adam
        assert expected[0] == 20 * trained


def tiny_plan(finetune="lora", strategy="zero3", gpus=8, nodes=1, objective="dpo", family="cogvideox"):
    return plan.plan_memory(
        family, TINY[family], finetune, strategy, gpus, nodes, objective, shape=TINY_SHAPE, lora_rank=4
    )


def test_zero3_partitions_more_with_more_gpus_and_zero2_keeps_the_frozen_weights_whole():
    zero3 = [tiny_plan("full", "zero3", gpus, nodes) for gpus, nodes in [(1, 1), (8, 1), (8, 2)]]
    assert zero3[0].states > zero3[1].states > zero3[2].states
    assert zero3[0].reference > zero3[1].reference > zero3[2].reference

    parameters = plan.parameter_counts(plan.build_on_meta(TINY["cogvideox"]))[0]
    for gpus, nodes in [(1, 1), (8, 1), (8, 2)]:
        assert tiny_plan("lora", "zero2", gpus, nodes).frozen == 2 * parameters
        assert tiny_plan("full", "zero2", gpus, nodes).reference == 2 * parameters
    assert tiny_plan("lora", "zero3_offload").frozen < tiny_plan("lora", "zero3").frozen < 2 * parameters


@pytest.mark.parametrize("strategy", plan.STRATEGIES)
def test_full_fine_tuning_needs_more_than_lora(strategy):
    assert tiny_plan("full", strategy).gpu > tiny_plan("lora", strategy).gpu


def test_the_reference_is_counted_for_full_dpo_only_and_sft_halves_the_batch():
    full_dpo, full_sft = tiny_plan("full", "ddp"), tiny_plan("full", "ddp", objective="sft")
    assert full_dpo.reference == full_dpo.trainable * 2 and full_sft.reference == 0
    assert tiny_plan("lora", "ddp").reference == 0  # the reference is the policy with adapters disabled
    assert full_dpo.activations.one_block == 2 * full_sft.activations.one_block
    assert full_dpo.gpu > full_sft.gpu


def test_preset_parameter_counts():
    """CogVideoX-5B's transformer is 5.57B parameters; Wan2.1's configs give 1.42B (the name says 1.3B) and 14.3B;
    FLUX.1-dev is published as 12B, Wan2.2-TI2V-5B as 5B, and each of Wan2.2-A14B's two experts as 14B."""
    counts = {name: plan.parameter_counts(plan.build_on_meta(config))[0] for name, config in plan.PRESETS.items()}
    assert counts["cogvideox-5b"] == pytest.approx(5.57e9, rel=0.02)
    assert counts["wan2.1-1.3b"] == pytest.approx(1.42e9, rel=0.01)
    assert counts["wan2.1-1.3b"] == pytest.approx(1.3e9, rel=0.10)
    assert counts["wan2.1-14b"] == pytest.approx(14e9, rel=0.03)
    assert counts["flux.1-dev"] == pytest.approx(12e9, rel=0.01)
    assert counts["wan2.2-ti2v-5b"] == pytest.approx(5e9, rel=0.01)
    assert counts["wan2.2-a14b"] == counts["wan2.1-14b"]  # one expert, Wan2.1-14B's architecture


NEW_PRESETS = {  # preset: (latent frames, height, width) of its default sample after the VAE, and its patch
    "flux.1-dev": ((1, 1024 // 8, 1024 // 8), 2),  # 2x2 packing
    "wan2.2-ti2v-5b": (((121 - 1) // 4 + 1, 704 // 16, 1280 // 16), 2),
    "wan2.2-a14b": (((81 - 1) // 4 + 1, 720 // 8, 1280 // 8), 2),
}


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_the_new_presets_plan_lora_and_full_with_the_same_arithmetic(name):
    """Each term follows the rules of the existing rows: 20 bytes per trained parameter under DDP, bf16 frozen
    weights (the LoRA base, or the full fine-tune's reference), and checkpointed block inputs of at least
    ``blocks x samples x tokens x hidden x 2`` bytes for a [winner; loser] pair."""
    config = plan.PRESETS[name]
    parameters, largest = plan.parameter_counts(plan.build_on_meta(config))
    (frames, height, width), patch = NEW_PRESETS[name]
    tokens = frames * (height // patch) * (width // patch)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    blocks = config["num_layers"] + config.get("num_single_layers", 0)
    for finetune in plan.FINETUNES:
        ddp, zero3 = (plan.plan_memory(name, config, finetune, strategy, 8) for strategy in ("ddp", "zero3"))
        assert ddp.activations.tokens == zero3.activations.tokens == tokens
        assert ddp.states == 20 * ddp.trainable
        frozen = "frozen" if finetune == "lora" else "reference"
        assert getattr(ddp, frozen) == 2 * parameters
        assert getattr(zero3, frozen) == 2 * parameters // 8 + 2 * largest
        assert ddp.gpu == ddp.states + ddp.frozen + ddp.reference + ddp.activations.total
        assert ddp.activations.block_inputs >= blocks * 2 * tokens * hidden * 2
    assert ddp.trainable == parameters  # the last is the full fine-tune


def test_wan22_a14b_plans_one_expert_as_wan21_14b_at_720p():
    """One expert is Wan2.1-14B's transformer: the same plan as Wan2.1-14B on Wan2.2-A14B's 81x720x1280 sample."""
    shape = plan.VideoShape(81, 720, 1280, 512)
    expert = plan.plan_memory("wan2.2-a14b", plan.PRESETS["wan2.2-a14b"], "lora", "zero3", 8)
    wan21 = plan.plan_memory("wan2.1-14b", plan.PRESETS["wan2.1-14b"], "lora", "zero3", 8, shape=shape)
    assert expert == dataclasses.replace(wan21, model="wan2.2-a14b")


def test_errors_name_the_option(tmp_path, capsys):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    no_class = tmp_path / "config.json"
    no_class.write_text(json.dumps({"num_layers": 2}))
    for args, expected in [
        (["--model", "cogvideox-50b"], "--model 'cogvideox-50b': unknown"),
        (["--config", str(tmp_path / "missing.json")], "--config"),
        (["--config", str(bad_json)], "not JSON"),
        (["--config", str(no_class)], "no '_class_name'"),
        (["--model", "cogvideox-5b", "--finetune", "qlora"], "--finetune 'qlora'"),
    ]:
        with pytest.raises(SystemExit):
            plan.plan_main(args)
        assert expected in capsys.readouterr().err


def test_the_cli_prints_the_table(capsys):
    main(["plan", "--model", "wan2.1-1.3b", "--finetune", "lora", "--strategy", "zero3", "--gpus", "8"])
    out = capsys.readouterr().out
    assert out.startswith(plan.TABLE_HEADER)
    assert "| wan2.1-1.3b | dpo | lora | zero3 | 8x1 |" in out and "32760 tokens in a block's hidden states" in out


def test_a_config_file_of_any_class_plans_without_activations(tmp_path, capsys):
    known = tmp_path / "wan" / "transformer" / "config.json"
    known.parent.mkdir(parents=True)
    known.write_text(json.dumps(TINY["wan"]))
    other = tmp_path / "config.json"
    other.write_text(
        json.dumps(
            {
                "_class_name": "UNet2DConditionModel",
                "block_out_channels": [32, 64],
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "cross_attention_dim": 32,
                "layers_per_block": 1,
                "sample_size": 8,
            }
        )
    )
    plan.plan_main(["--config", str(known), "--strategy", "ddp", "--frames", "9", "--height", "32", "--width", "48"])
    assert "n/a" not in capsys.readouterr().out
    plan.plan_main(["--config", str(other), "--strategy", "ddp"])
    out = capsys.readouterr().out
    assert "| n/a | n/a | n/a | **>= " in out and "UNet2DConditionModel" in out
