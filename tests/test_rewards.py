"""Reward components on procedural tasks, every tier, malformed calls, and the LLM judge."""

import dataclasses
import time

import pytest

from cacherl_jax.agent.outcome import CallOutcome, RolloutOutcome
from cacherl_jax.agent.procedural import generate_tasks
from cacherl_jax.chat.parse import parse_assistant
from cacherl_jax.rl.judge import JudgeConfig, LLMJudge, parse_score
from cacherl_jax.rl.rewards import (
    RewardConfig,
    is_meta_answer,
    process_accuracy,
    score_rollout,
    summarize,
)
from configs import grpo as grpo_configs
from tests.openai_stub import OpenAIStub


@pytest.fixture(scope="module")
def task():
    """A two-call currency task: get_rate, then convert with the rate it returned."""
    tasks = generate_tasks("train", 40, seed=0)
    return next(t for t in tasks if [c.name for c in t.reference_calls] == ["get_rate", "convert"])


def _turn(text):
    return parse_assistant(text)


def _call_text(call):
    import json

    return (
        "<tool_call>\n"
        + json.dumps({"name": call.name, "arguments": call.arguments})
        + "\n</tool_call>"
    )


def _perfect(task, tiers=("exact", "exact"), answer=None):
    calls = task.reference_calls
    turns = tuple(_turn(f"<think>\nstep\n</think>\n\n{_call_text(c)}") for c in calls)
    answer = task.expected_answer if answer is None else answer
    turns += (_turn(f"<think>\ndone\n</think>\n\n{answer}"),)
    outcome_calls = tuple(
        CallOutcome(c.name, c.arguments, tier) for c, tier in zip(calls, tiers, strict=True)
    )
    return RolloutOutcome(turns, outcome_calls, answer)


def test_a_perfect_rollout_scores_one_at_every_tier(task):
    for tier, a in (("exact", 0.6), ("fuzzy", 0.3), ("best_effort", 0.1)):
        reward = score_rollout(task, _perfect(task, ("exact", tier)))
        assert reward.tier == tier and reward.answer_weight == a
        assert reward.total == pytest.approx(1.0) and reward.answer == 1.0 and reward.process == 1.0


def test_tier_aware_weight_moves_the_total_with_the_worst_tier(task):
    """A wrong answer after perfect calls: the worse the tier, the less the answer counts."""
    totals = {}
    for tier in ("exact", "fuzzy", "best_effort"):
        reward = score_rollout(task, _perfect(task, (tier, "exact"), answer="12.5 GBP"))
        assert reward.answer == 0.0 and reward.process == pytest.approx(1.0)
        totals[tier] = reward.total
    assert totals == pytest.approx({"exact": 0.4, "fuzzy": 0.7, "best_effort": 0.9})
    fixed = RewardConfig(tier_aware=False)
    for tier in ("exact", "fuzzy", "best_effort"):
        reward = score_rollout(task, _perfect(task, (tier, tier), answer="12.5 GBP"), fixed)
        assert reward.total == pytest.approx(0.4)


def test_live_calls_count_as_exact(task):
    outcome = _perfect(task, ("live", "live"))
    assert outcome.worst_tier == "exact"


def test_order_counts_reference_calls_found_in_order(task):
    first, second = task.reference_calls
    wrong_rate = dict(second.arguments, rate=99.0)
    cases = [
        ((first, second), 1.0),
        ((second, first), 0.5),  # out of order: only one of them is found in sequence
        ((first,), 0.5),
        ((first, CallOutcome("convert", wrong_rate)), 0.5),
        ((CallOutcome("get_rate", {"quote": first.arguments["quote"], "base": first.arguments["base"]}), second), 1.0),
        ((), 0.0),
    ]  # fmt: skip
    for calls, expected in cases:
        outcome = RolloutOutcome(
            (_turn("x"),), tuple(CallOutcome(c.name, c.arguments) for c in calls), "x"
        )
        assert score_rollout(task, outcome).order == expected, calls


