"""Incremental, resumable output files and the run summary.

`ResumableOutput` appends one trajectory per line to the output JSONL as soon as it is finished:
one `os.write` of the whole line on an O_APPEND descriptor (so a killed process leaves at most
one partial last line) and an fsync every few records or seconds (so a machine crash loses at
most those). Opening it again:

- takes an exclusive `flock` on the file, so two runs cannot write one output;
- cuts a partial last line (what SIGKILL in the middle of a write leaves);
- reads the ids already written, which the pipeline skips: a rerun continues where the last run
  stopped and never writes a record twice.

Records that could not be augmented (teacher failures after retries, invalid reasoning with
`on_invalid="drop_record"`) go to `<stem>.rejected.jsonl` with the reason in
`metadata.augment`; with `retry_rejected` (the default) a rerun starts that file afresh and tries
those records again, so no input record is ever lost. The summary goes to `<stem>.summary.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cacherl_jax.chat.trajectory import Trajectory, TrajectoryError

# Histogram bucket edges (characters of reasoning per step and per trajectory).
STEP_CHAR_EDGES = (0, 50, 100, 200, 400, 800, 1600, 3200)
TRAJECTORY_CHAR_EDGES = (0, 200, 400, 800, 1600, 3200, 6400, 12800)
STEP_COUNT_EDGES = (0, 1, 2, 3, 5, 8, 13, 21)


def sidecar_paths(output: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(rejected JSONL, summary JSON) next to the output: `out.jsonl` -> `out.rejected.jsonl`,
    `out.summary.json`."""
    path = Path(output)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(f"{stem}.rejected.jsonl"), path.with_name(f"{stem}.summary.json")


def _record_line(trajectory: Trajectory) -> bytes:
    # Validated like write_jsonl does, so the file always reads back. Metadata is free-form and can
    # be large (a BFCL task's whole state): it is checked here, not copied. The id goes first,
    # which lets a rerun read ids without parsing whole records.
    metadata = trajectory.metadata
    if not isinstance(metadata, dict) or not isinstance(metadata.get("source", ""), str):
        raise TrajectoryError("must be an object with a string source", "metadata")
    checked = Trajectory.from_dict(
        {"id": trajectory.id, "messages": trajectory.messages, "tools": trajectory.tools}
    )
    record = {**checked.to_dict(), "metadata": metadata}
    try:
        return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    except UnicodeEncodeError:  # lone surrogates: \u-escaped, json.loads restores them
        return (json.dumps(record, separators=(",", ":")) + "\n").encode("ascii")


def _line_id(line: bytes, path: str, line_number: int) -> str:
    prefix = b'{"id":'
    if line.startswith(prefix):  # our own lines: decode the id string only
        with contextlib.suppress(ValueError):
            value, _ = json.JSONDecoder().raw_decode(line[len(prefix) :].decode())
            if isinstance(value, str):
                return value
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrajectoryError(f"not a JSON record ({exc})", "<json>", path, line_number) from None
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        raise TrajectoryError("record without a string id", "id", path, line_number)
    return record["id"]


def _complete_lines(path: str, data: bytes) -> Iterator[tuple[int, bytes]]:
    for line_number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            yield line_number, line


class AppendOnlyJsonl:
    """An O_APPEND JSONL file of this run (locked), written one whole line per `os.write` and
    fsynced in small batches. Opening it cuts a partial last line left by a killed run."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fresh: bool = False,
        fsync_every: int = 16,
        fsync_interval_s: float = 1.0,
    ):
        self.path = os.fspath(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise TrajectoryError(
                "another augment run is writing this file", path=self.path
            ) from None
        self.fsync_every, self.fsync_interval_s = fsync_every, fsync_interval_s
        self._unsynced, self._last_sync = 0, time.monotonic()
        self.truncated_bytes = 0
        try:
            if fresh:
                os.ftruncate(self.fd, 0)
            self._cut_partial_line()
        except BaseException:
            os.close(self.fd)
            raise

    def _cut_partial_line(self) -> bytes:
        """Cuts an unterminated last line; returns the complete lines."""
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, size, 0) if size else b""
        complete = data.rfind(b"\n") + 1
        if complete < size:  # a line cut by a kill: its record is redone, not half-kept
            os.ftruncate(self.fd, complete)
            os.fsync(self.fd)
            self.truncated_bytes = size - complete
        return data[:complete]

    def write(self, trajectory: Trajectory) -> None:
        line = _record_line(trajectory)
        written = os.write(self.fd, line)
        while written < len(line):  # a short write (a full disk): finish the line or fail
            written += os.write(self.fd, line[written:])
        self._unsynced += 1
        if (
            self._unsynced >= self.fsync_every
            or time.monotonic() - self._last_sync >= self.fsync_interval_s
        ):
            self.sync()

    def sync(self) -> None:
        if self._unsynced:
            os.fsync(self.fd)
        self._unsynced, self._last_sync = 0, time.monotonic()

    def close(self) -> None:
        if self.fd >= 0:
            self.sync()
            os.close(self.fd)  # also releases the lock
            self.fd = -1


class ResumableOutput(AppendOnlyJsonl):
    """The output JSONL with the ids it already holds (`done_ids`), which a rerun skips."""

    def __init__(self, path: str | os.PathLike[str], **kwargs: Any):
        super().__init__(path, **kwargs)
        self.done_ids: set[str] = set()
        try:
            data = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
            for line_number, line in _complete_lines(self.path, data):
                record_id = _line_id(line, self.path, line_number)
                if record_id in self.done_ids:
                    raise TrajectoryError(
                        f"id {record_id!r} appears twice", "id", self.path, line_number
                    )
                self.done_ids.add(record_id)
        except BaseException:
            os.close(self.fd)
            raise


def read_ids(path: str | os.PathLike[str]) -> set[str]:
    """The ids of the complete records of a JSONL file (empty if it does not exist)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as file:
        data = file.read()
    data = data[: data.rfind(b"\n") + 1]
    return {_line_id(line, path, number) for number, line in _complete_lines(path, data)}


