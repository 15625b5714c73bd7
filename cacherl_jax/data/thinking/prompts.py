"""What an LLM teacher is asked: explain one step a tool-using assistant actually took.

The conversation goes to the teacher as a plain-text transcript inside one user message, not as
chat turns with `tool_calls`: every OpenAI-compatible server (vLLM, SGLang, hosted APIs, ours)
accepts that, no server's tool-call parser can turn the transcript into a call, and the teacher
is never offered the tools to call. Long tool results and long histories are cut in the prompt
only (never in the output), which keeps the cost of a request bounded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from cacherl_jax.data.thinking.rules import Step

SYSTEM_PROMPT = (
    "You write the private reasoning of a tool-using assistant. You are shown a conversation and "
    "the step the assistant actually took next. Write the reasoning the assistant had right "
    "before that step, in the first person, as if deciding it: what the user needs, what the "
    "earlier tool results show, and why this step comes next. "
    "Do not write the call itself: no JSON, no <tool_call> tags, no function-call syntax such as "
    "name(arg=value). Do not say that the step was given to you. "
    "Reply with the reasoning only, in two to six sentences."
)
CALL_INSTRUCTION = (
    "Write the reasoning that leads to this call. Name the tool {tools} and say why these "
    "argument values are the right ones."
)
ANSWER_INSTRUCTION = (
    "Write the reasoning that leads to this answer: what the results so far establish and why "
    "the assistant can answer now."
)
REJECTION_FEEDBACK = {
    "empty": "it was empty",
    "tool_call_tag": "it contained <tool_call> or <tool_response> tags",
    "markup": "it contained <think> tags or special tokens",
    "json_call": "it contained a JSON tool call",
    "call_syntax": "it wrote the call as function-call syntax",
    "too_short": "it was too short",
    "too_long": "it was too long",
    "missing_tool_mention": "it did not name the tool it justifies",
}


@dataclasses.dataclass(frozen=True)
class PromptLimits:
    max_result_chars: int = 1500  # per tool result in the transcript
    max_context_messages: int = 40  # older messages (after the first request) are elided


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]} ... [{len(text) - limit} more characters]"


def _arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def _tool_line(tool: Mapping[str, Any]) -> str:
    function = tool.get("function") or tool
    properties = (function.get("parameters") or {}).get("properties") or {}
    parameters = ", ".join(
        f"{name}: {spec.get('type', 'any') if isinstance(spec, Mapping) else 'any'}"
        for name, spec in properties.items()
    )
    description = (function.get("description") or "").strip()
    return f"- {function['name']}({parameters})" + (f": {description}" if description else "")


def _transcript(context: list[dict[str, Any]], limits: PromptLimits) -> list[str]:
    lines = []
    # Keep the opening (system prompt and first request) and the most recent messages.
    opening = next((i + 1 for i, m in enumerate(context) if m["role"] == "user"), 0)
    recent = max(opening, len(context) - limits.max_context_messages)
    for index, message in enumerate(context):
        if opening <= index < recent:
            if index == opening:
                lines.append(f"[... {recent - opening} earlier messages omitted ...]")
            continue
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            name = message.get("name")
            header = f"[tool result{f': {name}' if name else ''}]"
            lines.append(f"{header}\n{_cut(content, limits.max_result_chars)}")
        elif role == "assistant":
            if content.strip():
                lines.append(f"[assistant]\n{content.strip()}")
            for call in message.get("tool_calls", []):
                function = call["function"]
                arguments = _arguments_text(function["arguments"])
                lines.append(f"[assistant calls {function['name']}] {arguments}")
        else:
            lines.append(f"[{role}]\n{content}")
    return lines


def teacher_messages(
    step: Step, *, limits: PromptLimits | None = None, rejected_for: str | None = None
) -> list[dict[str, str]]:
    """The chat messages sent to the teacher for `step` (`rejected_for`: why the previous reply
    was rejected, asked to be avoided this time)."""
    limits = limits or PromptLimits()
    parts = []
    if step.tools:
        parts.append("# Tools\n" + "\n".join(_tool_line(tool) for tool in step.tools))
    parts.append("# Conversation so far\n" + "\n\n".join(_transcript(step.context, limits)))
    if step.kind == "call":
        taken = "\n".join(
            f"The assistant calls {name} with arguments {_arguments_text(arguments)}."
            for name, arguments in step.calls
        )
        names = ", ".join(step.tool_names)
        parts.append(f"# The step to explain\n{taken}\n\n{CALL_INSTRUCTION.format(tools=names)}")
    else:
        answer = (step.message.get("content") or "").strip() or "(an empty reply)"
        parts.append(
            f"# The step to explain\nThe assistant answers:\n{answer}\n\n{ANSWER_INSTRUCTION}"
        )
    if rejected_for is not None:
        why = REJECTION_FEEDBACK.get(rejected_for, rejected_for)
        parts.append(f"Your previous reply was rejected because {why}. Write it again.")
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "\n\n".join(parts)},
    ]
