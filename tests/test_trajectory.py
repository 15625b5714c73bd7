"""Trajectory records: JSONL round trips, normalisation, and every bad input named by file:line."""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cacherl_jax.chat.trajectory import (
    ReadReport,
    Trajectory,
    TrajectoryError,
    load_jsonl,
    read_jsonl,
    write_jsonl,
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time"}}


def _full_record(record_id: str = "task-17") -> dict:
    """Already normalised, so it must come back from a file exactly as it is."""
    return {
        "id": record_id,
        "messages": [
            {"role": "system", "content": "You are a helpful agent. Réponds en français."},
            {"role": "user", "content": "Weather and time in Zürich and 東京? 🌦"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "Two cities → two parallel calls.",
                "tool_calls": [
                    {
                        "id": "call_0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
                    },
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "東京"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_0", "name": "get_weather", "content": "12°C"},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": "18°C"}'},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "get_time", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "09:00\u2028(line separator kept)"},
            {"role": "assistant", "content": "Zürich: 12°C, 東京: 18°C, 09:00."},
            {"role": "user", "content": "Merci !"},
            {"role": "assistant", "content": "De rien.", "reasoning_content": "Short reply."},
        ],
        "tools": copy.deepcopy([WEATHER_TOOL, TIME_TOOL]),
        "metadata": {"source": "bfcl", "task": "multi_turn_base_3", "turns": 2, "reward": 1.0},
    }


def _minimal(record_id: str = "t", **changes) -> dict:
    record = {"id": record_id, "messages": [{"role": "user", "content": "hi"}]}
    record.update(changes)
    return record


def _write_lines(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# --- round trips --------------------------------------------------------------------------------


def test_full_record_round_trips_through_jsonl(tmp_path):
    record = _full_record()
    trajectory = Trajectory.from_dict(record)
    assert trajectory.to_dict() == record

    path = tmp_path / "out" / "nested" / "trajectories.jsonl"  # parents are created
    assert write_jsonl(path, [trajectory, Trajectory.from_dict(_full_record("task-18"))]) == 2
    loaded, report = load_jsonl(path)

    assert loaded[0] == trajectory
    assert [t.id for t in loaded] == ["task-17", "task-18"]
    assert (report.path, report.read, report.skipped, report.errors) == (str(path), 2, 0, [])
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") == 2 and text.endswith("\n")
    assert "東京" in text and "\u2028" in text and "\\u" not in text  # ensure_ascii=False
    assert '", "' not in text  # compact separators


def test_tool_schema_key_order_survives_a_round_trip(tmp_path):
    tool = {
        "type": "function",
        "function": {
            "parameters": {"type": "object", "properties": {"z": {}, "a": {}, "m": {}}},
            "name": "zeta",
            "description": "keys deliberately out of order",
        },
    }
    write_jsonl(tmp_path / "t.jsonl", [Trajectory.from_dict(_minimal(tools=[tool]))])
    [loaded], _ = load_jsonl(tmp_path / "t.jsonl")
    function = loaded.tools[0]["function"]
    assert list(function) == ["parameters", "name", "description"]
    assert list(function["parameters"]["properties"]) == ["z", "a", "m"]
    assert json.dumps(loaded.tools[0]) == json.dumps(tool)


_texts = st.text(max_size=20)  # includes surrogates, \r, U+2028/2029, NEL: none may split a line
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | _texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(
    record_id=_texts.filter(bool),
    contents=st.lists(_texts, min_size=1, max_size=4),
    arguments=st.dictionaries(_texts, _json_values, max_size=3),
    metadata=st.dictionaries(_texts.filter(lambda k: k != "source"), _json_values, max_size=3),
)
def test_arbitrary_text_round_trips(tmp_path_factory, record_id, contents, arguments, metadata):
    messages = [{"role": "user", "content": text} for text in contents]
    call = {"function": {"name": "f", "arguments": arguments}}
    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
    messages.append({"role": "assistant", "content": "", "tool_calls": [call], "extra": metadata})
    trajectory = Trajectory.from_dict({"id": record_id, "messages": messages, "metadata": metadata})
    path = tmp_path_factory.mktemp("roundtrip") / "t.jsonl"
    write_jsonl(path, [trajectory, trajectory])
    loaded, report = load_jsonl(path)
    assert loaded == [trajectory, trajectory]
    assert report.read == 2


# --- normalisation ------------------------------------------------------------------------------


def test_normalisation():
    record = {
        "id": "n",
        "messages": [
            {"role": "system", "content": None},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {
                "role": "assistant",
                "reasoning_content": None,
                "tool_calls": [
                    {"function": {"name": "s", "arguments": '{"x": 1}'}},
                    {"function": {"name": "d", "arguments": {"x": 1}}},
                ],
                "weight": 0.5,
            },
            {"role": "assistant", "content": "done", "tool_calls": []},
            {"role": "user", "content": [], "name": "alice"},
        ],
    }
    messages = Trajectory.from_dict(record).messages
    assert messages[0] == {"role": "system", "content": ""}
    assert messages[1]["content"] == "ab"
    assert "reasoning_content" not in messages[2] and messages[2]["content"] == ""
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'  # still a string
    assert messages[2]["tool_calls"][1]["function"]["arguments"] == {"x": 1}  # still a dict
    assert messages[2]["weight"] == 0.5  # unknown keys kept
    assert messages[3] == {"role": "assistant", "content": "done"}  # empty tool_calls dropped
    assert messages[4] == {"role": "user", "content": "", "name": "alice"}


def test_optional_record_fields_default_to_empty():
    trajectory = Trajectory.from_dict(_minimal(tools=None, metadata=None))
    assert trajectory.tools == [] and trajectory.metadata == {}
    assert Trajectory.from_dict(_minimal()).to_dict() == {
        "id": "t",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [],
        "metadata": {},
    }


def test_from_dict_neither_mutates_nor_aliases_its_input():
    record = _full_record()
    record["messages"][0]["content"] = None
    record["messages"][1]["content"] = [{"type": "text", "text": "x"}]
    record["messages"][2]["tool_calls"].append({"function": {"name": "g", "arguments": {}}})
    record["messages"][-1]["reasoning_content"] = None
    record["messages"].append({"role": "assistant", "content": "x", "tool_calls": []})
    before = copy.deepcopy(record)

    trajectory = Trajectory.from_dict(record)
    assert record == before
    assert record["messages"][-1]["tool_calls"] == []  # the dropped key is still in the input

    trajectory.tools[0]["function"]["parameters"]["required"].append("unit")
    trajectory.metadata["turns"] = 99
    trajectory.messages[2]["tool_calls"][0]["function"]["arguments"]["city"] = "Bern"
    assert record == before


# --- errors -------------------------------------------------------------------------------------


def _with(change):
    record = _full_record()
    change(record)
    return record


# (bad record or raw line, field, words the message must contain)
ERROR_CASES = {
    "invalid-json": ('{"id": "t", "messages": [}', "<json>", "column 26"),
    "not-an-object": ("[1, 2]", "<record>", "JSON object, got array"),
    "missing-id": (_with(lambda r: r.pop("id")), "id", "missing"),
    "empty-id": (_with(lambda r: r.update(id="")), "id", "empty string"),
    "unknown-field": (_with(lambda r: r.update(reward=1)), "reward", "metadata"),
    "no-messages": (_with(lambda r: r.update(messages=[])), "messages", "at least one"),
    "bad-role": (_with(lambda r: r["messages"][1].update(role="narrator")), "messages[1].role", "'narrator'"),
    "missing-role": (_with(lambda r: r["messages"][4].pop("role")), "messages[4].role", "missing"),
    "non-text-part": (
        _with(lambda r: r["messages"][1].update(content=[
            {"type": "text", "text": "look:"}, {"type": "image_url", "image_url": {"url": "x"}},
        ])),
        "messages[1].content[1]",
        "'image_url'",
    ),
    "content-number": (_with(lambda r: r["messages"][0].update(content=3)), "messages[0].content", "number"),
    "tool-call-without-name": (
        _with(lambda r: r["messages"][2]["tool_calls"][1]["function"].pop("name")),
        "messages[2].tool_calls[1].function.name",
        "missing",
    ),
    "arguments-json-array": (
        _with(lambda r: r["messages"][2]["tool_calls"][1]["function"].update(arguments="[1, 2]")),
        "messages[2].tool_calls[1].function.arguments",
        "JSON object, holds array",
    ),
    "arguments-not-json": (
        _with(lambda r: r["messages"][5]["tool_calls"][0]["function"].update(arguments="city=Bern")),
        "messages[5].tool_calls[0].function.arguments",
        "not valid JSON",
    ),
    "arguments-number": (
        _with(lambda r: r["messages"][5]["tool_calls"][0]["function"].update(arguments=7)),
        "messages[5].tool_calls[0].function.arguments",
        "got number",
    ),
    "reasoning-on-user": (
        _with(lambda r: r["messages"][1].update(reasoning_content="hmm")),
        "messages[1].reasoning_content",
        "only assistant",
    ),
    "tool-calls-on-tool": (
        _with(lambda r: r["messages"][3].update(tool_calls=[{"function": {"name": "f", "arguments": {}}}])),
        "messages[3].tool_calls",
        "only assistant",
    ),
    "tool-content-not-string": (
        _with(lambda r: r["messages"][3].update(content={"temp": 12})),
        "messages[3].content",
        "got object",
    ),
    "tool-content-parts": (
        _with(lambda r: r["messages"][4].update(content=[{"type": "text", "text": "x"}])),
        "messages[4].content",
        "got array",
    ),
    "tool-call-id-not-string": (_with(lambda r: r["messages"][3].update(tool_call_id=0)), "messages[3].tool_call_id", "string"),
    "tool-schema-without-name": (
        _with(lambda r: r["tools"][1]["function"].pop("name")),
        "tools[1].function.name",
        "missing",
    ),
    "tool-schema-without-function": (_with(lambda r: r["tools"][0].pop("function")), "tools[0].function", "missing"),
    "tool-schema-wrong-type": (_with(lambda r: r["tools"][0].update(type="retrieval")), "tools[0].type", "'retrieval'"),
    "source-not-string": (_with(lambda r: r["metadata"].update(source=3)), "metadata.source", "string"),
}  # fmt: skip


@pytest.mark.parametrize("case", [case for case in ERROR_CASES if case != "invalid-json"])
def test_from_dict_names_the_bad_field(case):
    bad, field, words = ERROR_CASES[case]
    record = json.loads(bad) if isinstance(bad, str) else bad
    with pytest.raises(TrajectoryError) as info:
        Trajectory.from_dict(record)
    assert info.value.field == field
    assert words in info.value.message
    assert str(info.value) == f"{field}: {info.value.message}"
    assert (info.value.path, info.value.line) == (None, None)


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_file_errors_name_path_line_and_field(tmp_path, case):
    bad, field, words = ERROR_CASES[case]
    bad_line = bad if isinstance(bad, str) else json.dumps(bad, ensure_ascii=False)
    good = json.dumps(_full_record())
    path = _write_lines(tmp_path / "bad.jsonl", [good, good, bad_line, good])

    with pytest.raises(TrajectoryError) as info:
        list(read_jsonl(path))
    error = info.value
    assert (error.path, error.line, error.field) == (path, 3, field)
    assert str(error).startswith(f"{path}:3: {field}: ")
    assert words in str(error)


def test_invalid_utf8_is_a_json_error_on_its_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(_minimal()).encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(TrajectoryError, match=r":2: <json>: invalid UTF-8") as info:
        load_jsonl(path)
    assert info.value.line == 2


def test_on_error_skip_keeps_the_good_records_in_order(tmp_path, caplog):
    lines = [
        json.dumps(_minimal("a")),
        "{not json",
        "",
        json.dumps(_minimal("b")),
        json.dumps(_minimal("c", messages=[{"role": "robot", "content": "x"}])),
        "   ",
        json.dumps(_minimal("d")),
        json.dumps(_minimal("a")),  # duplicate ids are allowed
    ]
    path = _write_lines(tmp_path / "mixed.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="cacherl_jax.chat.trajectory"):
        trajectories, report = load_jsonl(path, on_error="skip")

    assert [t.id for t in trajectories] == ["a", "b", "d", "a"]
    assert (report.read, report.skipped) == (4, 2)
    assert [(e.line, e.field) for e in report.errors] == [(2, "<json>"), (5, "messages[0].role")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [str(e) for e in report.errors]
    assert warnings[0].startswith(f"{path}:2: <json>: invalid JSON")


def test_skip_report_keeps_the_first_hundred_errors_but_counts_all(tmp_path, caplog):
    path = _write_lines(tmp_path / "many.jsonl", ["{"] * 150 + [json.dumps(_minimal())])
    report = ReadReport(path=path)
    with caplog.at_level(logging.ERROR):  # keep 150 warnings out of the test log
        trajectories = list(read_jsonl(path, on_error="skip", report=report))
    assert len(trajectories) == 1 and report.read == 1
    assert report.skipped == 150
    assert len(report.errors) == 100 and report.errors[-1].line == 100


def test_byte_order_mark_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "windows.jsonl"
    body = "\r\n".join(json.dumps(_minimal(i)) for i in ("x", "y")) + "\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert [t.id for t in load_jsonl(path)[0]] == ["x", "y"]


def test_missing_file_is_a_trajectory_error(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(TrajectoryError, match="no such file") as info:
        read_jsonl(path)  # raised on the call, not on the first next()
    assert info.value.path == str(path) and info.value.line is None
    assert str(info.value) == f"{path}: no such file"
    with pytest.raises(TrajectoryError, match="no such file"):
        load_jsonl(path, on_error="skip")
    with pytest.raises(TrajectoryError, match="directory"):
        read_jsonl(tmp_path)


def test_on_error_must_be_raise_or_skip(tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        read_jsonl(tmp_path / "x.jsonl", on_error="ignore")


def test_errors_survive_pickling():
    error = TrajectoryError("bad", "messages[0].role", path="f.jsonl", line=3)
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.field, clone.path, clone.line, str(clone)) == (
        "messages[0].role",
        "f.jsonl",
        3,
        "f.jsonl:3: messages[0].role: bad",
    )


# --- writing ------------------------------------------------------------------------------------


def test_append_adds_to_the_end(tmp_path):
    path = tmp_path / "log.jsonl"
    assert write_jsonl(path, [Trajectory.from_dict(_minimal("a"))], append=True) == 1
    assert write_jsonl(path, (Trajectory.from_dict(_minimal(i)) for i in "bc"), append=True) == 2
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(_minimal("d")))  # no trailing newline
    assert write_jsonl(path, [Trajectory.from_dict(_minimal("e"))], append=True) == 1
    assert [t.id for t in load_jsonl(path)[0]] == ["a", "b", "c", "d", "e"]


def test_overwrite_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [Trajectory.from_dict(_minimal(i)) for i in "abc"])
    assert write_jsonl(path, [Trajectory.from_dict(_minimal("z"))]) == 1
    assert [t.id for t in load_jsonl(path)[0]] == ["z"]
    assert os.listdir(tmp_path) == ["t.jsonl"]
    assert write_jsonl(path, []) == 0 and path.read_bytes() == b""


def test_failed_write_leaves_the_old_file_untouched(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [Trajectory.from_dict(_minimal("old"))])
    before = path.read_bytes()
    bad = Trajectory(id="broken", messages=[{"role": "robot", "content": "x"}])

    def trajectories():
        yield Trajectory.from_dict(_minimal("new"))
        yield bad

    with pytest.raises(TrajectoryError, match=r"messages\[0\]\.role") as info:
        write_jsonl(path, trajectories())
    assert "'broken'" in str(info.value) and str(path) in str(info.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["t.jsonl"]
    with pytest.raises(TrajectoryError):
        write_jsonl(path, trajectories(), append=True)
    assert path.read_bytes() == before  # nothing appended either


def test_write_normalises_directly_built_trajectories(tmp_path):
    raw = Trajectory(id="r", messages=[{"role": "user", "content": None}])
    write_jsonl(tmp_path / "t.jsonl", [raw])
    [loaded], _ = load_jsonl(tmp_path / "t.jsonl")
    assert loaded.messages == [{"role": "user", "content": ""}]
    assert raw.messages == [{"role": "user", "content": None}]  # the caller's object is untouched


def test_lone_surrogates_round_trip(tmp_path):
    """Not encodable as UTF-8: written \\u-escaped, read back as the same string."""
    trajectory = Trajectory.from_dict(_minimal(messages=[{"role": "user", "content": "a\ud800é"}]))
    write_jsonl(tmp_path / "t.jsonl", [trajectory])
    assert load_jsonl(tmp_path / "t.jsonl")[0] == [trajectory]
