"""Rewards for a finished rollout, each component kept so it can be logged on its own.

    R = a(tier) * answer + (1 - a(tier)) * process

`process` is deterministic and needs no judge: the format of every assistant turn (it parses, no
calls inside the reasoning, no markup leaking into the answer), the validity of each call's
arguments against the tool schema, and ACEBench-style agreement of the calls with the task's
reference calls, in order. `answer` comes from the environment where it can judge (expected
values in the final answer, final state equal to the reference state when the rollout ran live)
or from an LLM judge (`cacherl_jax.rl.judge`). `tier_aware=False` is the fixed-weight ablation.

Which tier sets `a` (`tier_rule`):
- "paper" (the paper's formula, the default): the rollout's worst cache tier. A rollout whose
  tool results were only approximate is judged mostly on its process, so the model is not
  punished for the cache's limits. But a wrong call (a value mis-copied) usually misses the
  cache and lands in best effort, and a failing rollout (answer 0) then scores higher the worse
  its tier: its own mistake buys it process weight, and GRPO can learn to miss.
- "matched": the worst tier over only the calls that match a reference call (same tool,
  canonically equal arguments, as `order_score` matches them). A right call that the cache could
  only answer approximately still lowers `a` (the paper's intent kept); a call that matches no
  reference call is the model's error, not the cache's limit, and does not. No call matches:
  "exact". Tasks without reference calls fall back to "paper".
- "trusted": `a` as under "matched", and the answer is not trusted when a call that matches no
  reference call was answered approximately (fuzzy or best effort). A cache built from reference
  trajectories answers such a call with its nearest neighbour, most often a reference call of
  the same task, so the mistake is shown the right result and the final answer comes out right
  where a live tool would have shown the mistake's consequence
  (`experiments/cache_wrong_calls.py`). The untrusted answer is replaced by its expectation on
  live tools: times `untrusted_answer_scale`, the share of such calls whose live result is a
  reference call's anyway. Tasks without reference calls fall back to "paper".
`Reward.tier` is always the rollout's real worst tier (metrics by tier read it); the tier that
set `a` is `Reward.weight_tier`.

An answer that only talks about the task ("I will call the tool...") gets answer 0 and a process
penalty. A judge that fails leaves `answer = None` with the error recorded; the total then falls
back to the process reward and `answer_missing` says so (never a silent 0).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from cacherl_jax.agent.environment import ReferenceCall, Task, check_arguments, schema_name
from cacherl_jax.agent.outcome import TIERS, CallOutcome, RolloutOutcome, worst_tier
from cacherl_jax.agent.tool_cache import canonical_key

# Markup that must never reach the user-visible answer.
_LEAKED_MARKUP = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>")

# An answer that narrates what the model would do instead of doing it. Checked only on short
# answers without digits, so a real answer that happens to start with "Let me know" survives.
_META_RE = re.compile(
    r"\b(i will|i'll|i would|i am going to|i'm going to|let me|i need to|i should|"
    r"i can (?:call|use|check)|(?:call|use|using) the (?:tool|function)|tool call)\b",
    re.IGNORECASE,
)
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")

# Which calls' tiers set a(tier), and whether an answer is trusted: see the module docstring.
TIER_RULES = ("paper", "matched", "trusted")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    answer_weights: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"exact": 0.60, "fuzzy": 0.30, "best_effort": 0.10}
    )
    tier_aware: bool = True
    tier_rule: str = "paper"  # "paper" | "matched" | "trusted"
    untrusted_answer_scale: float = 0.05  # "trusted": an untrusted answer's expected share
    fixed_answer_weight: float = 0.60  # the ablation's a, the same for every tier
    format_weight: float = 0.2
    validity_weight: float = 0.2
    order_weight: float = 0.6
    meta_penalty: float = 0.5  # process reward is multiplied by (1 - meta_penalty)

    def __post_init__(self):
        if self.tier_rule not in TIER_RULES:
            raise ValueError(f"tier_rule must be one of {TIER_RULES}, got {self.tier_rule!r}")
        missing = set(TIERS) - set(self.answer_weights)
        if missing:
            raise ValueError(f"answer_weights needs a weight for {sorted(missing)}")
        weights = (*self.answer_weights.values(), self.fixed_answer_weight, self.meta_penalty)
        if not all(0.0 <= w <= 1.0 for w in (*weights, self.untrusted_answer_scale)):
            raise ValueError(
                "answer weights, meta_penalty and untrusted_answer_scale must lie in [0, 1]"
            )
        total = self.format_weight + self.validity_weight + self.order_weight
        if not math.isclose(total, 1.0):
            raise ValueError(f"format, validity and order weights must sum to 1, got {total}")

    @classmethod
    def from_config(cls, config: Any) -> RewardConfig:
        """From an ml-collections ConfigDict (or any mapping) with the same field names."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in dict(config).items() if k in fields}
        if "answer_weights" in values:
            values["answer_weights"] = dict(values["answer_weights"])
        return cls(**values)

    def answer_weight(self, tier: str) -> float:
        return self.answer_weights[tier] if self.tier_aware else self.fixed_answer_weight


