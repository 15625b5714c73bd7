"""Stateful tool environments and the tasks they are reset from.

An `Environment` is what a rollout talks to when tools run live: `reset(task)` loads the task's
initial state, `tool_schemas()` lists the OpenAI-style function schemas the model sees
(`{"type": "function", "function": {...}}`, as `render_prompt` renders them), `execute(name,
arguments)` runs one call and `final_state()` returns the state as plain JSON-like data for the
reward checker.

`execute` never raises for anything the model can get wrong: an unknown tool, arguments that do
not fit the schema (missing, unexpected, wrong type, not an object) or a tool that raises all come
back as a `ToolResult` whose text is shown to the model and whose `kind` says what happened.

A `Task` is environment-agnostic: its turns (the messages that open each turn and the reference
calls that solve it), the tools, the initial state, and what a correct run ends with (answer
and/or state). BFCL multi-turn tasks have several turns; procedural tasks have one.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

ErrorKind = Literal["ok", "unknown_tool", "bad_arguments", "tool_exception"]
ERROR_KINDS: tuple[ErrorKind, ...] = ("ok", "unknown_tool", "bad_arguments", "tool_exception")


class ToolError(Exception):
    """Raised by a tool for a failure it reports to the model (unknown item, not enough stock).

    The message becomes the tool result text; unlike other exceptions no type name is added.
    """


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What the model sees after a call (`text`) and how the call went (`kind`)."""

    text: str
    kind: ErrorKind = "ok"

    def __post_init__(self):
        if self.kind not in ERROR_KINDS:
            raise ValueError(f"unknown ToolResult kind {self.kind!r}")

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


@dataclasses.dataclass(frozen=True)
class ExecutedCall:
    """One call as it was executed: the arguments as the tool received them, and its result."""

    name: str
    arguments: Any  # a dict when the call got past argument checking; otherwise what was sent
    result: ToolResult
    turn: int = 0


