"""RandomCheckpointReplay: the bounded pool, uniform draws, the installed reference, resume, refusals, 2 processes."""

import json
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from helpers.pairs import random_pairs
from helpers.processes import SCRIPTS, finish, script_env
from helpers.training import trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.callbacks.replay import RandomCheckpointReplay
from lightning_pref.checkpoints import check_readable
from lightning_pref.errors import ConfigError
from lightning_pref.methods import DiffusionDPO, MaPO
from lightning_pref.reference import FrozenCopy

SEED = 3


def reference_weights(module, names):
    """The weights the module's reference holds, under the snapshot's names."""
    if isinstance(module.reference, FrozenCopy):
        state = module.reference.copy.state_dict()
        return {name: state[name] for name in names}
    params = dict(module.denoiser.named_parameters())
    return {name: params[name.replace(".default.", ".reference.")] for name in names}


class Probe(pl.Callback):
    """After the replay callback (it comes later in the list): per step, the draw and whether the reference holds
    exactly the drawn snapshot; the pool when the fit starts training."""

    def __init__(self, replay):
        self.replay, self.draws, self.exact = replay, {}, []

    def on_train_start(self, trainer, module):
        self.pool_at_start = ([dict(s) for s in self.replay.snapshots], list(self.replay.snapshot_steps))

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        replay = self.replay
        self.draws[trainer.global_step] = (replay.drawn_index, len(replay.snapshots))
        drawn = replay.snapshots[replay.drawn_index]
        held = reference_weights(module, drawn)
        self.exact.append(all(torch.equal(held[name], value) for name, value in drawn.items()))


def fit(tmp_path, pipeline, finetune, steps, replay, ckpt_path=None, **options):
    module = DiffusionDPO(StableDiffusionBackbone(str(pipeline)), finetune=finetune, lr=1e-2, seed=SEED)
    probe = Probe(replay)
    loader = DataLoader(random_pairs(6), batch_size=2)  # 3 steps per epoch
    trainer(tmp_path, steps, callbacks=[replay, probe, *options.pop("callbacks", [])], **options).fit(
        module, loader, ckpt_path=ckpt_path
    )
    return module, probe


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"pool_size": 0}, "pool_size"),
        ({"draw_every_n_steps": 1.5}, "draw_every_n_steps"),
        ({"when_full": "grow"}, "when_full"),
    ],
)
def test_bad_options_are_refused_naming_the_key(options, key):
    with pytest.raises(ConfigError, match=key):
        RandomCheckpointReplay(**options)


def test_draws_are_uniform_over_the_pool():
    # 7000 stages over a pool of 7: Pearson's chi-square against 1000 per snapshot stays below the 0.999 quantile
    # of chi-square with 6 degrees of freedom (22.458, from tables). The draws are a function of (seed, stage),
    # so the test cannot flake; a biased draw (say, never the last snapshot) gives a statistic in the thousands.
    counts = torch.zeros(7)
    for stage in range(7000):
        counts[RandomCheckpointReplay.draw_index(SEED, stage, 7)] += 1
    statistic = ((counts - 1000) ** 2 / 1000).sum().item()
    assert statistic < 22.458, counts
    # every index of a smaller pool is reachable, and another seed draws another sequence
    assert {RandomCheckpointReplay.draw_index(SEED, stage, 2) for stage in range(50)} == {0, 1}
    first = [RandomCheckpointReplay.draw_index(SEED, stage, 7) for stage in range(20)]
    assert first != [RandomCheckpointReplay.draw_index(SEED + 1, stage, 7) for stage in range(20)]


@pytest.mark.parametrize(
    ("finetune", "when_full", "expected_steps"), [("lora", "stop", [0, 1, 2]), ("full", "replace_oldest", [0, 5, 6])]
)
def test_the_pool_is_bounded_and_the_reference_is_the_drawn_snapshot_bit_for_bit(
    tiny_sd, tmp_path, finetune, when_full, expected_steps
):
    replay = RandomCheckpointReplay(every_n_steps=1, pool_size=3, when_full=when_full)
    module, probe = fit(tmp_path, tiny_sd, finetune, 6, replay)
    assert replay.snapshot_steps == expected_steps and len(replay.snapshots) == 3
    assert all(probe.exact) and len(probe.exact) == 6  # at every step, the reference held the draw exactly
    # each step's draw is the seeded uniform draw over the pool as it was then (1, 2, 3, 3, 3, 3 snapshots)
    assert probe.draws == {
        step: (RandomCheckpointReplay.draw_index(SEED, step, min(step + 1, 3)), min(step + 1, 3)) for step in range(6)
    }
    # the snapshots are the trained weights of their step: they differ, and one taken at the last step is the policy
    first, last = replay.snapshots[0], replay.snapshots[-1]
    assert any(not torch.equal(first[name], last[name]) for name in first)
    policy = module.trained_weights()
    assert all(torch.equal(value, policy[name]) for name, value in last.items()) == (expected_steps[-1] == 6)


