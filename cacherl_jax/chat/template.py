"""Qwen3's chat format: text identical to the official template, tokens with per-token masks, and
incremental rendering for rollouts.

The conversation is first rendered into spans (text, message index, kind). `render_text` joins
them; `render` encodes each span on its own and labels every token with its span's kind. Span
boundaries sit only where the tokenizer itself splits the text (at special/tag tokens, which
are matched before the pre-tokenizer runs) or where generation starts (after
`<|im_start|>assistant\\n`), so the assistant tokens are exactly the tokens the model emits.

Kinds: `prompt` (the template, system/user turns, tool results: never trained on), `thinking`
(`<think>...</think>` the model wrote) and `answer` (content, tool calls and the closing
`<|im_end|>` the model wrote). Loss mask 1 is exactly the thinking and answer tokens (subject
to the options of `render`).

Variants, one per published Qwen3 template (`template_check` tells which one a checkpoint has):
- `qwen3`: the hybrid template of the first Qwen3 release (`enable_thinking` on/off).
- `qwen3_thinking_2507`: the same rules, but the generation prompt itself opens `<think>\n`, so
  the model writes only the reasoning and `</think>`; that `<think>\n` is prompt, never target.
  `enable_thinking` does not exist there.
- `qwen3_instruct_2507`: no thinking at all: assistant turns are their content and tool calls
  (`reasoning_content` is ignored, `<think>` in content is plain content).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from cacherl_jax.chat.tokenizer import Tokenizer

Message = Mapping[str, Any]
Kind = Literal["prompt", "thinking", "answer"]
Variant = Literal["qwen3", "qwen3_thinking_2507", "qwen3_instruct_2507"]
VARIANTS: tuple[Variant, ...] = ("qwen3", "qwen3_thinking_2507", "qwen3_instruct_2507")

ROLE_IDS = {"system": 0, "user": 1, "assistant": 2, "tool": 3}

_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)
_EMPTY_THINK = "<think>\n\n</think>\n\n"


@dataclasses.dataclass(frozen=True)
class Span:
    text: str
    role: str
    turn: int  # index of the message the span belongs to (-1: the tools header without a system message)
    kind: Kind = "prompt"


def _json(value: Any) -> str:
    # The template's `tojson`: json.dumps with default separators, non-ASCII kept, keys unsorted.
    return json.dumps(value, ensure_ascii=False)


def _content(message: Message) -> str:
    return message.get("content") or ""


def _is_tool_response(text: str) -> bool:
    return text.startswith("<tool_response>") and text.endswith("</tool_response>")


def last_query_index(messages: Sequence[Message]) -> int:
    """Index of the last real user query (a user turn that is not only a tool response)."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message["role"] == "user" and not _is_tool_response(_content(message)):
            return index
    return len(messages) - 1


def split_reasoning(message: Message) -> tuple[str, str]:
    """(reasoning, content) of an assistant message, as the template derives them."""
    content = _content(message)
    if message.get("reasoning_content") is not None:
        return message["reasoning_content"], content
    if "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        return reasoning, content.split("</think>")[-1].lstrip("\n")
    return "", content


def tool_call_text(tool_call: Mapping[str, Any]) -> str:
    """`<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`; string arguments as given."""
    function = tool_call.get("function") or tool_call
    arguments = function.get("arguments", {})
    arguments_text = arguments if isinstance(arguments, str) else _json(arguments)
    return f'<tool_call>\n{{"name": "{function["name"]}", "arguments": {arguments_text}}}\n</tool_call>'


def _system_spans(
    messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None
) -> list[Span]:
    has_system = bool(messages) and messages[0]["role"] == "system"
    turn = 0 if has_system else -1
    if tools:
        prefix = _content(messages[0]) + "\n\n" if has_system else ""
        tool_lines = "".join("\n" + _json(tool) for tool in tools)
        return [
            Span(
                "<|im_start|>system\n" + prefix + _TOOLS_PREAMBLE + tool_lines + _TOOLS_POSTAMBLE,
                "system",
                turn,
            )
        ]
    if has_system:
        return [Span("<|im_start|>system\n" + _content(messages[0]) + "<|im_end|>\n", "system", 0)]
    return []


def check_variant(variant: str, enable_thinking: bool | None = None) -> None:
    """Rejects an unknown variant, and `enable_thinking` values its template cannot honour."""
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown chat template variant {variant!r} (one of {', '.join(VARIANTS)})"
        )
    if (variant, enable_thinking) in (
        ("qwen3_thinking_2507", False),
        ("qwen3_instruct_2507", True),
    ):
        raise ValueError(
            f"enable_thinking={enable_thinking} contradicts the {variant} chat template "
            "(only the hybrid qwen3 template switches thinking): leave enable_thinking unset"
        )


