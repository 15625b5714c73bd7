"""Show which tokens of a rendered conversation are trained on: `cacherl chat show`."""

from __future__ import annotations

import itertools

from cacherl_jax.chat.template import Rendered
from cacherl_jax.chat.tokenizer import Tokenizer

_COLORS = {"prompt": "\033[2m", "thinking": "\033[36m", "answer": "\033[32m"}
_RESET = "\033[0m"
_MARKERS = {"prompt": ("", ""), "thinking": ("⟦think:", "⟧"), "answer": ("⟦", "⟧")}


def _kind(mask: int, thinking: int) -> str:
    if not mask:
        return "prompt"
    return "thinking" if thinking else "answer"


def format_tokens(rendered: Rendered, tokenizer: Tokenizer, *, color: bool = False) -> str:
    """The decoded conversation with trained runs marked: ⟦answer⟧ and ⟦think:...⟧, or colours
    (dim prompt, cyan thinking, green answer) for a terminal. Runs are decoded whole, so the
    text between markers is exactly the trained text."""
    labels = [_kind(m, t) for m, t in zip(rendered.loss_mask, rendered.thinking_mask, strict=True)]
    out, start = [], 0
    for kind, group in itertools.groupby(labels):
        n = len(list(group))
        text = tokenizer.decode(rendered.token_ids[start : start + n])
        start += n
        if color:
            out.append(_COLORS[kind] + text + _RESET)
        else:
            opening, closing = _MARKERS[kind]
            out.append(opening + text + closing)
    return "".join(out)


def summary(rendered: Rendered) -> str:
    return (
        f"{len(rendered)} tokens, {rendered.num_trained} trained "
        f"({int((rendered.loss_mask & rendered.thinking_mask).sum())} thinking)"
    )