def test_a_resumed_run_restores_the_pool_and_draws_what_the_uninterrupted_run_draws(tiny_sd, tmp_path):
    def replay():  # two stages of 2 steps; a snapshot every 2 steps
        return RandomCheckpointReplay(every_n_steps=2, pool_size=4, draw_every_n_steps=2)

    whole_replay = replay()
    _, whole = fit(tmp_path / "whole", tiny_sd, "lora", 6, whole_replay)

    checkpoints = ModelCheckpoint(tmp_path / "checkpoints", save_top_k=-1, every_n_train_steps=3)
    first_replay = replay()
    fit(tmp_path / "first", tiny_sd, "lora", 3, first_replay, callbacks=[checkpoints], enable_checkpointing=True)
    path = tmp_path / "checkpoints" / "epoch=0-step=3.ckpt"
    check_readable(path)  # the project's plain-data check passes...
    state = torch.load(path, weights_only=True)["callbacks"]  # ...and the state loads without pickled objects
    assert any(key.startswith("RandomCheckpointReplay") for key in state)

    resumed_replay = replay()
    _, resumed = fit(tmp_path / "resumed", tiny_sd, "lora", 6, resumed_replay, ckpt_path=path)
    snapshots, steps = resumed.pool_at_start
    assert steps == [0, 2] and steps == first_replay.snapshot_steps
    assert all(
        torch.equal(value, first_replay.snapshots[i][name])
        for i, snap in enumerate(snapshots)
        for name, value in snap.items()
    )
    # step 3 is mid-stage: the stage's draw is reinstalled; steps 4 and 5 draw anew, as the whole run did
    assert resumed.draws == {step: whole.draws[step] for step in (3, 4, 5)} and all(resumed.exact)
    assert resumed_replay.snapshot_steps == whole_replay.snapshot_steps == [0, 2, 4, 6]
    for mine, theirs in zip(resumed_replay.snapshots, whole_replay.snapshots):
        assert all(torch.equal(mine[name], theirs[name]) for name in theirs)


def test_methods_without_a_reference_and_partitioned_weights_are_refused_at_fit_start(tiny_sd, tmp_path):
    loader = DataLoader(random_pairs(2), batch_size=2)
    with pytest.raises(ConfigError, match="reference-free"):
        trainer(tmp_path, 1, callbacks=[RandomCheckpointReplay()]).fit(
            MaPO(StableDiffusionBackbone(str(tiny_sd))), loader
        )
    module = DiffusionDPO(StableDiffusionBackbone(str(tiny_sd)), finetune="full")
    next(p for p in module.parameters() if p.requires_grad).ds_id = 0  # how ZeRO-3 marks a partitioned parameter
    with pytest.raises(ConfigError, match="ZeRO-3 or FSDP2"):
        RandomCheckpointReplay().on_fit_start(trainer(tmp_path, 1), module)


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_two_processes_draw_the_same_snapshot_and_hold_the_same_reference(tiny_sd, tmp_path, strategy):
    command = [sys.executable, str(SCRIPTS / "replay_fit.py"), str(tiny_sd), str(tmp_path), "--strategy", strategy]
    launch = subprocess.Popen(
        command, env=script_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    output = finish(launch)
    assert launch.returncode == 0, output[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0] == ranks[1]  # the same draws and pool steps on both ranks, without communication
    assert ranks[0]["snapshot_steps"] == [0, 2, 4] and ranks[0]["exact"] == [True] * 5
    seed = ranks[0]["seed"]
    assert ranks[0]["draws"] == [
        RandomCheckpointReplay.draw_index(seed, step, min(step // 2 + 1, 3)) for step in range(5)
    ]
    references = [load_file(tmp_path / f"reference{rank}.safetensors") for rank in range(2)]
    assert references[0].keys() == references[1].keys()
    assert all(torch.equal(references[0][name], references[1][name]) for name in references[0])
