"""The building blocks of the procedural suite: tools, task kinds and domains.

A domain is a handful of tools over a small JSON world (currency rates, a calendar, a few files,
a shop) and the kinds of task asked about it. A task kind enumerates the value combinations a
request can name (`combos`), builds the request values and a random world for one combination
(`setup`), and solves the task (`solve`) by calling tools through a `Caller`, so the reference
solution is computed by running the tools, never written down by hand.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from cacherl_jax.agent.environment import ToolError

World = dict[str, Any]
Values = dict[str, Any]


class Caller(Protocol):
    def __call__(self, name: str, arguments: dict[str, Any], reasoning: str) -> dict[str, Any]:
        """Executes a tool call (with the reasoning that motivates it) and returns its result."""
        ...


@dataclasses.dataclass(frozen=True)
class Tool:
    """A tool: all parameters required, `run(world, **arguments)` returns a JSON object and may
    change `world` or raise `ToolError`."""

    name: str
    description: str
    parameters: Mapping[str, str]  # name -> JSON type
    run: Callable[..., dict[str, Any]]

    def schema(self, *, describe: bool = False) -> dict[str, Any]:
        """Its OpenAI function schema. Short: each schema costs ~45 tokens of every prompt, and the
        description ~10 more, which is why it is left out unless asked for (the names and
        parameter names say what the tools do)."""
        function: dict[str, Any] = {"name": self.name}
        if describe:
            function["description"] = self.description
        function["parameters"] = {
            "type": "object",
            "properties": {name: {"type": kind} for name, kind in self.parameters.items()},
            "required": list(self.parameters),
        }
        return {"type": "function", "function": function}


@dataclasses.dataclass(frozen=True)
class Solution:
    answer: str  # the final answer, exactly as the reference trajectory ends
    reasoning: str  # why that is the answer (the final turn's thinking)


@dataclasses.dataclass(frozen=True)
class TaskKind:
    """One kind of request. The last two templates are held out: one for validation, one for test."""

    name: str
    templates: tuple[str, ...]
    combos: tuple[tuple[Any, ...], ...]  # every value combination a request can name
    setup: Callable[[random.Random, tuple[Any, ...]], tuple[Values, World]]
    solve: Callable[[Values, Caller], Solution]

    def __post_init__(self):
        if len(self.templates) < 3:
            raise ValueError(
                f"task kind {self.name}: needs at least 3 templates (train, val, test)"
            )
        if not self.combos:
            raise ValueError(f"task kind {self.name}: no value combinations")


@dataclasses.dataclass(frozen=True)
class Domain:
    name: str
    tools: tuple[Tool, ...]
    kinds: tuple[TaskKind, ...]

    def tool(self, name: str) -> Tool | None:
        return next((tool for tool in self.tools if tool.name == name), None)


def number(value: float) -> str:
    """A number as the tool results print it, so answers copy the exact same characters."""
    return json.dumps(value)


def require(condition: bool, message: str) -> None:
    """Raises the ToolError a tool reports to the model when `condition` does not hold."""
    if not condition:
        raise ToolError(message)
