"""A checkpoint's own chat template: which Qwen3 variant it is, and proof at load that our
renderer gives its tokens.

`check_checkpoint_template(checkpoint_dir, tokenizer)` reads the template (`chat_template.jinja`,
else `chat_template` in `tokenizer_config.json`), detects the variant from what the template
renders, renders probe conversations (system prompt, tools, reasoning, parallel tool calls, tool
results, earlier exchanges whose thinking is dropped; with and without the generation prompt)
both with the Jinja template, the way transformers' `apply_chat_template` does, and with
`chat.template.render`, and compares the token ids. The first differing token stops the run
before any training. On success the tokenizer renders in that variant from then on.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
from jinja2 import ext, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cacherl_jax.chat.template import Message, Variant, render
from cacherl_jax.chat.tokenizer import Tokenizer
from cacherl_jax.errors import UserError

TEMPLATE_FILES = ("chat_template.jinja", "tokenizer_config.json")
_ASSISTANT = "<|im_start|>assistant\n"


class ChatTemplateError(UserError):
    """A checkpoint chat template that cannot be read, parsed or recognised as a Qwen3 one."""


class ChatTemplateMismatch(ChatTemplateError):
    """Our renderer and the checkpoint's template give different tokens on a probe."""


# --- probes ----------------------------------------------------------------------------------------


def _tool(name: str, description: str, properties: Mapping[str, Any]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": dict(properties), "required": list(properties)}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


def _call(name: str, arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


_WEATHER = _tool("get_weather", "Current weather in a city", {"city": {"type": "string"}})
_CONVERT = _tool("convert", "Celsius to another unit", {"value": {"type": "number"}})

# name -> (messages, tools). Every rule of the templates is exercised by at least one probe.
PROBES: dict[str, tuple[list[Message], list[dict[str, Any]] | None]] = {
    "tool_loop": (
        [
            {"role": "system", "content": "You are a travel agent."},
            {"role": "user", "content": "Weather in Zürich and Bern?"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "Two cities, two calls.",
                "tool_calls": [
                    _call("get_weather", {"city": "Zürich"}),
                    _call("get_weather", '{"city":"Bern"}'),
                ],
            },
            {"role": "tool", "content": "21 C"},
            {"role": "tool", "content": "19 C"},
            {
                "role": "assistant",
                "content": "Converting.",
                "reasoning_content": "\nNow Fahrenheit.\n",
                "tool_calls": [_call("convert", {"value": 21, "unit": "F"})],
            },
            {"role": "tool", "content": "Error: unknown unit 'F'"},
            {
                "role": "assistant",
                "content": "Zürich 21 C, Bern 19 C.",
                "reasoning_content": "Report Celsius.",
            },
        ],
        [_WEATHER, _CONVERT],
    ),
    "two_queries": (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello!"},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Which city?", "reasoning_content": "Need a city."},
        ],
        None,
    ),
    "tools_without_system": (
        [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {})]},
            {"role": "user", "content": "<tool_response>\n-3 C\n</tool_response>"},
            {"role": "assistant", "content": "It is -3 C in Oslo."},
        ],
        [_WEATHER],
    ),
}


# --- the Jinja side, as transformers renders it ------------------------------------------------------


