"""Agent trajectories (chat messages, tool schemas, metadata) and their JSONL files.

Messages and tools stay plain dicts so they go to chat templates unchanged; `Trajectory.from_dict`
checks them against the OpenAI chat format once, on the way in, so that later stages never have
to guess (None content, list-of-parts content, string tool-call arguments) and a bad record is
reported by file, line and field instead of failing somewhere inside tokenisation.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from cacherl_jax.errors import UserError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
RECORD_FIELDS = ("id", "messages", "tools", "metadata")
MAX_REPORTED_ERRORS = 100
"""`ReadReport.errors` keeps this many; `ReadReport.skipped` counts them all."""


class TrajectoryError(UserError, ValueError):
    """A record that does not follow the trajectory schema, or a file that cannot be read.

    `field` names the offending part (e.g. 'messages[2].tool_calls[0].function.name', '<json>'
    for a line that is not JSON); `path` and `line` (1-based) are set when it came from a file.
    str() gives 'file:line: field: message'.
    """

    def __init__(
        self,
        message: str,
        field: str | None = None,
        path: str | None = None,
        line: int | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.field = field
        self.path = path
        self.line = line

    def __str__(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(self.path if self.line is None else f"{self.path}:{self.line}")
        if self.field is not None:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)

    def __reduce__(self):  # keep field/path/line across pickling (multiprocess data loaders)
        return (type(self), (self.message, self.field, self.path, self.line))


@dataclasses.dataclass
class Trajectory:
    """One agent conversation: OpenAI-style chat messages, tool schemas and free-form metadata.

    Build it with `from_dict`, which validates and normalises; the constructor does not check.
    """

    id: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, record: Any) -> Trajectory:
        """Validates and normalises a record; raises `TrajectoryError` naming the bad field.

        The input is not modified and nothing in the result aliases it.
        """
        return _parse_record(copy.deepcopy(record))

    def to_dict(self) -> dict[str, Any]:
        """The record form, {"id", "messages", "tools", "metadata"} (shares this object's lists)."""
        return {
            "id": self.id,
            "messages": self.messages,
            "tools": self.tools,
            "metadata": self.metadata,
        }


@dataclasses.dataclass
class ReadReport:
    """What `read_jsonl` did with a file: records returned and records skipped (with why)."""

    path: str
    read: int = 0
    skipped: int = 0
    errors: list[TrajectoryError] = dataclasses.field(default_factory=list)

    def _skip(self, error: TrajectoryError) -> None:
        self.skipped += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(error)


def read_jsonl(
    path: str | os.PathLike[str],
    *,
    on_error: Literal["raise", "skip"] = "raise",
    report: ReadReport | None = None,
) -> Iterator[Trajectory]:
    """Streams the trajectories of a JSONL file, one record per non-blank line.

    With on_error="raise" the first bad record raises `TrajectoryError` (path and line set); with
    "skip" it is logged as a warning and counted in `report`. A file that is missing or
    unreadable raises `TrajectoryError` either way, here rather than on the first `next()`.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path_str = os.fspath(path)
    if not os.path.exists(path_str):
        raise TrajectoryError("no such file", path=path_str)
    if os.path.isdir(path_str):
        raise TrajectoryError("is a directory, expected a JSONL file", path=path_str)
    return _read_records(path_str, on_error, report)


def _read_records(path: str, on_error: str, report: ReadReport | None) -> Iterator[Trajectory]:
    try:
        with open(path, "rb") as file:  # binary: split on b"\n" only, not on U+2028 or a lone \r
            yield from _records(file, path, on_error, report)
    except OSError as exc:
        raise TrajectoryError(f"cannot read: {exc.strerror or exc}", path=path) from exc


def _records(
    lines: Iterable[bytes], path: str, on_error: str, report: ReadReport | None
) -> Iterator[Trajectory]:
    for line_number, raw in enumerate(lines, start=1):
        try:
            trajectory = _parse_line(raw, first=line_number == 1)
        except TrajectoryError as error:
            error.path, error.line = path, line_number
            if on_error == "raise":
                raise
            logger.warning("%s", error)
            if report is not None:
                report._skip(error)
            continue
        if trajectory is None:
            continue
        if report is not None:
            report.read += 1
        yield trajectory


def _parse_line(raw: bytes, *, first: bool) -> Trajectory | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TrajectoryError(f"invalid UTF-8 at byte {exc.start + 1}", "<json>") from None
    if first:
        text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrajectoryError(f"invalid JSON: {exc.msg} (column {exc.colno})", "<json>") from None
    return _parse_record(record)  # freshly parsed: no need to copy


def load_jsonl(
    path: str | os.PathLike[str], *, on_error: Literal["raise", "skip"] = "raise"
) -> tuple[list[Trajectory], ReadReport]:
    """Reads a whole JSONL file; see `read_jsonl`."""
    report = ReadReport(path=os.fspath(path))
    trajectories = list(read_jsonl(path, on_error=on_error, report=report))
    return trajectories, report


def write_jsonl(
    path: str | os.PathLike[str], trajectories: Iterable[Trajectory], *, append: bool = False
) -> int:
    """Writes one compact UTF-8 JSON object per line and returns how many were written.

    Each trajectory is validated first (a file we wrote must read back) and written in normalised
    form, so `load_jsonl(path)` returns what `from_dict` made. Without `append` the file is
    written beside its target and renamed into place: a crash or a bad trajectory leaves the
    old file as it was. With `append` the new lines are all serialised before any is written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    lines = (_serialise(trajectory, index, target) for index, trajectory in enumerate(trajectories))
    if append:
        data = list(lines)
        with open(target, "ab") as file:
            if file.tell() > 0 and not _ends_with_newline(target):
                file.write(b"\n")  # do not glue the first new record onto an unterminated line
            file.writelines(data)
        return len(data)

    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    count = 0
    try:
        # os.open with mode 0o666 honours the umask, as a plain open() of the target would.
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as file:
            for line in lines:
                file.write(line)
                count += 1
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return count


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def _serialise(trajectory: Trajectory, index: int, path: Path) -> bytes:
    if not isinstance(trajectory, Trajectory):
        raise TypeError(
            f"write_jsonl item {index} is a {type(trajectory).__name__}, expected a Trajectory"
        )
    try:
        record = _parse_record(trajectory.to_dict()).to_dict()
    except TrajectoryError as error:
        raise TrajectoryError(
            f"{error.message} (trajectory {index}, id {trajectory.id!r}, not written)",
            error.field,
            path=os.fspath(path),
        ) from None
    try:
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # lone surrogates: \u-escape them, json.loads restores them
        return json.dumps(record, separators=(",", ":")).encode("ascii") + b"\n"


# --- validation ---------------------------------------------------------------------------------
# The functions below build new dicts and lists and never modify their input; free-form values
# (extra keys, metadata, tool schemas) are shared with it, which is why `from_dict` copies first.


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages about JSON records."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _expect(value: Any, kind: type, name: str, where: str) -> None:
    if not isinstance(value, kind):
        raise TrajectoryError(f"must be {name}, got {_json_type(value)}", where)


def _non_empty_string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        got = "an empty string" if value == "" else _json_type(value)
        raise TrajectoryError(f"must be a non-empty string, got {got}", where)
    return value


def _parse_record(record: Any) -> Trajectory:
    _expect(record, dict, "a JSON object", "<record>")
    unknown = [key for key in record if key not in RECORD_FIELDS]
    if unknown:
        raise TrajectoryError(
            f"unknown field (a record has {', '.join(RECORD_FIELDS)}; "
            "put anything else under metadata)",
            str(unknown[0]),
        )
    if "id" not in record:
        raise TrajectoryError("required field is missing", "id")
    trajectory_id = _non_empty_string(record["id"], "id")

    if "messages" not in record:
        raise TrajectoryError("required field is missing", "messages")
    messages = record["messages"]
    _expect(messages, list, "an array of messages", "messages")
    if not messages:
        raise TrajectoryError("must contain at least one message", "messages")

    tools = record.get("tools")
    tools = [] if tools is None else tools
    _expect(tools, list, "an array of tool schemas", "tools")

    metadata = record.get("metadata")
    metadata = {} if metadata is None else metadata
    _expect(metadata, dict, "an object", "metadata")
    if "source" in metadata:
        _expect(metadata["source"], str, "a string", "metadata.source")

    return Trajectory(
        id=trajectory_id,
        messages=[_parse_message(m, f"messages[{i}]") for i, m in enumerate(messages)],
        tools=[_check_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)],
        metadata=dict(metadata),
    )


