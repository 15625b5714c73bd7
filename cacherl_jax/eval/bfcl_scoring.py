"""BFCL v4 scoring: BFCL's AST rules for single-turn calls and its state and response checks for
multi-turn conversations, written here from BFCL's checker (nothing is copied or `eval`ed).

Model calls arrive parsed: `(name, arguments)` pairs, `ToolCall`s from
`cacherl_jax.chat.parse.parse_assistant(text).tool_calls` or OpenAI `tool_calls` entries
(arguments may be a JSON string). Each entry gets a `Verdict`: valid, or the first rule it broke
(`kind`) and a reason.

Single-turn rules (BFCL's `ast_checker`, Python categories). Ground truth lists, per expected call,
the allowed values of each parameter; `""` among them means the parameter may be left out.
- simple: exactly one call; multiple: as many calls as expected (one), checked against the first;
  parallel and parallel_multiple: as many calls as expected, matched in any order (greedily, as
  BFCL does: each expected call takes the first unmatched model call that passes).
- A call must name the function, give every required parameter and no parameter that is not in
  the schema or not in the ground truth, and give every ground-truth parameter that is not
  marked optional with `""`.
- Types are Python types of the schema type (`integer` -> int, `float` -> float with ints
  accepted, `array`/`tuple` -> list with one level of item types, `dict`, `string`/`any` -> str);
  bool is not an int. A value whose type is the type of the allowed values instead (BFCL's
  "variable" answers, e.g. a string for an integer) passes the type check and must then equal
  an allowed value exactly.
- Strings (also inside lists and dicts) compare after lowercasing and removing spaces and
  `,./-_*^` (single quotes become double); lists compare in order; dicts key by key against the
  allowed values of each key; everything else by `==` with an allowed value.
- irrelevance / live_irrelevance: valid when the model makes no call; live_relevance: when it
  makes at least one.

Multi-turn rules (BFCL's `multi_turn_checker`): the model's calls and the ground truth run turn by
turn in two `BfclEnvironment`s. After every turn whose ground truth is not empty: the model must
have made a call in that turn, every public attribute of every involved class instance must
equal the ground truth's, and every ground-truth result of the turn must appear among the
results of all the model's calls so far (as a multiset, in any order). Turns with empty ground
truth (miss_param, miss_func) are executed but not checked, as in BFCL v4.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from cacherl_jax.agent.bfcl import (
    CATEGORIES as MULTI_TURN_CATEGORIES,
)
from cacherl_jax.agent.bfcl import (
    BfclEnvironment,
    BfclError,
    data_dir,
    load_entries,
    openai_properties,
    read_entries,
    task_from_entry,
)
from cacherl_jax.agent.environment import Task

AST_CATEGORIES = (
    "simple_python",
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
)
RELEVANCE_CATEGORIES = ("irrelevance", "live_irrelevance", "live_relevance")
SINGLE_TURN_CATEGORIES = AST_CATEGORIES + RELEVANCE_CATEGORIES
CATEGORIES = SINGLE_TURN_CATEGORIES + MULTI_TURN_CATEGORIES

FAILURE_KINDS = (
    "malformed_call",  # a call without a string name or with arguments that are not an object
    "wrong_number_of_calls",
    "wrong_function_name",
    "missing_required_parameter",
    "unexpected_parameter",  # not in the schema, or not in the ground truth
    "missing_parameter",  # optional in the schema but required by the ground truth
    "wrong_type",
    "value_not_allowed",
    "irrelevance_detected",  # a call where none should be made
    "no_call",  # live_relevance: no call where one should be made
    "wrong_number_of_turns",  # multi-turn: the conversation stopped early (BFCL: force-terminated)
    "empty_turn",  # multi-turn: no call in a turn whose ground truth makes calls
    "state_mismatch",
    "response_mismatch",
)

# BFCL's Python type of each schema type (its PYTHON_TYPE_MAPPING), and the types whose items
# are type-checked too (one level deep).
_PYTHON_TYPES: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}
_ITEM_CHECKED_TYPES = ("array", "tuple")
_IGNORED_IN_STRINGS = re.compile(r"[ ,./\-_*^]")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether one entry's model output is correct; `kind` and `reason` say why not."""

    category: str
    entry_id: str
    valid: bool
    kind: str = "ok"  # "ok" or one of FAILURE_KINDS
    reason: str = ""

    def __post_init__(self):
        if self.kind != "ok" and self.kind not in FAILURE_KINDS:
            raise ValueError(f"unknown verdict kind {self.kind!r}")
        if self.valid != (self.kind == "ok"):
            raise ValueError(f"a verdict of kind {self.kind!r} cannot have valid={self.valid}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Mismatch(Exception):
    """A broken rule; becomes an invalid `Verdict`."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


# --- loading ---------------------------------------------------------------------------------------


def _require_category(category: str) -> None:
    if category not in CATEGORIES:
        raise BfclError(f"unknown BFCL category {category!r} (one of {', '.join(CATEGORIES)})")


def _where(category: str, entry: Mapping[str, Any]) -> str:
    return f"BFCL_v4_{category}.json entry {entry.get('id', '<no id>')!r}"


@functools.cache
def _load_category_cached(category: str) -> tuple[dict[str, Any], ...]:
    if category in MULTI_TURN_CATEGORIES:
        return tuple(load_entries(category))
    file_name = f"BFCL_v4_{category}.json"
    entries = read_entries(data_dir() / file_name)
    if category in AST_CATEGORIES:
        answers_path = data_dir() / "possible_answer" / file_name
        answers = {answer.get("id"): answer for answer in read_entries(answers_path)}
        for entry in entries:
            answer = answers.get(entry.get("id"))
            if answer is None or "ground_truth" not in answer:
                raise BfclError(f"{answers_path}: no ground_truth for entry {entry.get('id')!r}")
            entry["ground_truth"] = answer["ground_truth"]
    for entry in entries:
        _validate_single_turn(category, entry)
    return tuple(entries)


def load_category(category: str) -> list[dict[str, Any]]:
    """The entries of a category as BFCL ships them, each with its `ground_truth` merged in
    (none for the relevance categories). A fresh copy each call; the files are read once."""
    _require_category(category)
    return copy.deepcopy(list(_load_category_cached(category)))


def _validate_single_turn(category: str, entry: Mapping[str, Any]) -> None:
    """Raises `BfclError` naming the file, entry and field that does not have BFCL's shape."""
    where = _where(category, entry)
    if not isinstance(entry.get("id"), str):
        raise BfclError(f"{where}: field 'id' must be a string")
    functions = entry.get("function")
    if not isinstance(functions, list) or not functions:
        raise BfclError(f"{where}: field 'function' must be a non-empty list")
    for index, function in enumerate(functions):
        parameters = function.get("parameters") if isinstance(function, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BfclError(f"{where}: function[{index}] has no name")
        if not isinstance(parameters, dict) or not isinstance(
            parameters.get("properties", {}), dict
        ):
            raise BfclError(f"{where}: function[{index}].parameters must be an object")
    if category in RELEVANCE_CATEGORIES:
        return
    ground_truth = entry.get("ground_truth")
    if not isinstance(ground_truth, list) or not ground_truth:
        raise BfclError(f"{where}: field 'ground_truth' must be a non-empty list")
    for index, expected in enumerate(ground_truth):
        if not isinstance(expected, dict) or len(expected) != 1:
            raise BfclError(f"{where}: ground_truth[{index}] must map one function name")
        ((name, allowed),) = expected.items()
        if not isinstance(allowed, dict) or not all(isinstance(v, list) for v in allowed.values()):
            raise BfclError(
                f"{where}: ground_truth[{index}][{name!r}] must map parameters to lists"
            )
        if (
            category not in ("simple_python", "live_simple")
            and _function_doc(functions, name) is None
        ):
            raise BfclError(f"{where}: ground_truth[{index}]: no function {name!r} in 'function'")


def _function_doc(functions: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    return next((function for function in functions if function["name"] == name), None)


def _underscored(name: str, underscore_names: bool) -> str:
    # OpenAI-style APIs refuse "." in function names, so BFCL sends (and expects) "_" instead.
    return name.replace(".", "_") if underscore_names else name


def single_turn_tools(
    entry: Mapping[str, Any], *, underscore_names: bool = False
) -> list[dict[str, Any]]:
    """An entry's functions as OpenAI tools, converted as BFCL converts them for function-calling
    models; with `underscore_names` "." in names becomes "_" (score with the same setting)."""
    tools = []
    for function in entry["function"]:
        function = copy.deepcopy(function)
        function["name"] = _underscored(function["name"], underscore_names)
        function["parameters"]["type"] = "object"
        function["parameters"]["properties"] = openai_properties(
            function["parameters"].get("properties", {})
        )
        tools.append({"type": "function", "function": function})
    return tools


_LEFT_OUT = object()


def _first_allowed(values: Any) -> Any:
    """The first allowed value other than the optional marker `""`, or `_LEFT_OUT`."""
    if not isinstance(values, list):
        return values
    return next((value for value in values if value != ""), _LEFT_OUT)


def _first_allowed_dict(allowed: Any) -> Any:
    """A dict answer gives the allowed values of each key: the first of each."""
    if not isinstance(allowed, dict):
        return allowed
    picked = {key: _first_allowed(values) for key, values in allowed.items()}
    return {key: value for key, value in picked.items() if value is not _LEFT_OUT}


def ground_truth_calls(category: str, entry: Mapping[str, Any]) -> list[Any] | None:
    """Calls that the ground truth accepts (the oracle's answer).

    Single-turn: one list of `(name, arguments)` with the first allowed value other than `""` of
    each parameter (left out when `""` is the only one, or when the schema lacks the parameter);
    irrelevance categories: no calls; live_relevance: None (no ground truth). Multi-turn: one
    such list per user turn.
    """
    _require_category(category)
    if category in MULTI_TURN_CATEGORIES:
        task = task_from_entry(dict(entry), category)
        return [
            [(call.name, copy.deepcopy(call.arguments)) for call in turn.reference_calls]
            for turn in task.turns
        ]
    if category in RELEVANCE_CATEGORIES:
        return [] if "irrelevance" in category else None  # live_relevance has no ground truth
    calls = []
    for expected in entry["ground_truth"]:
        ((name, allowed),) = expected.items()
        function = (
            entry["function"][0] if "simple" in category else _function_doc(entry["function"], name)
        )
        properties = function["parameters"].get("properties", {})
        arguments = {}
        for parameter, values in allowed.items():
            value = _first_allowed(values)
            if value is _LEFT_OUT or parameter not in properties:
                continue
            type_name = properties[parameter].get("type")
            item_type_name = (properties[parameter].get("items") or {}).get("type")
            if type_name == "dict" and isinstance(value, dict):
                value = _first_allowed_dict(value)  # allowed values per key
            elif type_name == "array" and item_type_name == "dict" and isinstance(value, list):
                value = [_first_allowed_dict(item) for item in value]
            arguments[parameter] = copy.deepcopy(value)
        calls.append((name, arguments))
    return calls


# --- model calls -----------------------------------------------------------------------------------


def _as_call(call: Any, index: int) -> tuple[str, dict[str, Any]]:
    """`(name, arguments)` from a pair, a `ToolCall` or an OpenAI tool call; `_Mismatch` if the
    model's call cannot be one."""
    if isinstance(call, Mapping):
        function = call.get("function", call)
        name = function.get("name") if isinstance(function, Mapping) else None
        arguments = function.get("arguments") if isinstance(function, Mapping) else None
    elif hasattr(call, "name") and hasattr(call, "arguments"):
        name, arguments = call.name, call.arguments
    elif isinstance(call, Sequence) and not isinstance(call, str) and len(call) == 2:
        name, arguments = call
    else:
        raise _Mismatch("malformed_call", f"call {index} is not a (name, arguments) pair")
    if isinstance(arguments, str):
        with contextlib.suppress(json.JSONDecodeError):  # not an object: reported just below
            arguments = json.loads(arguments)
    if not isinstance(name, str) or not name:
        raise _Mismatch("malformed_call", f"call {index} has no function name")
    if not isinstance(arguments, dict):
        raise _Mismatch("malformed_call", f"call {index} ({name}): arguments are not an object")
    return name, arguments


# --- single-turn AST rules -------------------------------------------------------------------------


def _standardized(text: str) -> str:
    # BFCL forgives formatting: "April 1, 2024" == "april 1 2024", 'x' == "x".
    return _IGNORED_IN_STRINGS.sub("", text).lower().replace("'", '"')


def _standardized_item(value: Any) -> Any:
    return _standardized(value) if isinstance(value, str) else value


def _answer_type(allowed: Sequence[Any]) -> type | None:
    """The type of the first allowed value other than the optional marker `""`."""
    return next((type(value) for value in allowed if value != ""), None)


def _check_type(
    parameter: str, value: Any, allowed: list[Any], type_name: str, item_type: type | None
) -> bool:
    """Raises on a wrong type; returns True when the value is a "variable" (typed like the
    allowed values rather than like the schema), which is then compared exactly."""
    expected = _PYTHON_TYPES[type_name]
    answer_type = _answer_type(allowed)
    is_variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if item_type is None:
            return is_variable
        for alternative in allowed:
            # BFCL skips alternatives that are not lists (the optional marker): they pass.
            if not isinstance(alternative, list):
                return is_variable
            alternative_type = _answer_type(alternative)
            if all(type(item) in (item_type, alternative_type) for item in value):
                return is_variable
        raise _Mismatch(
            "wrong_type",
            f"parameter {parameter!r}: items must be {item_type.__name__}, got {value!r}",
        )
    if answer_type is not None and type(value) is answer_type:
        return True
    raise _Mismatch(
        "wrong_type",
        f"parameter {parameter!r} must be {type_name}, got {type(value).__name__} {value!r}",
    )


def _check_string(parameter: str, value: str, allowed: list[Any]) -> None:
    if _standardized(value) not in {_standardized(a) for a in allowed if isinstance(a, str)}:
        raise _Mismatch(
            "value_not_allowed",
            f"parameter {parameter!r}: {value!r} is not one of {allowed!r} (case-insensitive)",
        )


def _check_list(parameter: str, value: list[Any], allowed: list[Any]) -> None:
    standardized = [_standardized_item(item) for item in value]
    # An alternative is iterated as BFCL does, so the optional marker "" matches an empty list.
    alternatives = [
        [_standardized_item(item) for item in alternative]
        for alternative in allowed
        if isinstance(alternative, (list, str))
    ]
    if standardized not in alternatives:
        raise _Mismatch(
            "value_not_allowed", f"parameter {parameter!r}: {value!r} is not one of {allowed!r}"
        )


def _dict_mismatch(value: dict[str, Any], alternative: Any) -> str | None:
    """Why `value` does not fit one allowed dict (key -> allowed values), or None if it does."""
    if not isinstance(alternative, dict):
        return f"{value!r} is not {alternative!r}"
    for key, item in value.items():
        if key not in alternative:
            return f"unexpected key {key!r}"
        allowed_items = alternative[key]
        if not isinstance(allowed_items, list):
            allowed_items = [allowed_items]
        if _standardized_item(item) not in [_standardized_item(a) for a in allowed_items]:
            return f"key {key!r}: {item!r} is not one of {allowed_items!r}"
    for key, allowed_items in alternative.items():
        if key not in value and "" not in allowed_items:
            return f"missing key {key!r}"
    return None


def _check_dict(parameter: str, value: dict[str, Any], allowed: list[Any]) -> None:
    problem = f"{value!r} is not one of {allowed!r}"
    for alternative in allowed:
        if alternative == "":
            continue
        problem = _dict_mismatch(value, alternative)
        if problem is None:
            return
    raise _Mismatch("value_not_allowed", f"parameter {parameter!r}: {problem}")


def _check_list_of_dicts(parameter: str, value: list[Any], allowed: list[Any]) -> None:
    problem = f"{value!r} is not one of {allowed!r}"
    for alternative in allowed:
        # The optional marker "" counts as an empty list, as in BFCL.
        alternative = [] if alternative == "" else alternative
        if not isinstance(alternative, list):
            continue
        if len(value) != len(alternative):
            problem = f"{len(value)} items where {len(alternative)} are expected"
            continue
        for index, (item, expected) in enumerate(zip(value, alternative, strict=True)):
            mismatch = (
                _dict_mismatch(item, expected)
                if isinstance(item, dict)
                else f"{item!r} is not {expected!r}"
            )
            if mismatch is not None:
                problem = f"item {index}: {mismatch}"
                break
        else:
            return
    raise _Mismatch("value_not_allowed", f"parameter {parameter!r}: {problem}")


def _schema_type(function: Mapping[str, Any], parameter: str, spec: Any) -> tuple[str, type | None]:
    """The schema type name of a parameter and the Python type of its items (arrays, tuples)."""
    type_name = spec.get("type") if isinstance(spec, dict) else None
    if type_name not in _PYTHON_TYPES:
        raise BfclError(
            f"function {function['name']!r}: parameter {parameter!r} has type {type_name!r}"
        )
    if type_name not in _ITEM_CHECKED_TYPES:
        return type_name, None
    item_type_name = (spec.get("items") or {}).get("type")
    if item_type_name not in _PYTHON_TYPES:
        raise BfclError(
            f"function {function['name']!r}: parameter {parameter!r} has items of type {item_type_name!r}"
        )
    return type_name, _PYTHON_TYPES[item_type_name]


def _check_call(
    function: Mapping[str, Any],
    call: tuple[str, dict[str, Any]],
    allowed_values: Mapping[str, list[Any]],
    underscore_names: bool,
) -> None:
    """BFCL's rules for one call against one expected call; raises `_Mismatch` on the first break."""
    name, arguments = call
    expected_name = _underscored(function["name"], underscore_names)
    if name != expected_name:
        raise _Mismatch("wrong_function_name", f"expected {expected_name!r}, got {name!r}")
    parameters = function["parameters"]
    properties = parameters.get("properties", {})
    for parameter in parameters.get("required", []):
        if parameter not in arguments:
            raise _Mismatch(
                "missing_required_parameter", f"{name}: missing required parameter {parameter!r}"
            )
    for parameter, value in arguments.items():
        if parameter not in properties or parameter not in allowed_values:
            raise _Mismatch("unexpected_parameter", f"{name}: unexpected parameter {parameter!r}")
        allowed = allowed_values[parameter]
        type_name, item_type = _schema_type(function, parameter, properties[parameter])
        if type_name == "tuple" and type(value) is tuple:
            value = list(value)
        if type_name == "float" and type(value) is int:
            value = float(value)  # Python would convert an int passed for a float
        if _check_type(parameter, value, allowed, type_name, item_type):
            pass  # a "variable": compared exactly below
        elif type_name == "dict":
            _check_dict(parameter, value, allowed)
            continue
        elif _PYTHON_TYPES[type_name] is list and item_type is dict:
            _check_list_of_dicts(parameter, value, allowed)
            continue
        elif _PYTHON_TYPES[type_name] is str:
            _check_string(parameter, value, allowed)
            continue
        elif _PYTHON_TYPES[type_name] is list:
            _check_list(parameter, value, allowed)
            continue
        if value not in allowed:
            raise _Mismatch(
                "value_not_allowed",
                f"{name}: parameter {parameter!r}: {value!r} is not one of {allowed!r}",
            )
    for parameter, allowed in allowed_values.items():
        if parameter not in arguments and "" not in allowed:
            raise _Mismatch(
                "missing_parameter",
                f"{name}: parameter {parameter!r} is optional in the schema but the answer needs it",
            )


def _check_unordered(
    functions: Sequence[Mapping[str, Any]],
    calls: list[tuple[str, dict[str, Any]]],
    ground_truth: list[dict[str, Any]],
    underscore_names: bool,
) -> None:
    """Each expected call takes the first unmatched model call that passes (BFCL's greedy order)."""
    matched: set[int] = set()
    for expected_index, expected in enumerate(ground_truth):
        ((name, allowed),) = expected.items()
        function = _function_doc(functions, name)
        closest: _Mismatch | None = None
        for index, call in enumerate(calls):
            if index in matched:
                continue
            try:
                _check_call(function, call, allowed, underscore_names)
            except _Mismatch as mismatch:
                # Report the first candidate that calls the right function, if there is one.
                if closest is None or (
                    closest.kind == "wrong_function_name" and mismatch.kind != "wrong_function_name"
                ):
                    closest = mismatch
                continue
            matched.add(index)
            break
        else:
            raise _Mismatch(
                closest.kind,
                f"no model call matches expected call {expected_index} ({name}): {closest.reason}",
            )


def _score_ast(
    category: str,
    entry: Mapping[str, Any],
    calls: list[tuple[str, dict[str, Any]]],
    underscore_names: bool,
) -> None:
    functions, ground_truth = entry["function"], entry["ground_truth"]
    if len(calls) != len(ground_truth):
        raise _Mismatch(
            "wrong_number_of_calls", f"{len(calls)} calls where {len(ground_truth)} are expected"
        )
    if "parallel" in category:
        _check_unordered(functions, calls, ground_truth, underscore_names)
        return
    ((name, allowed),) = ground_truth[0].items()
    # simple: the entry's only function, whatever the answer's key says (as BFCL).
    function = functions[0] if "simple" in category else _function_doc(functions, name)
    _check_call(function, calls[0], allowed, underscore_names)


def score_single_turn(
    category: str,
    entry: Mapping[str, Any],
    model_calls: Sequence[Any],
    *,
    underscore_names: bool = False,
) -> Verdict:
    """BFCL's verdict on the calls a model made for one single-turn entry (from `load_category`)."""
    if category not in SINGLE_TURN_CATEGORIES:
        raise BfclError(
            f"{category!r} is not a single-turn category (one of {', '.join(SINGLE_TURN_CATEGORIES)})"
        )
    _validate_single_turn(category, entry)
    entry_id = entry["id"]
    try:
        calls = [_as_call(call, index) for index, call in enumerate(model_calls)]
        if category in RELEVANCE_CATEGORIES:
            if "irrelevance" in category and calls:
                raise _Mismatch(
                    "irrelevance_detected", f"{len(calls)} calls where none should be made"
                )
            if category == "live_relevance" and not calls:
                raise _Mismatch("no_call", "no call where one should be made")
        else:
            _score_ast(category, entry, calls, underscore_names)
    except _Mismatch as mismatch:
        return Verdict(category, entry_id, False, mismatch.kind, mismatch.reason)
    except BfclError as exc:
        raise BfclError(f"{_where(category, entry)}: {exc}") from None
    return Verdict(category, entry_id, True)


# --- multi-turn state and response checks ----------------------------------------------------------


def _state_differences(model: BfclEnvironment, truth: BfclEnvironment) -> list[str]:
    """`Class.attribute` for each public attribute of a ground-truth instance that the model's
    instance does not equal (the classes' own `__eq__` decide, e.g. files by name and content)."""
    missing = object()
    differences = []
    for class_name, truth_instance in truth.instances.items():
        model_instance = model.instances[class_name]
        for attribute, truth_value in vars(truth_instance).items():
            if attribute.startswith("_"):
                continue
            if getattr(model_instance, attribute, missing) != truth_value:
                differences.append(f"{class_name}.{attribute}")
    return differences


def _missing_results(truth_results: list[str], model_results: list[str]) -> list[str]:
    """Ground-truth results not found among the model's (each model result used once)."""
    available = Counter(model_results)
    missing = []
    for result in truth_results:
        if available[result] > 0:
            available[result] -= 1
        else:
            missing.append(result)
    return missing


def _snippet(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def score_multi_turn(task: Task, calls_per_turn: Sequence[Sequence[Any]]) -> Verdict:
    """BFCL's verdict on a multi-turn conversation: `calls_per_turn[i]` holds the model's calls
    in user turn i (all its steps together). The calls are executed again in a fresh
    `BfclEnvironment`, next to the ground truth, so the verdict does not depend on the rollout."""
    category = task.metadata.get("category", "multi_turn")
    if task.environment.get("kind") != "bfcl":
        raise BfclError(f"task {task.id!r} is not a BFCL task")
    if len(calls_per_turn) != len(task.turns):
        return Verdict(
            category,
            task.id,
            False,
            "wrong_number_of_turns",
            f"{len(calls_per_turn)} turns of calls for {len(task.turns)} user turns",
        )
    model, truth = BfclEnvironment(), BfclEnvironment()
    model.reset(task)
    truth.reset(task)
    model_results: list[str] = []
    for turn_index, (turn, calls) in enumerate(zip(task.turns, calls_per_turn, strict=True)):
        if turn_index:
            model.begin_turn(turn_index)
            truth.begin_turn(turn_index)
        made_a_call = False
        for index, call in enumerate(calls):
            try:
                name, arguments = _as_call(call, index)
            except _Mismatch:
                continue  # BFCL skips what it cannot decode
            made_a_call = True
            model_results.append(model.execute(name, arguments).text)
        truth_results = [
            truth.execute(call.name, call.arguments).text for call in turn.reference_calls
        ]
        if not turn.reference_calls:
            continue  # the model should not be able to act here; BFCL v4 checks nothing
        where = f"turn {turn_index}"
        if not made_a_call:
            return Verdict(
                category,
                task.id,
                False,
                "empty_turn",
                f"{where}: no call, the ground truth makes {len(turn.reference_calls)}",
            )
        differences = _state_differences(model, truth)
        if differences:
            return Verdict(
                category,
                task.id,
                False,
                "state_mismatch",
                f"{where}: state differs from the ground truth's in {', '.join(differences)}",
            )
        missing = _missing_results(truth_results, model_results)
        if missing:
            return Verdict(
                category,
                task.id,
                False,
                "response_mismatch",
                f"{where}: {len(missing)} ground-truth results not among the model's, "
                f"e.g. {_snippet(missing[0])!r}",
            )
    return Verdict(category, task.id, True)


# --- one entry point -------------------------------------------------------------------------------


def score_entry(
    category: str,
    entry: Mapping[str, Any] | Task,
    model_calls: Sequence[Any],
    *,
    underscore_names: bool = False,
) -> Verdict:
    """The verdict for one entry of any supported category.

    Single-turn: `entry` from `load_category(category)`, `model_calls` the calls of the model's
    answer. Multi-turn: `entry` from `load_category` or a `Task` from
    `cacherl_jax.agent.bfcl.load_tasks`, `model_calls` one list of calls per user turn.
    """
    _require_category(category)
    if category in SINGLE_TURN_CATEGORIES:
        return score_single_turn(category, entry, model_calls, underscore_names=underscore_names)
    task = entry if isinstance(entry, Task) else task_from_entry(dict(entry), category)
    return score_multi_turn(task, model_calls)
