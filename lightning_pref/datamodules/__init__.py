"""DataModules streaming preference, video and unpaired data from webdataset shards, the prompts of online
training, SPIN-Diffusion's self-play pairs, and the shard writers."""

from lightning_pref.datamodules.preference import PickAPicDataModule, PreferenceDataModule
from lightning_pref.datamodules.prompts import PromptDataModule
from lightning_pref.datamodules.self_play import SelfPlayDataModule
from lightning_pref.datamodules.shards import write_preference_shards, write_unpaired_shards
from lightning_pref.datamodules.streaming import ShardDataModule
from lightning_pref.datamodules.unpaired import UnpairedDataModule
from lightning_pref.datamodules.users import UserPreferenceDataModule
from lightning_pref.datamodules.video import VideoPreferenceDataModule

__all__ = [
    "PickAPicDataModule",
    "PreferenceDataModule",
    "PromptDataModule",
    "SelfPlayDataModule",
    "ShardDataModule",
    "UnpairedDataModule",
    "UserPreferenceDataModule",
    "VideoPreferenceDataModule",
    "write_preference_shards",
    "write_unpaired_shards",
]
