"""How faithful the cache's answers were: a rollout's calls replayed on live tools.

    counts = replay_rollouts(tasks, rollouts)      # {tier: {"calls": n, "agree": k}}
    metrics = fidelity_metrics(counts)             # fidelity/<tier>_calls, _agreement

Each rollout's calls run again, in order, on a fresh live environment of its task (so stateful
tools see the state the calls themselves build), and each call the cache answered is compared
with the live result: the same text agrees. This is the live-tool agreement of each cache tier
during training (the exact tier should agree always, fuzzy often, best effort seldom), next to
`loop.fidelity_report`, which replays given calls against the cache as it is now.

`wrong_call_answers` asks what a call that matches no reference call (a value mis-copied, a wrong
tool) is shown: a cache built from the reference trajectories answers it with its nearest
neighbour, usually a reference call of the same task, so the model sees the result the right call
would get, where a live tool shows the consequence of its mistake.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from cacherl_jax.agent.environment import Environment, Task
from cacherl_jax.agent.factory import make_environment
from cacherl_jax.agent.loop import CallRecord, Rollout, cache_scope
from cacherl_jax.agent.outcome import TIERS
from cacherl_jax.agent.tool_cache import ToolCache, canonical_key

TierCounts = dict[str, dict[str, int]]  # {tier: {"calls": n, "agree": k}}, every cache tier

# The note the loop appends to a result it cut (`CacheAgentLoop._truncate`).
_TRUNCATION_NOTE = re.compile(r"\n\[truncated: \d+ more tokens\]\Z")


def empty_counts() -> TierCounts:
    return {tier: {"calls": 0, "agree": 0} for tier in TIERS}


def replay_rollouts(
    tasks: Sequence[Task],
    rollouts: Sequence[Rollout],
    *,
    make_env: Callable[[Task], Environment] = make_environment,
) -> TierCounts:
    """Per cache tier, the rollouts' calls the cache answered and how many of them showed the
    model what the live tool returns. Live calls (hybrid, live modes) run too, to keep the
    state, but are not counted. Every rollout's task must be among `tasks`."""
    by_id = {task.id: task for task in tasks}
    counts = empty_counts()
    for rollout in rollouts:
        env = make_env(by_id[rollout.task_id])
        for call in rollout.calls:
            while env.turn < call.user_turn:  # the task's later user turns open new tools
                env.begin_turn(env.turn + 1)
            live = env.execute(call.name, call.arguments).text
            if call.tier in counts:
                counts[call.tier]["calls"] += 1
                counts[call.tier]["agree"] += int(shows_live_result(call, live))
    return counts


def shows_live_result(call: CallRecord, live: str) -> bool:
    """Whether the call's result, as the model saw it, is the live result. A result the loop cut
    is compared on the part shown."""
    if not call.truncated_tokens:
        return call.result == live
    shown = _TRUNCATION_NOTE.sub("", call.result).rstrip("\ufffd")  # a character cut in two
    return live.startswith(shown)


def add_counts(parts: Iterable[TierCounts]) -> TierCounts:
    """The sum of several processes' (or steps') counts."""
    total = empty_counts()
    for part in parts:
        for tier, counts in part.items():
            for key, value in counts.items():
                total[tier][key] += value
    return total


def fidelity_metrics(counts: TierCounts) -> dict[str, float]:
    """`fidelity/<tier>_calls` for every tier, and `fidelity/<tier>_agreement` where it had any."""
    metrics = {}
    for tier in TIERS:
        calls = counts[tier]["calls"]
        metrics[f"fidelity/{tier}_calls"] = float(calls)
        if calls:
            metrics[f"fidelity/{tier}_agreement"] = counts[tier]["agree"] / calls
    return metrics


def wrong_call_answers(
    task: Task,
    calls: Sequence[tuple[str, dict[str, Any]]],
    cache: ToolCache,
    *,
    scope: Literal["task", "world", "none"] = "task",
    make_env: Callable[[Task], Environment] = make_environment,
) -> Counter[str]:
    """What the cache and the live tools showed for the task's `calls` (run in order) that match
    no reference call of the task (same tool, canonically equal arguments).

    Counts: `matched` and `unmatched` calls; per tier the cache answered an unmatched call with,
    `unmatched_<tier>`; `cache_shows_reference`: the cache's result is one a reference call gets
    live while the call's own live result is not (the cache hands the mistake the right result);
    `live_shows_reference`: the call's live result is a reference call's anyway."""
    reference_env = make_env(task)
    reference_keys = {(c.name, canonical_key(c.arguments)) for c in task.reference_calls}
    reference_results = {
        reference_env.execute(c.name, c.arguments).text for c in task.reference_calls
    }
    env, task_scope = make_env(task), cache_scope(task, scope)
    counts: Counter[str] = Counter()
    for name, arguments in calls:
        live = env.execute(name, arguments).text
        if (name, canonical_key(arguments)) in reference_keys:
            counts["matched"] += 1
            continue
        hit = cache.lookup(name, arguments, scope=task_scope)
        counts["unmatched"] += 1
        counts[f"unmatched_{hit.tier}"] += 1
        live_right = live in reference_results
        counts["live_shows_reference"] += live_right
        counts["cache_shows_reference"] += hit.result in reference_results and not live_right
    return counts
