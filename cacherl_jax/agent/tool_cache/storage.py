"""A tool cache file: SQLite in WAL mode, so several processes read and write one file at once.

Entries are unique on (scope, tool, canonical arguments) and written with INSERT OR IGNORE, so the
first result recorded for a call stays. Rowids only grow, so a reader loads what others wrote by
reading the rows after the last one it saw. Every SQLite failure becomes a `ToolCacheError`
naming the file.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

from cacherl_jax.agent.tool_cache.records import ToolCacheError

SCHEMA_VERSION = 1
FORMAT_NAME = "cacherl_jax.tool_cache"
SQLITE_HEADER = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (
    id INTEGER PRIMARY KEY,
    scope TEXT NOT NULL,
    tool TEXT NOT NULL,
    arguments TEXT NOT NULL,
    result TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (scope, tool, arguments)
);
CREATE TABLE tools (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, schema TEXT NOT NULL);
"""
_TABLES = {"meta", "entries", "tools"}
_FETCH_ROWS = 4096

# (scope, tool, canonical arguments, result, source, created_at)
EntryRow = tuple[str, str, str, str, str, float]


class Storage:
    """One open tool cache file. Opening creates the schema in a new or empty file (unless
    `create` is False) and raises ToolCacheError for a file that is not a tool cache of this
    schema version. Not thread-safe: the caller holds a lock."""

    def __init__(self, path: str, busy_timeout_s: float, *, create: bool):
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self._check_file(create)
        self.connection = self._connect()
        try:
            self._check_schema(create)
            self.connection.execute("PRAGMA journal_mode = WAL")
            self.connection.execute("PRAGMA synchronous = NORMAL")  # WAL: durable to last sync
        except ToolCacheError:
            self.connection.close()
            raise
        except sqlite3.DatabaseError as exc:
            self.connection.close()
            raise self.error(f"corrupt or unreadable SQLite database: {exc}") from None

    def error(self, message: str) -> ToolCacheError:
        return ToolCacheError(message, self.path)

    @contextlib.contextmanager
    def failing_as(self, doing: str) -> Iterator[None]:
        """Turns a SQLite error into a ToolCacheError saying what failed."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            raise self.error(f"{doing} failed: {exc}") from None

    def close(self) -> None:
        self.connection.close()

    # -- opening ---------------------------------------------------------------------------------

    def _check_file(self, create: bool) -> None:
        """A directory, a missing file (unless created) or a file without the SQLite header."""
        path = self.path
        if os.path.isdir(path):
            raise self.error("is a directory, expected a tool cache file")
        exists = os.path.exists(path)
        if not exists and not create:
            raise self.error("no such tool cache file")
        if exists and os.path.getsize(path) > 0:
            try:
                with open(path, "rb") as file:
                    header = file.read(len(SQLITE_HEADER))
            except OSError as exc:
                raise self.error(f"cannot read: {exc.strerror or exc}") from None
            if header != SQLITE_HEADER:
                raise self.error("not a SQLite database (no SQLite header), so not a tool cache")

    def _connect(self) -> sqlite3.Connection:
        try:
            # Autocommit: every write opens its own BEGIN IMMEDIATE transaction.
            connection = sqlite3.connect(
                self.path, timeout=self.busy_timeout_s, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise self.error(f"cannot open: {exc}") from None
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        except sqlite3.DatabaseError as exc:
            connection.close()
            raise self.error(f"corrupt or unreadable SQLite database: {exc}") from None
        return connection

    def _check_schema(self, create: bool) -> None:
        tables = _tables(self.connection)
        if not tables:
            if not create:
                raise self.error("an empty database, not a tool cache")
            self._create_schema()
            tables = _tables(self.connection)
        if "meta" not in tables:
            names = ", ".join(sorted(tables))
            raise self.error(
                f"a SQLite database without the tool cache schema (its tables: {names})"
            )
        meta = dict(self.connection.execute("SELECT key, value FROM meta"))
        if meta.get("format") != FORMAT_NAME:
            raise self.error(
                f"a SQLite database of another format ({meta.get('format')!r}), not a tool cache"
            )
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise self.error(
                f"tool cache schema version {meta.get('schema_version')}, but this cacherl_jax "
                f"reads version {SCHEMA_VERSION}: rebuild it with `cacherl cache build`"
            )
        missing = _TABLES - tables
        if missing:
            raise self.error(f"tool cache is missing tables: {', '.join(sorted(missing))}")

    def _create_schema(self) -> None:
        with _transaction(self.connection):
            if _tables(self.connection):  # another process created it meanwhile
                return
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.connection.execute(statement)
            self.connection.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("format", FORMAT_NAME), ("schema_version", str(SCHEMA_VERSION))],
            )

    # -- reading ---------------------------------------------------------------------------------

    def tools_since(self, last_id: int) -> tuple[list[tuple[str, str]], int]:
        """([(name, schema JSON)] stored after id `last_id`, the last id stored)."""
        with self.failing_as("reading tool schemas"):
            rows = self.connection.execute(
                "SELECT name, schema FROM tools WHERE id > ? ORDER BY id", (last_id,)
            ).fetchall()
            (last,) = self.connection.execute("SELECT max(id) FROM tools").fetchone()
        return rows, last or 0

    def entries_since(self, last_rowid: int) -> Iterator[list[tuple]]:
        """Batches of (rowid, scope, tool, arguments, result, source) after `last_rowid`."""
        with self.failing_as("reading entries"):
            cursor = self.connection.execute(
                "SELECT id, scope, tool, arguments, result, source FROM entries WHERE id > ? "
                "ORDER BY id",
                (last_rowid,),
            )
            while rows := cursor.fetchmany(_FETCH_ROWS):
                yield rows

    def summary(self, top: int) -> dict[str, Any]:
        """Counts of entries, tools, scopes and tool schemas, and the `top` tools by entries."""
        with self.failing_as("reading the summary"):
            execute = self.connection.execute
            entries, tools, scopes = execute(
                "SELECT count(*), count(DISTINCT tool), count(DISTINCT scope) FROM entries"
            ).fetchone()
            top_tools = execute(
                "SELECT tool, count(*) AS n FROM entries GROUP BY tool ORDER BY n DESC, tool "
                "LIMIT ?",
                (top,),
            ).fetchall()
            schemas = execute("SELECT count(*) FROM tools").fetchone()[0]
        return {
            "entries": entries,
            "tools": tools,
            "scopes": scopes,
            "tool_schemas": schemas,
            "top_tools": [{"tool": tool, "entries": count} for tool, count in top_tools],
        }

    # -- writing ---------------------------------------------------------------------------------

    def insert_entries(self, rows: Sequence[EntryRow]) -> int:
        """Stores entries in one transaction (a key stored before keeps its result); returns
        how many were new."""
        with self.failing_as("recording"), _transaction(self.connection):
            before = self.connection.total_changes
            try:
                self.connection.executemany(
                    "INSERT OR IGNORE INTO entries "
                    "(scope, tool, arguments, result, source, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
            except UnicodeEncodeError as exc:
                raise self.error(f"a result or argument is not valid Unicode: {exc}") from None
            return self.connection.total_changes - before

    def delete_entries_after(self, last_rowid: int) -> int:
        """Deletes the entries stored after `last_rowid` (a private copy's own writes, undone);
        returns how many. The next entry then takes rowid `last_rowid + 1` again."""
        with self.failing_as("deleting entries"), _transaction(self.connection):
            cursor = self.connection.execute("DELETE FROM entries WHERE id > ?", (last_rowid,))
            return cursor.rowcount

    def insert_tools(self, rows: Sequence[tuple[str, str]]) -> int:
        """Stores (name, schema JSON) pairs, the first per name staying; returns how many were
        new."""
        with self.failing_as("recording tool schemas"), _transaction(self.connection):
            before = self.connection.total_changes
            self.connection.executemany(
                "INSERT OR IGNORE INTO tools (name, schema) VALUES (?, ?)", rows
            )
            return self.connection.total_changes - before


def _tables(connection: sqlite3.Connection) -> set[str]:
    rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    return {name for (name,) in rows}


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front (waiting up to busy_timeout): a deferred transaction
    # that reads first could not upgrade once another process has written, and fails at once.
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
