"""A fresh environment for a task: `make_environment(task)`, by `task.environment["kind"]`.

`make_environment(task, latency_s=0.1)` returns one whose every call first sleeps 0.1 s, to
measure what live tools cost a trainer (`loop.tool_latency_s`); `functools.partial` of it is a
`make_env` for `CacheAgentLoop`.

The protocol (`environment.py`) does not know its implementations; this module sits one layer
above both (the `agent` contract in pyproject.toml), so an implementation imports the protocol
and nothing imports back. A new kind is one entry in `ENVIRONMENTS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from cacherl_jax.agent.bfcl import BfclEnvironment
from cacherl_jax.agent.environment import Environment, Task
from cacherl_jax.agent.procedural.environment import ProceduralEnvironment

ENVIRONMENTS: Mapping[str, Callable[[], Environment]] = {
    "procedural": ProceduralEnvironment,
    "bfcl": BfclEnvironment,
}


def make_environment(task: Task, *, latency_s: float = 0.0) -> Environment:
    """A fresh environment of the task's kind, reset to its initial state, whose `execute`
    sleeps `latency_s` seconds before each answer (0: never)."""
    if not latency_s >= 0:  # also refuses NaN
        raise ValueError(f"tool latency must be >= 0 seconds, got {latency_s!r}")
    environment = environment_class(task)()
    environment.latency_s = float(latency_s)
    environment.reset(task)
    return environment


def environment_class(task: Task) -> Callable[[], Environment]:
    """The environment implementation of the task's kind (its class attributes, such as
    `check_types`, without building one)."""
    kind = task.environment.get("kind")
    if kind not in ENVIRONMENTS:
        known = ", ".join(ENVIRONMENTS)
        raise ValueError(f"task {task.id!r}: unknown environment kind {kind!r} ({known})")
    return ENVIRONMENTS[kind]