def _think_spans(
    reasoning: str, turn: int, enable_thinking: bool | None, variant: Variant
) -> list[Span]:
    """The think block of a turn that keeps its thinking: all prompt when empty and the model did
    not write it, else the written part (from `<think>`, or after it for Thinking-2507) through
    `</think>`."""
    reasoning = reasoning.strip("\n")
    if not reasoning and (variant == "qwen3_thinking_2507" or enable_thinking is False):
        # Hybrid with thinking disabled: the empty block was the generation prompt. Thinking-2507:
        # such a turn trains its answer only (its model never writes an empty thought), and one
        # span keeps the template's tokens (`\n\n` is one token).
        return [Span(_EMPTY_THINK, "assistant", turn)]
    if variant == "qwen3_thinking_2507":  # `<think>\n` came with the generation prompt
        return [
            Span("<think>\n", "assistant", turn),
            Span(reasoning + "\n</think>", "assistant", turn, "thinking"),
        ]
    return [Span("<think>\n" + reasoning + "\n</think>", "assistant", turn, "thinking")]


def _assistant_spans(
    message: Message,
    turn: int,
    keep_thinking: bool,
    enable_thinking: bool | None,
    variant: Variant = "qwen3",
) -> list[Span]:
    spans = [Span("<|im_start|>assistant\n", "assistant", turn)]
    if variant == "qwen3_instruct_2507":
        content = body = _content(message)
    else:
        reasoning, content = split_reasoning(message)
        body = content
        if keep_thinking:
            think = _think_spans(reasoning, turn, enable_thinking, variant)
            spans.extend(think)
            # A block in the prompt ends with its "\n\n"; one the model wrote ends at </think>.
            body = ("" if think[-1].kind == "prompt" else "\n\n") + content.lstrip("\n")
    for index, tool_call in enumerate(message.get("tool_calls") or []):
        if index > 0 or content:
            body += "\n"
        body += tool_call_text(tool_call)
    spans.append(Span(body + "<|im_end|>", "assistant", turn, "answer"))
    spans.append(Span("\n", "assistant", turn))
    return spans


def tool_response_spans(contents: Sequence[str], first_turn: int) -> list[Span]:
    """One user turn holding consecutive tool results."""
    text = "<|im_start|>user"
    for content in contents:
        text += "\n<tool_response>\n" + content + "\n</tool_response>"
    return [Span(text + "<|im_end|>\n", "tool", first_turn)]


def generation_prompt_spans(
    turn: int, enable_thinking: bool | None, variant: Variant = "qwen3"
) -> list[Span]:
    """Where the model starts writing: `<think>\\n` included for Thinking-2507."""
    check_variant(variant, enable_thinking)
    text = "<|im_start|>assistant\n"
    if variant == "qwen3_thinking_2507":
        text += "<think>\n"
    elif variant == "qwen3" and enable_thinking is False:
        text += _EMPTY_THINK
    return [Span(text, "assistant", turn)]


def render_spans(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
    variant: Variant = "qwen3",
) -> list[Span]:
    """The conversation as spans, following the variant's official chat template rule by rule."""
    check_variant(variant, enable_thinking)
    spans = _system_spans(messages, tools)
    query = last_query_index(messages)
    index = 0
    while index < len(messages):
        message = messages[index]
        role = message["role"]
        if role == "user" or (role == "system" and index > 0):
            spans.append(Span(f"<|im_start|>{role}\n{_content(message)}<|im_end|>\n", role, index))
        elif role == "assistant":
            reasoning, _ = split_reasoning(message)
            is_last = index == len(messages) - 1
            keep_thinking = index > query and (is_last or bool(reasoning))
            spans.extend(_assistant_spans(message, index, keep_thinking, enable_thinking, variant))
        elif role == "tool":
            stop = index
            while stop < len(messages) and messages[stop]["role"] == "tool":
                stop += 1
            spans.extend(tool_response_spans([_content(m) for m in messages[index:stop]], index))
            index = stop
            continue
        elif role != "system":
            raise ValueError(f"messages[{index}]: unknown role {role!r}")
        index += 1
    if add_generation_prompt:
        spans.extend(generation_prompt_spans(len(messages), enable_thinking, variant))
    return spans


def render_text(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
    variant: Variant = "qwen3",
) -> str:
    """Exactly the text of the variant's official chat template for the same arguments."""
    spans = render_spans(
        messages,
        tools,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        variant=variant,
    )
    return "".join(span.text for span in spans)


@dataclasses.dataclass(frozen=True)
class Rendered:
    """Token ids and per-token labels of a rendered conversation (all arrays [T])."""

    token_ids: np.ndarray  # int32
    loss_mask: np.ndarray  # int8: 1 exactly on trained assistant tokens
    thinking_mask: np.ndarray  # int8: 1 on tokens of <think>...</think> the model wrote
    role_ids: np.ndarray  # int8: ROLE_IDS of the message each token belongs to
    turn_ids: np.ndarray  # int32: index of that message (-1 for a tools-only system header)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_trained(self) -> int:
        return int(self.loss_mask.sum())

    def concat(self, other: Rendered) -> Rendered:
        return Rendered(
            *(
                np.concatenate([a, b])
                for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
            )
        )

    @classmethod
    def empty(cls) -> Rendered:
        return cls(
            *(np.zeros(0, dtype) for dtype in (np.int32, np.int8, np.int8, np.int8, np.int32))
        )


