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
from collections.abc import Iterable
from typing import Any

from cacherl_jax.agent.environment import ReferenceCall, Task
from cacherl_jax.agent.procedural.domain import Solution, TaskKind
from cacherl_jax.agent.procedural.environment import ProceduralEnvironment, get_domain
from cacherl_jax.data.trajectory import Trajectory, write_jsonl


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
    return Trajectory(
        id=task.id,
        messages=copy.deepcopy(task.messages) + run.messages,
        tools=copy.deepcopy(task.tools),
        metadata={
            "source": "procedural",
            "split": task.split,
            "kind": task.metadata["kind"],
            "task": task.to_dict(),
        },
    )


def write_trajectories(
    path: str | os.PathLike[str], tasks: Iterable[Task], *, reasoning: bool = True
) -> int:
    """Writes the tasks' reference trajectories as JSONL (`cacherl_jax.data` format); returns the
    count. `Task.from_dict(trajectory.metadata["task"])` gives each task back."""
    return write_jsonl(path, (reference_trajectory(task, reasoning=reasoning) for task in tasks))
