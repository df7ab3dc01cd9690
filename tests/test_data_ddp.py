"""Two DDP processes (gloo, CPU) with two dataloader workers each: distinct samples, equal batch counts."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from lightning_pref.datamodules import write_preference_shards
from lightning_pref.seeding import unit_hash


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ranks_get_disjoint_samples_and_the_same_number_of_batches(tmp_path):
    pixel = np.zeros((8, 8, 3), np.uint8)
    for index, size in enumerate([2, 9, 3, 7, 1, 6, 4, 8]):  # uneven shards: ranks hold unequal amounts of data
        write_preference_shards(
            [{"winner": pixel, "loser": pixel, "caption": "x"}] * size, tmp_path / "shards", prefix=f"s{index}"
        )
    script = Path(__file__).with_name("ddp_record_batches.py")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "shards"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
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
