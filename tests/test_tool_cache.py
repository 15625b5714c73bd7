"""The three-tier tool cache's public behaviour: tier semantics, statistics, scopes, persistence
and bad files, several writing processes, building from trajectories, and `cacherl cache` on the
command line. Keys and similarity: test_tool_cache_keys.py; the nearest-entry search and its
indexes: test_tool_cache_search.py."""

import json
import multiprocessing
import random
import sqlite3

import pytest

from cacherl_jax.agent import cache_cli
from cacherl_jax.agent.tool_cache import (
    CacheHit,
    ToolCache,
    ToolCacheConfig,
    ToolCacheError,
    ToolRecord,
    argument_similarity,
    build_from_trajectories,
    canonical_key,
)
from cacherl_jax.chat.trajectory import Trajectory, write_jsonl

WEATHER = {"city": "San Francisco", "unit": "celsius", "days": 3}


@pytest.fixture
def cache(tmp_path):
    with ToolCache(tmp_path / "cache.db") as opened:
        yield opened


# --- tiers -------------------------------------------------------------------------------------


def _weather_cache(cache):
    cache.record("get_weather", WEATHER, '{"temp": 21, "sky": "fog"}')
    cache.record("get_weather", {"city": "Tokyo", "unit": "celsius", "days": 3}, '{"temp": 28}')
    cache.record("get_weather", {"city": "Oslo", "unit": "kelvin", "days": 10}, '{"temp": 270}')
    return cache


def test_exact_hit_for_canonically_equal_arguments(cache):
    _weather_cache(cache)
    hit = cache.lookup("get_weather", {"days": 3.0, "unit": " celsius", "city": "San  Francisco"})
    assert hit.tier == "exact" and hit.score == 100.0
    assert hit.result == '{"temp": 21, "sky": "fog"}'
    assert hit.entry.arguments == WEATHER and hit.entry.tool == "get_weather"
    result, tier, score, entry = hit  # unpacks as the issue's (result, tier, score, entry)
    assert (result, tier, score, entry) == (hit.result, "exact", 100.0, hit.entry)


def test_perturbed_arguments_are_fuzzy_hits_on_the_nearest_entry(cache):
    _weather_cache(cache)
    for perturbed in (
        {"city": "San Fransisco", "unit": "celsius", "days": 3},  # a typo
        {"city": "San Francisco", "unit": "celsius", "days": 4},  # a nearby number
        {"city": "san francisco", "unit": "celsius", "days": 3},
    ):
        hit = cache.lookup("get_weather", perturbed)
        assert hit.tier == "fuzzy", perturbed
        assert hit.entry.arguments == WEATHER
        assert hit.result == '{"temp": 21, "sky": "fog"}'
        assert hit.score == pytest.approx(argument_similarity(perturbed, WEATHER))
        assert cache.config.fuzzy_threshold <= hit.score < 100


def test_unrelated_arguments_are_best_effort_with_the_nearest_entry(cache):
    _weather_cache(cache)
    query = {"city": "Ulaanbaatar", "unit": "rankine", "days": 400}
    hit = cache.lookup("get_weather", query)
    assert hit.tier == "best_effort" and hit.entry is not None
    assert hit.score < cache.config.fuzzy_threshold
    others = [
        {"city": "Tokyo", "unit": "celsius", "days": 3},
        {"city": "Oslo", "unit": "kelvin", "days": 10},
    ]
    best = max(argument_similarity(query, entry) for entry in [WEATHER, *others])
    assert hit.score == pytest.approx(best)


def test_other_argument_names_are_never_fuzzy(cache):
    _weather_cache(cache)
    # Every shared value is equal, so only the names differ: still not fuzzy, at any threshold.
    for query in ({"city": "San Francisco", "unit": "celsius"}, {**WEATHER, "hourly": True}):
        hit = cache.lookup("get_weather", query)
        assert hit.tier == "best_effort", query
        assert hit.entry is not None and hit.entry.arguments == WEATHER
    lenient = ToolCache(ToolCacheConfig(cache.path, fuzzy_threshold=0.0))
    assert lenient.lookup("get_weather", {"city": "San Francisco"}).tier == "best_effort"
    assert lenient.lookup("get_weather", {"city": "Rome", "unit": "x", "days": 0}).tier == "fuzzy"


