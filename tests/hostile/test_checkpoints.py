"""Hostile checkpoints: crafted and damaged checkpoints of every format, through every entry point that reads one.

A crafted pickle here would create a marker file when unpickled; it must never exist afterwards. Every refusal
is one line naming the file at fault; a refused pickle also names the global it wanted and the caller's opt-in.

The genuine checkpoints come from real runs of ``tests/scripts/distributed_fit.py``: one process for the single
``.ckpt``, two for ZeRO-2, ZeRO-3 and FSDP2. Each hostile checkpoint is a copy of one with a single part
replaced. (``tests/test_strategies.py`` resumes and exports such checkpoints on two processes, through the same
loaders.)
"""

from __future__ import annotations

import io
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import deepspeed.ops
import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers.cli import tiny_config, write_config
from helpers.distributed import global_batch, training_module, write_run_config
from helpers.training import trainer
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.utils.data import DataLoader

from lightning_pref import checkpoints
from lightning_pref.errors import CheckpointError, UserError
from lightning_pref.export import export, export_main
from lightning_pref.methods import DiffusionDPO
from lightning_pref.strategies import STRATEGY_OPT_IN, DeepSpeedStrategy, ModelParallelStrategy

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip compiling the shared-memory comm op

RUNS = {"file": "single", "zero2": "zero2", "zero3": "zero3", "fsdp2": "fsdp2"}  # kind: distributed_fit strategy
REFUSED = "refers to the Python global 'builtins.exec'"
NOT_TORCH_SAVE = "is not a file torch.save writes"
NOT_METADATA = "is not the pickled Metadata torch.distributed.checkpoint writes"


