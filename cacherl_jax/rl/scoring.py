"""Scoring rollouts on their tasks: reward, success, process accuracy, and their means.

The trainers validate with `evaluate` (the same CacheAgentLoop that trains, run over held-out
tasks) and score their training rollouts with `score_rollouts`; `cacherl_jax.eval` builds the
checkpoint evaluations and reports on top of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from cacherl_jax import parallel
from cacherl_jax.agent.environment import Task
from cacherl_jax.agent.loop import CacheAgentLoop, CallRecord, Rollout
from cacherl_jax.rl.rewards import (
    Reward,
    RewardConfig,
    environment_answer,
    process_accuracy,
    score_rollout,
    summarize,
)


@dataclasses.dataclass(frozen=True)
class MadeCall:
    """One call a rollout made, as the error taxonomy and the validation records read it."""

    name: str
    arguments: dict[str, Any] | None  # None when the call's JSON did not parse
    tier: str  # exact / fuzzy / best_effort from the cache; "live" when run live
    problems: tuple[str, ...] = ()  # kinds of the parse problems of the turn that made it

    @classmethod
    def from_record(cls, record: CallRecord) -> MadeCall:
        arguments = None if record.arguments is None else dict(record.arguments)
        return cls(record.name, arguments, record.tier, tuple(record.problems))


@dataclasses.dataclass
class TaskResult:
    """One rollout's score, with its calls and final answer (what the validation records keep).

    A plain dataclass of plain values: it pickles across processes (`allgather_objects`) and
    `to_dict()` is JSON-ready."""

    task_id: str
    sample: int
    reward: Reward
    success: bool
    process_accuracy: float
    calls: int
    stop_reason: str
    generated_tokens: int
    made_calls: tuple[MadeCall, ...] = ()
    final_answer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["reward"] = self.reward.to_dict()
        out["made_calls"] = [
            {**dataclasses.asdict(call), "problems": list(call.problems)}
            for call in self.made_calls
        ]
        return out


def score_rollouts(
    tasks: Sequence[Task], rollouts: Sequence[Rollout], reward_config: RewardConfig
) -> list[TaskResult]:
    """One result per rollout, in order; every rollout's task must be among `tasks`."""
    by_id = {task.id: task for task in tasks}
    results = []
    for rollout in rollouts:
        task = by_id[rollout.task_id]
        outcome = rollout.outcome()
        verdict = environment_answer(task, outcome)
        results.append(
            TaskResult(
                task_id=task.id,
                sample=rollout.sample,
                reward=score_rollout(task, outcome, reward_config),
                success=verdict is not None and verdict >= 1.0,
                process_accuracy=process_accuracy(task, outcome),
                calls=len(rollout.calls),
                stop_reason=rollout.stop_reason,
                generated_tokens=rollout.num_generated,
                made_calls=tuple(MadeCall.from_record(call) for call in rollout.calls),
                final_answer=rollout.final_answer,
            )
        )
    return results


def summarize_results(results: Sequence[TaskResult]) -> dict[str, float]:
    """Means over results: success rate, process accuracy, reward (and its parts), calls."""
    if not results:
        return {}
    out = {
        "success_rate": float(np.mean([r.success for r in results])),
        "process_accuracy": float(np.mean([r.process_accuracy for r in results])),
        "calls_per_task": float(np.mean([r.calls for r in results])),
        "format_errors": float(np.mean([r.reward.format < 1.0 for r in results])),
        "response_tokens": float(np.mean([r.generated_tokens for r in results])),
        "tasks": float(len({r.task_id for r in results})),
    }
    out.update(summarize([r.reward for r in results]))
    return out


def evaluate(
    loop: CacheAgentLoop,
    tasks: Sequence[Task],
    reward_config: RewardConfig,
    *,
    seed: int = 0,
    batch_tasks: int = 64,
) -> tuple[dict[str, float], list[TaskResult]]:
    """Runs the loop over the tasks (in batches of `batch_tasks` tasks) and scores every rollout.

    With several processes each runs its own contiguous block of the tasks; every process
    returns the results of all of them, in task order.
    """
    own = parallel.process_share(list(tasks), even=False)
    results: list[TaskResult] = []
    for start in range(0, len(own), batch_tasks):
        chunk = own[start : start + batch_tasks]
        results.extend(score_rollouts(chunk, loop.run(chunk, seed=seed), reward_config))
    results = [r for part in parallel.allgather_objects(results) for r in part]
    return summarize_results(results), results
