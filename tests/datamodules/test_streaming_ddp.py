"""Two DDP processes (gloo, CPU) with two dataloader workers each: distinct samples, equal batch counts."""

import json
import subprocess
import sys

import numpy as np
from helpers.processes import SCRIPTS, script_env

from lightning_pref.datamodules import write_preference_shards
from lightning_pref.seeding import unit_hash


def test_ranks_get_disjoint_samples_and_the_same_number_of_batches(tmp_path):
    pixel = np.zeros((8, 8, 3), np.uint8)
    for index, size in enumerate([2, 9, 3, 7, 1, 6, 4, 8]):  # uneven shards: ranks hold unequal amounts of data
        write_preference_shards(
            [{"winner": pixel, "loser": pixel, "caption": "x"}] * size, tmp_path / "shards", prefix=f"s{index}"
        )
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "ddp_record_batches.py"), str(tmp_path / "shards"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=script_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["batches"] for rank in ranks] == [10, 10]  # 5 per epoch, 2 epochs, on both ranks
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])
    # 4 consumers (2 ranks x 2 workers): consumer c reads shards[c::4]; rank 0 holds consumers 0 and 1
    assert {key.split("-")[0] for key in ranks[0]["keys"]} <= {"s0", "s1", "s4", "s5"}
    assert {key.split("-")[0] for key in ranks[1]["keys"]} <= {"s2", "s3", "s6", "s7"}
    assert len(set(ranks[0]["keys"]) | set(ranks[1]["keys"])) > 12  # 40 draws with replacement from 40 pairs
    for rank in ranks:  # label flips depend on (seed, key) alone: every rank and epoch agrees
        assert all(flipped == (unit_hash("label-noise", 3, key) < 0.3) for key, flipped in rank["flips"].items())
        assert rank["skipped"] == 0
