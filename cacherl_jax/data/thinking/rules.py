"""Which assistant steps of a trajectory get reasoning, where it comes from, and what is accepted.

For each trajectory `plan_record` decides:

- whether it is kept without thinking (a deterministic `no_thinking_share` of records, chosen by a
  hash of (seed, id), so a rerun makes the same choice): all reasoning is removed and the chat
  template renders it as Qwen3's non-thinking format;
- otherwise, for every assistant step the chat template renders with thinking (those after the
  last real user query; `steps="all"` for every step):
  - a tool-call step that already has reasoning keeps it (`keep_existing_reasoning`);
  - a tool-call step with text before its call has that text moved into the thinking block
    (`wrap_existing_text`) rather than regenerated;
  - every other tool-call step, and every answer step (no tool calls) always, is explained by the
    teacher: a `Step` holds the conversation so far and the step actually taken, so the teacher
    explains the call, it never chooses it.

`validate_reasoning` checks one reasoning: no chat markup (`<tool_call>`, `<think>`, ...), no
JSON call objects or `tool(arg=...)` call syntax that a parser could mistake for a call, the
justified tools named, and length bounds. It returns the rejection reason, counted in the summary.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from cacherl_jax.chat.template import last_query_index, split_reasoning
from cacherl_jax.chat.trajectory import Trajectory

StepKind = Literal["call", "answer"]
STEP_SELECTIONS = ("rendered", "all")
ON_INVALID = ("drop_record", "drop_thinking", "template")

# Rejection reasons of `validate_reasoning`, in the order they are checked.
REJECTION_REASONS = (
    "empty",
    "tool_call_tag",  # <tool_call> / </tool_call> / <tool_response>
    "markup",  # <think>, </think>, <|im_start|> and other special tokens
    "json_call",  # {"name": ..., "arguments": ...}
    "call_syntax",  # a justified tool written as a keyword call: cd(folder='x')
    "too_short",
    "too_long",
    "missing_tool_mention",
)

_TOOL_CALL_TAG_RE = re.compile(r"</?tool_call>|</?tool_response>")
_MARKUP_RE = re.compile(r"</?think>|<\|[a-z_]+\|>")
_JSON_CALL_RE = re.compile(r'"name"\s*:\s*"[^"]*"\s*,\s*"(?:arguments|parameters)"\s*:')
_JSON_DECODER = json.JSONDecoder()


@dataclasses.dataclass(frozen=True)
class AugmentRules:
    """The augmentation rules; `from_config(config.rules)` builds them from an ml-collections dict.

    steps: "rendered" (only steps the chat template shows with thinking: after the last real user
        query) or "all" (also earlier turns, for pipelines that split conversations per turn).
    on_invalid: what happens when a step's reasoning is still invalid after `max_attempts`:
        "drop_record" (the record goes to the rejected file), "drop_thinking" (the record is
        kept without thinking) or "template" (the template teacher's reasoning stands in).
    """

    no_thinking_share: float = 0.0
    seed: int = 0
    steps: Literal["rendered", "all"] = "rendered"
    wrap_existing_text: bool = True
    keep_existing_reasoning: bool = True
    max_attempts: int = 3
    on_invalid: Literal["drop_record", "drop_thinking", "template"] = "drop_record"
    min_chars: int = 20
    max_chars: int = 4000
    require_tool_mention: bool = True
    forbid_call_syntax: bool = True

    def __post_init__(self):
        if not 0.0 <= self.no_thinking_share <= 1.0:
            raise ValueError(f"no_thinking_share must be in [0, 1], got {self.no_thinking_share}")
        if self.steps not in STEP_SELECTIONS:
            raise ValueError(f"steps must be one of {STEP_SELECTIONS}, got {self.steps!r}")
        if self.on_invalid not in ON_INVALID:
            raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {self.on_invalid!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 <= self.min_chars <= self.max_chars:
            raise ValueError(
                f"need 0 <= min_chars <= max_chars, got {self.min_chars} and {self.max_chars}"
            )

    @classmethod
    def from_config(cls, config: Any) -> AugmentRules:
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown rules settings {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Step:
    """One assistant message to explain: the conversation before it and the step actually taken."""

    record_id: str
    index: int  # the assistant message's index in the trajectory
    kind: StepKind
    context: list[dict[str, Any]]  # the messages before the step
    message: dict[str, Any]  # the assistant message: its tool calls, or its answer
    tools: list[dict[str, Any]]

    @property
    def calls(self) -> list[tuple[str, Any]]:
        """(tool name, arguments) of each call the step made."""
        return [
            (call["function"]["name"], call["function"]["arguments"])
            for call in self.message.get("tool_calls", [])
        ]

    @property
    def tool_names(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self.calls))


@dataclasses.dataclass
class RecordPlan:
    """What `plan_record` decided for one trajectory; `apply_reasoning` completes it."""

    trajectory: Trajectory  # a copy: no-thinking records stripped, existing text already wrapped
    thinking: bool
    steps: list[Step]  # the steps the teacher must explain
    origins: dict[int, str]  # message index -> "wrapped" | "existing" for steps kept as they were
    wrap_rejections: dict[str, int]  # why existing text could not be kept (the step is explained)


def unit_hash(*parts: Any) -> float:
    """A number in [0, 1) that depends only on `parts` (stable across runs and machines)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def keeps_thinking(record_id: str, rules: AugmentRules) -> bool:
    return unit_hash("no-thinking", rules.seed, record_id) >= rules.no_thinking_share


def strip_thinking(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages without reasoning: `reasoning_content` dropped, `<think>` blocks in content cut."""
    stripped = []
    for message in messages:
        message = dict(message)
        if message["role"] == "assistant":
            _, content = split_reasoning(message)
            message.pop("reasoning_content", None)
            message["content"] = content
        stripped.append(message)
    return stripped


def plan_record(trajectory: Trajectory, rules: AugmentRules) -> RecordPlan:
    """Decides which steps of `trajectory` the teacher explains (see the module docstring)."""
    original = trajectory.messages  # read-only: the steps' context shares it
    # Only messages are edited; metadata gets one new key, so a shallow copy of it is enough
    # (BFCL and procedural records carry their whole task there).
    trajectory = Trajectory(
        trajectory.id,
        copy.deepcopy(original),
        list(trajectory.tools),
        dict(trajectory.metadata),
    )
    if not keeps_thinking(trajectory.id, rules):
        trajectory.messages = strip_thinking(trajectory.messages)
        return RecordPlan(trajectory, False, [], {}, {})

    first = last_query_index(original) + 1 if rules.steps == "rendered" else 0
    steps, origins, wrap_rejections = [], {}, {}
    for index in range(first, len(original)):
        message = trajectory.messages[index]
        if message["role"] != "assistant":
            continue
        reasoning, content = split_reasoning(message)
        has_calls = bool(message.get("tool_calls"))
        kept = reasoning.strip() if rules.keep_existing_reasoning else ""
        wrapped = content.strip() if rules.wrap_existing_text else ""
        if has_calls and (kept or wrapped):
            # Existing text is the model's own account of the step: kept, never regenerated.
            existing = "\n\n".join(part for part in (kept, wrapped) if part)
            reason = validate_reasoning(existing, (), rules, check_length=False)
            if reason is None:
                message["reasoning_content"] = existing
                message["content"] = "" if wrapped else content
                origins[index] = "wrapped" if wrapped else "existing"
                continue
            wrap_rejections[reason] = wrap_rejections.get(reason, 0) + 1
        message["content"] = content  # an inline <think> block is replaced, not kept twice
        message.pop("reasoning_content", None)
        steps.append(
            Step(
                record_id=trajectory.id,
                index=index,
                kind="call" if has_calls else "answer",
                context=original[:index],
                message=original[index],
                tools=trajectory.tools,
            )
        )
    return RecordPlan(trajectory, True, steps, origins, wrap_rejections)


def apply_reasoning(plan: RecordPlan, reasoning_by_index: Mapping[int, str]) -> Trajectory:
    """The planned trajectory with each explained step's reasoning filled in."""
    trajectory = plan.trajectory
    for index, reasoning in reasoning_by_index.items():
        trajectory.messages[index]["reasoning_content"] = reasoning
    return trajectory


# --- validation -------------------------------------------------------------------------------


def clean_reasoning(text: str | None) -> str:
    """The reasoning in a teacher's reply: stripped, and without a `<think>` wrapper around it."""
    text = (text or "").strip()
    if text.startswith("<think>") and "</think>" in text:
        inside, _, after = text[len("<think>") :].partition("</think>")
        text = after.strip() or inside.strip()
    return text


def _has_json_call(text: str) -> bool:
    if _JSON_CALL_RE.search(text):
        return True
    start = text.find("{")
    while start != -1:
        try:
            value, end = _JSON_DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            end = start + 1
        else:
            if (
                isinstance(value, dict)
                and "name" in value
                and ("arguments" in value or "parameters" in value)
            ):
                return True
        start = text.find("{", max(end, start + 1))
    return False


def _mentions(text: str, tool: str) -> bool:
    lowered = text.lower()
    name = tool.lower()
    return name in lowered or name.replace("_", " ") in lowered


def validate_reasoning(
    text: str, tool_names: Sequence[str], rules: AugmentRules, *, check_length: bool = True
) -> str | None:
    """The first rejection reason (`REJECTION_REASONS`) of a reasoning, or None if it is accepted.

    `tool_names` are the tools the reasoning justifies (empty for an answer step). Existing text
    is checked without length bounds: a short "Let me check." is still the model's own words.
    """
    if not text.strip():
        return "empty"
    if _TOOL_CALL_TAG_RE.search(text):
        return "tool_call_tag"
    if _MARKUP_RE.search(text):
        return "markup"
    if _has_json_call(text):
        return "json_call"
    if rules.forbid_call_syntax:
        for tool in tool_names:
            if re.search(rf"\b{re.escape(tool)}\s*\(\s*[A-Za-z_]\w*\s*=", text):
                return "call_syntax"
    if check_length and len(text) < rules.min_chars:
        return "too_short"
    if check_length and len(text) > rules.max_chars:
        return "too_long"
    if rules.require_tool_mention and not all(_mentions(text, tool) for tool in tool_names):
        return "missing_tool_mention"
    return None
