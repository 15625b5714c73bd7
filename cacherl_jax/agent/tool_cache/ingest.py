"""Building a tool cache from trajectories: every tool call a tool message answered becomes an
entry, and the trajectories' tool schemas are stored for "no recorded result" responses."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cacherl_jax.agent.tool_cache.cache import ToolCache
from cacherl_jax.agent.tool_cache.records import RecordReport, ToolRecord

if TYPE_CHECKING:
    from cacherl_jax.chat.trajectory import Trajectory


@dataclasses.dataclass
class BuildReport:
    """What `build_from_trajectories` found and stored."""

    trajectories: int = 0
    calls: int = 0  # tool calls answered by a tool message, all offered to the cache
    unanswered_calls: int = 0  # tool calls no tool message answered
    orphan_results: int = 0  # tool messages answering no pending call
    tool_schemas: int = 0  # new tool schemas stored
    records: RecordReport = dataclasses.field(default_factory=RecordReport)


def paired_calls(trajectory: Trajectory) -> tuple[list[tuple[str, Any, str]], int, int]:
    """The (tool, arguments, result) of each answered call of a trajectory, in order, with the
    counts of unanswered calls and orphan tool messages.

    A tool message answers the pending call (of the latest assistant turn) with its
    `tool_call_id`, or else the first pending call: trajectories without ids pair in order.
    """
    pairs: list[tuple[str, Any, str]] = []
    pending: list[dict[str, Any]] = []
    unanswered = orphans = 0
    for message in trajectory.messages:
        if message["role"] == "assistant":
            unanswered += len(pending)
            pending = list(message.get("tool_calls", []))
        elif message["role"] == "tool":
            call = _answered_call(pending, message.get("tool_call_id"))
            if call is None:
                orphans += 1
                continue
            pending.remove(call)
            function = call["function"]
            pairs.append((function["name"], function["arguments"], message["content"]))
        elif message["role"] == "user":
            unanswered += len(pending)
            pending = []
    return pairs, unanswered + len(pending), orphans


def _answered_call(pending: list[dict[str, Any]], call_id: str | None) -> dict[str, Any] | None:
    """The pending call with this id, else the first pending call, else None."""
    call = next((c for c in pending if call_id and c.get("id") == call_id), None)
    if call is None and pending:
        call = pending[0]
    return call


def build_from_trajectories(
    cache: ToolCache,
    paths: Iterable[str | os.PathLike[str]],
    *,
    scope: str | None = None,
    scope_per_trajectory: bool = False,
    batch_size: int = 10_000,
) -> BuildReport:
    """Records every answered tool call of the trajectories JSONL files (and their tool schemas).

    Entries get `scope`, or with `scope_per_trajectory` the trajectory's id (for tools whose
    results depend on the task's state). Raises TrajectoryError for a bad record."""
    from cacherl_jax.chat.trajectory import read_jsonl  # loaded only when building

    report = BuildReport()
    batch: list[ToolRecord] = []
    for path in paths:
        for trajectory in read_jsonl(path):
            entry_scope = trajectory.id if scope_per_trajectory else scope
            batch.extend(_trajectory_records(cache, trajectory, entry_scope, report))
            if len(batch) >= batch_size:
                report.records.add(cache.record_many(batch))
                batch.clear()
    if batch:
        report.records.add(cache.record_many(batch))
    return report


def _trajectory_records(
    cache: ToolCache, trajectory: Trajectory, scope: str | None, report: BuildReport
) -> list[ToolRecord]:
    """The records of one trajectory's answered calls; stores its tool schemas and counts it."""
    report.trajectories += 1
    if trajectory.tools:
        report.tool_schemas += cache.register_tools(trajectory.tools)
    pairs, unanswered, orphans = paired_calls(trajectory)
    report.unanswered_calls += unanswered
    report.orphan_results += orphans
    report.calls += len(pairs)
    source = f"trajectory:{trajectory.id}"
    return [ToolRecord(tool, arguments, result, scope, source) for tool, arguments, result in pairs]
