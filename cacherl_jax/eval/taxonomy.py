"""Why a validation task failed: one bucket per failed task, and one JSON record per task.

    records = [validation_record(task, result) for result in results]   # task by result.task_id
    write_validation_records(run_dir / "validation_sft.jsonl", tasks, results)
    taxonomy_table(read_validation_records(path))   # {"format": 3, "wrong_tool": 5, ...}

`failure_bucket` takes the first rule that applies to a failed task (None on success). The
calls are compared as `order_score` compares them: same tool and canonically equal arguments
(`canonical_key`), so a bucket never disagrees with the reward's own order score.

1. "format": a turn did not parse (format score < 1, or a call came from a turn with problems).
2. "no_call": no call made where the reference makes some (a plan or meta answer, a guess).
3. The reference calls are all found, in order, among the calls made (order score 1):
   "extra_calls" when more calls were made, else "wrong_answer" (the final answer is wrong).
4. "wrong_order": every reference call was made, but not in the reference's order.
5. Right tools (the names made are a prefix of the reference's names, or extend them): the first
   argument that differs, call by call, decides where the model went wrong, by where the
   reference value comes from: "wrong_value_request" (it appears in the user's request),
   "wrong_value_result" (it appears in an earlier reference call's result: the model copied a
   tool result wrongly) or "wrong_value_other" (neither: an argument the reference has not, or
   a value the reference computed). The earliest wrong value is the cause; later ones follow
   from it (a wrong currency code gives a wrong rate, which gives a wrong amount).
6. "stops_early": right tools with right arguments, but fewer calls than the reference.
7. "wrong_tool": the sequence of tool names departs from the reference's.

Where a value comes from is decided by replaying the reference calls in the task's environment
(only for tasks that reach rule 5 with a value not in the request).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cacherl_jax.agent.environment import Task, execute_reference
from cacherl_jax.agent.factory import make_environment
from cacherl_jax.agent.tool_cache import canonical_key
from cacherl_jax.rl.scoring import TaskResult

BUCKETS = (
    "format",
    "no_call",
    "wrong_tool",
    "wrong_value_request",
    "wrong_value_result",
    "wrong_value_other",
    "wrong_order",
    "stops_early",
    "extra_calls",
    "wrong_answer",
)
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")  # unsigned: "2026-03-04" holds no -3

Call = tuple[str, str | None]  # (tool name, canonical arguments; None when they did not parse)


def failure_bucket(task: Task, result: TaskResult) -> str | None:
    """The bucket of a failed task (module docstring), None when it succeeded."""
    return _diagnose(task, result)[0]


def failure_detail(task: Task, result: TaskResult) -> str:
    """A short line saying what went wrong ("" on success): which call and argument, and why."""
    return _diagnose(task, result)[1]


def validation_record(task: Task, result: TaskResult) -> dict[str, Any]:
    """One JSON-ready line about one rollout of a validation task: what was asked, what was done,
    how it scored and, when it failed, its bucket."""
    reward = result.reward
    bucket, detail = _diagnose(task, result)
    return {
        "task_id": result.task_id,
        "sample": result.sample,
        "kind": task.metadata.get("kind"),
        "request": _request_text(task),
        "reference_calls_count": len(task.reference_calls),
        "template_held_out": task.metadata.get("template_held_out"),
        "success": result.success,
        "process_accuracy": result.process_accuracy,
        "reward": {
            name: getattr(reward, name)
            for name in ("total", "answer", "process", "format", "validity", "order", "tier")
        },
        "calls": [
            {
                "name": call.name,
                "arguments": call.arguments,
                "tier": call.tier,
                "problems": list(call.problems),
            }
            for call in result.made_calls
        ],
        "reference_calls": [
            {"name": call.name, "arguments": call.arguments} for call in task.reference_calls
        ],
        "final_answer": result.final_answer,
        "expected_answer": task.expected_answer,
        "stop_reason": result.stop_reason,
        "failure": bucket,
        "failure_detail": detail,
    }


def write_validation_records(
    path: str | Path, tasks: Sequence[Task], results: Sequence[TaskResult]
) -> Path:
    """One `validation_record` per result, as JSON lines; every result's task must be in `tasks`."""
    by_id = {task.id: task for task in tasks}
    lines = [json.dumps(validation_record(by_id[r.task_id], r)) + "\n" for r in results]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path


