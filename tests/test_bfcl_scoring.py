"""BFCL v4 scoring: ground truth scores 100%, perturbed answers fail with the right reason, and the
verdicts agree with BFCL's own checkers (imported from the installed `bfcl-eval` package).

BFCL's `ast_checker` module imports `bfcl_eval.constants.model_config`, which imports every API
client BFCL supports (anthropic, openai, ...). It only reads `MODEL_CONFIG_MAPPING[model]
.underscore_to_dot` from it, so a stand-in module with that mapping is put in `sys.modules` while
the checker is imported. Its multi-turn checker imports only light modules. BFCL's multi-turn
checker `eval`s call strings: here only strings this test renders from BFCL's own data.
"""

from __future__ import annotations

import copy
import itertools
import json
import sys
import types
from unittest import mock

import bfcl_eval  # noqa: F401  (installed by the Makefile: its absence fails, it does not skip)
import pytest

from cacherl_jax.agent.bfcl import BfclError, load_tasks, task_from_entry
from cacherl_jax.eval import report
from cacherl_jax.eval.bfcl_scoring import (
    AST_CATEGORIES,
    MULTI_TURN_CATEGORIES,
    Verdict,
    ground_truth_calls,
    load_category,
    score_entry,
    score_multi_turn,
    score_single_turn,
    single_turn_tools,
)

# Entries whose ground truth no answer can pass, under BFCL's checker too: a required parameter
# the answer leaves out or allows only as "" (live_simple_106, live_simple_112 and
# live_multiple_507, 964), or a parameter missing from the schema (live_multiple_862).
UNSATISFIABLE = {
    "live_simple_106-63-0",
    "live_simple_112-68-0",
    "live_multiple_507-149-4",
    "live_multiple_862-181-3",
    "live_multiple_964-207-0",
}


def _import_bfcl_ast_checker():
    model_config = types.ModuleType("bfcl_eval.constants.model_config")
    model_config.MODEL_CONFIG_MAPPING = {
        "dots": types.SimpleNamespace(underscore_to_dot=False),
        "underscores": types.SimpleNamespace(underscore_to_dot=True),
    }
    # patch.dict restores sys.modules afterwards, so no other test sees the stand-in.
    with mock.patch.dict(sys.modules, {"bfcl_eval.constants.model_config": model_config}):
        try:
            from bfcl_eval.constants.enums import Language
            from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
        except ImportError:
            return None
    return lambda *args: ast_checker(*args[:3], Language.PYTHON, *args[3:])


def _import_bfcl_multi_turn_checker():
    try:
        from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker
    except ImportError:
        return None
    return multi_turn_checker


BFCL_AST_CHECKER = _import_bfcl_ast_checker()
BFCL_MULTI_TURN_CHECKER = _import_bfcl_multi_turn_checker()

# BFCL's error types -> our failure kinds (single-turn, non-parallel entries).
_BFCL_KINDS = {
    "wrong_func_name": "wrong_function_name",
    "missing_required": "missing_required_parameter",
    "unexpected_param": "unexpected_parameter",
    "missing_optional": "missing_parameter",
    "wrong_count": "wrong_number_of_calls",
}


def _bfcl_kind(error_type: str) -> str:
    head, _, tail = error_type.partition(":")
    if head == "type_error":
        return "wrong_type"
    if head == "value_error" or tail == "unclear":
        return "value_not_allowed"
    return _BFCL_KINDS[tail]


def _bfcl_ast_verdict(category, entry, calls, model="dots"):
    model_output = [{name: arguments} for name, arguments in calls]
    return BFCL_AST_CHECKER(entry["function"], model_output, entry["ground_truth"], category, model)


def _assert_agrees_with_bfcl(category, entry, calls, verdict, model="dots"):
    if BFCL_AST_CHECKER is None:
        return
    theirs = _bfcl_ast_verdict(category, entry, calls, model)
    assert verdict.valid == theirs["valid"], (entry["id"], verdict, theirs["error"])
    if not theirs["valid"] and "parallel" not in category:
        assert verdict.kind == _bfcl_kind(theirs["error_type"]), (entry["id"], verdict, theirs)