def test_exact_only_cache_answers_nothing_but_exact_hits(cache):
    _weather_cache(cache)
    exact_only = ToolCache(ToolCacheConfig(cache.path, exact_only=True))
    hit = exact_only.lookup(
        "get_weather", {"days": 3.0, "unit": "celsius", "city": "San Francisco"}
    )
    assert (hit.tier, hit.score) == ("exact", 100.0) and hit.entry.arguments == WEATHER
    near = {**WEATHER, "days": 4}  # a fuzzy hit in the full cache
    assert cache.lookup("get_weather", near).tier == "fuzzy"
    miss = exact_only.lookup("get_weather", near)
    assert (miss.tier, miss.score, miss.entry) == ("best_effort", 0.0, None)
    assert json.loads(miss.result)["error"] == "no_recorded_result"
    assert exact_only.stats()["unseen_tool"] == 0  # the tool is known, only the call is not


def test_unseen_tool_gets_a_schema_shaped_no_recorded_result(cache):
    _weather_cache(cache)
    hit = cache.lookup("get_time", {"zone": "UTC"})
    assert (hit.tier, hit.score, hit.entry) == ("best_effort", 0.0, None)
    response = json.loads(hit.result)
    assert response["error"] == "no_recorded_result" and response["tool"] == "get_time"
    assert response["arguments"] == {"zone": "UTC"} and "get_time" in response["message"]

    schema = {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current time in a time zone.",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
        },
    }
    assert cache.register_tools([schema]) == 1
    response = json.loads(cache.lookup("get_time", {"zone": "UTC"}).result)
    assert response["description"] == "Current time in a time zone."
    assert response["parameters"] == {"zone": "string"}
    stats = cache.stats()
    assert (stats["best_effort"], stats["unseen_tool"], stats["lookups"]) == (2, 2, 2)


def test_stats_count_lookups_per_tier(cache):
    _weather_cache(cache)
    cache.lookup("get_weather", WEATHER)
    cache.lookup("get_weather", {**WEATHER, "days": 4})
    cache.lookup("get_weather", {"city": "Lima", "unit": "x", "days": 99})
    cache.lookup("nope", {})
    stats = cache.stats()
    assert {k: stats[k] for k in ("lookups", "exact", "fuzzy", "best_effort", "unseen_tool")} == {
        "lookups": 4, "exact": 1, "fuzzy": 1, "best_effort": 2, "unseen_tool": 1,
    }  # fmt: skip
    assert (stats["entries"], stats["tools"]) == (3, 1)
    cache.reset_stats()
    assert cache.stats()["lookups"] == 0


def test_first_recorded_result_wins_and_conflicts_are_counted(cache):
    first = cache.record("f", {"a": 1}, "one")
    again = cache.record("f", {"a": 1.0}, "uno")
    assert again == first and again.result == "one"
    report = cache.record_many([ToolRecord("f", {"a": 1}, "one"), ToolRecord("f", {"a": 1}, "x")])
    assert (report.records, report.recorded, report.already_present, report.conflicting) == (
        2, 0, 2, 1,
    )  # fmt: skip
    with pytest.raises(ToolCacheError, match="must be a string"):
        cache.record("f", {"a": 2}, {"not": "text"})


# --- scopes ------------------------------------------------------------------------------------


def test_scoped_lookups_see_only_their_scope(tmp_path):
    path = tmp_path / "cache.db"
    with ToolCache(path) as writer:
        writer.record("ls", {"dir": "."}, "a.txt", scope="task-1")
        writer.record("ls", {"dir": "."}, "b.txt", scope="task-2")
        writer.record("pwd", {}, "/home", scope="task-2")
    scoped = ToolCache(ToolCacheConfig(path, scope_mode="scoped"))
    assert scoped.lookup("ls", {"dir": "."}, scope="task-1").result == "a.txt"
    assert scoped.lookup("ls", {"dir": "."}, scope="task-2").result == "b.txt"
    assert scoped.lookup("ls", {"dir": "./"}, scope="task-2").entry.scope == "task-2"
    assert scoped.lookup("pwd", {}, scope="task-1").entry is None  # never seen in task-1
    assert scoped.lookup("ls", {"dir": "."}).entry is None  # no entry in the global scope
    everything = ToolCache(ToolCacheConfig(path, scope_mode="global"))
    hit = everything.lookup("ls", {"dir": "."}, scope="task-2")
    assert (hit.tier, hit.result) == ("exact", "a.txt")  # global: the first recorded answers
    assert everything.lookup("pwd", {}, scope="task-1").result == "/home"


