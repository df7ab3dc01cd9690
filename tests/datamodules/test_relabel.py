"""Relabelling pair shards with a scorer: flips match the scorer, a second pass flips nothing, every field
survives, ties follow the option, corrupt samples are counted, the command line writes the same."""

import io
import json

import numpy as np
import pytest
import torch
from helpers.shards import append_members, read_samples
from PIL import Image

from lightning_pref.cli import main as cli_main
from lightning_pref.datamodules import PreferenceDataModule
from lightning_pref.datamodules.shards import write_preference_shards
from lightning_pref.errors import ConfigError, DataError
from lightning_pref.evaluation import ScorerSpec
from lightning_pref.relabel import REPORT_NAME, relabel_shards
from lightning_pref.rewards import WarmthReward
from lightning_pref.toy.preferences import ToyPreferenceReward
from lightning_pref.toy.world import COLORS, SHAPES, render

WARMTH = ScorerSpec("lightning_pref.rewards.toy.WarmthReward")
PAIRS = 12


def toy_pairs(count=PAIRS, seed=0):
    """Rendered pairs of random colours (so the stored order is random for warmth); the last pair's two
    images are identical (an exact tie)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for index in range(count):
        shape = SHAPES[index % len(SHAPES)]
        winner, loser = (render(shape, str(rng.choice(list(COLORS))), "gray", rng) for _ in range(2))
        if index == count - 1:
            loser = winner
        pairs.append(
            {
                "winner": winner,
                "loser": loser,
                "caption": f"a {shape}",
                "user_id": index,
                "source_row": f"row-{index}",
                "label_flipped": index % 3 == 0,
            }
        )
    return pairs


def decode(data):
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1).float() / 255


def direct_scores(reward, samples):
    """``(N, 2)``: the reward of each stored sample's winner and loser, computed here from the file bytes."""
    winners = torch.stack([decode(sample["winner.png"]) for sample in samples])
    losers = torch.stack([decode(sample["loser.png"]) for sample in samples])
    prompts = [json.loads(sample["json"])["caption"] for sample in samples]
    return torch.stack([reward.score(winners, prompts), reward.score(losers, prompts)], dim=1)


@pytest.fixture
def source(tmp_path):
    write_preference_shards(toy_pairs(), tmp_path / "source", samples_per_shard=5)
    return tmp_path / "source"


def test_flips_are_the_pairs_the_scorer_orders_the_other_way(source, tmp_path):
    before = read_samples(source)
    expected = direct_scores(WarmthReward(), before)
    report = relabel_shards(str(source), tmp_path / "out", WARMTH, batch_size=4)
    flips = expected[:, 1] > expected[:, 0]
    assert 0 < int(flips.sum()) < PAIRS  # the data tests both branches
    ties = int((expected[:, 0] == expected[:, 1]).sum())
    assert ties >= 1
    assert report["counts"] == {
        "read": PAIRS,
        "kept": PAIRS,
        "flipped": int(flips.sum()),
        "ties": ties,
        "ties_dropped": 0,
        "corrupt": 0,
    }
    assert report["flip_fraction"] == int(flips.sum()) / PAIRS
    assert report["scorer"]["class_path"] == WARMTH.class_path and report["scorer"]["init_args"] == {}
    assert json.loads((tmp_path / "out" / REPORT_NAME).read_text()) == report

    after = read_samples(tmp_path / "out")
    for sample, scores, flipped in zip(after, expected.tolist(), flips.tolist()):
        metadata = json.loads(sample["json"])
        assert metadata["relabel_flipped"] == flipped
        # float32 scores of the same pixels, stored as float64 in the json: equal to a float32's rounding
        stored = torch.tensor([metadata["score_winner"], metadata["score_loser"]])
        assert torch.allclose(stored, torch.tensor(scores[::-1] if flipped else scores), rtol=0, atol=1e-6)
        assert metadata["score_winner"] >= metadata["score_loser"]