# --- single-turn: ground truth and perturbations over every entry ---------------------------------


@pytest.mark.parametrize("category", AST_CATEGORIES)
def test_ground_truth_scores_100_percent(category):
    entries = load_category(category)
    assert entries
    for entry in entries:
        calls = ground_truth_calls(category, entry)
        verdict = score_single_turn(category, entry, calls)
        assert verdict.valid == (entry["id"] not in UNSATISFIABLE), verdict
        _assert_agrees_with_bfcl(category, entry, calls, verdict)


_WRONG_TYPE_VALUES = {
    "string": 12345,
    "integer": "7",
    "float": "7.5",
    "boolean": "true",
    "array": "x",
    "tuple": "x",
    "dict": "x",
    "any": 3,
}


def _wrong_value(type_name, value, allowed):
    if type_name == "string" and isinstance(value, str):
        return value + "zzq"
    if type_name == "integer" and type(value) is int:
        return value + 1000
    if type_name == "float" and type(value) in (int, float):
        return value + 1000.5
    if type_name == "boolean" and type(value) is bool and (not value) not in allowed:
        return not value
    return None


def _perturbations(category, entry, calls):
    """(label, calls, expected kind): the first call changed in one way each, or an extra call."""
    name, arguments = calls[0]
    function = next(f for f in entry["function"] if f["name"] == name)
    properties = function["parameters"].get("properties", {})
    required = function["parameters"].get("required", [])
    ((_, allowed_values),) = entry["ground_truth"][0].items()
    rest = calls[1:]

    def first_changed(new_arguments):
        return [(name, new_arguments), *rest]

    for parameter, value in arguments.items():
        wrong = _wrong_value(properties[parameter]["type"], value, allowed_values[parameter])
        if wrong is not None:
            yield "wrong_value", first_changed({**arguments, parameter: wrong}), "value_not_allowed"
            break
    present = [parameter for parameter in required if parameter in arguments]
    if present:
        without = {k: v for k, v in arguments.items() if k != present[0]}
        yield "missing_required", first_changed(without), "missing_required_parameter"
    if arguments:
        parameter = next(iter(arguments))
        wrong = _WRONG_TYPE_VALUES[properties[parameter]["type"]]
        yield "wrong_type", first_changed({**arguments, parameter: wrong}), "wrong_type"
    yield "extra_call", [*calls, calls[0]], "wrong_number_of_calls"
    yield "wrong_function", [(name + "_v2", arguments), *rest], "wrong_function_name"
    yield "unexpected_parameter", first_changed({**arguments, "zzq": 1}), "unexpected_parameter"
    # Accepted variations: an int for a float, other case and spacing, another call order.
    for parameter, value in arguments.items():
        if properties[parameter]["type"] == "float" and type(value) is float and value.is_integer():
            yield "int_for_float", first_changed({**arguments, parameter: int(value)}), "ok"
            break
    for parameter, value in arguments.items():
        if properties[parameter]["type"] == "string" and isinstance(value, str):
            spaced = value.upper().replace(" ", "  ")
            yield "string_format", first_changed({**arguments, parameter: spaced}), "ok"
            break
    if len(calls) > 1:
        yield "reversed_order", calls[::-1], None  # BFCL's greedy matching fails a few


@pytest.mark.parametrize("category", AST_CATEGORIES)
def test_perturbed_answers_fail_with_the_right_reason(category):
    checked = 0
    for entry in load_category(category):
        if entry["id"] in UNSATISFIABLE:
            continue
        for label, calls, expected in _perturbations(
            category, entry, ground_truth_calls(category, entry)
        ):
            verdict = score_single_turn(category, entry, calls)
            # In parallel entries a changed call is judged by the expected call it fails to
            # match, whose closest candidate may be another call: only the verdict is fixed.
            if expected is not None and (
                "parallel" not in category or expected in ("ok", "wrong_number_of_calls")
            ):
                assert verdict.kind == expected, (entry["id"], label, verdict)
            elif expected is not None:
                assert not verdict.valid, (entry["id"], label, verdict)
            _assert_agrees_with_bfcl(category, entry, calls, verdict)
            checked += 1
    assert checked >= 5 * len(load_category(category)) - 5 * len(UNSATISFIABLE)