class Payload:
    """Unpickling it runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@dataclass(frozen=True)
class Hostile:
    kind: str  # a key of RUNS
    damage: str  # payload, payload_in_item, zero_bytes, random_bytes, truncated, wrong_layout
    part: str  # what it changes, relative to the checkpoint ("" for a single file: the file itself)
    names: str  # the path the refusal must name, relative to the checkpoint
    says: str  # what the refusal must say

    def __str__(self) -> str:
        return f"{self.kind}-{self.damage}-{self.part or 'ckpt'}"


ZERO2_MODEL = "checkpoint/mp_rank_00_model_states.pt"
FILE_PAYLOAD = Hostile("file", "payload", "", "", REFUSED)
ZERO2_PAYLOAD = Hostile("zero2", "payload", ZERO2_MODEL, ZERO2_MODEL, REFUSED)
METADATA_PAYLOAD = Hostile("fsdp2", "payload", ".metadata", ".metadata", REFUSED)
ITEM_PAYLOAD = Hostile("fsdp2", "payload_in_item", "__9_0.distcp", "__9_0.distcp", REFUSED)
CORPUS = [
    FILE_PAYLOAD,
    ZERO2_PAYLOAD,
    Hostile(
        "zero2",
        "payload",
        "checkpoint/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "checkpoint/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        REFUSED,
    ),
    Hostile(
        "zero3",
        "payload",
        "checkpoint/zero_pp_rank_0_mp_rank_00_model_states.pt",
        "checkpoint/zero_pp_rank_0_mp_rank_00_model_states.pt",
        REFUSED,
    ),
    METADATA_PAYLOAD,
    Hostile("fsdp2", "payload", "meta.pt", "meta.pt", REFUSED),
    ITEM_PAYLOAD,
    *(
        Hostile(kind, damage, part, part, says)
        for kind, part, says in [
            ("file", "", NOT_TORCH_SAVE),
            ("zero2", ZERO2_MODEL, NOT_TORCH_SAVE),
            ("fsdp2", ".metadata", NOT_METADATA),
        ]
        for damage in ("zero_bytes", "random_bytes", "truncated")
    ),
    Hostile("file", "wrong_layout", "", "", "is a directory but neither a DeepSpeed checkpoint"),
    Hostile("zero2", "wrong_layout", "latest", "latest", "names the tag 'global_step9'"),
    Hostile("fsdp2", "wrong_layout", "__1_0.distcp", ".metadata", "lists the data file '__1_0.distcp'"),
]


@pytest.fixture(scope="module")
def pipeline(tiny_pixel_sd):
    return tiny_pixel_sd


@pytest.fixture(scope="module")
def genuine(distributed_run):
    """Per format: the last checkpoint of a real 4-step run (the strategy tests' runs), and the weights that run
    ended with."""
    runs = {}
    for kind, strategy in RUNS.items():
        _, out = distributed_run(strategy)
        runs[kind] = out / "checkpoints" / "step=4.ckpt", load_file(out / "final_denoiser.safetensors")
    return runs


@pytest.fixture(scope="module", autouse=True)
def no_process_group_left_behind():
    """The strategies here run in pytest's own process: their process group goes when the module is done."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rewrite(part: Path, content: bytes) -> None:
    part.unlink()  # the copy hard-links the genuine file: writing through the link would change it too
    part.write_bytes(content)


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def craft(genuine: Path, case: Hostile, root: Path, marker: Path) -> Path:
    """A copy of ``genuine`` (hard links, so copies are free) with ``case.part`` damaged as ``case.damage`` says."""
    checkpoint = root / genuine.name
    root.mkdir(parents=True)
    if case.damage == "wrong_layout" and genuine.is_file():  # the directory holding the checkpoint, not it
        checkpoint.mkdir()
        os.link(genuine, checkpoint / genuine.name)
        return checkpoint
    if genuine.is_dir():
        shutil.copytree(genuine, checkpoint, copy_function=os.link)
    else:
        os.link(genuine, checkpoint)
    part = checkpoint / case.part
    original = part.read_bytes() if part.is_file() else b""
    if case.damage == "payload" and part.name == ".metadata":  # the genuine metadata, carrying the payload
        metadata = checkpoints.read_metadata(part)
        metadata.payload = Payload(marker)
        rewrite(part, pickle.dumps(metadata))
    elif case.damage == "payload":  # the genuine content, plus the payload
        rewrite(part, saved({**torch.load(io.BytesIO(original), weights_only=False), "payload": Payload(marker)}))
    elif case.damage == "payload_in_item":  # a non-tensor item (an optimizer's lr) moved into a crafted data file
        metadata = checkpoints.read_metadata(checkpoint / ".metadata")
        index = next(
            index
            for index in metadata.storage_data
            if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata)
        )
        part.write_bytes(saved(Payload(marker)))
        metadata.storage_data[index] = _StorageInfo(part.name, 0, part.stat().st_size)
        rewrite(checkpoint / ".metadata", pickle.dumps(metadata))
    elif case.damage == "zero_bytes":
        rewrite(part, b"")
    elif case.damage == "random_bytes":
        rewrite(part, random.Random(0).randbytes(4096))
    elif case.damage == "truncated":
        rewrite(part, original[: len(original) // 2])
    elif case.part == "latest":  # wrong layout: `latest` names a tag that is not there
        rewrite(part, b"global_step9")
    else:  # wrong layout: a data file the metadata lists is gone
        part.unlink()
    return checkpoint


def diffusion_dpo(pipeline: Path) -> DiffusionDPO:
    """The module scripts/distributed_fit.py trains."""
    return training_module(pipeline)


def one_process_strategy(kind: str):
    """The project's strategy for a kind of checkpoint, on this one process."""
    if kind in ("zero2", "zero3"):
        return DeepSpeedStrategy(stage=int(kind[-1]))
    return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)


def fit_from(pipeline: Path, checkpoint: Path, root: Path, strategy) -> DiffusionDPO:
    """``Trainer.fit(ckpt_path=checkpoint)`` on this process, up to step 4: a genuine step-4 checkpoint only loads."""
    module = diffusion_dpo(pipeline)
    with mock.patch.dict(os.environ):  # what Lightning and DeepSpeed set there for the run goes with it
        trainer(root, 4, strategy=strategy, devices=1).fit(
            module, DataLoader(global_batch((3, 8, 8)), batch_size=4), ckpt_path=checkpoint
        )
    return module


def through_check_readable(checkpoint: Path, pipeline: Path, root: Path, kind: str) -> None:
    checkpoints.check_readable(checkpoint, opt_in="--trust_pickled_checkpoint true")


def through_export(checkpoint: Path, pipeline: Path, root: Path, kind: str) -> None:
    export(write_run_config(pipeline, root, "full"), checkpoint, root / "exported")


def through_export_command(checkpoint: Path, pipeline: Path, root: Path, kind: str) -> None:
    config = write_run_config(pipeline, root, "full")
    export_main(["--config", str(config), "--checkpoint", str(checkpoint), "--out", str(root / "exported")])


def through_strategy(checkpoint: Path, pipeline: Path, root: Path, kind: str) -> None:
    fit_from(pipeline, checkpoint, root, one_process_strategy(kind))


ENTRY_POINTS = {  # each reads a checkpoint, and names its own opt-in when it refuses one
    "check_readable": (through_check_readable, "--trust_pickled_checkpoint true"),
    "export": (through_export, "trust_pickle=True"),
    "export_command": (through_export_command, "--trust-pickled-checkpoint"),
    "strategy_fit": (through_strategy, STRATEGY_OPT_IN),
}


@pytest.mark.parametrize("case", CORPUS, ids=str)
@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_a_hostile_checkpoint_is_refused_in_one_line_and_runs_nothing(genuine, pipeline, tmp_path, entry_point, case):
    marker = tmp_path / "payload_ran"
    checkpoint = craft(genuine[case.kind][0], case, tmp_path / "crafted", marker)
    read, opt_in = ENTRY_POINTS[entry_point]
    with pytest.raises(UserError) as refusal:
        read(checkpoint, pipeline, tmp_path, case.kind)
    message = str(refusal.value)
    assert "\n" not in message
    assert str(checkpoint / case.names) in message and case.says in message
    if case.damage.startswith("payload"):
        assert opt_in in message
    assert "weights_only=False" not in message
    assert not marker.exists()


@pytest.mark.parametrize("kind", RUNS)
def test_genuine_checkpoints_pass_and_export_the_weights_training_ended_with(genuine, pipeline, tmp_path, kind):
    checkpoint, final = genuine[kind]
    checkpoints.check_readable(checkpoint)
    export_main(
        [
            "--config",
            str(write_run_config(pipeline, tmp_path, "full")),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "exported"),
        ]
    )
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "exported" / "unet")
    assert unet.state_dict().keys() == final.keys()
    for key, value in unet.state_dict().items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=0)


