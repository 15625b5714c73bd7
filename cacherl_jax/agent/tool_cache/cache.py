"""The public tool cache: `ToolCacheConfig` and `ToolCache` (recording, loading, lookups).

A lookup canonicalises the call (`keys.canonical_arguments`), answers from the exact dict of the
tool when the key is there, else asks the block of the call's argument names for its nearest
entry (`block.Block.search`) and grades the score into a tier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from cacherl_jax.agent.tool_cache.block import Block
from cacherl_jax.agent.tool_cache.index import CHUNK_BITS, CHUNK_MASK, EntryStore, ToolIndex
from cacherl_jax.agent.tool_cache.keys import TEXT, canonical_arguments, canonical_key, index_value
from cacherl_jax.agent.tool_cache.records import (
    TIERS,
    CacheEntry,
    CacheHit,
    RecordReport,
    Tier,
    ToolCacheError,
    ToolRecord,
    function_schema,
    no_record_response,
)
from cacherl_jax.agent.tool_cache.storage import SCHEMA_VERSION, EntryRow, Storage

SCOPE_MODES = ("global", "scoped")


@dataclasses.dataclass(frozen=True)
class ToolCacheConfig:
    """Where the cache lives and how it answers. Build one from an ml-collections ConfigDict with
    `ToolCacheConfig.from_config(config.tool_cache)`.

    fuzzy_threshold: the lowest `argument_similarity` (0-100) that is a fuzzy hit.
    scope_mode: "global" (lookups see all entries) or "scoped" (a lookup in scope S sees only S).
    busy_timeout_s: how long a write waits for another process's write to finish.
    exact_only: answer only exact hits from the cache; every other call gets the "no recorded
        result" response (tier best-effort, score 0), as for a tool never seen (an ablation).
    """

    path: str
    fuzzy_threshold: float = 80.0
    scope_mode: Literal["global", "scoped"] = "global"
    busy_timeout_s: float = 30.0
    exact_only: bool = False

    def __post_init__(self):
        object.__setattr__(self, "path", os.fspath(self.path))
        if not 0.0 <= self.fuzzy_threshold <= 100.0:
            raise ValueError(f"fuzzy_threshold must be in [0, 100], got {self.fuzzy_threshold}")
        if self.scope_mode not in SCOPE_MODES:
            raise ValueError(f"scope_mode must be one of {SCOPE_MODES}, got {self.scope_mode!r}")
        if self.busy_timeout_s < 0:
            raise ValueError(f"busy_timeout_s must be >= 0, got {self.busy_timeout_s}")

    @classmethod
    def from_config(cls, config: Any) -> ToolCacheConfig:
        """From a mapping or an ml-collections ConfigDict (anything with `to_dict()`)."""
        if isinstance(config, cls):
            return config
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown tool cache settings {unknown}; known: {sorted(known)}")
        return cls(**values)


class ToolCache:
    """A tool cache on one SQLite file; see the package docstring for the tiers.

    `ToolCache(path_or_config)` opens (creating unless create=False) the file and loads its
    entries. Raises ToolCacheError for a file that is not a tool cache of this schema version.
    Safe to share between threads (one lock) but not across `fork`: open one per process.
    """

    def __init__(self, config: ToolCacheConfig | str | os.PathLike[str], *, create: bool = True):
        if not isinstance(config, ToolCacheConfig):
            config = ToolCacheConfig(path=os.fspath(config))
        self.config = config
        self.path = config.path
        self._scoped = config.scope_mode == "scoped"
        self._lock = threading.RLock()
        self._storage = Storage(self.path, config.busy_timeout_s, create=create)
        self._counts = dict.fromkeys((*TIERS, "unseen_tool"), 0)
        self._clear()
        try:
            self.refresh()
        except BaseException:
            self._storage.close()
            raise

    def _clear(self) -> None:
        """Empties the in-memory index (the file is untouched)."""
        self._entries = EntryStore()  # in rowid order
        self._strings: dict[str, str] = {}  # one copy of each scope, tool and source name
        self._index: dict[tuple[str, str], ToolIndex] = {}  # (partition, tool) -> index
        self._schemas: dict[str, dict[str, Any]] = {}
        self._last_rowid = 0
        self._last_tool_rowid = 0

    def close(self) -> None:
        with self._lock:
            self._storage.close()

    def __enter__(self) -> ToolCache:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._entries)

    # -- loading ---------------------------------------------------------------------------------

    def refresh(self) -> int:
        """Loads entries and tool schemas stored since the last refresh (by any process); returns
        how many entries were added. Incremental: rowids only grow."""
        with self._lock:
            before = len(self._entries)
            schemas, self._last_tool_rowid = self._storage.tools_since(self._last_tool_rowid)
            for name, schema in schemas:
                self._schemas[name] = json.loads(schema)
            for rows in self._storage.entries_since(self._last_rowid):
                for row in rows:
                    self._add(*row)
            return len(self._entries) - before

    def _add(self, rowid: int, scope: str, tool: str, key: str, result: str, source: str) -> None:
        strings = self._strings
        scope = strings.setdefault(scope, scope)
        tool = strings.setdefault(tool, tool)
        source = strings.setdefault(source, source)
        entry_index = len(self._entries)
        self._entries.append((rowid, scope, tool, key, result, source))
        self._last_rowid = rowid
        index_key = (self._partition(scope), tool)
        tool_index = self._index.get(index_key)
        if tool_index is None:
            tool_index = self._index[index_key] = ToolIndex()
        tool_index.add(key, entry_index)  # the same call in another scope: the first answers

    def build_indexes(self) -> None:
        """Builds every lazily built search index now, so no lookup pays for it (benchmarks)."""
        with self._lock:
            for tool_index in self._index.values():
                tool_index.build_indexes(self._entries)

    # -- lookups ---------------------------------------------------------------------------------

    def _partition(self, scope: str | None) -> str:
        return (scope or "") if self._scoped else ""

    def _entry(self, entry_index: int) -> CacheEntry:
        # EntryStore.__getitem__ inline, and tuple.__new__ skips NamedTuple's keyword-handling
        # __new__: both on every hit, where they are a good part of an exact lookup's time.
        chunks, chunk = self._entries.chunks, entry_index >> CHUNK_BITS
        if chunk < len(chunks):
            return tuple.__new__(CacheEntry, chunks[chunk][entry_index & CHUNK_MASK])
        return tuple.__new__(CacheEntry, self._entries.tail[entry_index & CHUNK_MASK])

    def _hit(self, entry_index: int, tier: Tier, score: float) -> CacheHit:
        self._counts[tier] += 1
        entry = self._entry(entry_index)
        return tuple.__new__(CacheHit, (entry[4], tier, score, entry))

    def lookup(
        self,
        tool: str,
        arguments: Mapping[str, Any] | str | None,
        *,
        scope: str | None = None,
        schema: Mapping[str, Any] | None = None,
    ) -> CacheHit:
        """Answers a call from the cache; never raises for an unknown tool (see the tiers).

        `scope` matters only with scope_mode="scoped". `schema` (an OpenAI tool or function
        schema) shapes the "no recorded result" response when the tool has no entries; otherwise
        a schema stored by `register_tools` is used."""
        canonical, key = canonical_arguments(arguments)
        with self._lock:
            tool_index = self._index.get((self._partition(scope), tool))
            if tool_index is not None:
                entry_index = tool_index.exact.get(key)
                if entry_index is not None:  # the exact tier: one dict lookup
                    return self._hit(entry_index, "exact", 100.0)
                if not self.config.exact_only:
                    score, entry_index, same_names = self._nearest(tool_index, canonical)
                    fuzzy = same_names and score >= self.config.fuzzy_threshold
                    return self._hit(entry_index, "fuzzy" if fuzzy else "best_effort", score)
            return self._no_record(tool, canonical, schema, unseen=tool_index is None)

    def _no_record(
        self, tool: str, canonical: dict[str, Any], schema: Mapping[str, Any] | None, unseen: bool
    ) -> CacheHit:
        self._counts["best_effort"] += 1
        self._counts["unseen_tool"] += unseen
        known = self._schemas.get(tool)
        if schema:
            with contextlib.suppress(ToolCacheError):  # a schema without a name: ignored
                known = function_schema(schema)
        return CacheHit(no_record_response(tool, canonical, known), "best_effort", 0.0, None)

    def _nearest(self, tool_index: ToolIndex, canonical: dict[str, Any]) -> tuple[float, int, bool]:
        """(score, entry index, whether the argument names agree) of the nearest entry found."""
        if tool_index.pending:
            tool_index.index_pending(self._entries)
        names = tuple(sorted(canonical))
        query = {}
        for name in names:
            value = canonical[name]
            query[name] = (
                (value, TEXT, value, math.nan) if type(value) is str else index_value(value)
            )
        block = tool_index.blocks.get(names)
        if block is not None:
            score, entry_index = block.search(query, len(names) or 1, self.config.fuzzy_threshold)
            return score, entry_index, True

        # Other argument names: the block sharing the most names (then the largest) answers,
        # scored over the names of both (a missing name scores 0), and never as fuzzy.
        def overlap(block: Block) -> tuple[float, int]:
            union = len(set(names) | set(block.names)) or 1
            return len(set(names) & set(block.names)) / union, len(block.rows)

        block = max(tool_index.blocks.values(), key=overlap)
        shared = {name: value for name, value in query.items() if name in block.columns}
        union = len(set(names) | set(block.names)) or 1
        score, entry_index = block.search(shared, union, math.inf)
        return score, entry_index, False

    # -- recording -------------------------------------------------------------------------------

    def record(
        self,
        tool: str,
        arguments: Mapping[str, Any] | str | None,
        result: str,
        *,
        scope: str | None = None,
        source: str = "live",
    ) -> CacheEntry:
        """Stores one executed call (the first result recorded for a key stays) and returns the
        entry the cache now answers that call with."""
        self.record_many([ToolRecord(tool, arguments, result, scope, source)])
        with self._lock:
            entry_index = self._exact_index(tool, canonical_key(arguments), scope)
            assert entry_index is not None, "a recorded call must be an exact hit"
            return self._entry(entry_index)

    def _exact_index(self, tool: str, key: str, scope: str | None) -> int | None:
        tool_index = self._index.get((self._partition(scope), tool))
        return None if tool_index is None else tool_index.exact.get(key)

    def record_many(self, records: Iterable[ToolRecord]) -> RecordReport:
        """Stores calls in one transaction (INSERT OR IGNORE on (scope, tool, arguments)), then
        refreshes; safe while other processes write the same file."""
        rows = _entry_rows(records)
        report = RecordReport(records=len(rows))
        with self._lock:
            report.recorded = self._storage.insert_entries(rows)
            self.refresh()
            for scope, tool, key, result, _, _ in rows:
                entry_index = self._exact_index(tool, key, scope)
                if entry_index is not None and self._entries[entry_index][4] != result:
                    report.conflicting += 1
        report.already_present = report.records - report.recorded
        return report

    def register_tools(self, schemas: Iterable[Mapping[str, Any]]) -> int:
        """Stores tool schemas (OpenAI tool or bare function objects; the first one per name
        stays) for "no recorded result" responses; returns how many were new."""
        rows = []
        for schema in schemas:
            function = function_schema(schema)
            rows.append((function["name"], json.dumps(function, ensure_ascii=False)))
        with self._lock:
            added = self._storage.insert_tools(rows)
            self.refresh()
        return added

    # -- what this copy wrote: marks, entries since a mark, undoing them ----------------------

    def mark(self) -> int:
        """A position in the file's entries (the last rowid stored, 0 when empty): pass it to
        `entries_since` or `rollback` to name what was recorded after it."""
        with self._lock:
            self.refresh()
            return self._last_rowid

    def entries_since(self, mark: int) -> list[CacheEntry]:
        """The entries stored after `mark`, in the order they were stored (read from the file,
        so entries other processes wrote count too)."""
        with self._lock:
            return [CacheEntry(*row) for rows in self._storage.entries_since(mark) for row in rows]

    def rollback(self, mark: int) -> int:
        """Deletes the entries stored after `mark` and rebuilds the index from the file; returns
        how many were deleted. Only for a file no other process reads (a host's snapshot): a
        reader's index would keep the deleted entries, as rowids are otherwise only added."""
        with self._lock:
            deleted = self._storage.delete_entries_after(mark)
            if deleted:
                self._clear()
                self.refresh()
            return deleted

    # -- statistics ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Lookups answered per tier since opening (or `reset_stats`), in this process; with
        'unseen_tool' the best-effort answers for tools without entries, and the entry counts."""
        with self._lock:
            lookups = sum(self._counts[tier] for tier in TIERS)
            return {
                "lookups": lookups,
                **self._counts,
                "entries": len(self._entries),
                "tools": len({tool for _, tool in self._index}),
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._counts = dict.fromkeys(self._counts, 0)

    def summary(self, top: int = 10) -> dict[str, Any]:
        """What the file holds (read from the database, not the in-memory index): entries,
        tools, scopes, schemas, and the `top` tools by entry count."""
        with self._lock:
            counts = self._storage.summary(top)
        return {"path": self.path, "schema_version": SCHEMA_VERSION, **counts}


def _entry_rows(records: Iterable[ToolRecord]) -> list[EntryRow]:
    """The rows to store for some records; raises ToolCacheError for a bad tool name or result."""
    rows, now = [], time.time()
    for record in records:
        if not isinstance(record.tool, str) or not record.tool:
            raise ToolCacheError(f"a tool name must be a non-empty string, got {record.tool!r}")
        if not isinstance(record.result, str):
            raise ToolCacheError(
                f"a result must be a string (the text the tool returned), got "
                f"{type(record.result).__name__} for {record.tool}"
            )
        key = canonical_key(record.arguments)
        rows.append((record.scope or "", record.tool, key, record.result, record.source, now))
    return rows
