"""Rewards: score images against prompts (higher is better) behind one interface, ``RewardModel``."""

from lightning_pref.rewards.base import RewardModel, WeightedSumReward, check_reward_inputs
from lightning_pref.rewards.clip import AestheticReward, CLIPScoreReward, PickScoreReward
from lightning_pref.rewards.external import HPSv2Reward, ImageRewardReward
from lightning_pref.rewards.learned import LearnedReward
from lightning_pref.rewards.toy import ColorAgreementReward, ShapeAgreementReward, WarmthReward
from lightning_pref.rewards.video import FrameAveragedReward

__all__ = [
    "AestheticReward",
    "CLIPScoreReward",
    "ColorAgreementReward",
    "FrameAveragedReward",
    "HPSv2Reward",
    "ImageRewardReward",
    "LearnedReward",
    "PickScoreReward",
    "RewardModel",
    "ShapeAgreementReward",
    "WarmthReward",
    "WeightedSumReward",
    "check_reward_inputs",
]