def test_relabelling_the_relabelled_shards_flips_nothing(source, tmp_path):
    relabel_shards(str(source), tmp_path / "once", WARMTH, batch_size=5)
    report = relabel_shards(str(tmp_path / "once"), tmp_path / "twice", WARMTH, batch_size=3)
    assert report["counts"]["flipped"] == 0 and report["counts"]["kept"] == PAIRS
    once, twice = read_samples(tmp_path / "once"), read_samples(tmp_path / "twice")
    assert [sample["winner.png"] for sample in once] == [sample["winner.png"] for sample in twice]


def test_every_field_is_kept_and_a_flip_exchanges_the_files(source, tmp_path):
    first = read_samples(source)
    embedding = io.BytesIO()
    np.save(embedding, np.ones((2, 3), dtype=np.float32), allow_pickle=False)
    extra = embedding.getvalue()
    members = {
        "winner.png": first[0]["winner.png"],
        "loser.png": first[1]["winner.png"],
        "user_embedding.npy": extra,
        "notes.txt": b"any other member",
    }
    append_members(
        sorted(source.glob("*.tar"))[0],
        [(f"extra.{name}", data) for name, data in members.items()] + [("extra.json", b'{"caption": "a circle"}')],
    )
    before = read_samples(source)
    relabel_shards(str(source), tmp_path / "out", WARMTH)
    after = read_samples(tmp_path / "out")
    assert sorted(path.name for path in (tmp_path / "out").glob("*.tar")) == sorted(
        p.name for p in source.glob("*.tar")
    )
    assert len(after) == len(before)
    for old, new in zip(before, after):
        new_metadata, old_metadata = json.loads(new["json"]), json.loads(old["json"])
        flipped = new_metadata["relabel_flipped"]
        assert (new["winner.png"], new["loser.png"]) == (
            (old["loser.png"], old["winner.png"]) if flipped else (old["winner.png"], old["loser.png"])
        )
        assert {name: value for name, value in new.items() if name not in ("winner.png", "loser.png", "json")} == {
            name: value for name, value in old.items() if name not in ("winner.png", "loser.png", "json")
        }
        added = {"score_winner", "score_loser", "relabel_flipped", "label_flipped"}
        assert {k: v for k, v in new_metadata.items() if k not in added} == {
            k: v for k, v in old_metadata.items() if k not in added
        }
        assert new_metadata["label_flipped"] == (old_metadata.get("label_flipped", False) != flipped)
    assert [sample.get("user_embedding.npy") for sample in after].count(extra) == 1
    assert [sample.get("notes.txt") for sample in after].count(b"any other member") == 1


def test_the_datamodule_reads_the_relabelled_order(source, tmp_path):
    relabel_shards(str(source), tmp_path / "out", WARMTH)
    data = PreferenceDataModule(str(tmp_path / "out"), val_shards=str(tmp_path / "out"), batch_size=64, num_workers=0)
    batch = next(iter(data.val_dataloader()))
    rewards_w = WarmthReward().score((batch["pixels_w"] + 1) / 2, batch["prompt"])
    rewards_l = WarmthReward().score((batch["pixels_l"] + 1) / 2, batch["prompt"])
    assert bool((rewards_w >= rewards_l).all()) and data.skipped_samples == 0
    metadata = [json.loads(sample["json"]) for sample in read_samples(tmp_path / "out")]
    assert batch["label_flipped"].tolist() == [m["label_flipped"] for m in metadata]


def test_relabelling_with_the_labelling_reward_clears_label_flipped(tmp_path):
    pairs = toy_pairs()
    for pair in pairs:  # stored flipped exactly where the order disagrees with warmth: noisy labels
        images = torch.from_numpy(np.stack([pair["winner"], pair["loser"]])).permute(0, 3, 1, 2).float() / 255
        warmth = WarmthReward().score(images, [pair["caption"]] * 2)
        pair["label_flipped"] = bool(warmth[1] > warmth[0])
    assert 0 < sum(pair["label_flipped"] for pair in pairs) < PAIRS
    write_preference_shards(pairs, tmp_path / "noisy")
    relabel_shards(str(tmp_path / "noisy"), tmp_path / "clean", WARMTH)
    metadata = [json.loads(sample["json"]) for sample in read_samples(tmp_path / "clean")]
    assert [m["relabel_flipped"] for m in metadata] == [pair["label_flipped"] for pair in pairs]
    assert not any(m["label_flipped"] for m in metadata)