@dataclasses.dataclass(frozen=True)
class Reward:
    total: float
    answer: float | None  # None: the judge failed (see `judge_error`)
    process: float
    format: float
    validity: float
    order: float
    meta_answer: bool
    tier: str  # the rollout's worst cache tier
    answer_weight: float
    judge_error: str | None = None
    weight_tier: str | None = None  # the tier that set answer_weight (None: the same as `tier`)
    answer_trusted: bool = True  # False: "trusted" scaled an answer the cache may have handed over

    @property
    def answer_missing(self) -> bool:
        return self.answer is None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- process ---------------------------------------------------------------------------------------


def format_score(outcome: RolloutOutcome) -> float:
    """Fraction of assistant turns that parse cleanly; markup in the final answer fails it."""
    if not outcome.turns:
        return 0.0
    clean = [turn.ok for turn in outcome.turns]
    if outcome.final_answer is not None and any(m in outcome.final_answer for m in _LEAKED_MARKUP):
        clean[-1] = False
    return sum(clean) / len(clean)


def validity_score(task: Task, outcome: RolloutOutcome, *, check_types: bool = True) -> float:
    """Fraction of calls to a tool the task offers, with arguments that fit its schema. Without
    calls: 1 if the task needs none, else 0 (not calling is not a way to be valid)."""
    if not outcome.calls:
        return 1.0 if not task.reference_calls else 0.0
    schemas = {schema_name(tool): tool.get("function") or tool for tool in _all_tools(task)}
    valid = 0
    for call in outcome.calls:
        schema = schemas.get(call.name)
        if schema is None or call.arguments is None:
            continue
        try:
            check_arguments(schema, dict(call.arguments), check_types=check_types)
        except ValueError:
            continue
        valid += 1
    return valid / len(outcome.calls)


def _call_key(call: CallOutcome | ReferenceCall) -> tuple[str, str]:
    """What two calls must share to be the same call: the tool and the canonical arguments."""
    return call.name, canonical_key(call.arguments)


def order_score(task: Task, outcome: RolloutOutcome) -> float:
    """ACEBench's milestone agreement: the fraction of reference calls found, in order, among
    the model's calls (same tool, canonically equal arguments; other calls in between are fine)."""
    reference = [_call_key(c) for c in task.reference_calls]
    if not reference:
        return 1.0
    made = [_call_key(c) for c in outcome.calls if c.arguments is not None]
    found, position = 0, 0
    for name, key in reference:
        for index in range(position, len(made)):
            if made[index] == (name, key):
                found, position = found + 1, index + 1
                break
    return found / len(reference)


def is_meta_answer(answer: str | None) -> bool:
    """True for an answer that only talks about the task instead of giving a result."""
    if answer is None or not answer.strip():
        return True
    text = answer.strip()
    return len(text) < 300 and not _NUMBER_RE.search(text) and bool(_META_RE.search(text))


# --- answer ----------------------------------------------------------------------------------------


def _numbers_equal(a: str, b: str) -> bool:
    x, y = float(a), float(b)
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


def _words(text: str) -> list[str]:
    """Case-folded words of the text once its numbers are taken out."""
    return re.findall(r"\w+", _NUMBER_RE.sub(" ", text).casefold())


def answer_contains(answer: str, expected: str) -> float:
    """Fraction of the expected answer's values found in the answer: numbers compared as numbers
    (1.50 == 1.5), words case-insensitively."""
    expected_numbers = _NUMBER_RE.findall(expected)
    words = _words(expected)
    wanted = len(expected_numbers) + len(words)
    if not wanted:
        return 1.0
    answer_numbers = _NUMBER_RE.findall(answer)
    answer_words = set(_words(answer))
    found = sum(any(_numbers_equal(n, m) for m in answer_numbers) for n in expected_numbers)
    found += sum(w in answer_words for w in words)
    return found / wanted


def environment_answer(task: Task, outcome: RolloutOutcome) -> float | None:
    """The environment's verdict in [0, 1], or None when it cannot judge this task (no expected
    answer, and no live final state to compare)."""
    checks = []
    if task.expected_answer is not None:
        answer = outcome.final_answer or ""
        checks.append(answer_contains(answer, task.expected_answer))
    if task.expected_state is not None and outcome.final_state is not None:
        checks.append(1.0 if dict(outcome.final_state) == dict(task.expected_state) else 0.0)
    if not checks:
        return None
    return math.prod(checks)


