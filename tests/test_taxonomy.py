"""The error taxonomy of failed validation tasks, on hand-built rollouts of procedural tasks: one
rollout per bucket, scored by `score_rollouts` as the trainers score theirs."""

import json
import pickle

import numpy as np
import pytest

from cacherl_jax.agent.environment import execute_reference
from cacherl_jax.agent.factory import make_environment
from cacherl_jax.agent.loop import CallRecord, Rollout
from cacherl_jax.agent.procedural import generate_tasks
from cacherl_jax.chat.parse import ParsedAssistant, Problem, ToolCall
from cacherl_jax.eval import taxonomy
from cacherl_jax.rl.rewards import RewardConfig
from cacherl_jax.rl.scoring import MadeCall, score_rollouts


def _task(kind):
    return generate_tasks("validation", 1, seed=3, kinds=[kind])[0]


def _rollout(task, calls, answer, *, problems=()):
    """A rollout that made `calls` ((name, arguments) pairs), one assistant turn each, answered
    by running them live, then answered `answer`; `problems` are the first turn's parse problems."""
    environment = make_environment(task)
    records, turns = [], []
    for index, (name, arguments) in enumerate(calls):
        turn_problems = tuple(problems) if index == 0 else ()
        call = ToolCall(name, arguments or {}, "")
        turns.append(
            ParsedAssistant("", "", (call,) if arguments is not None else (), turn_problems)
        )
        result = environment.execute(name, arguments or {})
        kinds = tuple(p.kind for p in turn_problems)
        records.append(
            CallRecord(index, name, arguments, "live", 100.0, result.text, problems=kinds)
        )
    turns.append(ParsedAssistant("", answer, (), () if calls else tuple(problems)))
    tokens = np.zeros(4, np.int32)
    return Rollout(
        task_id=task.id, sample=0, token_ids=tokens, loss_mask=np.ones(4, np.int8),
        logprobs=np.zeros(4, np.float32), raw_logprobs=np.zeros(4, np.float32),
        thinking_mask=np.zeros(4, np.int8), turn_ids=np.zeros(4, np.int32), prompt_length=0,
        turns=turns, calls=records, final_answer=answer, stop_reason="answer",
    )  # fmt: skip


def _result(task, calls, answer, **kwargs):
    [result] = score_rollouts([task], [_rollout(task, calls, answer, **kwargs)], RewardConfig())
    return result


def _reference(task):
    """The reference calls as (name, arguments) and their results, parsed."""
    executed = execute_reference(task, make_environment(task))
    return [(c.name, dict(c.arguments)) for c in executed], [
        json.loads(c.result.text) for c in executed
    ]


@pytest.fixture(scope="module")
def convert():
    """A currency.convert task: get_rate(base, quote) from the request, then convert(amount,
    rate) with the rate copied from get_rate's result."""
    task = _task("currency.convert")
    calls, _ = _reference(task)
    assert [name for name, _ in calls] == ["get_rate", "convert"]
    return task, calls


def test_success_has_no_bucket(convert):
    task, calls = convert
    result = _result(task, calls, task.expected_answer)
    assert result.success and taxonomy.failure_bucket(task, result) is None
    assert taxonomy.failure_detail(task, result) == ""


def test_a_rate_copied_wrong_from_the_tool_result_is_wrong_value_result(convert):
    task, calls = convert
    (rate_call, (_, arguments)) = calls
    wrong = {**arguments, "rate": round(arguments["rate"] + 0.111, 3)}
    answer = f"{round(wrong['amount'] * wrong['rate'], 2)} {rate_call[1]['quote']}"
    result = _result(task, [rate_call, ("convert", wrong)], answer)
    assert not result.success
    assert taxonomy.failure_bucket(task, result) == "wrong_value_result"
    assert "rate" in taxonomy.failure_detail(task, result)


