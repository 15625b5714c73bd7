"""Tier fidelity: a rollout's cache-answered calls replayed on live tools, counted per tier."""

import json

import numpy as np
import pytest

from cacherl_jax.agent.factory import make_environment
from cacherl_jax.agent.fidelity import (
    add_counts,
    fidelity_metrics,
    replay_rollouts,
    wrong_call_answers,
)
from cacherl_jax.agent.loop import CallRecord, Rollout
from cacherl_jax.agent.procedural import generate_tasks, write_trajectories
from cacherl_jax.agent.procedural.currency import CURRENCIES
from cacherl_jax.agent.tool_cache import ToolCache, ToolCacheConfig, build_from_trajectories
from cacherl_jax.eval import wrong_calls


@pytest.fixture(scope="module")
def tasks():
    return generate_tasks("train", 200, seed=1)


def _task(tasks, kind):
    return next(t for t in tasks if t.metadata.get("kind") == kind)


def _rollout(task, calls):
    """A rollout of `task` that made `calls` (its tokens do not matter here)."""
    empty = np.zeros(1, np.int32)
    return Rollout(
        task_id=task.id, sample=0, token_ids=empty, loss_mask=empty.astype(np.int8),
        logprobs=empty.astype(np.float32), raw_logprobs=empty.astype(np.float32),
        thinking_mask=empty.astype(np.int8), turn_ids=empty, prompt_length=1, turns=[],
        calls=calls, final_answer="x", stop_reason="answer",
    )  # fmt: skip


def _record(name, arguments, tier, result, truncated_tokens=0):
    score = 100.0 if tier in ("exact", "live") else 50.0
    return CallRecord(0, name, arguments, tier, score, result, truncated_tokens=truncated_tokens)


def _live(task, calls):
    """What a fresh environment of the task returns for `calls`, run in order."""
    env = make_environment(task)
    return [env.execute(name, arguments).text for name, arguments in calls]


def test_replay_counts_agreement_per_tier(tasks):
    """An exact hit agrees; a fuzzy hit answered with another key's result disagrees; a
    truncated result agrees on the part shown; a best-effort result that is the live one
    agrees (the tier says how the cache found it, the replay whether it was right)."""
    price = _task(tasks, "shop.price")
    (call,) = price.reference_calls
    right = _live(price, [(call.name, call.arguments)])[0]
    items = price.initial_state["items"]
    wanted = items[call.arguments["item"]]["price"]
    other_item = next(name for name, item in items.items() if item["price"] != wanted)
    other = _live(price, [("get_price", {"item": other_item})])[0]
    assert other != right
    cut = right[:5] + "\n[truncated: 3 more tokens]"
    rollouts = [
        _rollout(price, [_record(call.name, call.arguments, "exact", right)]),
        _rollout(price, [_record(call.name, call.arguments, "fuzzy", other)]),
        _rollout(price, [_record(call.name, call.arguments, "fuzzy", cut, truncated_tokens=3)]),
        _rollout(price, [_record(call.name, call.arguments, "best_effort", right)]),
        _rollout(price, [_record(call.name, call.arguments, "best_effort", "no record")]),
    ]
    counts = replay_rollouts([price], rollouts)
    assert counts == {
        "exact": {"calls": 1, "agree": 1},
        "fuzzy": {"calls": 2, "agree": 1},
        "best_effort": {"calls": 2, "agree": 1},
    }
    assert fidelity_metrics(counts) == {
        "fidelity/exact_calls": 1.0,
        "fidelity/exact_agreement": 1.0,
        "fidelity/fuzzy_calls": 2.0,
        "fidelity/fuzzy_agreement": 0.5,
        "fidelity/best_effort_calls": 2.0,
        "fidelity/best_effort_agreement": 0.5,
    }


def test_live_calls_run_for_the_state_but_are_not_counted(tasks):
    """Two identical purchases: the second's balance depends on the first. The first ran live
    (not counted); the cache answered the second exactly with the balance after both, which
    agrees only if the replay ran the first call too."""
    shop = _task(tasks, "shop.buy")
    (buy,) = shop.reference_calls
    first, second = _live(shop, [(buy.name, buy.arguments)] * 2)
    assert first != second
    rollout = _rollout(
        shop,
        [
            _record(buy.name, buy.arguments, "live", first),
            _record(buy.name, buy.arguments, "exact", second),
        ],
    )
    counts = replay_rollouts([shop], [rollout])
    assert counts["exact"] == {"calls": 1, "agree": 1}
    assert sum(c["calls"] for c in counts.values()) == 1
    only_live = replay_rollouts([shop], [_rollout(shop, [rollout.calls[0]])])
    assert fidelity_metrics(only_live) == {
        "fidelity/exact_calls": 0.0,
        "fidelity/fuzzy_calls": 0.0,
        "fidelity/best_effort_calls": 0.0,
    }  # no agreement where no call of the tier was replayed