def read_validation_records(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def taxonomy_table(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Failed records per bucket, every bucket listed (0 when none), in `BUCKETS` order."""
    counts = collections.Counter(r["failure"] for r in records if r.get("failure"))
    unknown = set(counts) - set(BUCKETS)
    if unknown:
        raise ValueError(f"unknown failure buckets {sorted(unknown)}")
    return {bucket: counts[bucket] for bucket in BUCKETS}


def success_by_domain(records: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """(succeeded, tasks) per domain (the part of a record's kind before the dot), sorted by name:
    a kind the model never learned shows as a domain near 0 however well the others do."""
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for record in records:
        tally = counts[str(record["kind"]).split(".", 1)[0]]
        tally[0] += bool(record["success"])
        tally[1] += 1
    return {domain: (ok, n) for domain, (ok, n) in sorted(counts.items())}


@dataclasses.dataclass(frozen=True)
class GroupSignal:
    """How a kind's tasks fare when each is sampled several times: the signal GRPO can use.

    A group (one task's samples) gives GRPO an advantage only if its rewards differ, and a push
    toward success only if its successes differ (`mixed`): on a kind no sample ever solves
    (`solved_any` 0) GRPO can only sharpen partial credit, and a kind whose groups all succeed
    has nothing left to teach."""

    tasks: int
    samples: int
    success_rate: float  # over all samples
    solved_any: int  # tasks with at least one successful sample (pass@samples)
    mixed: int  # tasks whose samples neither all succeed nor all fail


def group_signal_by_kind(records: Iterable[Mapping[str, Any]]) -> dict[str, GroupSignal]:
    """`GroupSignal` per task kind, sorted by name, from validation records with several samples
    per task (`validation_record`'s `task_id`, `kind` and `success`)."""
    groups: dict[str, dict[str, list[bool]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    for record in records:
        groups[str(record["kind"])][str(record["task_id"])].append(bool(record["success"]))
    signal = {}
    for kind, by_task in sorted(groups.items()):
        outcomes = list(by_task.values())
        samples = sum(map(len, outcomes))
        signal[kind] = GroupSignal(
            tasks=len(outcomes),
            samples=samples,
            success_rate=sum(map(sum, outcomes)) / samples,
            solved_any=sum(any(group) for group in outcomes),
            mixed=sum(any(group) and not all(group) for group in outcomes),
        )
    return signal


def reachable_by_kind(
    greedy: Iterable[Mapping[str, Any]], sampled: Iterable[Mapping[str, Any]]
) -> dict[str, int]:
    """Per kind, the tasks the greedy records fail but some sampled record of the same task
    solves: the most that sharpening the policy on these tasks can add to greedy success (GRPO
    could add more only by teaching what no sample shows)."""
    solved = {record["task_id"] for record in sampled if record["success"]}
    counts: dict[str, int] = collections.Counter()
    for record in greedy:
        counts[str(record["kind"])] += not record["success"] and record["task_id"] in solved
    return dict(sorted(counts.items()))


# --- rules -----------------------------------------------------------------------------------


def _diagnose(task: Task, result: TaskResult) -> tuple[str | None, str]:
    if result.success:
        return None, ""
    reference = [(c.name, canonical_key(c.arguments)) for c in task.reference_calls]
    made = [(c.name, _key(c.arguments)) for c in result.made_calls]
    problems = sorted({p for c in result.made_calls for p in c.problems})
    if result.reward.format < 1.0 or problems:
        return "format", f"format score {result.reward.format:.2f}; problems: {problems}"
    if not made and reference:
        return "no_call", f"no call; answered {_short(result.final_answer)}"
    if _is_subsequence(reference, made):
        if len(made) > len(reference):
            return "extra_calls", f"{len(made)} calls for {len(reference)} reference calls"
        return "wrong_answer", (
            f"answered {_short(result.final_answer)}, expected {_short(task.expected_answer)}"
        )
    if not collections.Counter(reference) - collections.Counter(made):
        return "wrong_order", f"made {[name for name, _ in made]}"
    names, reference_names = [n for n, _ in made], [n for n, _ in reference]
    common = min(len(names), len(reference_names))
    if names[:common] == reference_names[:common]:
        for index in range(common):
            if made[index] != reference[index]:
                return _wrong_value(task, result, index)
        return "stops_early", f"{len(made)} of {len(reference)} calls, all right"
    return "wrong_tool", f"made {names}, reference {reference_names}"


def _wrong_value(task: Task, result: TaskResult, index: int) -> tuple[str, str]:
    """The bucket of the first argument of call `index` that differs from the reference's."""
    reference = task.reference_calls[index]
    arguments = result.made_calls[index].arguments or {}
    where = f"call {index + 1} {reference.name}"
    for name, value in reference.arguments.items():
        if name in arguments and _key({name: arguments[name]}) == _key({name: value}):
            continue
        made = json.dumps(arguments[name]) if name in arguments else "missing"
        detail = f"{where}: {name}={made}, reference {json.dumps(value)}"
        if _appears(value, _request_text(task)):
            return "wrong_value_request", detail + " (from the request)"
        if _appears(value, "\n".join(_reference_results(task)[:index])):
            return "wrong_value_result", detail + " (from a tool result)"
        return "wrong_value_other", detail
    extra = sorted(set(arguments) - set(reference.arguments))
    return "wrong_value_other", f"{where}: arguments the reference has not: {extra}"


def _is_subsequence(needles: Sequence[Call], haystack: Sequence[Call]) -> bool:
    """Whether `needles` occur in `haystack` in order (others may lie in between)."""
    rest = iter(haystack)
    return all(any(item == needle for item in rest) for needle in needles)


def _key(arguments: Mapping[str, Any] | None) -> str | None:
    return None if arguments is None else canonical_key(arguments)


# --- where a reference value comes from --------------------------------------------------------


def _request_text(task: Task) -> str:
    """Every user message of the task, one per line."""
    messages = [m for turn in task.turns for m in turn.messages if m.get("role") == "user"]
    return "\n".join(str(m.get("content") or "") for m in messages)


def _reference_results(task: Task) -> list[str]:
    """The result text of each reference call, replayed in a fresh environment of the task."""
    return [call.result.text for call in execute_reference(task, make_environment(task))]


def _appears(value: Any, text: str) -> bool:
    """Whether a JSON value is written in the text: numbers as numbers (1.50 == 1.5; the sign
    is not read), strings case-insensitively, lists item by item, anything else as its JSON."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value) in text
    if isinstance(value, int | float):
        numbers = _NUMBER_RE.findall(text)
        return any(math.isclose(float(n), abs(value), rel_tol=1e-9) for n in numbers)
    if isinstance(value, str):
        return bool(value.strip()) and value.strip().casefold() in text.casefold()
    if isinstance(value, list):
        return bool(value) and all(_appears(item, text) for item in value)
    return json.dumps(value, sort_keys=True) in text


def _short(text: str | None, limit: int = 80) -> str:
    if text is None:
        return "nothing"
    text = " ".join(text.split())
    return json.dumps(text if len(text) <= limit else text[: limit - 3] + "...")
