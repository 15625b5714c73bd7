"""The tool cache on a pod: local snapshots, hosts' deltas, and their deterministic merge -- on
real SQLite files, with real (spawned) processes as hosts."""

import json
import multiprocessing
import random
import sqlite3

import pytest

from cacherl_jax.agent.tool_cache import (
    Delta,
    Origin,
    ToolCache,
    ToolCacheConfig,
    ToolCacheError,
    ToolRecord,
    delta_from_json,
    delta_to_json,
    merge,
    snapshot,
    sync,
    take_delta,
)

# What each host records during the step, in order: (tool, arguments, result, scope).
HOST_CALLS = {
    0: [
        ("rate", {"base": "USD", "quote": "EUR"}, "0.91", None),  # also on host 1
        ("only0", {"i": 1}, "a", None),
        ("rate", {"base": "USD", "quote": "JPY"}, "150 (host 0)", None),  # also on host 1
        ("rate", {"base": "USD", "quote": "JPY"}, "151 (host 0 again)", None),  # its own first
        ("ls", {"path": "/"}, "bin etc", "task-1"),
        ("seeded", {"k": 1}, "from host 0", None),  # in the master: the master's stays
    ],
    1: [
        ("rate", {"quote": "JPY", "base": "USD"}, "149 (host 1)", None),  # same key, other order
        ("only1", {"i": 1}, "b", None),
        ("rate", {"base": "USD", "quote": "EUR"}, "0.90 (host 1)", None),
        ("ls", {"path": "/"}, "home", "task-2"),  # another scope: its own key
        ("ls", {"path": "/"}, "etc bin", "task-1"),
        ("only1", {"i": 2}, "c", None),
    ],
}


def _master(path):
    with ToolCache(path) as cache:
        cache.record("seeded", {"k": 1}, "from the master")
        cache.record("seeded", {"k": 2}, "also seeded", scope="task-1")
    return path


def _rows(cache: ToolCache) -> list[tuple]:
    """Every entry as stored: (rowid, scope, tool, arguments, result, source)."""
    return [tuple(entry) for entry in cache.entries_since(0)]


def _host_step(master: str, local_dir: str, process: int, step: int, out: str) -> None:
    """One host: snapshot the master, record its calls, write its delta as JSON."""
    with ToolCache(snapshot(master, local_dir)) as cache:
        mark = cache.mark()
        for tool, arguments, result, scope in HOST_CALLS[process]:
            cache.record(tool, arguments, result, scope=scope, source="hybrid")
        delta = take_delta(cache, mark, step=step, process=process)
    with open(out, "w") as file:
        json.dump(delta_to_json(delta), file)


def _run_hosts(tmp_path, master, step=0) -> list[Delta]:
    context = multiprocessing.get_context("spawn")
    outs = [str(tmp_path / f"delta{p}.json") for p in HOST_CALLS]
    hosts = [
        context.Process(target=_host_step, args=(master, str(tmp_path / f"host{p}"), p, step, out))
        for p, out in zip(HOST_CALLS, outs, strict=True)
    ]
    for host in hosts:
        host.start()
    for host in hosts:
        host.join(timeout=120)
    assert [host.exitcode for host in hosts] == [0, 0]
    deltas = []
    for out in outs:
        with open(out) as file:
            deltas.append(delta_from_json(json.load(file)))
    return deltas


def _one_host_reference(tmp_path, master) -> list[tuple]:
    """One process recording every host's rows in origin order (process 0's, then 1's)."""
    with ToolCache(snapshot(master, tmp_path / "reference")) as cache:
        for process in sorted(HOST_CALLS):
            for tool, arguments, result, scope in HOST_CALLS[process]:
                cache.record(tool, arguments, result, scope=scope, source="hybrid")
        return _rows(cache)


