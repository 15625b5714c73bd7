"""Split Qwen3 assistant output into reasoning, content and tool calls.

Generated text is data for reward functions, so `parse_assistant` never raises: each way the
output departs from the format the chat template renders is reported as a `Problem`, and only
well-formed tool-call blocks outside the reasoning become `ToolCall`s (nothing doubtful is ever
executed). Blocks are delimited by tag strings, as in vLLM's Hermes/Qwen parser, so a JSON string
that itself contains a tag string is not supported.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
END_TOKENS = ("<|im_end|>", "<|endoftext|>")

PROBLEM_KINDS = (
    "unclosed_think",  # <think> without </think>: the rest is reasoning
    "tool_call_in_thinking",  # <tool_call> inside the reasoning: ignored, never executed
    "unclosed_tool_call",  # <tool_call> without its </tool_call> (e.g. truncated output)
    "stray_tool_call_end",  # </tool_call> without an opening tag
    "nested_tool_call",  # <tool_call> inside an open block: the whole block is rejected
    "invalid_json",  # block is not valid JSON
    "not_an_object",  # JSON parses but is not an object
    "missing_name",  # "name" missing, not a string, or blank
    "bad_arguments",  # "arguments" missing, or neither an object nor a string holding one
    "extra_keys",  # keys besides name/arguments (the call is still accepted)
    "multiple_think_blocks",  # a second <think> or </think>
    "text_after_tool_calls",  # non-whitespace content after the last tool-call block
    "empty",  # no reasoning, content or calls survive parsing
)

_SNIPPET_CHARS = 200
_TOOL_TAG_RE = re.compile(f"{re.escape(TOOL_CALL_START)}|{re.escape(TOOL_CALL_END)}")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One well-formed call. `raw` is the block text exactly as generated, for logging and audits."""

    name: str
    arguments: dict[str, Any]
    raw: str

    def to_openai(self, call_id: str | None = None) -> dict[str, Any]:
        """An OpenAI `tool_calls` entry. Arguments stay a dict, which the Qwen3 template accepts."""
        call: dict[str, Any] = {} if call_id is None else {"id": call_id}
        call["type"] = "function"
        call["function"] = {"name": self.name, "arguments": dict(self.arguments)}
        return call