def test_malformed_and_invalid_calls(task):
    first = task.reference_calls[0]
    bad_json = _turn('<tool_call>\n{"name": "get_rate", "arguments": {"base": }\n</tool_call>')
    in_thinking = _turn(f"<think>\n{_call_text(first)}\n</think>\n\nok")
    assert not bad_json.ok and not in_thinking.ok
    outcome = RolloutOutcome(
        (bad_json, in_thinking, _turn(task.expected_answer)),
        (
            CallOutcome("get_rate", None),  # the JSON did not parse
            CallOutcome("no_such_tool", {"x": 1}),
            CallOutcome("get_rate", {"base": first.arguments["base"]}),  # missing 'quote'
            CallOutcome("convert", {"amount": "lots", "rate": 1.0}),  # wrong type
            CallOutcome(first.name, first.arguments),
        ),
        task.expected_answer,
    )
    reward = score_rollout(task, outcome)
    assert reward.format == pytest.approx(1 / 3)
    assert reward.validity == pytest.approx(1 / 5)
    assert reward.order == 0.5


def test_leaked_markup_in_the_answer_fails_the_format(task):
    answer = f"{task.expected_answer} </think>"
    outcome = dataclasses.replace(_perfect(task), final_answer=answer)
    assert score_rollout(task, outcome).format == pytest.approx(2 / 3)


def test_meta_answers_are_penalised(task):
    for text in (
        "I will call the get_rate tool to find the rate.",
        "Let me check that for you.",
        "",
        None,
    ):
        assert is_meta_answer(text), text
    for text in ("397.02 EUR", "Let me know: it is 12 EUR.", "Done: the file was copied."):
        assert not is_meta_answer(text), text
    reward = score_rollout(task, _perfect(task, answer="I will use the tool to convert it."))
    assert reward.meta_answer and reward.answer == 0.0
    assert reward.process == pytest.approx(0.5)
    assert reward.total == pytest.approx(0.6 * 0 + 0.4 * 0.5)


def test_answers_compare_numbers_as_numbers(task):
    expected = task.expected_answer  # e.g. "397.02 EUR"
    number, unit = expected.split()
    assert (
        score_rollout(
            task, _perfect(task, answer=f"It is {float(number):.3f} {unit.lower()}.")
        ).answer
        == 1.0
    )
    assert score_rollout(task, _perfect(task, answer=f"{number}")).answer == 0.5


def test_state_is_checked_when_the_rollout_ran_live():
    task = next(t for t in generate_tasks("train", 200, seed=1) if t.metadata["domain"] == "shop"
                and t.expected_state is not None and t.expected_state != t.initial_state)  # fmt: skip
    outcome = _perfect(task, tuple("live" for _ in task.reference_calls))
    right = dataclasses.replace(outcome, final_state=task.expected_state)
    wrong = dataclasses.replace(outcome, final_state=task.initial_state)
    assert score_rollout(task, right).answer == 1.0 and score_rollout(task, wrong).answer == 0.0
    assert process_accuracy(task, right) == 1.0


def test_summary_by_tier(task):
    rewards = [
        score_rollout(task, _perfect(task, ("exact", "exact"))),
        score_rollout(task, _perfect(task, ("fuzzy", "exact"), answer="0 GBP")),
    ]
    summary = summarize(rewards)
    assert summary["tier/exact_fraction"] == 0.5 and summary["tier/best_effort_fraction"] == 0.0
    assert summary["reward/total_exact"] == pytest.approx(1.0)
    assert summary["reward/total_fuzzy"] == pytest.approx(0.7)


def test_bad_reward_config():
    with pytest.raises(ValueError, match="best_effort"):
        RewardConfig(answer_weights={"exact": 0.6, "fuzzy": 0.3})
    with pytest.raises(ValueError, match="sum to 1"):
        RewardConfig(order_weight=0.9)


# --- which tier sets the answer weight --------------------------------------------------------


def _miscopied(task, tiers, answer):
    """The currency task's two calls, the second with a mis-copied rate, then `answer`."""
    first, second = task.reference_calls
    wrong = CallOutcome("convert", dict(second.arguments, rate=second.arguments["rate"] + 1.0))
    calls = (
        CallOutcome(first.name, first.arguments, tiers[0]),
        dataclasses.replace(wrong, tier=tiers[1]),
    )
    turns = tuple(_turn(f"<think>\nstep\n</think>\n\n{_call_text(c)}") for c in calls)
    turns += (_turn(f"<think>\ndone\n</think>\n\n{answer}"),)
    return RolloutOutcome(turns, calls, answer)