def test_dotted_names_as_underscores_agree_with_bfcl():
    entry = next(e for e in load_category("simple_python") if "." in e["function"][0]["name"])
    calls = ground_truth_calls("simple_python", entry)
    underscored = [(name.replace(".", "_"), arguments) for name, arguments in calls]
    tool_name = single_turn_tools(entry, underscore_names=True)[0]["function"]["name"]
    assert tool_name == underscored[0][0]
    for model, setting in (("dots", False), ("underscores", True)):
        for candidate in (calls, underscored):
            verdict = score_single_turn("simple_python", entry, candidate, underscore_names=setting)
            assert verdict.valid == (candidate is (underscored if setting else calls))
            _assert_agrees_with_bfcl("simple_python", entry, candidate, verdict, model)


# --- single-turn: the rules on hand-written entries (no BFCL needed) ------------------------------


def _entry(properties, required, answer, name="f", functions=()):
    schema = {"type": "dict", "properties": properties, "required": required}
    return {
        "id": "hand_0",
        "function": [{"name": name, "description": "", "parameters": schema}, *functions],
        "ground_truth": [{name: answer}],
    }


def _verdict(entry, arguments, category="simple_python", name="f"):
    verdict = score_single_turn(category, entry, [(name, arguments)])
    _assert_agrees_with_bfcl(category, entry, [(name, arguments)], verdict)
    return verdict