class _Generation(ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag) renders its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' filter: json.dumps, non-ASCII kept (Jinja's own would escape HTML characters).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def compile_template(template: str, source: str) -> jinja2.Template:
    """The template in the sandbox transformers uses, with its filters and globals."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return environment.from_string(template)
    except jinja2.exceptions.TemplateError as err:
        raise ChatTemplateError(
            f"{source}: cannot parse the chat template: {_one_line(err)}"
        ) from err


def render_template(
    compiled: jinja2.Template,
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None,
    add_generation_prompt: bool,
    source: str,
) -> str:
    try:
        return compiled.render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # a template can raise anything (raise_exception, TypeError, ...)
        raise ChatTemplateError(f"{source}: the chat template failed: {_one_line(err)}") from err


# --- reading and detecting --------------------------------------------------------------------------


def read_chat_template(checkpoint_dir: str | os.PathLike[str]) -> tuple[str, str] | None:
    """(template, where it came from) of a checkpoint directory, or None when it has none.

    `chat_template.jinja` wins over `tokenizer_config.json`, as in transformers.
    """
    directory = Path(checkpoint_dir)
    jinja_file = directory / TEMPLATE_FILES[0]
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    config_file = directory / TEMPLATE_FILES[1]
    if not config_file.is_file():
        return None
    try:
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ChatTemplateError(f"{config_file}: not a JSON object ({_one_line(err)})") from err
    if isinstance(template, list):  # named templates: the default one is the chat template
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template:
        return None
    return template, f"{config_file}:chat_template"


def detect_variant(compiled: jinja2.Template, source: str) -> Variant:
    """The variant, from what the template renders: the generation prompt after
    `<|im_start|>assistant\\n` (`<think>\\n`: Thinking-2507), and whether reasoning is shown."""
    prompt = render_template(compiled, [{"role": "user", "content": "q"}], None, True, source)
    head, found, tail = prompt.rpartition(_ASSISTANT)
    if found and tail == "<think>\n":
        return "qwen3_thinking_2507"
    if not found or tail:
        raise ChatTemplateError(
            f"{source}: not a Qwen3 chat template (generation prompt {prompt[len(head) :]!r})"
        )
    turn = {"role": "assistant", "content": "a", "reasoning_content": "r"}
    text = render_template(compiled, [{"role": "user", "content": "q"}, turn], None, False, source)
    return "qwen3" if "<think>\nr\n</think>" in text else "qwen3_instruct_2507"


# --- the check -------------------------------------------------------------------------------------


def _token(tokenizer: Tokenizer, ids: Sequence[int], index: int) -> str:
    if index >= len(ids):
        return "<end of text>"
    return f"{ids[index]} {tokenizer.decode([ids[index]])!r}"


def _mismatch(
    tokenizer: Tokenizer, ours: list[int], theirs: list[int], label: str
) -> ChatTemplateMismatch | None:
    index = next(
        (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
        min(len(ours), len(theirs)),
    )
    if index == len(ours) == len(theirs):
        return None
    context = tokenizer.decode(theirs[max(0, index - 12) : index])
    return ChatTemplateMismatch(
        f"{label} at token {index}: ours {_token(tokenizer, ours, index)} vs template's "
        f"{_token(tokenizer, theirs, index)}, after {context!r}"
    )


def verify_template(
    compiled: jinja2.Template, variant: Variant, tokenizer: Tokenizer, source: str
) -> None:
    """Raises `ChatTemplateMismatch` at the first probe whose tokens differ."""
    for name, (messages, tools) in PROBES.items():
        for add_generation_prompt in (False, True):
            text = render_template(compiled, messages, tools, add_generation_prompt, source)
            ours = render(
                messages,
                tools,
                tokenizer,
                add_generation_prompt=add_generation_prompt,
                variant=variant,
            )
            prompt = "with" if add_generation_prompt else "without"
            label = (
                f"{source}: our {variant} rendering differs from the checkpoint's chat template "
                f"on probe {name!r} ({prompt} generation prompt)"
            )
            error = _mismatch(tokenizer, ours.token_ids.tolist(), tokenizer.encode(text), label)
            if error is not None:
                raise error


def check_checkpoint_template(
    checkpoint_dir: str | os.PathLike[str] | None, tokenizer: Tokenizer
) -> Variant:
    """The checkpoint's chat template variant, verified token by token against our renderer;
    sets `tokenizer.chat_variant` to it. "qwen3" (the hybrid template) when `checkpoint_dir` is
    empty, not a directory, or has no template. Raises a one-line `ChatTemplateError` (unreadable
    or not a Qwen3 template) or `ChatTemplateMismatch` (the first differing token)."""
    found = read_chat_template(checkpoint_dir) if checkpoint_dir else None
    if found is None:
        variant: Variant = "qwen3"
    else:
        template, source = found
        compiled = compile_template(template, source)
        variant = detect_variant(compiled, source)
        verify_template(compiled, variant, tokenizer, source)
    tokenizer.chat_variant = variant
    return variant


def copy_chat_template(
    source_dir: str | os.PathLike[str], export_dir: str | os.PathLike[str]
) -> list[str]:
    """Copies the checkpoint's template files into an export, so the exported checkpoint keeps
    its variant; returns the names copied."""
    copied = []
    for name in TEMPLATE_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copy(Path(source_dir) / name, Path(export_dir) / name)
            copied.append(name)
    return copied


def load_checked_tokenizer(spec: str, checkpoint_dir: str | os.PathLike[str] | None) -> Tokenizer:
    """The tokenizer `spec` names (or the checkpoint's own), its chat variant read from the
    checkpoint's template and verified against it: what every command that loads a checkpoint
    does first, so a mismatch stops it before any work."""
    from cacherl_jax.chat.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(spec or os.fspath(checkpoint_dir))
    check_checkpoint_template(checkpoint_dir, tokenizer)
    return tokenizer
