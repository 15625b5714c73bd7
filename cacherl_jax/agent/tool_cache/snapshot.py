"""The tool cache on a pod: a private local copy per host, and one deterministic merge of what
every host recorded.

SQLite must not sit on a network filesystem (its locks and WAL index do not hold there), so no
host opens the run's cache file itself. A step in hybrid mode goes:

1. At start each host copies the run's cache to local disk, `path = snapshot(source, local_dir)`,
   opens it (`ToolCache(path)`) and takes `mark = cache.mark()`.
2. During the step the agent loop records live results into the host's copy, so later calls of
   the same step are exact hits there.
3. After the step each host takes `take_delta(cache, mark, step=step, process=index)`: the
   entries its copy stored since the mark, in the order it stored them. An entry's origin is
   (step, process, row), row its position in the delta. The hosts exchange their deltas as
   JSON (`delta_to_json` / `delta_from_json`, e.g. through an all-gather).
4. Each host calls `sync(cache, mark, deltas)` with every host's delta: it undoes its own
   writes since the mark (unless they already come first in the merge) and applies all deltas
   in origin order, then takes a new mark. Every host's copy then is the merged cache.
5. When it saves a checkpoint, process 0 publishes its copy as the run's cache:
   `snapshot(copy_path, staging_dir)` gives one closed file to upload or rename into place.
   (`merge(master, deltas)` applies the same deltas to a cache that was not a host's copy.)

`merge` inserts each entry unless its (scope, tool, arguments) key is stored already, in origin
order, so for a key recorded on several hosts the smallest origin wins -- what one host
recording the same rows in that order keeps -- and no key any host recorded is lost. Entries the
cache already held stay. Merging a delta twice changes nothing, and the order the deltas arrive
in does not matter. After `sync`, every host's copy and the master hold the same entries in the
same rowid order, so lookups (fuzzy ties included) answer alike on every host and after a
restart from the published cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from cacherl_jax.agent.tool_cache.cache import ToolCache
from cacherl_jax.agent.tool_cache.keys import canonical_key
from cacherl_jax.agent.tool_cache.records import (
    CacheEntry,
    RecordReport,
    ToolCacheError,
    ToolRecord,
)
from cacherl_jax.agent.tool_cache.storage import Storage

DELTA_FORMAT = "cacherl_jax.tool_cache.delta"
DELTA_VERSION = 1
_SIDECARS = ("-wal", "-shm", "-journal")


class Origin(NamedTuple):
    """Where an entry of a delta was recorded; smaller origins win a key."""

    step: int
    process: int
    row: int


@dataclasses.dataclass(frozen=True)
class Delta:
    """The entries one host's copy stored during one step, in the order it stored them (row i
    is `records[i]`); arguments are the canonical key strings."""

    step: int
    process: int
    records: tuple[ToolRecord, ...]

    def __len__(self) -> int:
        return len(self.records)

    def origins(self) -> list[Origin]:
        return [Origin(self.step, self.process, row) for row in range(len(self.records))]


# -- local copies ----------------------------------------------------------------------------


def snapshot(
    source: str | os.PathLike[str],
    local_dir: str | os.PathLike[str],
    *,
    busy_timeout_s: float = 30.0,
) -> Path:
    """Copies the tool cache at `source` to `local_dir` (same file name) and returns the copy's
    path; a missing `source` gives an empty cache.

    The copy goes through SQLite's backup API, so it is consistent while other processes write
    `source` (entries still in its WAL included). It is one self-contained file (rollback
    journal, no sidecars), written next to its target and renamed into place, replacing an older
    copy and its stale WAL: close any cache open on the target first. Raises ToolCacheError for a
    `source` that is not a tool cache (corrupt, foreign, another schema version)."""
    source = os.fspath(source)
    target = Path(local_dir) / Path(source).name
    if target.exists() and os.path.samefile(source, target):
        raise ToolCacheError("a snapshot cannot replace its own source", source)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    _remove_with_sidecars(staging)
    try:
        if os.path.exists(source):
            _backup(source, staging, busy_timeout_s)
        else:
            Storage(os.fspath(staging), busy_timeout_s, create=True).close()
        _single_file(staging)
        _remove_with_sidecars(target)
        os.replace(staging, target)
    except BaseException:
        _remove_with_sidecars(staging)
        raise
    return target


def _backup(source: str, staging: Path, busy_timeout_s: float) -> None:
    """Copies `source` into the new file `staging`; opening it as Storage checks it first."""
    storage = Storage(source, busy_timeout_s, create=False)
    try:
        with storage.failing_as("copying"), contextlib.closing(sqlite3.connect(staging)) as copy:
            storage.connection.backup(copy)
    finally:
        storage.close()


def _single_file(path: Path) -> None:
    """Leaves the database in rollback-journal mode: one file, safe to copy or upload as is."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as connection:
        connection.execute("PRAGMA journal_mode = DELETE")


