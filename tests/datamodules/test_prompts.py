"""PromptDataModule: prompts from a file or a list, shuffled per pass, split across ranks, resumable."""

import lightning.pytorch as pl
import pytest
import torch
from helpers.training import trainer

from lightning_pref.datamodules.prompts import PromptDataModule, PromptLoader
from lightning_pref.errors import ConfigError, DataError, MissingFileError

PROMPTS = [f"prompt {i}" for i in range(10)]


def batches(loader):
    return [batch["prompt"] for batch in loader]


def test_prompts_come_from_a_file_one_per_line_with_keys_naming_their_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cat\n\n  a blue dog  \na square\n")
    data = PromptDataModule(str(path), batch_size=3, batches_per_epoch=1)
    (batch,) = list(data.train_dataloader())
    assert sorted(zip(batch["key"], batch["prompt"])) == [
        ("prompt-000000", "a red cat"),
        ("prompt-000001", "a blue dog"),
        ("prompt-000002", "a square"),
    ]


def test_bad_prompt_sources_get_one_line_naming_the_file_and_the_fix(tmp_path):
    with pytest.raises(MissingFileError, match="prompts file '.*missing.txt' does not exist: check the path"):
        PromptDataModule(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="prompts file '.*empty.txt' holds no prompt: write one prompt per line"):
        PromptDataModule(str(tmp_path / "empty.txt"))
    with pytest.raises(ConfigError, match="non-empty list of strings"):
        PromptDataModule([])
    with pytest.raises(ConfigError, match="batch_size=0"):
        PromptDataModule(PROMPTS, batch_size=0)


def test_every_pass_is_a_seeded_permutation_of_the_prompts():
    order = sum(batches(PromptLoader(PROMPTS, 5, 6, seed=0, rank=0, world=1)), [])  # three passes of ten
    passes = [order[i : i + 10] for i in range(0, 30, 10)]
    assert all(sorted(one) == sorted(PROMPTS) for one in passes)
    assert passes[0] != passes[1] and passes[0] != PROMPTS
    assert order == sum(batches(PromptLoader(PROMPTS, 5, 6, seed=0, rank=0, world=1)), [])
    assert order != sum(batches(PromptLoader(PROMPTS, 5, 6, seed=1, rank=0, world=1)), [])


def test_ranks_get_equal_batch_counts_and_split_each_global_batch():
    one_rank = batches(PromptLoader(PROMPTS, 4, 6, seed=0, rank=0, world=1))
    rank_0, rank_1 = (batches(PromptLoader(PROMPTS, 2, 3, seed=0, rank=r, world=2)) for r in (0, 1))
    assert len(rank_0) == len(rank_1) == 3
    # Global batch g of two ranks holds the prompts one rank with twice the batch draws at its batch g.
    assert [a + b for a, b in zip(rank_0, rank_1)] == one_rank[:3]


def test_a_restored_loader_continues_with_the_batches_of_the_uninterrupted_run():
    loader = PromptLoader(PROMPTS, 3, 4, seed=0, rank=0, world=1)
    loader.counts_own_consumption = True
    uninterrupted = batches(loader) + batches(loader)  # two epochs
    for consumed in (3, 4, 6):
        interrupted = PromptLoader(PROMPTS, 3, 4, seed=0, rank=0, world=1)
        interrupted.consumed_batches = consumed
        resumed = PromptLoader(PROMPTS, 3, 4, seed=0, rank=0, world=1)
        resumed.load_state_dict(interrupted.state_dict())
        epoch_end = (consumed // 4 + 1) * 4
        assert batches(resumed) == uninterrupted[consumed:epoch_end]
    with pytest.raises(DataError, match="resume with the same prompts and number of devices"):
        PromptLoader(PROMPTS, 3, 4, seed=0, rank=0, world=2).load_state_dict(interrupted.state_dict())


class RecordPrompts(pl.LightningModule):
    """A one-parameter module that records the prompts of every batch it trains on."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["prompt"])
        return (self.weight - 1).square().sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_fit_resumed_from_its_checkpoint_trains_on_the_uninterrupted_runs_batches(tmp_path):
    uninterrupted = RecordPrompts()
    trainer(tmp_path / "a", 5).fit(uninterrupted, datamodule=PromptDataModule(PROMPTS, 3, 3))

    first = RecordPrompts()
    fit = trainer(tmp_path / "b", 2)
    fit.fit(first, datamodule=PromptDataModule(PROMPTS, 3, 3))
    fit.save_checkpoint(tmp_path / "two.ckpt")
    resumed = RecordPrompts()
    trainer(tmp_path / "c", 5).fit(resumed, datamodule=PromptDataModule(PROMPTS, 3, 3), ckpt_path=tmp_path / "two.ckpt")
    assert first.seen + resumed.seen == uninterrupted.seen
