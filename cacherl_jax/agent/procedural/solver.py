"""The reference solver: runs a task kind's solution against a live environment and records the
full trajectory (assistant tool calls with short reasoning, tool results, final answer).

One call per assistant turn, because each call needs the previous result. The reasoning strings
are deliberately plain; the hybrid-thinking pipeline can replace them (`reasoning=False` leaves
them out).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
from collections.abc import Iterable
from typing import Any

from cacherl_jax.agent.environment import ReferenceCall, Task
from cacherl_jax.agent.procedural.domain import Solution, TaskKind
from cacherl_jax.agent.procedural.environment import ProceduralEnvironment, get_domain
from cacherl_jax.chat.trajectory import Trajectory, write_jsonl


@dataclasses.dataclass
class SolverRun:
    """What solving one task produced."""

    calls: list[ReferenceCall]
    messages: list[dict[str, Any]]  # the assistant and tool messages after the request
    solution: Solution
    final_state: dict[str, Any]


class ReferenceCallFailed(RuntimeError):
    """The reference solution made a call that failed: a bug in a task kind, never the model's."""


def run_solver(
    task: Task, kind: TaskKind, values: dict[str, Any], *, reasoning: bool = True
) -> SolverRun:
    """Solves `task` (whose world is `task.initial_state`) with `kind.solve` in a fresh environment."""
    environment = ProceduralEnvironment()
    environment.reset(task)
    calls: list[ReferenceCall] = []
    messages: list[dict[str, Any]] = []

    def call(name: str, arguments: dict[str, Any], why: str) -> dict[str, Any]:
        result = environment.execute(name, arguments)
        if not result.ok:
            raise ReferenceCallFailed(
                f"task {task.id!r} ({kind.name}): {name}({arguments}) -> {result.text}"
            )
        reference = ReferenceCall(name, copy.deepcopy(arguments))
        calls.append(reference)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "",
            "tool_calls": [reference.to_openai()],
        }
        if reasoning:
            message["reasoning_content"] = why
        messages.extend([message, {"role": "tool", "name": name, "content": result.text}])
        return json.loads(result.text)

    solution = kind.solve(values, call)
    final: dict[str, Any] = {"role": "assistant", "content": solution.answer}
    if reasoning:
        final["reasoning_content"] = solution.reasoning
    messages.append(final)
    return SolverRun(calls, messages, solution, environment.final_state())


def task_kind(task: Task) -> TaskKind:
    """The task kind a procedural task was generated from (`metadata["kind"]`)."""
    name = task.metadata.get("kind")
    domain = get_domain(task.environment.get("domain", ""))
    for kind in domain.kinds:
        if kind.name == name:
            return kind
    raise ValueError(f"task {task.id!r}: unknown task kind {name!r} in domain {domain.name!r}")


def reference_trajectory(task: Task, *, reasoning: bool = True) -> Trajectory:
    """The full reference conversation of a procedural task, with the task in its metadata."""
    run = run_solver(task, task_kind(task), task.metadata["values"], reasoning=reasoning)
    return _trajectory(task, run.messages)


def _trajectory(task: Task, messages: list[dict[str, Any]], **metadata: Any) -> Trajectory:
    """The task's request followed by `messages`, with the task in the metadata."""
    return Trajectory(
        id=task.id,
        messages=copy.deepcopy(task.messages) + messages,
        tools=copy.deepcopy(task.tools),
        metadata={
            "source": "procedural",
            "split": task.split,
            "kind": task.metadata["kind"],
            "task": task.to_dict(),
            **metadata,
        },
    )


# What a weak teacher writes instead of acting: a plan, with no call and no result. The reward's
# process score treats it as a meta answer (`cacherl_jax.rl.rewards.is_meta_answer`).
PLAN_ONLY_ANSWER = "I will use the tools to look that up."


def plan_only_trajectory(task: Task, *, reasoning: bool = True) -> Trajectory:
    """A flawed trajectory of `task`: the assistant answers with a plan instead of calling tools.

    Mixed into SFT data (`write_trajectories(plan_only_fraction=...)`), it gives a model that
    sometimes acts and sometimes only talks about acting: the imperfect starting point that
    reinforcement learning improves on, and a reward signal a tiny model can act on.
    """
    final: dict[str, Any] = {"role": "assistant", "content": PLAN_ONLY_ANSWER}
    if reasoning:
        final["reasoning_content"] = "I should use the tools."
    return _trajectory(task, [final], plan_only=True)


def write_trajectories(
    path: str | os.PathLike[str],
    tasks: Iterable[Task],
    *,
    reasoning: bool = True,
    plan_only_fraction: float = 0.0,
    seed: int = 0,
) -> int:
    """Writes the tasks' reference trajectories as JSONL (`cacherl_jax.data` format); returns the
    count. `Task.from_dict(trajectory.metadata["task"])` gives each task back.

    `plan_only_fraction`: the share of tasks (drawn with `seed`) written as `plan_only_trajectory`
    instead, to simulate noisy teacher data.
    """
    if not 0.0 <= plan_only_fraction <= 1.0:
        raise ValueError(f"plan_only_fraction must lie in [0, 1], got {plan_only_fraction}")
    rng = random.Random(seed)

    def trajectories():
        for task in tasks:
            flawed = plan_only_fraction > 0 and rng.random() < plan_only_fraction
            make = plan_only_trajectory if flawed else reference_trajectory
            yield make(task, reasoning=reasoning)

    return write_jsonl(path, trajectories())