def test_a_genuine_fsdp2_checkpoint_of_two_processes_resumes_on_one_through_the_strategy(genuine, pipeline, tmp_path):
    checkpoint, final = genuine["fsdp2"]
    module = fit_from(pipeline, checkpoint, tmp_path, one_process_strategy("fsdp2"))
    for key, value in module.denoiser.state_dict().items():
        torch.testing.assert_close(value.full_tensor(), final[key], rtol=0, atol=0)


def test_lightnings_own_strategies_load_a_single_file_weights_only(genuine, pipeline, tmp_path):
    marker = tmp_path / "payload_ran"
    checkpoint = craft(genuine["file"][0], FILE_PAYLOAD, tmp_path / "crafted", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer(tmp_path, 4).fit(
            diffusion_dpo(pipeline), DataLoader(global_batch((3, 8, 8)), batch_size=4), ckpt_path=checkpoint
        )
    assert not marker.exists()


@pytest.mark.parametrize("case", [FILE_PAYLOAD, ZERO2_PAYLOAD, METADATA_PAYLOAD], ids=str)
def test_the_opt_in_restores_unrestricted_loading(genuine, pipeline, tmp_path, case):
    """The payloads are live: trusted, each runs (and the genuine content around it still exports)."""
    marker = tmp_path / "payload_ran"
    checkpoint = craft(genuine[case.kind][0], case, tmp_path / "crafted", marker)
    export(write_run_config(pipeline, tmp_path, "full"), checkpoint, tmp_path / "exported", trust_pickle=True)
    assert marker.exists()


def test_a_trusting_strategy_loads_unrestricted(genuine, pipeline, tmp_path):
    marker = tmp_path / "payload_ran"
    checkpoint = craft(genuine["fsdp2"][0], METADATA_PAYLOAD, tmp_path / "crafted", marker)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1, trust_pickled_checkpoint=True)
    fit_from(pipeline, checkpoint, tmp_path, strategy)
    assert marker.exists()


def test_the_libraries_own_loads_are_plain_data_inside_restricted_loading(genuine, tmp_path):
    """Even where no check ran first (a file replaced after it), DeepSpeed's and torch.distributed.checkpoint's
    own loaders refuse a payload inside ``restricted_loading``, and only there."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as load_distributed

    marker = tmp_path / "payload_ran"
    zero2 = craft(genuine["zero2"][0], ZERO2_PAYLOAD, tmp_path / "zero2", marker)
    metadata = craft(genuine["fsdp2"][0], METADATA_PAYLOAD, tmp_path / "metadata", marker)
    item = craft(genuine["fsdp2"][0], ITEM_PAYLOAD, tmp_path / "item", marker)
    item_key = next(
        key
        for key, stored in checkpoints.read_metadata(item / ".metadata").storage_data.items()
        if stored.relative_path == "__9_0.distcp"
    ).fqn
    with checkpoints.restricted_loading(zero2), pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        get_fp32_state_dict_from_zero_checkpoint(str(zero2))
    with checkpoints.restricted_loading(metadata), pytest.raises(CheckpointError, match=REFUSED):
        FileSystemReader(metadata).read_metadata()
    with checkpoints.restricted_loading(item), pytest.raises(CheckpointException, match="Weights only load failed"):
        load_distributed({item_key: 0.0}, storage_reader=FileSystemReader(item), no_dist=True)
    assert not marker.exists()
    get_fp32_state_dict_from_zero_checkpoint(str(zero2))  # outside: DeepSpeed's weights_only=False load runs it
    assert marker.exists()


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'last.ckpt'} does not exist: expected a .ckpt file"):
        checkpoints.check_readable(tmp_path / "last.ckpt")


@pytest.mark.parametrize("case", [FILE_PAYLOAD, ZERO2_PAYLOAD, METADATA_PAYLOAD], ids=str)
def test_the_command_line_refuses_a_crafted_checkpoint_before_the_run(
    genuine, tiny_sd, tiny_shards, tmp_path, capsys, case
):
    from lightning_pref.cli import main

    marker = tmp_path / "marker"
    checkpoint = craft(genuine[case.kind][0], case, tmp_path / "hostile", marker)
    config = str(write_config(tiny_config(tiny_sd, tiny_shards, tmp_path), tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--ckpt_path", str(checkpoint)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--trust_pickled_checkpoint true" in err
    assert not marker.exists()
