"""A fresh environment for a task: `make_environment(task)`, by `task.environment["kind"]`.

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


def make_environment(task: Task) -> Environment:
    """A fresh environment of the task's kind, reset to its initial state."""
    kind = task.environment.get("kind")
    if kind not in ENVIRONMENTS:
        known = ", ".join(ENVIRONMENTS)
        raise ValueError(f"task {task.id!r}: unknown environment kind {kind!r} ({known})")
    environment = ENVIRONMENTS[kind]()
    environment.reset(task)
    return environment
