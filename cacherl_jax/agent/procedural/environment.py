"""The environment of the procedural suite: a domain's tools over a copy of the task's world."""

from __future__ import annotations

import copy
import json
from typing import Any

from cacherl_jax.agent.environment import Environment, Task
from cacherl_jax.agent.procedural import currency, dates, files, shop
from cacherl_jax.agent.procedural.domain import Domain, World

DOMAINS: dict[str, Domain] = {
    domain.name: domain for domain in (currency.DOMAIN, dates.DOMAIN, files.DOMAIN, shop.DOMAIN)
}


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown procedural domain {name!r} (one of {', '.join(DOMAINS)})")
    return DOMAINS[name]


class ProceduralEnvironment(Environment):
    """Results are JSON objects as text (`json.dumps` separators, like tool-call arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.world: World = {}
        self._domain: Domain | None = None

    def _load(self, task: Task) -> None:
        self._domain = get_domain(task.environment.get("domain", ""))
        self.world = copy.deepcopy(task.initial_state)

    def _invoke(self, name: str, arguments: dict[str, Any]) -> str:
        tool = self._domain.tool(name) if self._domain else None
        if tool is None:  # a schema in the task that the domain does not implement
            raise RuntimeError(
                f"the {self._domain.name if self._domain else '?'} domain has no tool {name!r}"
            )
        return json.dumps(tool.run(self.world, **arguments), ensure_ascii=False)

    def final_state(self) -> dict[str, Any]:
        return copy.deepcopy(self.world)
