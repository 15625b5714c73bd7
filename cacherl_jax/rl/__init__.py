"""Reinforcement learning: the GRPO objective, group advantages and (later) rewards."""

from cacherl_jax.rl.grpo import AGGREGATIONS, KL_ESTIMATORS, group_advantages, grpo_loss, kl_penalty

__all__ = ["AGGREGATIONS", "KL_ESTIMATORS", "group_advantages", "grpo_loss", "kl_penalty"]