@pytest.mark.parametrize("ties", ["keep", "drop"])
def test_pairs_within_the_tie_margin_keep_their_order_or_are_dropped(source, tmp_path, ties):
    expected = direct_scores(WarmthReward(), read_samples(source))
    gaps = (expected[:, 0] - expected[:, 1]).abs().sort().values.tolist()
    margin = (gaps[PAIRS // 2] + gaps[PAIRS // 2 + 1]) / 2  # halfway between two gaps: no pair sits on the margin
    within = (expected[:, 0] - expected[:, 1]).abs() <= margin
    report = relabel_shards(str(source), tmp_path / "out", WARMTH, tie_margin=margin, ties=ties)
    flips = (expected[:, 1] > expected[:, 0]) & ~within
    counts = report["counts"]
    assert counts["ties"] == int(within.sum()) and counts["flipped"] == int(flips.sum())
    assert counts["ties_dropped"] == (int(within.sum()) if ties == "drop" else 0)
    assert counts["kept"] == PAIRS - counts["ties_dropped"]
    assert len(read_samples(tmp_path / "out")) == counts["kept"]


def test_corrupt_samples_are_counted_not_fatal(source, tmp_path):
    shard = sorted(source.glob("*.tar"))[0]
    append_members(
        shard,
        [
            ("bad-1.winner.png", b"not an image"),
            ("bad-1.loser.png", b"nor this"),
            ("bad-1.json", b'{"caption": "a circle"}'),
            ("bad-2.winner.png", read_samples(source)[0]["winner.png"]),
            ("bad-2.json", b'{"caption": "a circle"}'),
        ],
    )
    report = relabel_shards(str(source), tmp_path / "out", WARMTH)
    assert report["counts"]["corrupt"] == 2 and report["counts"]["read"] == PAIRS + 2
    assert report["counts"]["kept"] == PAIRS and len(read_samples(tmp_path / "out")) == PAIRS


def test_nothing_usable_is_one_error_and_bad_options_are_refused(source, tmp_path):
    with pytest.raises(DataError, match="no pair"):
        relabel_shards(str(source), tmp_path / "all-ties", WARMTH, tie_margin=2.0, ties="drop")
    with pytest.raises(ConfigError, match="already holds shards"):
        relabel_shards(str(source), source, WARMTH)
    with pytest.raises(ConfigError, match="ties="):
        relabel_shards(str(source), tmp_path / "x", WARMTH, ties="coin_flip")
    for margin in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="tie_margin="):
            relabel_shards(str(source), tmp_path / "x", WARMTH, tie_margin=margin)
    with pytest.raises(ConfigError, match="--scorer"):
        relabel_shards(str(source), tmp_path / "x", ScorerSpec("lightning_pref.rewards.toy.NoSuchReward"))
    assert not (tmp_path / "x").exists()


def test_the_command_line_relabels_with_a_scorer_and_its_init_args(source, tmp_path, capsys):
    scorer = 'lightning_pref.toy.preferences.ToyPreferenceReward={"preference": "cool"}'
    cli_main(["data", "relabel", "--in", str(source), "--out", str(tmp_path / "out"), "--scorer", scorer])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = direct_scores(ToyPreferenceReward("cool"), read_samples(source))
    assert printed["flipped"] == int((expected[:, 1] > expected[:, 0]).sum()) and printed["kept"] == PAIRS
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["scorer"]["init_args"] == {"preference": "cool"} and report["counts"]["flipped"] == printed["flipped"]
    with pytest.raises(SystemExit) as exit_info:  # a second run into the same directory: one error line
        cli_main(["data", "relabel", "--in", str(source), "--out", str(tmp_path / "out"), "--scorer", scorer])
    assert exit_info.value.code == 2 and "already holds shards" in capsys.readouterr().err