@dataclasses.dataclass(frozen=True)
class Problem:
    """One departure from the expected format; `kind` is one of `PROBLEM_KINDS`."""

    kind: str
    detail: str

    def __post_init__(self):
        if self.kind not in PROBLEM_KINDS:  # catches typos here rather than in a reward function
            raise ValueError(f"unknown problem kind {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class ParsedAssistant:
    """An assistant turn as its parts, plus everything that was wrong with it."""

    reasoning: str
    content: str
    tool_calls: tuple[ToolCall, ...]
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_message(self) -> dict[str, Any]:
        """An OpenAI-style assistant message (tool calls carry no ids; the Qwen3 template needs none)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        return message


def parse_assistant(text: str) -> ParsedAssistant:
    """Parse the text generated after `<|im_start|>assistant\\n`; never raises on a string."""
    problems: list[Problem] = []
    text = _strip_end_token(text)
    reasoning, rest = _split_thinking(text, problems)
    content, calls = _split_tool_calls(rest, problems)
    if not (reasoning.strip() or content or calls):
        problems.append(Problem("empty", f"nothing generated besides markup: {_snippet(text)}"))
    return ParsedAssistant(reasoning, content, tuple(calls), tuple(problems))


def _snippet(text: str) -> str:
    if len(text) <= _SNIPPET_CHARS:
        return repr(text)
    return repr(text[:_SNIPPET_CHARS]) + f"... ({len(text)} chars)"


def _strip_end_token(text: str) -> str:
    """Drop one trailing end-of-turn token; truncated output simply has none."""
    stripped = text.rstrip()
    for token in END_TOKENS:
        if stripped.endswith(token):
            return stripped[: -len(token)]
    return text


def _split_thinking(text: str, problems: list[Problem]) -> tuple[str, str]:
    """(reasoning, rest). Without `<think>`, text before `</think>` is reasoning opened by the prompt."""
    end = text.find(THINK_END)
    if end < 0:
        start = text.find(THINK_START)
        if start < 0:
            return "", text
        reasoning, rest = text[start + len(THINK_START) :], text[:start]
        problems.append(Problem("unclosed_think", f"reasoning never closed: {_snippet(reasoning)}"))
    else:
        reasoning, rest = text[:end], text[end + len(THINK_END) :]
        head = reasoning.lstrip()
        if head.startswith(THINK_START):
            reasoning = head[len(THINK_START) :]
    extra = reasoning.count(THINK_START) + rest.count(THINK_START) + rest.count(THINK_END)
    if extra:
        problems.append(
            Problem("multiple_think_blocks", f"{extra} think tag(s) beyond the first block")
        )
    at = reasoning.find(TOOL_CALL_START)
    if at >= 0:
        problems.append(
            Problem("tool_call_in_thinking", f"ignored: {_snippet(reasoning[at : at + 300])}")
        )
    return reasoning.strip("\n"), rest


def _split_tool_calls(text: str, problems: list[Problem]) -> tuple[str, list[ToolCall]]:
    """(content, calls): content is the text outside blocks, calls the blocks that parse."""
    outside: list[str] = []
    calls: list[ToolCall] = []
    depth = 0  # > 1 only inside a nested block
    pos = 0  # start of the current outside segment, or of the current block's body
    block_start = 0
    nested = False
    segments_before_tail: int | None = None  # len(outside) when the last block closed
    for match in _TOOL_TAG_RE.finditer(text):
        if match.group() == TOOL_CALL_START:
            if depth == 0:
                outside.append(text[pos : match.start()])
                block_start, pos, nested = match.start(), match.end(), False
            else:
                nested = True
                problems.append(
                    Problem("nested_tool_call", _snippet(text[block_start : match.end()]))
                )
            depth += 1
        elif depth == 0:
            context = text[max(0, match.start() - 100) : match.end()]
            problems.append(Problem("stray_tool_call_end", _snippet(context)))
            outside.append(text[pos : match.start()])
            pos = match.end()
        else:
            depth -= 1
            if depth == 0:
                if not nested:  # a nested block was already reported and is never executed
                    call = _parse_block(text[pos : match.start()], problems)
                    if call is not None:
                        calls.append(call)
                pos = match.end()
                segments_before_tail = len(outside)
    if depth:
        problems.append(Problem("unclosed_tool_call", _snippet(text[block_start:])))
    else:
        outside.append(text[pos:])
    if segments_before_tail is not None:
        tail = "".join(outside[segments_before_tail:]).strip()
        if tail:
            problems.append(Problem("text_after_tool_calls", _snippet(tail)))
    return "".join(outside).strip(), calls


def _parse_block(raw: str, problems: list[Problem]) -> ToolCall | None:
    """A `ToolCall` for a well-formed block, else None with every fault reported."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as error:
        where = f"{error.msg} at line {error.lineno} column {error.colno}"
        problems.append(Problem("invalid_json", f"{where}: {_snippet(raw)}"))
        return None
    except (ValueError, RecursionError) as error:  # e.g. too deeply nested, or a huge integer
        problems.append(Problem("invalid_json", f"{type(error).__name__}: {_snippet(raw)}"))
        return None
    if not isinstance(obj, dict):
        problems.append(Problem("not_an_object", f"got {type(obj).__name__}: {_snippet(raw)}"))
        return None
    name = obj.get("name")
    if not (isinstance(name, str) and name.strip()):
        problems.append(Problem("missing_name", f"name={name!r:.60} in {_snippet(raw)}"))
    arguments = _arguments(obj, raw, problems)
    extra = sorted(set(obj) - {"name", "arguments"})
    if extra:
        problems.append(Problem("extra_keys", f"{_snippet(', '.join(extra))} in {_snippet(raw)}"))
    if not (isinstance(name, str) and name.strip()) or arguments is None:
        return None
    return ToolCall(name=name, arguments=arguments, raw=raw)


def _arguments(obj: dict[str, Any], raw: str, problems: list[Problem]) -> dict[str, Any] | None:
    """The arguments object; a string holding a JSON object is accepted, as some models emit one."""
    if "arguments" not in obj:
        problems.append(Problem("bad_arguments", f"no arguments in {_snippet(raw)}"))
        return None
    arguments = obj["arguments"]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError) as error:
            problems.append(
                Problem(
                    "bad_arguments", f"string is not JSON ({error}): {_snippet(obj['arguments'])}"
                )
            )
            return None
    if not isinstance(arguments, dict):
        problems.append(
            Problem("bad_arguments", f"got {type(arguments).__name__}: {_snippet(raw)}")
        )
        return None
    return arguments
