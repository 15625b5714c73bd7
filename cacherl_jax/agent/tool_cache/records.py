"""What the tool cache stores and answers: the tiers, its records and reports, its error, and the
"no recorded result" response for a tool the cache never saw."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

from cacherl_jax.errors import UserError

Tier = Literal["exact", "fuzzy", "best_effort"]
TIERS: tuple[Tier, ...] = ("exact", "fuzzy", "best_effort")


class ToolCacheError(UserError, ValueError):
    """A cache file that cannot be used (not SQLite, someone else's database, another schema
    version, corrupt, unwritable) or a bad argument to a cache command. str(): 'path: message'."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message if self.path is None else f"{self.path}: {self.message}"

    def __reduce__(self):
        return (type(self), (self.message, self.path))


class CacheEntry(NamedTuple):
    """One recorded call. `canonical_args` is the exact-tier key; `arguments` parses it."""

    rowid: int
    scope: str
    tool: str
    canonical_args: str
    result: str
    source: str

    @property
    def arguments(self) -> dict[str, Any]:
        return json.loads(self.canonical_args)


class CacheHit(NamedTuple):
    """A lookup's answer: (result, tier, score, entry). `score` is 0-100 (100 exact, 0 for a tool
    never seen); `entry` is the recorded call that answers, None for a tool never seen."""

    result: str
    tier: Tier
    score: float
    entry: CacheEntry | None


@dataclasses.dataclass(frozen=True)
class ToolRecord:
    """A call and its result to store: `ToolCache.record_many` takes these."""

    tool: str
    arguments: Mapping[str, Any] | str | None
    result: str
    scope: str | None = None
    source: str = "live"


@dataclasses.dataclass
class RecordReport:
    """What `record_many` did: `recorded` new entries; `already_present` calls whose key was
    stored before (the first result stays); `conflicting` of those, the ones whose result differs
    from the result the cache answers with."""

    records: int = 0
    recorded: int = 0
    already_present: int = 0
    conflicting: int = 0

    def add(self, other: RecordReport) -> None:
        """Adds another report's counts to this one."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


def no_record_response(
    tool: str, arguments: Mapping[str, Any], schema: Mapping[str, Any] | None = None
) -> str:
    """The JSON text answering a call of a tool the cache never saw: it says no result is recorded
    and, when the tool's schema is known, what the tool takes (and returns, if the schema says)."""
    response: dict[str, Any] = {
        "error": "no_recorded_result",
        "tool": tool,
        "arguments": dict(arguments),
        "message": f"No recorded result: the tool cache holds no call of {tool}, so what it "
        "would return here is unknown.",
    }
    if schema:
        response.update(_schema_fields(schema))
    return json.dumps(response, ensure_ascii=False)


def _schema_fields(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The description, parameter types and return description a function schema gives."""
    fields: dict[str, Any] = {}
    if schema.get("description"):
        fields["description"] = schema["description"]
    properties = (schema.get("parameters") or {}).get("properties") or {}
    if isinstance(properties, Mapping):
        fields["parameters"] = {
            name: spec.get("type", "any") if isinstance(spec, Mapping) else "any"
            for name, spec in properties.items()
        }
    for returns_key in ("returns", "response", "output"):
        if returns_key in schema:
            fields["returns"] = schema[returns_key]
            break
    return fields


def function_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The function part of an OpenAI tool ({"type": "function", "function": {...}}) or a bare one."""
    function = schema.get("function") if schema.get("type") == "function" else schema
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ToolCacheError("a tool schema needs a function name")
    return dict(function)