def test_two_hosts_merge_as_one_host_recording_in_origin_order(tmp_path):
    master = str(_master(tmp_path / "cache.db"))
    with ToolCache(master) as cache:
        before = _rows(cache)
    deltas = _run_hosts(tmp_path, master)
    with ToolCache(master) as cache:
        assert _rows(cache) == before  # the hosts wrote only their own copies
    # A host's delta holds its first result per key it added; the master's keys are not in it.
    assert [len(delta) for delta in deltas] == [4, 6]
    assert deltas[0].origins()[1] == Origin(step=0, process=0, row=1)

    reference = _one_host_reference(tmp_path, master)

    with ToolCache(ToolCacheConfig(master, scope_mode="scoped")) as cache:
        report = merge(cache, reversed(deltas))  # the order deltas arrive in does not matter
        assert (report.records, report.recorded, report.already_present) == (10, 7, 3)
        assert report.conflicting == 3  # EUR, JPY and ls in task-1: host 0 won
        merged = _rows(cache)
        assert merged == reference  # rowids, results and sources
        lookup = cache.lookup
        assert lookup("rate", {"base": "USD", "quote": "EUR"}).result == "0.91"
        assert lookup("rate", {"base": "USD", "quote": "JPY"}).result == "150 (host 0)"
        assert lookup("ls", {"path": "/"}, scope="task-1").result == "bin etc"
        assert lookup("seeded", {"k": 1}).result == "from the master"
        for process, calls in HOST_CALLS.items():  # no key any host recorded is lost
            for tool, arguments, _, scope in calls:
                hit = lookup(tool, arguments, scope=scope)
                assert hit.tier == "exact" and hit.entry.scope == (scope or ""), (process, tool)

        again = merge(cache, [*deltas, deltas[1]])  # idempotent
        assert again.recorded == 0 and _rows(cache) == merged


def _spy_rollbacks(monkeypatch, cache: ToolCache) -> list[int]:
    """The marks `sync` rolls `cache` back to (each a reload of its index)."""
    marks = []

    def rollback(mark: int) -> int:
        marks.append(mark)
        return ToolCache.rollback(cache, mark)

    monkeypatch.setattr(cache, "rollback", rollback)
    return marks


def test_hosts_in_sync_hold_the_masters_entries_in_its_order(tmp_path, monkeypatch):
    master = ToolCache(_master(tmp_path / "cache.db"))
    hosts = [ToolCache(snapshot(master.path, tmp_path / f"host{p}")) for p in range(2)]
    steps = [
        HOST_CALLS,
        {  # step 1: both record a new shared key; host 1 re-records one host 0 added at step 0
            0: [("f", {"x": "hello world"}, "0@1", None)],
            1: [
                ("only0", {"i": 1}, "ignored", None),
                ("f", {"x": "hello  world"}, "1@1", None),
                ("g", {}, "g", None),
            ],
        },
    ]
    rollbacks = [_spy_rollbacks(monkeypatch, host) for host in hosts]
    for step, calls in enumerate(steps):
        marks = [host.mark() for host in hosts]
        for process, host in enumerate(hosts):
            for tool, arguments, result, scope in calls[process]:
                host.record(tool, arguments, result, scope=scope, source="hybrid")
        payloads = [  # what an all-gather of the JSON would hand every host
            json.dumps(delta_to_json(take_delta(host, mark, step=step, process=p)))
            for p, (host, mark) in enumerate(zip(hosts, marks, strict=True))
        ]
        deltas = [delta_from_json(json.loads(payload)) for payload in payloads]
        merge(master, deltas)
        for host, mark in zip(hosts, marks, strict=True):
            sync(host, mark, deltas)
            assert _rows(host) == _rows(master), step  # rowids and sources too
            assert len(host) == len(master)
    # Host 0's rows come first in every merge, so its copy never reloads; host 1's always do.
    assert rollbacks[0] == [] and len(rollbacks[1]) == 2
    assert hosts[1].lookup("f", {"x": "hello world"}).result == "0@1"
    assert hosts[1].lookup("only0", {"i": 1}).result == "a"
    assert hosts[1].lookup("f", {"x": "hello wrld"}).entry.result == "0@1"  # a fuzzy hit
    for cache in (master, *hosts):
        cache.close()