def test_the_paper_rule_pays_a_miscopied_call_that_misses_the_cache(task):
    """Both fail (answer 0). Right calls, exact: process 1, a = 0.6 -> 0.4. Second call
    mis-copied (valid, but only one of two reference calls found: process 0.2 + 0.2 + 0.6 * 0.5
    = 0.7), best effort: a = 0.1 -> 0.9 * 0.7 = 0.63. Under "matched" only the right first call
    (exact) sets a = 0.6 -> 0.4 * 0.7 = 0.28: the miss no longer pays."""
    right = _perfect(task, ("exact", "exact"), answer="12.5 GBP")
    missed = _miscopied(task, ("exact", "best_effort"), answer="12.5 GBP")
    paper, matched = RewardConfig(), RewardConfig(tier_rule="matched")

    assert score_rollout(task, right, paper).total == pytest.approx(0.4)
    exploit = score_rollout(task, missed, paper)
    assert exploit.process == pytest.approx(0.7) and exploit.total == pytest.approx(0.63)
    assert exploit.weight_tier == "best_effort"

    assert score_rollout(task, right, matched).total == pytest.approx(0.4)
    fixed = score_rollout(task, missed, matched)
    assert fixed.total == pytest.approx(0.28) and fixed.answer_weight == 0.6
    # The record keeps the rollout's real worst tier for the metrics by tier.
    assert (fixed.tier, fixed.weight_tier) == ("best_effort", "exact")


def test_matched_keeps_the_lower_weight_for_right_calls_the_cache_answers_approximately(task):
    """Both calls right, the second answered fuzzy / best effort, answer wrong: process 1, so
    the total is 1 - a with a = 0.3 / 0.1, as under the paper's rule."""
    matched = RewardConfig(tier_rule="matched")
    for tier, a in (("fuzzy", 0.3), ("best_effort", 0.1)):
        reward = score_rollout(task, _perfect(task, ("exact", tier), answer="12.5 GBP"), matched)
        assert (reward.weight_tier, reward.answer_weight) == (tier, a)
        assert reward.total == pytest.approx(1.0 - a)
    # No call matches a reference call (both mis-copied, both missing the cache): full weight.
    missed = _miscopied(task, ("best_effort", "best_effort"), answer="12.5 GBP")
    first = missed.calls[0]
    wrong_first = dataclasses.replace(first, arguments=dict(first.arguments, quote="ZZZ"))
    none_right = dataclasses.replace(missed, calls=(wrong_first, missed.calls[1]))
    reward = score_rollout(task, none_right, matched)
    assert (reward.tier, reward.weight_tier, reward.answer_weight) == ("best_effort", "exact", 0.6)
    # The fixed-weight ablation ignores the rule.
    unaware = RewardConfig(tier_aware=False, tier_rule="matched")
    assert score_rollout(task, _perfect(task, ("fuzzy", "fuzzy")), unaware).answer_weight == 0.6


def test_matched_falls_back_to_the_paper_rule_without_reference_calls(task):
    """No reference calls: order 1 and both calls valid, so process 1; best effort under either
    rule gives a = 0.1 and, with answer 0, a total of 0.9."""
    bare = dataclasses.replace(
        task, turns=[dataclasses.replace(turn, reference_calls=[]) for turn in task.turns]
    )
    outcome = _perfect(task, ("exact", "best_effort"), answer="12.5 GBP")
    for rule in ("paper", "matched"):
        reward = score_rollout(bare, outcome, RewardConfig(tier_rule=rule))
        assert reward.weight_tier == "best_effort" and reward.total == pytest.approx(0.9), rule


def test_tier_rule_comes_from_the_config(task):
    config = grpo_configs.get_config("tiny")
    assert RewardConfig.from_config(config.reward).tier_rule == "paper"
    config.reward.tier_rule = "matched"
    reward_config = RewardConfig.from_config(config.reward)
    missed = _miscopied(task, ("exact", "best_effort"), answer="12.5 GBP")
    assert score_rollout(task, missed, reward_config).total == pytest.approx(0.28)
    with pytest.raises(ValueError, match=r"\('paper', 'matched', 'trusted'\)"):
        RewardConfig(tier_rule="cheapest")
    with pytest.raises(ValueError, match="untrusted_answer_scale"):
        RewardConfig(untrusted_answer_scale=1.5)