def test_counts_add_across_processes():
    one = {"exact": {"calls": 2, "agree": 2}, "fuzzy": {"calls": 1, "agree": 0}}
    two = {"exact": {"calls": 1, "agree": 0}, "best_effort": {"calls": 3, "agree": 1}}
    assert add_counts([one, two]) == {
        "exact": {"calls": 3, "agree": 2},
        "fuzzy": {"calls": 1, "agree": 0},
        "best_effort": {"calls": 3, "agree": 1},
    }


def test_a_wrong_call_is_shown_the_right_calls_result_by_the_cache_not_by_live_tools(
    tasks, tmp_path
):
    """A currency rate with the quote mis-copied matches no reference call: the cache, built
    from the task's reference trajectory, answers it with the reference call's rate (its only
    neighbour in the task's scope); the live tool answers the pair actually asked for."""
    rate = _task(tasks, "currency.rate")
    path = tmp_path / "reference.jsonl"
    write_trajectories(path, [rate], reasoning=False)
    (call,) = rate.reference_calls
    other = next(c for c in CURRENCIES if c not in call.arguments.values())
    wrong = dict(call.arguments, quote=other)
    config = ToolCacheConfig(str(tmp_path / "cache.sqlite"), scope_mode="scoped")
    with ToolCache(config) as cache:
        build_from_trajectories(cache, [str(path)], scope_per_trajectory=True)
        counts = wrong_call_answers(rate, [(call.name, call.arguments), (call.name, wrong)], cache)
        assert (
            cache.lookup(call.name, wrong, scope=rate.id).result
            == _live(rate, [(call.name, call.arguments)])[0]
        )
    assert counts["matched"] == 1 and counts["unmatched"] == 1
    assert counts["unmatched_exact"] == 0
    assert counts["cache_shows_reference"] == 1 and counts["live_shows_reference"] == 0


def test_wrong_calls_of_a_results_folder_counted_per_domain(tmp_path):
    """A results folder whose validation records make every reference call, and in the
    currency rate task also a call with the quote mis-copied: only that call is unmatched, and the
    cache, built from the seed's reference trajectories, shows it the reference's rate."""
    seed, tasks = 3, generate_tasks("validation", 16, 3)
    records = []
    for task in tasks:
        calls = [{"name": c.name, "arguments": c.arguments} for c in task.reference_calls]
        if task.metadata["kind"] == "currency.rate":
            (call,) = task.reference_calls
            other = next(c for c in CURRENCIES if c not in call.arguments.values())
            calls.append({"name": call.name, "arguments": dict(call.arguments, quote=other)})
        calls.append({"name": "get_rate", "arguments": None})  # unparsed: counted, not replayed
        records.append({"task_id": task.id, "kind": task.metadata["kind"], "calls": calls})
    run = tmp_path / "runs" / f"seed{seed}" / "full"
    run.mkdir(parents=True)
    (run / "validation_sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    settings = {"fuzzy_threshold": 80.0, "scope_mode": "scoped"}
    totals = wrong_calls.measure(tmp_path, ["full:sft", "full:grpo"], settings)
    assert not totals["full:grpo"]  # no such file: left out
    by_domain = totals["full:sft"]
    assert set(by_domain) == {"currency", "calendar", "files", "shop"}
    currency = by_domain["currency"]
    reference_calls = sum(len(t.reference_calls) for t in tasks)
    assert currency["unmatched"] == currency["cache_shows_reference"] == 1
    assert currency["live_shows_reference"] == 0
    assert sum(c["matched"] for c in by_domain.values()) == reference_calls
    assert sum(c["calls"] for c in by_domain.values()) == reference_calls + 1 + len(tasks)
    rows = wrong_calls.table_rows(totals)
    assert rows[-1][:5] == ["full:sft", "all", reference_calls + 1 + len(tasks), reference_calls, 1]
    assert len(rows) == 5  # four domains and "all"; full:grpo had no records
    assert wrong_calls.shares(totals) == {
        "full:sft": {"unmatched": 1, "cache_shows_reference": 1.0, "live_shows_reference": 0.0}
    }
