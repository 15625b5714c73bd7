"""BFCL v4 multi-turn tasks and the environment that runs BFCL's executable tool classes.

Data and tools come from the `bfcl-eval` package (installed with `--no-deps`): entries from
`bfcl_eval/data/BFCL_v4_<category>.json`, ground truth from `data/possible_answer/`, tool docs
from `data/multi_turn_func_doc/` and the classes (file system, math, messaging, posting, tickets,
trading, travel, vehicle control) from the modules `executable_backend_config` names.

BFCL's own executor `eval`s call strings. Here nothing is evaluated: ground-truth strings such as
`"cd(folder='document')"` or `"sort('final_report.pdf')"` are parsed with `ast` into a function
name and literal arguments (positional ones are named from the method's signature), and the
environment calls public methods by name with JSON arguments checked against the tool schema.

All four multi-turn categories load: base, miss_param (the user leaves out a parameter: the turn's
ground truth is empty), miss_func (a function is withheld until a later turn, where its schema
appears as `Turn.new_tools`) and long_context (classes loaded with `long_context=True`). An entry
with a user turn that holds no message (miss_func's "function added" turn) keeps that turn with no
messages, as BFCL does.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib
import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cacherl_jax.agent.environment import (
    Environment,
    ExecutedCall,
    ReferenceCall,
    Task,
    ToolResult,
    Turn,
    execute_reference,
)
from cacherl_jax.errors import UserError

CATEGORIES = (
    "multi_turn_base",
    "multi_turn_miss_func",
    "multi_turn_miss_param",
    "multi_turn_long_context",
)
# The classes of the multi-turn categories (BFCL's mapping also lists web search and memory
# backends, which belong to other categories and need packages we do not install).
MULTI_TURN_CLASSES = (
    "GorillaFileSystem",
    "MathAPI",
    "MessageAPI",
    "TwitterAPI",
    "TicketAPI",
    "TradingBot",
    "TravelAPI",
    "VehicleControlAPI",
)

# BFCL's own Gorilla -> OpenAPI type names (bfcl_eval.constants.type_mappings.GORILLA_TO_OPENAPI,
# restricted to the types multi-turn docs use); unknown types become "string", as BFCL does.
_OPENAPI_TYPES = {
    "integer": "integer",
    "number": "number",
    "float": "number",
    "string": "string",
    "boolean": "boolean",
    "bool": "boolean",
    "array": "array",
    "list": "array",
    "dict": "object",
    "object": "object",
    "tuple": "array",
    "any": "string",
}


class BfclError(UserError, ValueError):
    """BFCL data that cannot be loaded or parsed; the message names the file, entry and field."""


def _backend_config():
    try:
        from bfcl_eval.constants import executable_backend_config
    except ImportError as exc:
        raise BfclError(
            f"the bfcl-eval package is needed for BFCL tasks ({exc}); install it with "
            "`pip install --no-deps bfcl-eval mpmath` (make does this)"
        ) from None
    return executable_backend_config


def data_dir() -> Path:
    """`bfcl_eval/data` of the installed package."""
    import bfcl_eval

    return Path(bfcl_eval.__file__).parent / "data"


# --- parsing ground-truth call strings -----------------------------------------------------------


def _literal(node: ast.expr, where: str) -> Any:
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise BfclError(f"{where}: argument {ast.unparse(node)!r} is not a literal") from None
    return _as_json(value, where)


def _as_json(value: Any, where: str) -> Any:
    """Literal values as JSON would carry them: tuples become lists; sets, bytes, complex fail."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_as_json(item, where) for item in value]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: _as_json(item, where) for key, item in value.items()}
    raise BfclError(f"{where}: {type(value).__name__} value {value!r} has no JSON form")