def test_a_currency_code_copied_wrong_from_the_request_is_wrong_value_request(convert):
    task, calls = convert
    (_, rate_arguments), (_, convert_arguments) = calls
    other = next(c for c in ("USD", "EUR", "GBP") if c not in task.messages[-1]["content"])
    wrong = {**rate_arguments, "quote": other}
    # The later convert then copies the wrong rate too; the first wrong value is the cause.
    result = _result(task, [("get_rate", wrong), ("convert", convert_arguments)], "0 EUR")
    assert taxonomy.failure_bucket(task, result) == "wrong_value_request"
    assert "quote" in taxonomy.failure_detail(task, result)


def test_an_argument_the_reference_has_not_is_wrong_value_other(convert):
    task, calls = convert
    (rate_call, (_, arguments)) = calls
    result = _result(task, [rate_call, ("convert", {**arguments, "fee": 1})], "1 EUR")
    assert taxonomy.failure_bucket(task, result) == "wrong_value_other"


def test_format_no_call_wrong_tool_stops_early_extra_calls_wrong_answer(convert):
    task, calls = convert
    rate_call = calls[0]
    unclosed = [Problem("unclosed_think", "<think> never closed")]
    cases = {
        "format": _result(task, calls, "2 EUR</think>"),
        "no_call": _result(task, [], "I will call the tool to convert it."),
        "wrong_tool": _result(task, [rate_call, rate_call], "1 EUR"),
        "stops_early": _result(task, [rate_call], "The rate is 1.2."),
        "extra_calls": _result(task, [*calls, rate_call], "12 EUR"),
        "wrong_answer": _result(task, calls, "It is 3.5 EUR."),
    }
    cases["format_in_a_call"] = _result(task, calls, "2 EUR", problems=unclosed)
    for expected, result in cases.items():
        assert not result.success, expected
        assert taxonomy.failure_bucket(task, result) == expected.removesuffix("_in_a_call")
    assert cases["format"].reward.format < 1.0
    assert cases["format_in_a_call"].made_calls[0].problems == ("unclosed_think",)


def test_same_calls_in_another_order_is_wrong_order():
    task = _task("currency.convert_twice")
    calls, results = _reference(task)
    assert [name for name, _ in calls] == ["get_rate", "convert", "get_rate", "convert"]
    shuffled = [calls[2], calls[0], calls[1], calls[3]]
    # It answers with the amount in the middle currency.
    result = _result(task, shuffled, f"{results[1]['amount']} {calls[0][1]['quote']}")
    assert not result.success
    assert taxonomy.failure_bucket(task, result) == "wrong_order"


def test_calls_compare_canonically_as_the_order_score_does(convert):
    """{"amount": 250.0} is {"amount": 250}: the calls are right, the answer is what failed."""
    task, calls = convert
    (rate_call, (_, arguments)) = calls
    floats = {"rate": arguments["rate"], "amount": float(arguments["amount"])}
    result = _result(task, [rate_call, ("convert", floats)], "2 EUR")
    assert result.reward.order == 1.0
    assert taxonomy.failure_bucket(task, result) == "wrong_answer"


def test_results_keep_calls_and_answer_and_pickle(convert):
    task, calls = convert
    result = _result(task, calls, task.expected_answer)
    assert result.made_calls == tuple(MadeCall(name, args, "live") for name, args in calls)
    assert result.final_answer == task.expected_answer
    assert pickle.loads(pickle.dumps(result)) == result
    as_dict = json.loads(json.dumps(result.to_dict()))
    assert as_dict["made_calls"][1] == {
        "name": "convert", "arguments": calls[1][1], "tier": "live", "problems": []
    }  # fmt: skip


