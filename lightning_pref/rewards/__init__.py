"""Rewards: score images against prompts (higher is better) behind one interface, ``RewardModel``."""

from lightning_pref.rewards.base import RewardModel, WeightedSumReward, check_reward_inputs
from lightning_pref.rewards.toy import ColorAgreementReward, ShapeAgreementReward, WarmthReward

__all__ = [
    "ColorAgreementReward",
    "RewardModel",
    "ShapeAgreementReward",
    "WarmthReward",
    "WeightedSumReward",
    "check_reward_inputs",
]