def _remove_with_sidecars(path: Path) -> None:
    for suffix in ("", *_SIDECARS):
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{path}{suffix}")


# -- deltas ------------------------------------------------------------------------------------


def take_delta(cache: ToolCache, mark: int, *, step: int, process: int) -> Delta:
    """The entries `cache` stored after `mark` (`ToolCache.mark`), as this host's delta."""
    records = tuple(_record(entry) for entry in cache.entries_since(mark))
    return Delta(_count(step, "step"), _count(process, "process"), records)


def delta_to_json(delta: Delta) -> dict[str, Any]:
    """JSON-able data for a delta (`delta_from_json` reads it back)."""
    return {
        "format": DELTA_FORMAT,
        "version": DELTA_VERSION,
        "step": delta.step,
        "process": delta.process,
        "entries": [
            [r.scope or "", r.tool, r.arguments, r.result, r.source] for r in delta.records
        ],
    }


def delta_from_json(data: Mapping[str, Any]) -> Delta:
    """The delta `delta_to_json` wrote; raises ToolCacheError for anything else."""
    if not isinstance(data, Mapping) or data.get("format") != DELTA_FORMAT:
        raise ToolCacheError(f"not a tool cache delta (format {DELTA_FORMAT!r} expected)")
    if data.get("version") != DELTA_VERSION:
        raise ToolCacheError(
            f"tool cache delta version {data.get('version')}, but this cacherl_jax reads "
            f"version {DELTA_VERSION}"
        )
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise ToolCacheError("a tool cache delta needs a list of entries")
    records = []
    for row, entry in enumerate(entries):
        if not (
            isinstance(entry, list) and len(entry) == 5 and all(isinstance(v, str) for v in entry)
        ):
            raise ToolCacheError(
                f"entry {row} of a tool cache delta is not [scope, tool, arguments, result, "
                f"source] strings: {entry!r:.200}"
            )
        scope, tool, arguments, result, source = entry
        records.append(ToolRecord(tool, arguments, result, scope, source))
    return Delta(
        _count(data.get("step"), "step"), _count(data.get("process"), "process"), tuple(records)
    )


def _count(value: Any, name: str) -> int:
    if type(value) is not int or value < 0:
        raise ToolCacheError(f"a tool cache delta's {name} must be an int >= 0, got {value!r}")
    return value


# -- merging -----------------------------------------------------------------------------------


def merge(cache: ToolCache, deltas: Iterable[Delta]) -> RecordReport:
    """Applies the deltas to `cache` in origin order, each entry only if its key is absent (see
    the module docstring); returns what was recorded, already present and conflicting. The
    same delta given twice counts once; two different deltas of one (step, process) are an
    error."""
    return cache.record_many(
        record for delta in _in_origin_order(deltas) for record in delta.records
    )


def sync(cache: ToolCache, mark: int, deltas: Iterable[Delta]) -> RecordReport:
    """Brings a host's copy to the merged state: undoes what it stored after `mark` and merges
    every host's delta of the step (its own included) in origin order, so each host's copy
    equals the master. Raises ToolCacheError, changing nothing, when an entry this copy stored
    after `mark` is in none of the deltas (it would be lost)."""
    deltas = _in_origin_order(deltas)
    merged = {
        (r.scope or "", r.tool, canonical_key(r.arguments)) for d in deltas for r in d.records
    }
    own = cache.entries_since(mark)
    missing = [e for e in own if (e.scope, e.tool, e.canonical_args) not in merged]
    if missing:
        raise ToolCacheError(
            f"{len(missing)} entries this copy recorded after mark {mark} are in no delta "
            f"(e.g. {missing[0].tool} {missing[0].canonical_args:.200}): pass its own delta",
            cache.path,
        )
    merged_records = [record for delta in deltas for record in delta.records]
    if [_record(entry) for entry in own] != merged_records[: len(own)]:
        # Its own rows are not the merge's first: rebuilt from the mark (the index reloads).
        cache.rollback(mark)
    return merge(cache, deltas)


def _record(entry: CacheEntry) -> ToolRecord:
    return ToolRecord(entry.tool, entry.canonical_args, entry.result, entry.scope, entry.source)


def _in_origin_order(deltas: Iterable[Delta]) -> list[Delta]:
    by_origin: dict[tuple[int, int], Delta] = {}
    for delta in deltas:
        key = (delta.step, delta.process)
        if by_origin.setdefault(key, delta) != delta:
            raise ToolCacheError(
                f"two different tool cache deltas of step {delta.step}, process {delta.process}"
            )
    return [by_origin[key] for key in sorted(by_origin)]