def test_records_round_trip_through_the_file_and_count_by_bucket(convert, tmp_path):
    task, calls = convert
    results = [
        _result(task, calls, task.expected_answer),
        _result(task, [], "I will call the tool."),
        _result(task, calls[:1], "The rate is 1.1."),
        _result(task, calls[:1], "The rate is 1.2."),
    ]
    path = taxonomy.write_validation_records(
        tmp_path / "v" / "validation_sft.jsonl", [task], results
    )
    records = taxonomy.read_validation_records(path)
    assert records == [json.loads(json.dumps(taxonomy.validation_record(task, r))) for r in results]
    first = records[0]
    assert first["kind"] == "currency.convert" and first["reference_calls_count"] == 2
    assert first["success"] and first["failure"] is None
    assert first["template_held_out"] == task.metadata["template_held_out"]
    assert first["expected_answer"] == task.expected_answer
    assert first["reference_calls"] == [{"name": n, "arguments": a} for n, a in calls]
    assert set(first["reward"]) == {"total", "answer", "process", "format", "validity", "order",
                                    "tier"}  # fmt: skip
    assert [r["failure"] for r in records] == [None, "no_call", "stops_early", "stops_early"]
    table = taxonomy.taxonomy_table(records)
    assert list(table) == list(taxonomy.BUCKETS)
    assert table["stops_early"] == 2 and table["no_call"] == 1 and sum(table.values()) == 3


def test_successes_by_domain_and_the_reports_table(tmp_path):
    from cacherl_jax.demo_report import domain_section

    records = [
        {"kind": "currency.rate", "success": False},
        {"kind": "currency.convert", "success": True},
        {"kind": "files.read", "success": False},
        {"kind": "calendar.date", "success": True},
    ]
    assert taxonomy.success_by_domain(records) == {
        "calendar": (1, 1), "currency": (1, 2), "files": (0, 1)
    }  # fmt: skip
    (tmp_path / "validation_sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = domain_section(tmp_path, ["base", "sft"])  # base has no records: no row
    assert lines[2:5] == [
        "| stage | calendar | currency | files |",
        "|---|---|---|---|",
        "| sft | 1/1 | 1/2 | 0/1 |",
    ]
    assert domain_section(tmp_path, ["base"]) == []


def test_group_signal_counts_solved_and_mixed_groups_per_kind():
    def record(kind, task, success):
        return {"kind": kind, "task_id": task, "success": success}

    records = [
        record("shop.buy", "a", True), record("shop.buy", "a", True),
        record("shop.buy", "b", True), record("shop.buy", "b", False),
        record("currency.rate", "c", False), record("currency.rate", "c", False),
        record("currency.rate", "d", False), record("currency.rate", "d", False),
        record("calendar.date", "e", False), record("calendar.date", "e", True),
    ]  # fmt: skip
    signal = taxonomy.group_signal_by_kind(records)
    assert list(signal) == ["calendar.date", "currency.rate", "shop.buy"]
    assert signal["shop.buy"] == taxonomy.GroupSignal(
        tasks=2, samples=4, success_rate=0.75, solved_any=2, mixed=1
    )
    # Never solved by any sample: no group has a success spread for GRPO to learn from.
    assert signal["currency.rate"] == taxonomy.GroupSignal(
        tasks=2, samples=4, success_rate=0.0, solved_any=0, mixed=0
    )
    assert signal["calendar.date"].mixed == 1 and signal["calendar.date"].success_rate == 0.5


def test_reachable_counts_greedy_failures_some_sample_solves():
    greedy = [
        {"kind": "calendar.date", "task_id": "e", "success": False},  # a sample solves it
        {"kind": "calendar.date", "task_id": "f", "success": True},  # already solved
        {"kind": "currency.rate", "task_id": "c", "success": False},  # no sample solves it
    ]
    sampled = [
        {"kind": "calendar.date", "task_id": "e", "success": False},
        {"kind": "calendar.date", "task_id": "e", "success": True},
        {"kind": "calendar.date", "task_id": "f", "success": True},
        {"kind": "currency.rate", "task_id": "c", "success": False},
    ]
    assert taxonomy.reachable_by_kind(greedy, sampled) == {"calendar.date": 1, "currency.rate": 0}