def test_trusted_scales_an_answer_a_wrong_call_may_have_been_handed(task):
    """The mis-copied rate answered best effort, and the final answer right anyway (the cache
    showed the reference call's result): process 0.7. "matched" sets a = 0.6 from the right
    first call and pays the answer: 0.6 + 0.4 * 0.7 = 0.88. "trusted" keeps a = 0.6 and counts
    the answer at 0.05: 0.03 + 0.28 = 0.31. The same rollout answered live, or the wrong call
    answered exactly (its own live result), keeps the answer."""
    handed = _miscopied(task, ("exact", "best_effort"), answer=task.expected_answer)
    matched, trusted = RewardConfig(tier_rule="matched"), RewardConfig(tier_rule="trusted")
    assert score_rollout(task, handed, matched).total == pytest.approx(0.88)
    reward = score_rollout(task, handed, trusted)
    assert (reward.weight_tier, reward.answer_weight) == ("exact", 0.6)
    assert not reward.answer_trusted
    assert reward.answer == pytest.approx(0.05) and reward.total == pytest.approx(0.31)
    for tiers in (("live", "live"), ("exact", "exact"), ("fuzzy", "exact")):
        own = _miscopied(task, tiers, answer=task.expected_answer)
        kept = score_rollout(task, own, trusted)
        assert kept.answer_trusted and kept.answer == 1.0, tiers
    # A right call answered approximately is the cache's limit, not the model's: trusted, a = 0.1.
    right = score_rollout(task, _perfect(task, ("exact", "best_effort")), trusted)
    assert right.answer_trusted and right.total == pytest.approx(1.0) and right.answer_weight == 0.1
    summary = summarize([reward, right])
    assert summary["reward/answer_untrusted"] == pytest.approx(0.5)


# --- the LLM judge, over real HTTP --------------------------------------------------------------


def test_parse_score():
    assert parse_score("Score: 4") == 0.8
    assert parse_score("reasoning... score = 2.5\nScore: 5") == 1.0
    assert parse_score("Score: 9") is None and parse_score("great answer") is None


def test_judge_scores_caches_and_records_failures(task, tmp_path):
    def reply(body):
        prompt = body["messages"][-1]["content"]
        if "SLOW" in prompt:
            time.sleep(2.0)
        if "BROKEN" in prompt:
            return None
        if "VAGUE" in prompt:
            return "It is fine I guess."
        return "Score: 4"

    with OpenAIStub(reply) as stub:
        config = JudgeConfig(
            base_url=stub.base_url, model="judge", cache_path=str(tmp_path / "judge.sqlite"),
            timeout_s=0.5, max_retries=1,
        )  # fmt: skip
        judge = LLMJudge(config)
        good = judge.judge("How much?", "397 EUR", reference="397.02 EUR", tool_results=["{}"])
        assert good.score == 0.8 and good.error is None and not good.cached
        n = len(stub.requests)
        assert judge.judge(
            "How much?", "397 EUR", reference="397.02 EUR", tool_results=["{}"]
        ).cached
        assert len(stub.requests) == n  # served from the disk cache
        # A fresh judge on the same cache file still hits it.
        assert LLMJudge(config).judge("How much?", "397 EUR", "397.02 EUR", ["{}"]).cached

        for answer, error in (("SLOW", "Timeout"), ("BROKEN", "Error"), ("VAGUE", "no 'Score")):
            result = judge.judge("How much?", answer)
            assert result.score is None and error in result.error, result
        # Failures are never cached: a retry asks again.
        before = len(stub.requests)
        judge.judge("How much?", "VAGUE")
        assert len(stub.requests) == before + 1

        results = judge.judge_many([{"request": f"q{i}", "answer": "a"} for i in range(6)])
        assert [r.score for r in results] == [0.8] * 6

    failed = score_rollout(task, _perfect(task), judge_answer=(None, "Timeout: read timed out"))
    assert (
        failed.answer is None and failed.answer_missing and failed.judge_error.startswith("Timeout")
    )
    assert failed.total == pytest.approx(failed.process)
    judged = score_rollout(task, _perfect(task, ("fuzzy", "exact")), judge_answer=(0.8, None))
    assert judged.total == pytest.approx(0.3 * 0.8 + 0.7 * 1.0)


def test_a_corrupt_judge_cache_is_a_clear_error(tmp_path):
    bad = tmp_path / "judge.sqlite"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match="not a usable judge cache"):
        LLMJudge(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m", cache_path=str(bad)))