def test_config_from_an_ml_collections_config_dict(tmp_path):
    import ml_collections

    config = ml_collections.ConfigDict(
        {"path": str(tmp_path / "c.db"), "fuzzy_threshold": 90.0, "scope_mode": "scoped"}
    )
    made = ToolCacheConfig.from_config(config)
    assert (made.fuzzy_threshold, made.scope_mode) == (90.0, "scoped")
    with pytest.raises(ValueError, match="unknown tool cache settings"):
        ToolCacheConfig.from_config({"path": "x", "treshold": 1})
    with pytest.raises(ValueError, match="fuzzy_threshold"):
        ToolCacheConfig(path="x", fuzzy_threshold=101)
    with pytest.raises(ValueError, match="scope_mode"):
        ToolCacheConfig(path="x", scope_mode="per-task")


# --- persistence and bad files -----------------------------------------------------------------


def test_refresh_sees_entries_other_connections_wrote(tmp_path):
    path = tmp_path / "cache.db"
    reader = ToolCache(path)
    writer = ToolCache(path)
    writer.record("f", {"x": "hello world"}, "1")
    assert reader.lookup("f", {"x": "hello world"}).entry is None
    assert reader.refresh() == 1
    assert reader.lookup("f", {"x": "hello world"}).tier == "exact"
    writer.record("f", {"x": "hello there"}, "2")
    assert reader.lookup("f", {"x": "hello therr"}).result == "1"  # not refreshed yet
    reader.refresh()
    assert reader.lookup("f", {"x": "hello therr"}).result == "2"  # new entry joins the index


def test_bad_files_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(ToolCacheError, match="not a SQLite database") as error:
        ToolCache(garbage)
    assert str(garbage) in str(error.value)

    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as connection:
        connection.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(
        ToolCacheError, match=r"without the tool cache schema \(its tables: users\)"
    ):
        ToolCache(foreign)

    old = tmp_path / "old.db"
    ToolCache(old).close()
    with sqlite3.connect(old) as connection:
        connection.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(
        ToolCacheError, match="schema version 99, but this cacherl_jax reads version 1"
    ):
        ToolCache(old)

    other_format = tmp_path / "other.db"
    with sqlite3.connect(other_format) as connection:
        connection.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        connection.execute("INSERT INTO meta VALUES ('format', 'someone.else')")
    with pytest.raises(ToolCacheError, match="another format"):
        ToolCache(other_format)

    with pytest.raises(ToolCacheError, match="no such tool cache file"):
        ToolCache(tmp_path / "missing.db", create=False)
    with pytest.raises(ToolCacheError, match="is a directory"):
        ToolCache(tmp_path)


def test_corrupt_pages_behind_a_valid_header_are_a_clear_error(tmp_path):
    path = tmp_path / "cache.db"
    with ToolCache(path) as cache:
        cache.record_many([ToolRecord("f", {"i": i}, "x" * 200) for i in range(500)])
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    data[100:] = random.Random(0).randbytes(len(data) - 100)  # keep the 100-byte file header
    path.write_bytes(bytes(data))
    with pytest.raises(ToolCacheError, match=str(path)):
        ToolCache(path)


# --- several processes -------------------------------------------------------------------------


def _write_records(path: str, worker: int, count: int) -> None:
    with ToolCache(ToolCacheConfig(path, busy_timeout_s=60)) as cache:
        for i in range(count):
            cache.record("write", {"worker": worker, "i": i}, f"{worker}:{i}")
            if i % 10 == 0:  # the same key from every process: stored once
                cache.record("shared", {"i": i}, f"from {worker}")


