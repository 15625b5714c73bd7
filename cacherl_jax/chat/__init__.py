"""Tokenizers, the Qwen3 chat format with per-token loss masks, and parsing model output."""

from cacherl_jax.chat.parse import ParsedAssistant, Problem, ToolCall, parse_assistant
from cacherl_jax.chat.template import (
    Rendered,
    append_generated,
    append_tool_results,
    render,
    render_prompt,
    render_text,
)
from cacherl_jax.chat.tokenizer import (
    SpecialTokens,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "ParsedAssistant",
    "Problem",
    "Rendered",
    "SpecialTokens",
    "Tokenizer",
    "TokenizerError",
    "ToolCall",
    "append_generated",
    "append_tool_results",
    "load_tokenizer",
    "parse_assistant",
    "render",
    "render_prompt",
    "render_text",
    "train_tokenizer",
]