def encode_spans(
    spans: Sequence[Span],
    tokenizer: Tokenizer,
    *,
    trained_turns: set[int] | None = None,
    train_thinking: bool = True,
) -> Rendered:
    """Encodes span by span; `trained_turns` (None: all) limits which assistant turns get mask 1."""
    ids, loss, thinking, roles, turns = [], [], [], [], []
    for span in spans:
        span_ids = tokenizer.encode(span.text)
        trained = span.kind != "prompt" and (trained_turns is None or span.turn in trained_turns)
        if span.kind == "thinking" and not train_thinking:
            trained = False
        ids.extend(span_ids)
        loss.extend([int(trained)] * len(span_ids))
        thinking.extend([int(span.kind == "thinking")] * len(span_ids))
        roles.extend([ROLE_IDS[span.role]] * len(span_ids))
        turns.extend([span.turn] * len(span_ids))
    return Rendered(
        np.asarray(ids, np.int32),
        np.asarray(loss, np.int8),
        np.asarray(thinking, np.int8),
        np.asarray(roles, np.int8),
        np.asarray(turns, np.int32),
    )


def render(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None,
    tokenizer: Tokenizer,
    *,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
    train_on: Literal["all", "last"] = "all",
    train_thinking: bool = True,
    variant: Variant | None = None,
) -> Rendered:
    """Token ids plus loss mask, thinking mask, role and turn ids of every token.

    `train_on="last"` trains only the final assistant message; `train_thinking=False` masks the
    thinking tokens out of the loss (they stay in the input). `variant` defaults to the
    tokenizer's `chat_variant` (the checkpoint's template, once checked).
    """
    spans = render_spans(
        messages,
        tools,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        variant=variant or tokenizer.chat_variant,
    )
    trained_turns = None
    if train_on == "last":
        assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        trained_turns = set(assistant_turns[-1:])
    elif train_on != "all":
        raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
    return encode_spans(
        spans, tokenizer, trained_turns=trained_turns, train_thinking=train_thinking
    )


# --- incremental rendering for rollouts -----------------------------------------------------------


def render_prompt(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None,
    tokenizer: Tokenizer,
    *,
    enable_thinking: bool | None = None,
) -> Rendered:
    """The prompt a rollout starts from (generation prompt included; nothing trained), in the
    tokenizer's chat variant: for Thinking-2507 it ends with `<think>\\n`."""
    spans = render_spans(
        messages,
        tools,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
        variant=tokenizer.chat_variant,
    )
    return encode_spans(spans, tokenizer, trained_turns=set())


def generated_thinking_mask(token_ids: Sequence[int], tokenizer: Tokenizer) -> np.ndarray:
    """1 on the tokens of the think block at the start of a generated turn (through `</think>`).

    With Thinking-2507 the block was opened by the prompt, so the turn starts inside it; with
    Instruct-2507 nothing is thinking (a `<think>` it writes is content, as its template renders).
    """
    ids = np.asarray(token_ids)
    mask = np.zeros(len(ids), np.int8)
    variant = tokenizer.chat_variant
    if variant == "qwen3_instruct_2507":
        return mask
    ends = np.flatnonzero(ids == tokenizer.special.think_end)
    if len(ends):
        mask[: ends[0] + 1] = 1
    elif len(ids) and (ids[0] == tokenizer.special.think or variant == "qwen3_thinking_2507"):
        mask[:] = 1  # unclosed: everything generated is thinking
    return mask


def append_generated(
    rendered: Rendered, token_ids: Sequence[int], tokenizer: Tokenizer, *, turn: int
) -> Rendered:
    """Appends sampled tokens verbatim (loss mask 1): they are never decoded and re-encoded."""
    n = len(token_ids)
    generated = Rendered(
        np.asarray(token_ids, np.int32),
        np.ones(n, np.int8),
        generated_thinking_mask(token_ids, tokenizer),
        np.full(n, ROLE_IDS["assistant"], np.int8),
        np.full(n, turn, np.int32),
    )
    return rendered.concat(generated)


def append_tool_results(
    rendered: Rendered,
    results: Sequence[str],
    tokenizer: Tokenizer,
    *,
    first_turn: int,
    enable_thinking: bool | None = None,
) -> Rendered:
    """Closes the assistant turn and appends the tool-result turn and the next generation prompt.

    If the model stopped without `<|im_end|>` (e.g. on a `</tool_call>` stop token), one is added
    with loss mask 0. The `\\n` after `<|im_end|>` belongs to the template, not to the model.
    """
    spans: list[Span] = []
    assistant_turn = first_turn - 1
    if not len(rendered) or rendered.token_ids[-1] != tokenizer.special.im_end:
        spans.append(Span("<|im_end|>", "assistant", assistant_turn))
    spans.append(Span("\n", "assistant", assistant_turn))
    spans.extend(tool_response_spans(results, first_turn))
    spans.extend(
        generation_prompt_spans(first_turn + len(results), enable_thinking, tokenizer.chat_variant)
    )
    return rendered.concat(encode_spans(spans, tokenizer, trained_turns=set()))
