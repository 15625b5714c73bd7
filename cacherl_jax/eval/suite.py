"""Evaluation of a checkpoint on task suites with environments: success, process accuracy,
reward, calls, format.

The same CacheAgentLoop that trains runs the evaluation, greedy by default. Tools run live when
the loop is in live mode (the honest setting for a final number: success is then judged on the
real final state) or from the cache otherwise (cheap, for learning curves). Scoring itself
(`evaluate`, `score_rollouts`, `TaskResult`) lives in `cacherl_jax.rl.scoring`, where the
trainers validate with it; it is re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cacherl_jax.agent.environment import Task
from cacherl_jax.agent.loop import CacheAgentLoop
from cacherl_jax.rl.rewards import RewardConfig
from cacherl_jax.rl.scoring import TaskResult, evaluate, score_rollouts, summarize_results

__all__ = ["TaskResult", "evaluate", "evaluate_checkpoint", "score_rollouts", "summarize_results"]


def evaluate_checkpoint(
    checkpoint: str,
    tasks: Sequence[Task],
    *,
    tokenizer_spec: str = "",
    reward_config: RewardConfig | None = None,
    loop_config: Any = None,
    cache: Any = None,
    seed: int = 0,
) -> tuple[dict[str, float], list[TaskResult]]:
    """Loads an HF checkpoint (and its tokenizer) and evaluates it greedily with live tools."""
    from cacherl_jax.agent.loop import LoopConfig
    from cacherl_jax.chat.template_check import load_checked_tokenizer
    from cacherl_jax.model import load_hf_checkpoint
    from cacherl_jax.sampling import Sampler

    tokenizer = load_checked_tokenizer(tokenizer_spec, checkpoint)
    config, params = load_hf_checkpoint(checkpoint)
    loop_config = loop_config or LoopConfig(group_size=1, mode="live", temperature=0.0)
    loop = CacheAgentLoop(Sampler(params, config), tokenizer, cache, loop_config)
    return evaluate(loop, tasks, reward_config or RewardConfig(), seed=seed)