def test_processes_writing_one_file_lose_no_entries(tmp_path):
    path = str(tmp_path / "cache.db")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_records, args=(path, w, 200)) for w in range(4)]
    for process in workers:  # all racing to create the file, too
        process.start()
    watcher = ToolCache(ToolCacheConfig(path, busy_timeout_s=60))  # opened while they write
    for process in workers:
        process.join(timeout=120)
    assert [process.exitcode for process in workers] == [0, 0, 0, 0]
    watcher.refresh()
    assert len(watcher) == 4 * 200 + 20
    for worker in range(4):
        for i in range(200):
            hit = watcher.lookup("write", {"worker": worker, "i": i})
            assert (hit.tier, hit.result) == ("exact", f"{worker}:{i}")
    assert ToolCache(path).summary()["entries"] == 4 * 200 + 20


# --- built from trajectories ------------------------------------------------------------------


def _tool_call(name, arguments, call_id=None):
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return call if call_id is None else {"id": call_id, **call}


def _trajectories() -> list[Trajectory]:
    records = [
        {  # ids, answered out of order, arguments as a JSON string
            "id": "t1",
            "messages": [
                {"role": "user", "content": "weather in two cities?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        _tool_call("get_weather", '{"city": "Paris"}', "c1"),
                        _tool_call("get_weather", {"city": "Lima"}, "c2"),
                    ],
                },
                {"role": "tool", "tool_call_id": "c2", "content": '{"temp": 19}\n'},
                {"role": "tool", "tool_call_id": "c1", "content": "  {\"temp\": 11}  "},
                {"role": "assistant", "content": "Paris 11, Lima 19."},
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather"}}],
        },
        {  # no ids: paired in order; one call never answered; one orphan tool message
            "id": "t2",
            "messages": [
                {"role": "user", "content": "files?"},
                {"role": "assistant", "content": "", "tool_calls": [_tool_call("ls", {}), _tool_call("cat", {"path": "a b"})]},
                {"role": "tool", "content": "a b\nc"},
                {"role": "tool", "content": "contents of \u00e9 \u2603"},
                {"role": "tool", "content": "orphan"},
                {"role": "assistant", "content": "", "tool_calls": [_tool_call("rm", {"path": "x"})]},
                {"role": "user", "content": "stop"},
            ],
        },
    ]  # fmt: skip
    return [Trajectory.from_dict(record) for record in records]


def test_every_call_of_a_trajectories_file_becomes_an_exact_hit(tmp_path):
    path = tmp_path / "trajectories.jsonl"
    write_jsonl(path, _trajectories())
    with ToolCache(tmp_path / "cache.db") as cache:
        report = build_from_trajectories(cache, [path])
        expected = [
            ("get_weather", {"city": "Paris"}, '  {"temp": 11}  '),
            ("get_weather", {"city": "Lima"}, '{"temp": 19}\n'),
            ("ls", {}, "a b\nc"),
            ("cat", {"path": "a b"}, "contents of \u00e9 \u2603"),
        ]
        for tool, arguments, result in expected:
            hit = cache.lookup(tool, arguments)
            assert hit.tier == "exact" and hit.result == result  # byte-identical
            assert hit.entry.source.startswith("trajectory:")
        assert (report.trajectories, report.calls, report.unanswered_calls) == (2, 4, 1)
        assert (report.orphan_results, report.tool_schemas, report.records.recorded) == (1, 1, 4)
        again = build_from_trajectories(cache, [path])
        assert (again.records.recorded, again.records.already_present) == (0, 4)


def test_scope_per_trajectory(tmp_path):
    path = tmp_path / "trajectories.jsonl"
    write_jsonl(path, _trajectories())
    with ToolCache(tmp_path / "cache.db") as cache:
        build_from_trajectories(cache, [path], scope_per_trajectory=True)
    scoped = ToolCache(ToolCacheConfig(tmp_path / "cache.db", scope_mode="scoped"))
    assert scoped.lookup("ls", {}, scope="t2").tier == "exact"
    assert scoped.lookup("ls", {}, scope="t1").entry is None


# --- command line ------------------------------------------------------------------------------