@dataclasses.dataclass(frozen=True)
class ReferenceCall:
    """A call of the reference solution: tool name and JSON arguments (keyword form)."""

    name: str
    arguments: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        """An OpenAI `tool_calls` entry, as trajectories store calls."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass
class Turn:
    """One user turn: the messages that open it, the reference calls that answer it and the tools
    that become available from it on (BFCL's miss-function category adds tools mid-conversation).
    """

    messages: list[dict[str, Any]]
    reference_calls: list[ReferenceCall] = dataclasses.field(default_factory=list)
    new_tools: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Task:
    """A request, the environment it runs in, its reference solution and what success means.

    `environment` names the environment kind and its settings (`{"kind": "procedural", "domain":
    "shop"}`, `{"kind": "bfcl", "involved_classes": [...], "long_context": False}`);
    `initial_state` is what `Environment.reset` loads. Success is the final answer matching
    `expected_answer` (when not None) and the final state equalling `expected_state` (when not
    None); process accuracy compares the model's calls with `reference_calls`.
    """

    id: str
    split: str
    environment: dict[str, Any]
    tools: list[dict[str, Any]]
    turns: list[Turn]
    initial_state: dict[str, Any]
    expected_answer: str | None = None
    expected_state: dict[str, Any] | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The messages a rollout starts from (optional system prompt and the first request)."""
        return self.turns[0].messages

    @property
    def reference_calls(self) -> list[ReferenceCall]:
        """All reference calls, turn after turn."""
        return [call for turn in self.turns for call in turn.reference_calls]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; `Task.from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Task:
        where = f"task {record.get('id', '<no id>')!r}"
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(record) - fields)
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r}")
        missing = [
            name for name in ("id", "split", "environment", "tools", "turns") if name not in record
        ]
        if missing:
            raise ValueError(f"{where}: required field {missing[0]!r} is missing")
        data = copy.deepcopy(dict(record))
        turns = []
        for index, turn in enumerate(data.pop("turns")):
            try:
                calls = [ReferenceCall(**call) for call in turn.get("reference_calls", [])]
                turns.append(Turn(turn["messages"], calls, turn.get("new_tools", [])))
            except (KeyError, TypeError) as exc:
                raise ValueError(f"{where}: turns[{index}] is malformed ({exc})") from None
        if not turns:
            raise ValueError(f"{where}: turns must hold at least one turn")
        data.setdefault("initial_state", {})
        return cls(turns=turns, **data)


# --- argument checking ---------------------------------------------------------------------------

_JSON_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "array": "an array",
    "object": "an object",
    "null": "null",
}


class _BadArguments(Exception):
    pass


def _json_type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _checked_value(value: Any, schema: Mapping[str, Any], where: str) -> Any:
    """`value` if it fits `schema` (integral floats for integers become ints), else raises."""
    expected = schema.get("type")
    types = [expected] if isinstance(expected, str) else list(expected or [])
    actual = _json_type_of(value)
    if types:
        if actual == "integer" and "number" in types and "integer" not in types:
            pass  # every integer is a number
        elif actual == "number" and "integer" in types and float(value).is_integer():
            value = int(value)  # 3.0 from a model that writes floats means 3
        elif actual not in types:
            wanted = " or ".join(_JSON_TYPE_NAMES.get(t, t) for t in types)
            raise _BadArguments(
                f"{where} must be {wanted}, got {_JSON_TYPE_NAMES.get(actual, actual)}"
            )
    if "enum" in schema and value not in schema["enum"]:
        raise _BadArguments(f"{where} must be one of {', '.join(map(repr, schema['enum']))}")
    if isinstance(value, (list, tuple)) and isinstance(schema.get("items"), Mapping):
        value = [
            _checked_value(item, schema["items"], f"{where}[{i}]") for i, item in enumerate(value)
        ]
    if isinstance(value, dict) and isinstance(schema.get("properties"), Mapping):
        value = {
            key: _checked_value(item, schema["properties"][key], f"{where}.{key}")
            if key in schema["properties"]
            else item
            for key, item in value.items()
        }
    return value


def check_arguments(
    schema: Mapping[str, Any], arguments: Any, *, check_types: bool = True
) -> dict[str, Any]:
    """Arguments checked against an OpenAI function schema; raises ValueError saying what is wrong.

    `arguments` may be a dict or a JSON string holding one. Required and unexpected names are
    checked, and with `check_types` JSON types (recursively), enums and array items too; integral
    floats given for integers are converted, everything else is returned as given.
    """
    try:
        return _check_arguments(schema, arguments, check_types)
    except _BadArguments as exc:
        raise ValueError(str(exc)) from None


def _check_arguments(
    schema: Mapping[str, Any], arguments: Any, check_types: bool = True
) -> dict[str, Any]:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise _BadArguments(f"arguments are not valid JSON ({exc.msg})") from None
    if not isinstance(arguments, dict):
        raise _BadArguments(
            f"arguments must be an object, got {_JSON_TYPE_NAMES.get(_json_type_of(arguments), 'a value')}"
        )
    parameters = schema.get("parameters") or {}
    properties = parameters.get("properties") or {}
    missing = [name for name in parameters.get("required", []) if name not in arguments]
    if missing:
        raise _BadArguments(f"missing required argument {missing[0]!r}")
    unexpected = [name for name in arguments if name not in properties]
    if unexpected:
        expected = ", ".join(properties) or "none"
        raise _BadArguments(f"unexpected argument {unexpected[0]!r} (expected: {expected})")
    if not check_types:
        return arguments
    return {
        name: _checked_value(value, properties[name], f"argument {name!r}")
        for name, value in arguments.items()
    }


# --- the environment protocol --------------------------------------------------------------------


def schema_name(schema: Mapping[str, Any]) -> str:
    """The function name of an OpenAI tool schema (or of a bare function schema)."""
    return (schema.get("function") or schema)["name"]


def checked_call(
    visible: Mapping[str, Mapping[str, Any]], name: Any, arguments: Any, *, check_types: bool = True
) -> dict[str, Any] | ToolResult:
    """A call's arguments checked against the tools callable now (`visible`, by name, in the
    order they were opened), or the error an environment answers without running any tool: an
    unknown tool (naming the available ones) or arguments its schema rejects."""
    schema = visible.get(name) if isinstance(name, str) else None
    if schema is None:
        available = ", ".join(visible) or "none"
        return ToolResult(
            f"Error: unknown tool {name!r}. Available tools: {available}.", "unknown_tool"
        )
    try:
        return _check_arguments(schema.get("function") or schema, arguments, check_types)
    except _BadArguments as exc:
        return ToolResult(f"Error: bad arguments for {name}: {exc}.", "bad_arguments")


class Environment(abc.ABC):
    """A stateful tool environment. Subclasses implement `_load`, `_invoke` and `final_state`.

    `history` holds every executed call since the last reset, errors included. With
    `check_types` False only argument names are checked and values go to the tool as given.
    `latency_s` > 0 makes every `execute` sleep that long before it answers, like a real API
    behind a network (`make_environment(task, latency_s=...)` sets it; 0, the default: no sleep).
    """

    check_types = True
    latency_s = 0.0

    def __init__(self) -> None:
        self.task: Task | None = None
        self.turn = 0
        self.history: list[ExecutedCall] = []
        self._visible: dict[str, dict[str, Any]] = {}

    def reset(self, task: Task) -> None:
        """Loads the task's initial state (a fresh copy) and opens its first turn."""
        self.task = task
        self.history = []
        self._visible = {}
        self._load(task)
        self._add_tools(task.tools)
        self.turn = 0
        self._add_tools(task.turns[0].new_tools)

    def begin_turn(self, index: int) -> None:
        """Opens turn `index` (state carries over); tools that the turn adds become callable."""
        task = self._require_task()
        if not 0 <= index < len(task.turns):
            raise IndexError(f"task {task.id!r} has {len(task.turns)} turns, no turn {index}")
        self.turn = index
        self._add_tools(task.turns[index].new_tools)

    def tool_schemas(self) -> list[dict[str, Any]]:
        """The tools callable now, in OpenAI format."""
        return list(self._visible.values())

    def execute(self, name: str, arguments: Any) -> ToolResult:
        """Runs one call; every failure is returned as a `ToolResult`, never raised."""
        self._require_task()
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        checked = checked_call(self._visible, name, arguments, check_types=self.check_types)
        if isinstance(checked, ToolResult):
            result = checked
        else:
            # A copy, so the tool cannot alias (or be changed through) the caller's objects.
            arguments = copy.deepcopy(checked)
            result = self._run(name, arguments)
        self.history.append(ExecutedCall(name, arguments, result, self.turn))
        return result

    @abc.abstractmethod
    def final_state(self) -> dict[str, Any]:
        """The current state as plain JSON-like data (dicts, lists, strings, numbers)."""

    @abc.abstractmethod
    def _load(self, task: Task) -> None:
        """Builds the state from `task.initial_state` without modifying the task."""

    @abc.abstractmethod
    def _invoke(self, name: str, arguments: dict[str, Any]) -> str:
        """Runs a known tool with checked arguments and returns the result text."""

    def _run(self, name: str, arguments: dict[str, Any]) -> ToolResult:
        try:
            return ToolResult(self._invoke(name, arguments))
        except ToolError as exc:
            return ToolResult(f"Error: {exc}", "tool_exception")
        except (
            Exception
        ) as exc:  # a tool's bug or its way of refusing: either way the model sees it
            return ToolResult(f"Error: {type(exc).__name__}: {exc}", "tool_exception")

    def _add_tools(self, schemas: Sequence[Mapping[str, Any]]) -> None:
        for schema in schemas:
            self._visible[schema_name(schema)] = dict(schema)

    def _require_task(self) -> Task:
        if self.task is None:
            raise RuntimeError(f"{type(self).__name__}: call reset(task) before using it")
        return self.task


def execute_reference(task: Task, environment: Environment) -> list[ExecutedCall]:
    """Resets the environment to the task, runs its reference calls turn by turn and returns them
    as executed, with their results (a fresh environment: `agent.factory.make_environment`)."""
    environment.reset(task)
    for index, turn in enumerate(task.turns):
        if index:
            environment.begin_turn(index)
        for call in turn.reference_calls:
            environment.execute(call.name, call.arguments)
    return list(environment.history)
