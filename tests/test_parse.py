"""Parsing Qwen3 assistant output: the happy paths, every problem kind, and fuzzed robustness."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cacherl_jax.chat.parse import (
    PROBLEM_KINDS,
    ParsedAssistant,
    Problem,
    ToolCall,
    parse_assistant,
)

EXAMPLE = """<think>
I need the weather, then convert units.
</think>

Let me check.
<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris"}}
</tool_call>
<tool_call>
{"name": "convert", "arguments": {"value": 3, "unit": "F"}}
</tool_call><|im_end|>"""

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<|im_end|>", "<|endoftext|>")


def call(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


def kinds(parsed: ParsedAssistant) -> list[str]:
    return [problem.kind for problem in parsed.problems]


def dumps(obj: Any) -> str:
    # Escaping "<" keeps a tag string inside a JSON value from being read as markup.
    return json.dumps(obj).replace("<", "\\u003c")


def render(parsed: ParsedAssistant) -> str:
    """The format of EXAMPLE: think block, content, one block per call, end token."""
    text = f"<think>\n{parsed.reasoning}\n</think>\n\n{parsed.content}"
    for tool_call in parsed.tool_calls:
        text += "\n" + call(dumps({"name": tool_call.name, "arguments": tool_call.arguments}))
    return text + "<|im_end|>"


def parts(parsed: ParsedAssistant) -> tuple[str, str, list[tuple[str, str]]]:
    """What a round trip must keep; arguments compared as canonical JSON (NaN != NaN)."""
    calls = [(c.name, json.dumps(c.arguments, sort_keys=True)) for c in parsed.tool_calls]
    return parsed.reasoning, parsed.content, calls


# --- well-formed output ---------------------------------------------------------------------


def test_example_parses_exactly():
    parsed = parse_assistant(EXAMPLE)
    assert parsed.reasoning == "I need the weather, then convert units."
    assert parsed.content == "Let me check."
    assert parsed.tool_calls == (
        ToolCall("get_weather", {"city": "Paris"}, raw=f"\n{WEATHER}\n"),
        ToolCall(
            "convert",
            {"value": 3, "unit": "F"},
            raw='\n{"name": "convert", "arguments": {"value": 3, "unit": "F"}}\n',
        ),
    )
    assert parsed.problems == ()
    assert parsed.ok
    assert render(parsed) == EXAMPLE


def test_example_to_message():
    assert parse_assistant(EXAMPLE).to_message() == {
        "role": "assistant",
        "content": "Let me check.",
        "reasoning_content": "I need the weather, then convert units.",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "convert", "arguments": {"value": 3, "unit": "F"}}},
        ],
    }  # fmt: skip


def test_to_message_omits_empty_fields_and_to_openai_takes_an_id():
    assert parse_assistant("Hi.").to_message() == {"role": "assistant", "content": "Hi."}
    tool_call = ToolCall("f", {"x": 1}, raw="")
    assert tool_call.to_openai("call_0") == {
        "id": "call_0",
        "type": "function",
        "function": {"name": "f", "arguments": {"x": 1}},
    }
    assert "id" not in tool_call.to_openai()
    tool_call.to_openai()["function"]["arguments"]["x"] = 2
    assert tool_call.arguments == {"x": 1}


def test_no_think_block():
    parsed = parse_assistant("  The answer is 4.\n<|im_end|>")
    assert (parsed.reasoning, parsed.content, parsed.tool_calls) == ("", "The answer is 4.", ())
    assert parsed.ok


def test_empty_think_block_of_non_thinking_mode():
    parsed = parse_assistant("<think>\n\n</think>\n\nHello.<|endoftext|>")
    assert (parsed.reasoning, parsed.content) == ("", "Hello.")
    assert parsed.ok


def test_think_opened_by_the_prompt():
    parsed = parse_assistant("Two plus two.\nThat is four.\n</think>\n\nIt is 4.<|im_end|>")
    assert parsed.reasoning == "Two plus two.\nThat is four."
    assert parsed.content == "It is 4."
    assert parsed.ok


def test_reasoning_keeps_spaces_and_strips_only_newlines():
    parsed = parse_assistant("<think>\n\n  indented\n\n</think>\n\n  \n  answer  \n")
    assert (parsed.reasoning, parsed.content) == ("  indented", "answer")


def test_only_one_end_token_is_stripped():
    parsed = parse_assistant("hi<|im_end|><|im_end|>\n")
    assert parsed.content == "hi<|im_end|>"
    assert parse_assistant("hi<|endoftext|>").content == "hi"


def test_truncated_output_without_end_token():
    parsed = parse_assistant("<think>\nok\n</think>\n\nThe answer is")
    assert (parsed.reasoning, parsed.content) == ("ok", "The answer is")
    assert parsed.ok


def test_several_calls_keep_their_order():
    names = ["a", "b", "c", "d"]
    text = "\n".join(call(dumps({"name": n, "arguments": {"i": i}})) for i, n in enumerate(names))
    parsed = parse_assistant(text)
    assert [c.name for c in parsed.tool_calls] == names
    assert [c.arguments for c in parsed.tool_calls] == [{"i": i} for i in range(4)]
    assert parsed.content == ""
    assert parsed.ok


def test_content_before_calls_and_whitespace_in_blocks():
    parsed = parse_assistant(f"Sure, one moment.\n<tool_call>  \n\t{WEATHER} \n\n</tool_call>")
    assert parsed.content == "Sure, one moment."
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert parsed.ok


def test_string_encoded_arguments_are_parsed():
    body = dumps({"name": "convert", "arguments": json.dumps({"value": 3, "unit": "F"})})
    parsed = parse_assistant(call(body))
    assert parsed.tool_calls[0].arguments == {"value": 3, "unit": "F"}
    assert parsed.tool_calls[0].raw == f"\n{body}\n"
    assert parsed.ok


def test_empty_arguments_object_is_fine():
    parsed = parse_assistant(call('{"name": "now", "arguments": {}}'))
    assert parsed.tool_calls[0].arguments == {}
    assert parsed.ok


# --- malformed output: one case per problem kind ----------------------------------------------

MALFORMED = {
    "unclosed_think": "<think>\nStill thinking when the budget ran out",
    "tool_call_in_thinking": f"<think>\nMaybe {call(WEATHER)}\n</think>\n\nDone.",
    "unclosed_tool_call": f'{call(WEATHER)}\n<tool_call>\n{{"name": "convert", "argu',
    "stray_tool_call_end": "Done.</tool_call>",
    "nested_tool_call": f'<tool_call>\n{{"name": "a", {call(WEATHER)}}}\n</tool_call>',
    "invalid_json": call('{"name": "get_weather", "arguments": {"city": "Paris"}'),
    "not_an_object": call('["get_weather", {"city": "Paris"}]'),
    "missing_name": call('{"arguments": {"city": "Paris"}}'),
    "bad_arguments": call('{"name": "get_weather", "arguments": ["Paris"]}'),
    "extra_keys": call('{"name": "get_weather", "arguments": {}, "id": 7}'),
    "multiple_think_blocks": "<think>a</think>b<think>c</think>d",
    "text_after_tool_calls": f"{call(WEATHER)}\nHope that helps!",
    "empty": "<think>\n\n</think>\n\n<|im_end|>",
}


def test_every_problem_kind_has_a_malformed_case():
    assert set(MALFORMED) == set(PROBLEM_KINDS)


@pytest.mark.parametrize("kind", PROBLEM_KINDS)
def test_malformed_output_reports_its_kind(kind):
    parsed = parse_assistant(MALFORMED[kind])
    assert kind in kinds(parsed)
    assert not parsed.ok
    assert all(len(problem.detail) < 300 for problem in parsed.problems)


def test_problem_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown problem kind"):
        Problem("typo", "")


def test_unclosed_think_is_all_reasoning():
    parsed = parse_assistant(f"<think>\nI will call {call(WEATHER)} and then")
    assert parsed.reasoning.startswith("I will call <tool_call>")
    assert (parsed.content, parsed.tool_calls) == ("", ())
    assert kinds(parsed) == ["unclosed_think", "tool_call_in_thinking"]


def test_calls_inside_thinking_are_never_executed():
    parsed = parse_assistant(MALFORMED["tool_call_in_thinking"])
    assert parsed.tool_calls == ()
    assert parsed.content == "Done."
    assert "<tool_call>" in parsed.reasoning
    assert kinds(parsed) == ["tool_call_in_thinking"]


def test_calls_inside_thinking_opened_by_the_prompt_are_never_executed():
    parsed = parse_assistant(f"{call(WEATHER)}\n</think>\n\n{call(WEATHER)}")
    assert len(parsed.tool_calls) == 1
    assert kinds(parsed) == ["tool_call_in_thinking"]


def test_truncated_call_keeps_the_complete_ones():
    parsed = parse_assistant(MALFORMED["unclosed_tool_call"])
    assert [c.name for c in parsed.tool_calls] == ["get_weather"]
    assert "convert" not in parsed.content
    assert kinds(parsed) == ["unclosed_tool_call"]


def test_truncated_json_reports_the_position():
    parsed = parse_assistant(MALFORMED["invalid_json"])
    assert parsed.tool_calls == ()
    assert kinds(parsed) == ["invalid_json", "empty"]
    assert "delimiter at line 3 column 1" in parsed.problems[0].detail


def test_failed_block_between_valid_ones():
    bad = call('{"name": "get_weather", "arguments": {"city": Paris}}')
    good = call('{"name": "convert", "arguments": {"value": 3}}')
    parsed = parse_assistant(f"{call(WEATHER)}\n{bad}\n{good}")
    assert [c.name for c in parsed.tool_calls] == ["get_weather", "convert"]
    assert kinds(parsed) == ["invalid_json"]


def test_stray_end_tag_is_dropped_from_content():
    parsed = parse_assistant(MALFORMED["stray_tool_call_end"])
    assert parsed.content == "Done."
    assert kinds(parsed) == ["stray_tool_call_end"]


@pytest.mark.parametrize(
    "text",
    [
        MALFORMED["nested_tool_call"],
        f'<tool_call>\n{{"name": {call(WEATHER)}',  # restarted after truncation, never closed
    ],
)
def test_nested_blocks_are_rejected_whole(text):
    parsed = parse_assistant(text)
    assert parsed.tool_calls == ()
    assert "nested_tool_call" in kinds(parsed)


@pytest.mark.parametrize(
    ("arguments", "kind"),
    [
        ('["Paris"]', "bad_arguments"),
        ('"Paris"', "bad_arguments"),
        ('"[1, 2]"', "bad_arguments"),
        ('"{not json"', "bad_arguments"),
        ("null", "bad_arguments"),
        ("3", "bad_arguments"),
    ],
)
def test_arguments_of_the_wrong_type(arguments, kind):
    parsed = parse_assistant(call(f'{{"name": "get_weather", "arguments": {arguments}}}'))
    assert parsed.tool_calls == ()
    assert kinds(parsed) == [kind, "empty"]


@pytest.mark.parametrize("name", ['""', '"  "', "3", "null", '["f"]', '{"f": 1}'])
def test_names_of_the_wrong_type(name):
    parsed = parse_assistant(call(f'{{"name": {name}, "arguments": {{}}}}'))
    assert parsed.tool_calls == ()
    assert "missing_name" in kinds(parsed)


def test_missing_arguments_and_name_are_both_reported():
    parsed = parse_assistant(call('{"function": "get_weather"}'))
    assert kinds(parsed) == ["missing_name", "bad_arguments", "extra_keys", "empty"]


def test_extra_keys_still_accept_the_call():
    parsed = parse_assistant(MALFORMED["extra_keys"])
    assert [c.name for c in parsed.tool_calls] == ["get_weather"]
    assert kinds(parsed) == ["extra_keys"]


def test_multiple_think_blocks_keep_the_first_as_reasoning():
    parsed = parse_assistant(MALFORMED["multiple_think_blocks"])
    assert (parsed.reasoning, parsed.content) == ("a", "b<think>c</think>d")
    assert kinds(parsed) == ["multiple_think_blocks"]


def test_text_after_calls_is_kept_in_content():
    parsed = parse_assistant(f"Checking.\n{MALFORMED['text_after_tool_calls']}")
    assert parsed.content == "Checking.\n\nHope that helps!"
    assert len(parsed.tool_calls) == 1
    assert kinds(parsed) == ["text_after_tool_calls"]


@pytest.mark.parametrize("text", ["", "   \n", "<|im_end|>", "<think>\n\n</think>\n\n<|im_end|>"])
def test_empty_output(text):
    assert kinds(parse_assistant(text)) == ["empty"]


def test_long_garbage_is_truncated_in_details():
    parsed = parse_assistant(call("{" + "x" * 10_000))
    assert kinds(parsed) == ["invalid_json", "empty"]
    assert len(parsed.problems[0].detail) < 300


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ("[" * 100_000, "invalid_json"),  # deeper than the recursion limit
        ("1" * 10_000, "invalid_json"),  # past Python's int-parsing digit limit
        ('{"name": "f", "arguments": "' + "[" * 100_000 + '"}', "bad_arguments"),
    ],
)
def test_pathological_json_is_reported_not_raised(body, kind):
    assert kinds(parse_assistant(call(body))) == [kind, "empty"]


# --- fuzzing ----------------------------------------------------------------------------------

JSON_BITS = (
    WEATHER,
    '{"name": "convert", "arguments": "{\\"value\\": 3}"}',
    '{"name": 3}',
    '{"arguments": {}}',
    "[1, 2]",
    '"name"',
    '"arguments"',
    "{",
    "}",
    ":",
    ",",
    "\n",
)
tag_soup = st.lists(
    st.one_of(
        st.sampled_from(TAGS + JSON_BITS),
        st.text(st.characters(blacklist_characters="<"), max_size=8),  # no accidental partial tags
    ),
    max_size=24,
).map("".join)


def check_invariants(text: str, parsed: ParsedAssistant) -> None:
    assert isinstance(parsed.reasoning, str) and isinstance(parsed.content, str)
    assert parsed.ok == (not parsed.problems)
    assert all(problem.kind in PROBLEM_KINDS for problem in parsed.problems)
    for tool_call in parsed.tool_calls:
        assert isinstance(tool_call.name, str) and tool_call.name.strip()
        assert isinstance(tool_call.arguments, dict)
    json.dumps(parsed.to_message())
    # Calls come only from outside the reasoning: after the first </think>, or before an unclosed
    # <think>, or anywhere when there is no think tag at all.
    if "</think>" in text:
        region = text[text.find("</think>") :]
    elif "<think>" in text:
        region = text[: text.find("<think>")]
    else:
        region = text
    for tool_call in parsed.tool_calls:
        assert f"<tool_call>{tool_call.raw}</tool_call>" in region


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), tag_soup))
def test_never_raises_on_arbitrary_text(text):
    check_invariants(text, parse_assistant(text))


@settings(max_examples=300, deadline=None)
@given(tag_soup)
def test_render_then_parse_is_a_fixed_point(text):
    parsed = parse_assistant(text)
    assert parts(parse_assistant(render(parsed))) == parts(parsed)


plain_text = st.text().filter(lambda s: not any(tag in s for tag in TAGS))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3)
    ),
    max_leaves=8,
)
tool_calls = st.builds(
    ToolCall,
    name=st.text(min_size=1).filter(str.strip),
    arguments=st.dictionaries(st.text(), json_values, max_size=4),
    raw=st.just(""),
)


@settings(max_examples=200, deadline=None)
@given(plain_text, plain_text, st.lists(tool_calls, max_size=3))
def test_round_trip_through_the_rendered_format(reasoning, content, calls):
    original = ParsedAssistant(reasoning.strip("\n"), content.strip(), tuple(calls), problems=())
    parsed = parse_assistant(render(original))
    assert parts(parsed) == parts(original)
    assert set(kinds(parsed)) <= {"empty"}