def _check_tool(tool: Any, where: str) -> dict[str, Any]:
    """Checks an OpenAI function schema; returns it as given (templates dump it verbatim)."""
    _expect(tool, dict, "an object", where)
    if tool.get("type") != "function":
        raise TrajectoryError(
            f"must be 'function', got {tool.get('type')!r}"
            if "type" in tool
            else "required field is missing (must be 'function')",
            f"{where}.type",
        )
    if "function" not in tool:
        raise TrajectoryError("required field is missing", f"{where}.function")
    function = tool["function"]
    _expect(function, dict, "an object", f"{where}.function")
    if "name" not in function:
        raise TrajectoryError("required field is missing", f"{where}.function.name")
    _non_empty_string(function["name"], f"{where}.function.name")
    if "description" in function:
        _expect(function["description"], str, "a string", f"{where}.function.description")
    if "parameters" in function:
        _expect(function["parameters"], dict, "an object", f"{where}.function.parameters")
    return tool


def _parse_message(message: Any, where: str) -> dict[str, Any]:
    _expect(message, dict, "an object", where)
    if "role" not in message:
        raise TrajectoryError("required field is missing", f"{where}.role")
    role = message["role"]
    if role not in ROLES:
        raise TrajectoryError(f"must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")

    out: dict[str, Any] = {}
    for key, value in message.items():
        if key == "content":
            if role == "tool":
                _expect(value, str, "a string in a tool message", f"{where}.content")
                out[key] = value
            else:
                out[key] = _parse_content(value, f"{where}.content")
        elif key in ("reasoning_content", "tool_calls"):
            if value is None or (key == "tool_calls" and value == []):
                continue  # absent in all but name: drop it so templates see one form
            if role != "assistant":
                raise TrajectoryError(f"only assistant messages may have {key}", f"{where}.{key}")
            if key == "reasoning_content":
                _expect(value, str, "a string or null", f"{where}.{key}")
                out[key] = value
            else:
                _expect(value, list, "an array", f"{where}.{key}")
                out[key] = [_parse_tool_call(c, f"{where}.{key}[{i}]") for i, c in enumerate(value)]
        elif role == "tool" and key in ("tool_call_id", "name"):
            _expect(value, str, "a string", f"{where}.{key}")
            out[key] = value
        else:
            out[key] = value  # unknown keys travel untouched
    if "content" not in out:
        if role == "tool":
            raise TrajectoryError("required field is missing in a tool message", f"{where}.content")
        out["content"] = ""
    return out