def test_cli_build_stats_lookup(tmp_path, capsys):
    trajectories = tmp_path / "trajectories.jsonl"
    write_jsonl(trajectories, _trajectories())
    db = str(tmp_path / "cache.db")
    assert cache_cli.main(["cache", "build", "--trajectories", str(trajectories), "--db", db]) == 0
    assert "4 new entries from 4 answered calls in 2 trajectories" in capsys.readouterr().out

    assert cache_cli.main(["cache", "stats", "--db", db, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["entries"], summary["tools"]) == (4, 3)
    assert summary["top_tools"][0] == {"tool": "get_weather", "entries": 2}
    assert cache_cli.main(["cache", "stats", "--db", db]) == 0
    assert "4 entries, 3 tools" in capsys.readouterr().out

    lookup = ["cache", "lookup", "--db", db, "--tool", "get_weather"]
    assert cache_cli.main([*lookup, "--arguments", '{"city": "Pariss"}', "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["tier"] == "fuzzy" and answer["result"] == '  {"temp": 11}  '
    assert answer["entry"]["arguments"] == {"city": "Paris"}
    assert cache_cli.main([*lookup, "--arguments", '{"city": "Paris"}']) == 0
    out = capsys.readouterr().out
    assert out.startswith("tier: exact  score: 100.00") and '{"temp": 11}' in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["cache", "stats", "--db", "{missing}"], "no such tool cache file"),
        (["cache", "stats", "--db", "{garbage}"], "not a SQLite database"),
        (["cache", "lookup", "--db", "{db}", "--tool", "f", "--arguments", "{{x"], "not valid JSON"),
        (["cache", "lookup", "--db", "{db}", "--tool", "f", "--arguments", "[1]"], "must be a JSON object"),
        (["cache", "lookup", "--db", "{db}", "--tool", "f", "--threshold", "200"], "fuzzy_threshold"),
        (["cache", "build", "--trajectories", "{missing}", "--db", "{db}"], "no such file"),
    ],
)  # fmt: skip
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "garbage.db").write_bytes(b"not a database at all" * 10)
    ToolCache(tmp_path / "cache.db").close()
    paths = {
        "missing": str(tmp_path / "missing"),
        "garbage": str(tmp_path / "garbage.db"),
        "db": str(tmp_path / "cache.db"),
    }
    assert cache_cli.main([arg.format(**paths) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cacherl cache: error: ") and message in err
    assert err.count("\n") == 1


def test_cache_hit_is_a_plain_tuple():
    hit = CacheHit("r", "fuzzy", 90.0, None)
    assert tuple(hit) == ("r", "fuzzy", 90.0, None)


def test_bfcl_ground_truth_replays_as_exact_byte_identical_hits(tmp_path):
    """A cache built from live executions of BFCL multi-turn ground truth answers a replay of that
    ground truth with 100% exact hits and byte-identical results (one scope per task: results
    depend on each task's state)."""
    from cacherl_jax.agent import bfcl

    tasks = bfcl.load_tasks("multi_turn_base", limit=60, with_expected_state=False)
    cache = ToolCache(ToolCacheConfig(tmp_path / "bfcl.sqlite", scope_mode="scoped"))
    # Record the first execution of each (tool, arguments) only, as a cache built from live
    # runs would: a repeated call in a task with changed state keeps its first result, so the
    # replay below compares against a fresh execution, call by call in order.
    live = {task.id: bfcl.execute_ground_truth(task) for task in tasks}
    cache.record_many(
        ToolRecord(call.name, call.arguments, call.result.text, task_id)
        for task_id, calls in live.items()
        for call in calls
    )
    replay = {task.id: bfcl.execute_ground_truth(task) for task in tasks}
    hits = 0
    for task_id, calls in replay.items():
        first_results = {}
        for call in calls:
            first_results.setdefault(canonical_key(call.arguments) + call.name, call.result.text)
            hit = cache.lookup(call.name, call.arguments, scope=task_id)
            assert hit.tier == "exact", (task_id, call.name)
            assert hit.result == first_results[canonical_key(call.arguments) + call.name]
            hits += 1
    assert hits == sum(len(c) for c in live.values()) > 300
    assert cache.stats()["exact"] == hits