def test_types_optional_parameters_and_allowed_values():
    entry = _entry(
        {
            "x": {"type": "float"},
            "n": {"type": "integer"},
            "city": {"type": "string"},
            "unit": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        ["x", "n"],
        {
            "x": [2.0],
            "n": [3],
            "city": ["San Francisco, CA", "SF"],
            "unit": ["km", ""],
            "tags": [["a", "b"]],
        },
    )
    good = {"x": 2.0, "n": 3, "city": "san francisco ca", "tags": ["A", "b"]}
    assert _verdict(entry, good).valid
    assert _verdict(entry, {**good, "x": 2}).valid  # an int where a float is expected
    assert _verdict(entry, {**good, "unit": "km"}).valid
    cases = {
        "wrong_type": [{**good, "n": 3.0}, {**good, "n": True}, {**good, "tags": [1, 2]}],
        "value_not_allowed": [
            {**good, "n": 4},
            {**good, "unit": "mi"},
            {**good, "city": "Oakland"},
            {**good, "tags": ["b", "a"]},  # lists compare in order
        ],
        "missing_required_parameter": [{k: v for k, v in good.items() if k != "n"}],
        "missing_parameter": [{k: v for k, v in good.items() if k != "city"}],
        "unexpected_parameter": [{**good, "other": 1}],
    }
    for kind, arguments_list in cases.items():
        for arguments in arguments_list:
            verdict = _verdict(entry, arguments)
            assert (verdict.valid, verdict.kind) == (False, kind), arguments
            assert verdict.reason


def test_variable_answers_and_dicts():
    # A string answer for an integer parameter is a "variable": that exact string passes.
    entry = _entry({"n": {"type": "integer"}}, ["n"], {"n": ["count"]})
    assert _verdict(entry, {"n": "count"}).valid
    assert _verdict(entry, {"n": "Count"}).kind == "value_not_allowed"
    entry = _entry(
        {"filters": {"type": "dict"}},
        ["filters"],
        {"filters": [{"color": ["Red"], "size": ["M", ""]}]},
    )
    assert _verdict(entry, {"filters": {"color": "red"}}).valid
    assert _verdict(entry, {"filters": {"color": "red", "size": "M"}}).valid
    for bad in ({"size": "M"}, {"color": "red", "size": "L"}, {"color": "red", "x": 1}):
        assert _verdict(entry, {"filters": bad}).kind == "value_not_allowed", bad


def test_call_counts_order_and_relevance():
    entry = _entry({"a": {"type": "integer"}}, ["a"], {"a": [1]})
    entry["ground_truth"].append({"f": {"a": [2]}})
    both = [("f", {"a": 2}), ("f", {"a": 1})]
    assert score_single_turn("parallel", entry, both).valid
    assert score_single_turn("parallel", entry, both[:1]).kind == "wrong_number_of_calls"
    assert score_single_turn("parallel", entry, [both[0], both[0]]).kind == "value_not_allowed"
    single = _entry({"a": {"type": "integer"}}, ["a"], {"a": [1]})
    assert score_single_turn("simple_python", single, []).kind == "wrong_number_of_calls"
    irrelevance = load_category("irrelevance")[0]
    assert score_single_turn("irrelevance", irrelevance, []).valid
    verdict = score_single_turn("irrelevance", irrelevance, [("f", {})])
    assert verdict.kind == "irrelevance_detected"
    relevance = load_category("live_relevance")[0]
    assert score_single_turn("live_relevance", relevance, [("f", {})]).valid
    assert score_single_turn("live_relevance", relevance, []).kind == "no_call"


def test_model_calls_in_any_shape_and_malformed_ones():
    entry = _entry({"a": {"type": "integer"}}, ["a"], {"a": [1]})
    shapes = [
        ("f", {"a": 1}),
        {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        types.SimpleNamespace(name="f", arguments={"a": 1}),  # like chat.parse.ToolCall
    ]
    for call in shapes:
        assert score_single_turn("simple_python", entry, [call]).valid, call
    for call in [("f", "not json"), ("f", [1]), (None, {"a": 1}), 42]:
        verdict = score_single_turn("simple_python", entry, [call])
        assert verdict.kind == "malformed_call", call


def test_bad_input_names_the_file_entry_and_field():
    with pytest.raises(BfclError, match="unknown BFCL category 'simple'"):
        load_category("simple")
    entry = copy.deepcopy(load_category("simple_python")[0])
    del entry["function"]
    with pytest.raises(
        BfclError, match=r"BFCL_v4_simple_python.json entry 'simple_python_0'.*'function'"
    ):
        score_single_turn("simple_python", entry, [])
    entry = copy.deepcopy(load_category("multiple")[0])
    entry["ground_truth"] = [{"no_such_function": {}}]
    with pytest.raises(
        BfclError, match=r"entry 'multiple_0'.*ground_truth\[0\].*'no_such_function'"
    ):
        score_single_turn("multiple", entry, [])
    entry = _entry({"a": {"type": "complex"}}, ["a"], {"a": [1]})
    with pytest.raises(BfclError, match=r"entry 'hand_0'.*parameter 'a' has type 'complex'"):
        score_single_turn("simple_python", entry, [("f", {"a": 1})])
    with pytest.raises(ValueError, match="unknown verdict kind"):
        Verdict("simple_python", "x", False, "bad_kind")


# --- multi-turn ------------------------------------------------------------------------------------


def test_multi_turn_base_ground_truth_scores_100_percent():
    entries = load_category("multi_turn_base")
    assert len(entries) == 200
    for entry in entries:
        verdict = score_entry(
            "multi_turn_base", entry, ground_truth_calls("multi_turn_base", entry)
        )
        assert verdict.valid, verdict


@pytest.mark.parametrize("category", MULTI_TURN_CATEGORIES[1:])
def test_other_multi_turn_ground_truth_passes_on_a_sample(category):
    entries = load_category(category)[::10]
    for entry in entries:
        verdict = score_entry(category, entry, ground_truth_calls(category, entry))
        assert verdict.valid, verdict


_renamed_runs = itertools.count()


def _bfcl_multi_turn_verdict(entry, calls_per_turn):
    def render(name, arguments):
        return f"{name}({', '.join(f'{key}={value!r}' for key, value in arguments.items())})"

    decoded = [[[render(*call) for call in turn]] if turn else [] for turn in calls_per_turn]
    category = entry["id"].rsplit("_", 1)[0]
    # BFCL keeps instances in module globals keyed by model name: a fresh name per run.
    return BFCL_MULTI_TURN_CHECKER(
        decoded, entry["ground_truth"], entry, category, f"cacherl_test_{next(_renamed_runs)}"
    )


def _multi_turn_perturbations(calls):
    acting = [index for index, turn in enumerate(calls) if turn]
    first, last = acting[0], acting[-1]
    changed = copy.deepcopy(calls)
    changed[first] = []
    yield "drop_turn", changed, "empty_turn"
    changed = copy.deepcopy(calls)
    changed[last] = changed[last][:-1]
    yield "drop_last_call", changed, None
    changed = copy.deepcopy(calls)
    changed[first].append(changed[first][0])
    yield "repeat_call", changed, None
    changed = copy.deepcopy(calls)
    for index in reversed(range(len(changed[last]))):
        name, arguments = changed[last][index]
        strings = [key for key, value in arguments.items() if isinstance(value, str)]
        if strings:
            changed[last][index] = (name, {**arguments, strings[0]: arguments[strings[0]] + "_x"})
            yield "wrong_value", changed, None
            break


def test_multi_turn_perturbations_agree_with_bfcl():
    kinds = set()
    for entry in load_category("multi_turn_base")[::2]:
        task = task_from_entry(copy.deepcopy(entry), "multi_turn_base")
        calls = ground_truth_calls("multi_turn_base", entry)
        if BFCL_MULTI_TURN_CHECKER is not None:
            assert _bfcl_multi_turn_verdict(entry, calls)["valid"], entry["id"]
        for label, changed, expected in _multi_turn_perturbations(calls):
            verdict = score_multi_turn(task, changed)
            kinds.add(verdict.kind)
            if expected is not None:
                assert verdict.kind == expected, (entry["id"], label, verdict)
            if BFCL_MULTI_TURN_CHECKER is None:
                continue
            theirs = _bfcl_multi_turn_verdict(entry, changed)
            assert verdict.valid == theirs["valid"], (entry["id"], label, verdict, theirs)
            if not verdict.valid:  # e.g. state_mismatch <-> multi_turn:instance_state_mismatch
                assert verdict.kind.split("_")[0] in theirs["error_type"], (verdict, theirs)
    assert {"ok", "empty_turn", "state_mismatch", "response_mismatch"} <= kinds


def test_multi_turn_rules_by_hand():
    (task,) = load_tasks("multi_turn_base", ids=["multi_turn_base_0"], with_expected_state=False)
    calls = [[(c.name, c.arguments) for c in turn.reference_calls] for turn in task.turns]
    assert score_multi_turn(task, calls).valid
    assert score_multi_turn(task, calls[:-1]).kind == "wrong_number_of_turns"
    # An extra read-only call changes nothing BFCL checks.
    with_extra = copy.deepcopy(calls)
    with_extra[0].insert(0, ("pwd", {}))
    assert score_multi_turn(task, with_extra).valid
    # A call to an unknown tool fails without raising, and leaves the turn empty of effects.
    broken = copy.deepcopy(calls)
    broken[0] = [("no_such_tool", {})]
    assert not score_multi_turn(task, broken).valid
    # The malformed call is skipped, as BFCL skips what it cannot decode.
    skipped = copy.deepcopy(calls)
    skipped[0] = [("cd", "not json")]
    assert score_multi_turn(task, skipped).kind == "empty_turn"


# --- the results table -----------------------------------------------------------------------------


def test_results_table_markdown_and_json(tmp_path):
    verdicts = [
        Verdict("simple_python", "a", True),
        Verdict("simple_python", "b", False, "wrong_type", "x"),
        Verdict("simple_python", "c", True),
        Verdict("multi_turn_base", "d", False, "state_mismatch", "y"),
    ]
    results = report.summarize(verdicts)
    data = report.to_json(results)
    assert data["categories"]["simple_python"] == {
        "accuracy": round(2 / 3, 6),
        "correct": 2,
        "count": 3,
        "failures": {"wrong_type": 1},
    }
    assert data["overall"]["correct"] == 2 and data["overall"]["count"] == 4
    assert data["category_mean_accuracy"] == round((2 / 3 + 0) / 2, 6)
    markdown = report.render_markdown(results, title="BFCL v4")
    assert "| simple_python | 66.7% | 2 | 3 | wrong_type (1) |" in markdown
    assert "| **overall** | 50.0% | 2 | 4 |" in markdown
    markdown_path, json_path = report.write_report(results, tmp_path)
    assert json.loads(json_path.read_text()) == data
    assert markdown_path.read_text() == report.render_markdown(results)