def _parse_content(content: Any, where: str) -> str:
    """None -> "", a list of text parts -> their concatenation; anything else is an error."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise TrajectoryError(
            f"must be a string, null or an array of text parts, got {_json_type(content)}", where
        )
    texts = []
    for i, part in enumerate(content):
        _expect(part, dict, "a text part object", f"{where}[{i}]")
        if part.get("type") != "text":
            raise TrajectoryError(
                f"only text parts are supported, got type {part.get('type')!r}", f"{where}[{i}]"
            )
        if "text" not in part:
            raise TrajectoryError("required field is missing", f"{where}[{i}].text")
        _expect(part["text"], str, "a string", f"{where}[{i}].text")
        texts.append(part["text"])
    return "".join(texts)


def _parse_tool_call(call: Any, where: str) -> dict[str, Any]:
    _expect(call, dict, "an object", where)
    out = dict(call)
    if "id" in call:
        _expect(call["id"], str, "a string", f"{where}.id")
    if "type" in call and call["type"] != "function":
        raise TrajectoryError(f"must be 'function', got {call['type']!r}", f"{where}.type")
    if "function" not in call:
        raise TrajectoryError("required field is missing", f"{where}.function")
    function = call["function"]
    _expect(function, dict, "an object", f"{where}.function")
    if "name" not in function:
        raise TrajectoryError("required field is missing", f"{where}.function.name")
    _non_empty_string(function["name"], f"{where}.function.name")
    if "arguments" not in function:
        raise TrajectoryError("required field is missing", f"{where}.function.arguments")
    arguments = function["arguments"]
    if isinstance(arguments, str):  # kept as the string: the template writes it as given
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise TrajectoryError(
                f"string is not valid JSON: {exc.msg} (column {exc.colno})",
                f"{where}.function.arguments",
            ) from None
        if not isinstance(parsed, dict):
            raise TrajectoryError(
                f"string must hold a JSON object, holds {_json_type(parsed)}",
                f"{where}.function.arguments",
            )
    elif not isinstance(arguments, dict):
        raise TrajectoryError(
            f"must be an object or a JSON string of one, got {_json_type(arguments)}",
            f"{where}.function.arguments",
        )
    out["function"] = dict(function)
    return out