# --- the summary -------------------------------------------------------------------------------


def histogram(values: list[int], edges: tuple[int, ...]) -> dict[str, int]:
    """Counts per bucket: '0-49', '50-99', ..., '3200+' for edges (0, 50, ..., 3200)."""
    labels = [f"{low}-{high - 1}" for low, high in itertools.pairwise(edges)]
    labels.append(f"{edges[-1]}+")
    counts = dict.fromkeys(labels, 0)
    for value in values:
        bucket = sum(value >= edge for edge in edges) - 1
        counts[labels[max(bucket, 0)]] += 1
    return counts


@dataclasses.dataclass
class DatasetStats:
    """What the whole output file holds (all runs together)."""

    records: int = 0
    with_thinking: int = 0
    without_thinking: int = 0
    steps_with_reasoning: int = 0
    step_origins: dict[str, int] = dataclasses.field(default_factory=dict)
    step_chars: list[int] = dataclasses.field(default_factory=list)
    step_words: list[int] = dataclasses.field(default_factory=list)
    trajectory_chars: list[int] = dataclasses.field(default_factory=list)
    steps_per_trajectory: list[int] = dataclasses.field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        self.records += 1
        augment = (record.get("metadata") or {}).get("augment") or {}
        if not augment.get("thinking", False):
            self.without_thinking += 1
            return
        self.with_thinking += 1
        for step in augment.get("steps", []):
            origin = step.get("origin", "?")
            self.step_origins[origin] = self.step_origins.get(origin, 0) + 1
        total, steps = 0, 0
        for message in record.get("messages", []):
            reasoning = (
                message.get("reasoning_content") if message.get("role") == "assistant" else None
            )
            if reasoning:
                steps += 1
                total += len(reasoning)
                self.step_chars.append(len(reasoning))
                self.step_words.append(len(reasoning.split()))
        self.steps_with_reasoning += steps
        self.trajectory_chars.append(total)
        self.steps_per_trajectory.append(steps)

    def to_dict(self) -> dict[str, Any]:
        def mean(values: list[int]) -> float:
            return round(sum(values) / len(values), 1) if values else 0.0

        return {
            "records": self.records,
            "with_thinking": self.with_thinking,
            "without_thinking": self.without_thinking,
            "steps_with_reasoning": self.steps_with_reasoning,
            "step_origins": dict(sorted(self.step_origins.items())),
            "mean_reasoning_chars_per_step": mean(self.step_chars),
            "mean_reasoning_words_per_step": mean(self.step_words),
            "mean_reasoning_chars_per_trajectory": mean(self.trajectory_chars),
            "histograms": {
                "reasoning_chars_per_step": histogram(self.step_chars, STEP_CHAR_EDGES),
                "reasoning_chars_per_trajectory": histogram(
                    self.trajectory_chars, TRAJECTORY_CHAR_EDGES
                ),
                "reasoning_steps_per_trajectory": histogram(
                    self.steps_per_trajectory, STEP_COUNT_EDGES
                ),
            },
        }


def dataset_stats(path: str | os.PathLike[str]) -> DatasetStats:
    stats = DatasetStats()
    if os.path.exists(path):
        with open(path, "rb") as file:
            for line in file:
                if line.strip():
                    with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                        stats.add(json.loads(line))
    return stats


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines of a summary (the JSON file holds everything)."""
    run, dataset = summary["run"], summary["dataset"]
    lines = [
        f"augment {summary['status']}: {run['written']} written, {run['rejected']} rejected, "
        f"{run['skipped_done']} already done, {run['no_thinking']} kept without thinking "
        f"({run['elapsed_s']:.1f} s, {run['records_per_s']:.1f} records/s)",
        f"teacher {run['teacher']}: {run['teacher_requests']} requests, {run['retries']} retries, "
        f"{run['prompt_tokens']} + {run['completion_tokens']} tokens, ${run['cost_usd']:.4f}",
    ]
    if run["rejection_reasons"]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(run["rejection_reasons"].items()))
        lines.append(f"rejected reasoning: {reasons}")
    if run["record_failures"]:
        failures = ", ".join(f"{k} {v}" for k, v in sorted(run["record_failures"].items()))
        lines.append(f"rejected records: {failures}")
    lines.append(
        f"output: {dataset['records']} records ({dataset['with_thinking']} with thinking), "
        f"{dataset['mean_reasoning_chars_per_step']} chars of reasoning per step"
    )
    step_histogram = dataset["histograms"]["reasoning_chars_per_step"]
    lines.append(
        "reasoning chars per step: " + "  ".join(f"{k}:{v}" for k, v in step_histogram.items())
    )
    return "\n".join(lines)