def parse_call(text: str, where: str = "call") -> tuple[str, list[Any], dict[str, Any]]:
    """`"f(1, b='x')"` -> `("f", [1], {"b": "x"})` without evaluating anything.

    Only a plain function name called with literal arguments is accepted; attribute access
    (`__import__('os').system`), nested calls, names, `*args` and `**kwargs` raise `BfclError`.
    """
    if not isinstance(text, str):
        raise BfclError(f"{where}: expected a call string, got {type(text).__name__}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise BfclError(f"{where}: {text!r} is not a call ({exc.msg})") from None
    call = tree.body
    if not isinstance(call, ast.Call):
        raise BfclError(f"{where}: {text!r} is not a function call")
    if not isinstance(call.func, ast.Name):
        raise BfclError(f"{where}: {text!r} must call a plain function name")
    args = []
    for node in call.args:
        if isinstance(node, ast.Starred):
            raise BfclError(f"{where}: {text!r}: *args is not supported")
        args.append(_literal(node, where))
    kwargs = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            raise BfclError(f"{where}: {text!r}: **kwargs is not supported")
        kwargs[keyword.arg] = _literal(keyword.value, where)
    return call.func.id, args, kwargs


# --- loading entries ------------------------------------------------------------------------------


def read_entries(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise BfclError(f"{path}: no such file (is bfcl-eval installed?)")
    entries = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise BfclError(f"{path}:{line_number}: invalid JSON ({exc.msg})") from None
    return entries


def load_entries(category: str = "multi_turn_base") -> list[dict[str, Any]]:
    """The raw entries of a multi-turn category, each with its `ground_truth` merged in."""
    if category not in CATEGORIES:
        raise BfclError(
            f"unknown BFCL multi-turn category {category!r} (one of {', '.join(CATEGORIES)})"
        )
    file_name = f"BFCL_v4_{category}.json"
    entries = read_entries(data_dir() / file_name)
    answers_path = data_dir() / "possible_answer" / file_name
    answers = {}
    for answer in read_entries(answers_path):
        if "id" not in answer or "ground_truth" not in answer:
            raise BfclError(f"{answers_path}: entry {answer.get('id')!r} lacks id or ground_truth")
        answers[answer["id"]] = answer["ground_truth"]
    for entry in entries:
        if entry.get("id") not in answers:
            raise BfclError(f"{answers_path}: no ground truth for entry {entry.get('id')!r}")
        entry["ground_truth"] = answers[entry["id"]]
    return entries


@functools.cache
def _tool_class(class_name: str) -> type:
    config = _backend_config()
    if class_name not in MULTI_TURN_CLASSES:
        raise BfclError(
            f"unknown BFCL class {class_name!r} (one of {', '.join(MULTI_TURN_CLASSES)})"
        )
    module = importlib.import_module(config.CLASS_FILE_PATH_MAPPING[class_name])
    return getattr(module, class_name)


def openai_properties(properties: dict[str, Any]) -> dict[str, Any]:
    """BFCL's conversion of parameter types to OpenAPI (its `_cast_to_openai_type`)."""
    converted = {}
    for name, spec in properties.items():
        spec = dict(spec)
        gorilla_type = spec.get("type")
        if gorilla_type == "float":
            spec["format"] = "float"
            spec["description"] = spec.get("description", "") + " This is a float type value."
        spec["type"] = _OPENAPI_TYPES.get(gorilla_type, "string")
        if "properties" in spec:
            spec["properties"] = openai_properties(spec["properties"])
        elif "items" in spec:
            items = dict(spec["items"])
            items["type"] = _OPENAPI_TYPES.get(items.get("type"), "string")
            if "properties" in items:
                items["properties"] = openai_properties(items["properties"])
            spec["items"] = items
        converted[name] = spec
    return converted


@functools.cache
def _class_tools(class_name: str) -> tuple[dict[str, Any], ...]:
    """A class's tools in OpenAI format, as BFCL sends them to OpenAI-style function-calling models."""
    config = _backend_config()
    _tool_class(class_name)  # validates the name
    path = data_dir() / "multi_turn_func_doc" / config.MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name]
    tools = []
    for index, doc in enumerate(read_entries(path)):
        if "name" not in doc or not isinstance(doc.get("parameters"), dict):
            raise BfclError(f"{path}: function {index} lacks a name or parameters")
        function = copy.deepcopy(doc)
        function["parameters"]["type"] = "object"
        function["parameters"]["properties"] = openai_properties(
            doc["parameters"].get("properties", {})
        )
        tools.append({"type": "function", "function": function})
    return tuple(tools)


def _keyword_arguments(
    class_names: Sequence[str], name: str, args: list[Any], kwargs: dict[str, Any], where: str
) -> dict[str, Any]:
    """Names positional arguments from the method's signature (its order, not the doc's)."""
    for class_name in reversed(
        class_names
    ):  # BFCL: a later class's method shadows an earlier one's
        method = getattr(_tool_class(class_name), name, None)
        if method is not None and not name.startswith("_"):
            break
    else:
        raise BfclError(f"{where}: no involved class has a method {name!r}")
    parameters = [p for p in inspect.signature(method).parameters if p != "self"]
    if len(args) > len(parameters):
        raise BfclError(f"{where}: {name} takes {len(parameters)} arguments, {len(args)} given")
    named = dict(zip(parameters, args, strict=False))
    duplicated = set(named) & set(kwargs)
    if duplicated:
        raise BfclError(f"{where}: argument {sorted(duplicated)[0]!r} given twice")
    return {**named, **kwargs}


def _require(entry: dict[str, Any], field: str, kind: type, where: str) -> Any:
    if field not in entry:
        raise BfclError(f"{where}: field {field!r} is missing")
    if not isinstance(entry[field], kind):
        raise BfclError(f"{where}: field {field!r} must be a {kind.__name__}")
    return entry[field]


def task_from_entry(entry: dict[str, Any], category: str, *, split: str = "test") -> Task:
    """One BFCL entry (with `ground_truth`) as a `Task`; raises `BfclError` naming the field."""
    where = f"BFCL_v4_{category}.json entry {entry.get('id', '<no id>')!r}"
    entry_id = _require(entry, "id", str, where)
    questions = _require(entry, "question", list, where)
    ground_truth = _require(entry, "ground_truth", list, where)
    class_names = _require(entry, "involved_classes", list, where)
    initial_config = entry.get("initial_config", {})
    if len(questions) != len(ground_truth):
        raise BfclError(
            f"{where}: {len(questions)} question turns but {len(ground_truth)} ground-truth turns"
        )
    for class_name in class_names:
        try:
            _tool_class(class_name)
        except BfclError as exc:
            raise BfclError(f"{where}: involved_classes: {exc}") from None

    tools = [tool for class_name in class_names for tool in _class_tools(class_name)]
    by_name = {tool["function"]["name"]: tool for tool in tools}
    held_back = {}  # turn index -> schemas withheld until then (miss_func)
    for turn_key, names in entry.get("missed_function", {}).items():
        for name in names:
            if name not in by_name:
                raise BfclError(
                    f"{where}: missed_function[{turn_key!r}]: unknown function {name!r}"
                )
            if not str(turn_key).isdigit():
                raise BfclError(f"{where}: missed_function: turn {turn_key!r} is not a turn index")
            held_back.setdefault(int(turn_key), []).append(by_name[name])
    withheld = {schema["function"]["name"] for schemas in held_back.values() for schema in schemas}

    turns = []
    for turn_index, (messages, calls) in enumerate(zip(questions, ground_truth, strict=True)):
        if not isinstance(messages, list) or not isinstance(calls, list):
            raise BfclError(
                f"{where}: question[{turn_index}] and ground_truth[{turn_index}] must be lists"
            )
        reference = []
        for call_index, text in enumerate(calls):
            call_where = f"{where}: ground_truth[{turn_index}][{call_index}]"
            name, args, kwargs = parse_call(text, call_where)
            reference.append(
                ReferenceCall(name, _keyword_arguments(class_names, name, args, kwargs, call_where))
            )
        turns.append(Turn(list(messages), reference, held_back.get(turn_index, [])))

    return Task(
        id=entry_id,
        split=split,
        environment={
            "kind": "bfcl",
            "involved_classes": list(class_names),
            "long_context": category == "multi_turn_long_context",
        },
        tools=[tool for tool in tools if tool["function"]["name"] not in withheld],
        turns=turns,
        initial_state=copy.deepcopy(initial_config),
        metadata={
            "source": "bfcl",
            "category": category,
            "path": entry.get("path", []),
            "excluded_function": entry.get("excluded_function", []),
        },
    )


def load_tasks(
    category: str = "multi_turn_base",
    *,
    ids: Sequence[str] | None = None,
    limit: int | None = None,
    with_expected_state: bool = True,
) -> list[Task]:
    """BFCL multi-turn entries as tasks (all, those in `ids`, or the first `limit`).

    With `with_expected_state` the ground truth is executed once to record the final state.
    """
    entries = load_entries(category)
    if ids is not None:
        wanted = set(ids)
        entries = [entry for entry in entries if entry.get("id") in wanted]
        missing = wanted - {entry["id"] for entry in entries}
        if missing:
            raise BfclError(f"BFCL_v4_{category}.json: no entry {sorted(missing)[0]!r}")
    if limit is not None:
        entries = entries[:limit]
    tasks = [task_from_entry(entry, category) for entry in entries]
    if with_expected_state:
        for task in tasks:
            environment = BfclEnvironment()
            execute_reference(task, environment)
            task.expected_state = environment.final_state()
    return tasks


# --- the environment ------------------------------------------------------------------------------


def _plain(value: Any, ancestors: tuple[int, ...] = ()) -> Any:
    """Objects as JSON-like data: public attributes only; back-references (a directory's parent)
    are dropped, as are private attributes (BFCL's state checker ignores them too)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if id(value) in ancestors:
        return None
    ancestors = (*ancestors, id(value))
    if isinstance(value, dict):
        return {str(key): _plain(item, ancestors) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(item, ancestors) for item in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if hasattr(value, "__dict__"):
        return {
            key: _plain(item, ancestors)
            for key, item in vars(value).items()
            if not key.startswith("_") and id(item) not in ancestors
        }
    return repr(value)


def format_result(value: Any) -> str:
    """BFCL's executor's formatting: strings as they are, dicts as JSON, anything else str()."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


class BfclEnvironment(Environment):
    """The involved BFCL classes of a task, each loaded with its part of `initial_config`.

    Argument names are checked against the schemas but values are not type-checked: BFCL's
    backend takes what the model sends, and its own ground truth breaks the schema types
    (`close_ticket(ticket_id='ticket_001')` for an integer `ticket_id`, entry 173 of every
    category), so strict types would fail correct answers.
    """

    check_types = False

    def __init__(self) -> None:
        super().__init__()
        self.instances: dict[str, Any] = {}
        self._owner: dict[str, Any] = {}

    def _load(self, task: Task) -> None:
        stateless = _backend_config().STATELESS_CLASSES
        long_context = bool(task.environment.get("long_context", False))
        self.instances, self._owner = {}, {}
        for class_name in task.environment["involved_classes"]:
            instance = _tool_class(class_name)()
            if class_name not in stateless:
                config = copy.deepcopy(task.initial_state.get(class_name, {}))
                instance._load_scenario(config, long_context=long_context)
            self.instances[class_name] = instance
            for tool in _class_tools(class_name):
                self._owner[tool["function"]["name"]] = instance

    def _invoke(self, name: str, arguments: dict[str, Any]) -> str:
        return format_result(self._call(name, arguments))

    def _run(self, name: str, arguments: dict[str, Any]) -> ToolResult:
        # BFCL's executor's texts: a method reports failure by returning {"error": ...} (kept as
        # is, kind tool_exception) and an exception becomes "Error during execution: ...".
        try:
            value = self._call(name, arguments)
        except Exception as exc:
            return ToolResult(f"Error during execution: {exc}", "tool_exception")
        failed = isinstance(value, dict) and set(value) == {"error"}
        return ToolResult(format_result(value), "tool_exception" if failed else "ok")

    def _call(self, name: str, arguments: dict[str, Any]) -> Any:
        # Only names with a schema get here (the base class checks), so no private method is callable.
        return getattr(self._owner[name], name)(**arguments)

    def final_state(self) -> dict[str, Any]:
        stateless = _backend_config().STATELESS_CLASSES
        return {
            class_name: _plain(instance)
            for class_name, instance in self.instances.items()
            if class_name not in stateless
        }


def execute_ground_truth(task: Task) -> list[ExecutedCall]:
    """Executes a BFCL task's ground truth in a fresh environment: (tool, arguments, result) per
    call, turn by turn (`ExecutedCall.turn`)."""
    if task.environment.get("kind") != "bfcl":
        raise ValueError(f"task {task.id!r} is not a BFCL task")
    return execute_reference(task, BfclEnvironment())