# --- combination -----------------------------------------------------------------------------------


def _reference_keys(task: Task) -> set[tuple[str, str]]:
    return {_call_key(c) for c in task.reference_calls}


def weight_tier(task: Task, outcome: RolloutOutcome, rule: str = "paper") -> str:
    """The tier that sets a(tier) under `rule` (see the module docstring)."""
    if rule == "paper" or not task.reference_calls:
        return outcome.worst_tier
    reference = _reference_keys(task)
    return worst_tier(
        call.tier
        for call in outcome.calls
        if call.arguments is not None and _call_key(call) in reference
    )


def answer_trusted(task: Task, outcome: RolloutOutcome) -> bool:
    """Whether every call that matches no reference call saw its own live result (answered live
    or by an exact cache hit): otherwise the cache may have shown it the right call's result.
    Without reference calls no call can be told wrong: trusted (the paper's rule applies)."""
    if not task.reference_calls:
        return True
    reference = _reference_keys(task)
    return not any(
        call.tier in ("fuzzy", "best_effort") and _call_key(call) not in reference
        for call in outcome.calls
        if call.arguments is not None
    )


def score_rollout(
    task: Task,
    outcome: RolloutOutcome,
    config: RewardConfig = RewardConfig(),
    *,
    judge_answer: tuple[float | None, str | None] | None = None,
    check_types: bool = True,
) -> Reward:
    """The reward of one rollout. `judge_answer` = (score in [0, 1] or None, error or None) from an
    LLM judge; without it the environment judges (and a task it cannot judge scores 0)."""
    meta = is_meta_answer(outcome.final_answer)
    fmt = format_score(outcome)
    validity = validity_score(task, outcome, check_types=check_types)
    order = order_score(task, outcome)
    process = config.format_weight * fmt + config.validity_weight * validity
    process += config.order_weight * order
    if meta:
        process *= 1.0 - config.meta_penalty

    judge_error = None
    if judge_answer is not None:
        answer, judge_error = judge_answer
    else:
        answer = environment_answer(task, outcome)
        if answer is None:
            answer = 0.0
    if meta and answer is not None:
        answer = 0.0  # an answer that only talks about the task answers nothing
    trusted = config.tier_rule != "trusted" or answer_trusted(task, outcome)
    if not trusted and answer is not None:
        answer *= config.untrusted_answer_scale

    weighted_by = weight_tier(task, outcome, config.tier_rule)
    a = config.answer_weight(weighted_by)
    total = process if answer is None else a * answer + (1.0 - a) * process
    return Reward(
        total=total,
        answer=answer,
        process=process,
        format=fmt,
        validity=validity,
        order=order,
        meta_answer=meta,
        tier=outcome.worst_tier,
        answer_weight=a,
        judge_error=judge_error,
        weight_tier=weighted_by,
        answer_trusted=trusted,
    )


def process_accuracy(task: Task, outcome: RolloutOutcome) -> float:
    """ACEBench's agent metric: 1 if the end state is right, else the in-order milestone fraction.

    Without a live final state, "end state right" means the environment's answer check passes.
    """
    verdict = environment_answer(task, outcome)
    if verdict is not None and verdict >= 1.0:
        return 1.0
    return order_score(task, outcome)


def summarize(rewards: Sequence[Reward]) -> dict[str, float]:
    """Mean of every component, overall and by tier (for the metrics log)."""
    out: dict[str, float] = {}
    if not rewards:
        return out
    n = len(rewards)
    for name in ("total", "process", "format", "validity", "order"):
        out[f"reward/{name}"] = sum(getattr(r, name) for r in rewards) / n
    answered = [r.answer for r in rewards if r.answer is not None]
    if answered:
        out["reward/answer"] = sum(answered) / len(answered)
    out["reward/answer_missing"] = sum(r.answer_missing for r in rewards) / n
    out["reward/meta_answer"] = sum(r.meta_answer for r in rewards) / n
    out["reward/answer_untrusted"] = sum(not r.answer_trusted for r in rewards) / n
    for tier in TIERS:
        group = [r for r in rewards if r.tier == tier]
        out[f"tier/{tier}_fraction"] = len(group) / n
        if group:
            out[f"reward/total_{tier}"] = sum(r.total for r in group) / len(group)
    return out


def _all_tools(task: Task) -> list[dict[str, Any]]:
    tools = list(task.tools)
    for turn in task.turns:
        tools.extend(turn.new_tools)
    return tools