def test_sync_without_the_hosts_own_delta_changes_nothing(tmp_path):
    with ToolCache(snapshot(tmp_path / "none.db", tmp_path / "host")) as host:
        mark = host.mark()
        host.record("mine", {"i": 1}, "x")
        other = Delta(0, 1, (ToolRecord("theirs", '{"i":1}', "y"),))
        with pytest.raises(ToolCacheError, match="pass its own delta"):
            sync(host, mark, [other])
        assert [row[2:5] for row in _rows(host)] == [("mine", '{"i":1}', "x")]


def test_delta_json_round_trip_and_bad_deltas(tmp_path):
    with ToolCache(tmp_path / "cache.db") as cache:
        cache.record("a", {"s": "é ☃"}, "r1", scope="t")
        mark = cache.mark()
        cache.record("b", None, "r2")
        delta = take_delta(cache, mark, step=3, process=2)
    assert delta == Delta(3, 2, (ToolRecord("b", "{}", "r2", "", "live"),))
    data = json.loads(json.dumps(delta_to_json(delta)))
    assert delta_from_json(data) == delta

    with pytest.raises(ToolCacheError, match="not a tool cache delta"):
        delta_from_json({"entries": []})
    with pytest.raises(ToolCacheError, match="delta version 7"):
        delta_from_json({**data, "version": 7})
    with pytest.raises(ToolCacheError, match="entry 0 of a tool cache delta"):
        delta_from_json({**data, "entries": [["", "b", {}, "r2", "live"]]})
    with pytest.raises(ToolCacheError, match="process must be an int >= 0"):
        delta_from_json({**data, "process": -1})
    with (
        ToolCache(tmp_path / "other.db") as other,
        pytest.raises(ToolCacheError, match="two different tool cache deltas of step 3"),
    ):
        merge(other, [delta, Delta(3, 2, ())])


def test_snapshot_copies_consistently_and_replaces_an_older_copy(tmp_path):
    source = tmp_path / "run" / "cache.db"
    source.parent.mkdir()
    writer = ToolCache(source)  # open: its entries sit in the WAL, not yet in the main file
    writer.record_many([ToolRecord("f", {"i": i}, str(i)) for i in range(300)])
    assert (tmp_path / "run" / "cache.db-wal").stat().st_size > 0

    copy = snapshot(source, tmp_path / "local")
    assert copy == tmp_path / "local" / "cache.db"
    assert sorted(p.name for p in copy.parent.iterdir()) == ["cache.db"]  # one file
    with ToolCache(copy) as local:
        assert _rows(local) == _rows(writer)
        local.record("local only", {}, "x")
    assert writer.refresh() == 0 and len(writer) == 300  # the copy is not the source

    writer.record("g", {}, "y")
    with ToolCache(snapshot(source, tmp_path / "local")) as local:  # replaces the old copy
        assert len(local) == 301 and local.lookup("local only", {}).entry is None
    writer.close()

    with ToolCache(snapshot(tmp_path / "missing.db", tmp_path / "local")) as empty:
        assert len(empty) == 0 and empty.mark() == 0


def test_snapshot_of_a_bad_file_is_the_packages_clear_error(tmp_path):
    corrupt = tmp_path / "cache.db"
    with ToolCache(corrupt) as cache:
        cache.record_many([ToolRecord("f", {"i": i}, "x" * 200) for i in range(500)])
    with sqlite3.connect(corrupt) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(corrupt.read_bytes())
    data[100:] = random.Random(0).randbytes(len(data) - 100)  # keep the 100-byte file header
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ToolCacheError, match=str(corrupt)):
        snapshot(corrupt, tmp_path / "local")
    assert not (tmp_path / "local").exists() or not list((tmp_path / "local").iterdir())

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(ToolCacheError, match="not a SQLite database"):
        snapshot(garbage, tmp_path / "local")
    with pytest.raises(ToolCacheError, match="cannot replace its own source"):
        snapshot(_master(tmp_path / "m.db"), tmp_path)
