"""Canonical arguments (the exact tier's key) and the similarity of arguments (the fuzzy score).

Similarity is on rapidfuzz's 0-100 scale: `fuzz.ratio` for texts (100 * (1 - Indel distance /
sum of the lengths)), relative difference for numbers, equality for booleans and null.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from rapidfuzz import fuzz, process

from cacherl_jax.agent.tool_cache import limits
from cacherl_jax.agent.tool_cache.records import ToolCacheError

# --- canonical arguments --------------------------------------------------------------------


def normalise_string(text: str) -> str:
    """NFC, whitespace runs collapsed to one space, trimmed: 'a  b ' and 'a b' are one value."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    return " ".join(text.split())


def canonical_value(value: Any) -> Any:
    """The canonical JSON value: integral floats become ints (1.0 -> 1, -0.0 -> 0), strings are
    normalised, tuples become lists, objects keep their (exact) key names. Raises TypeError for
    anything JSON cannot hold."""
    kind = type(value)  # exact types first: isinstance against Mapping is slow
    if kind is str:
        return normalise_string(value)
    if kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return int(value) if value.is_integer() else value
    if kind is dict or isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"argument names must be strings, got {type(key).__name__}")
            out[key] = canonical_value(item)
        return out
    if isinstance(value, (list, tuple)):
        return [canonical_value(item) for item in value]
    if isinstance(value, str):  # subclasses of the types above
        return normalise_string(str(value))
    if isinstance(value, (bool, int)):
        return int(value) if not isinstance(value, bool) else bool(value)
    if isinstance(value, float):
        return canonical_value(float(value))
    raise TypeError(f"a {type(value).__name__} is not a JSON value")


# One encoder, made once: json.dumps with options builds a new one per call. ASCII escapes keep
# every key storable in SQLite, lone surrogates included.
_encode = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode
_escape = json.encoder.encode_basestring_ascii
_LITERALS = {None: "null", True: "true", False: "false"}


def dumps_canonical(value: Any) -> str:
    """Compact JSON with sorted keys. Flat objects, the usual arguments, are written here
    (the same text as the json module's, several times faster); anything nested goes to json."""
    if type(value) is not dict:
        return _encode(value)
    parts = []
    for name in sorted(value):
        item = value[name]
        item_type = type(item)
        if item_type is str:
            text = _escape(item)
        elif item_type is int:
            text = int.__repr__(item)
        elif item_type is float and math.isfinite(item):
            text = float.__repr__(item)
        elif item is None or item_type is bool:
            text = _LITERALS[item]
        else:
            text = _encode(item)
        parts.append(f"{_escape(name)}:{text}")
    return "{" + ",".join(parts) + "}"


def canonical_arguments(arguments: Mapping[str, Any] | str | None) -> tuple[dict[str, Any], str]:
    """(canonical dict, its key string) for a call's arguments: a mapping, a JSON object string
    (as in OpenAI tool calls) or None for no arguments. Raises ToolCacheError for a string that is
    not a JSON object and TypeError for values JSON cannot hold."""
    if type(arguments) is not dict:
        arguments = _parsed_arguments(arguments)
    canonical = canonical_value(arguments)
    return canonical, dumps_canonical(canonical)


def _parsed_arguments(arguments: Mapping[str, Any] | str | None) -> Mapping[str, Any]:
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ToolCacheError(f"arguments are not valid JSON: {exc.msg}") from None
    if not isinstance(arguments, Mapping):
        raise ToolCacheError(f"arguments must be a JSON object, got {type(arguments).__name__}")
    return arguments


def canonical_key(arguments: Mapping[str, Any] | str | None) -> str:
    """The exact-tier key: `{"a":1,"b":2}` and `{"b": 2, "a": 1.0}` give the same string."""
    return canonical_arguments(arguments)[1]


# --- similarity -------------------------------------------------------------------------------

# A value as the fuzzy index sees it: (vocabulary key, kind, text, number).
TEXT, NUMBER, EXACT_ONLY = 0, 1, 2  # str/list/object; int/float; bool/null
IndexValue = tuple[Any, int, str, float]


def index_value(value: Any) -> IndexValue:
    """(vocabulary key, kind, text, number) of a canonical value: strings are their own key;
    numbers compare by value (NaN as text when beyond float range); the rest as canonical JSON."""
    value_type = type(value)
    if value_type is str:
        return value, TEXT, value, math.nan
    if value_type is int or value_type is float:
        # json writes ints and finite floats as repr does; repr is much faster.
        finite = value_type is int or math.isfinite(value)  # isfinite(huge int) overflows
        text = repr(value) if finite else dumps_canonical(value)
        try:
            return ("number", text), NUMBER, text, float(value)
        except OverflowError:  # an int beyond float range: compared as text
            return ("number", text), TEXT, text, math.nan
    text = dumps_canonical(value)
    if value is None or value_type is bool:
        return ("json", text), EXACT_ONLY, text, math.nan
    return ("json", text), TEXT, text, math.nan


def number_similarity(a: float, b: float) -> float:
    """100 * (1 - |a-b| / max(|a|,|b|)), floored at 0; 100 when equal, 0 when not finite."""
    if a == b:
        return 100.0
    similarity = 100.0 * max(0.0, 1.0 - abs(a - b) / max(abs(a), abs(b)))
    return similarity if math.isfinite(similarity) else 0.0


def number_similarities(x: float, values: np.ndarray) -> np.ndarray:
    """`number_similarity(x, v)` for each v, with the same float operations."""
    with np.errstate(all="ignore"):
        similarity = 100.0 * np.maximum(
            0.0, 1.0 - np.abs(x - values) / np.maximum(abs(x), np.abs(values))
        )
    similarity[~np.isfinite(similarity)] = 0.0
    similarity[values == x] = 100.0
    return similarity


def ratios(text: str, choices: Sequence[str]) -> np.ndarray:
    """`fuzz.ratio(text, choice)` for each choice: a Python loop for a few (a cdist call costs
    more to start than a few ratios), one `process.cdist` for more."""
    if len(choices) <= limits.LOOP_RATIOS:
        ratio = fuzz.ratio
        return np.array([ratio(text, choice) for choice in choices], dtype=np.float64)
    return process.cdist([text], choices, scorer=fuzz.ratio, dtype=np.float64)[0]


def value_similarity(a: Any, b: Any) -> float:
    """0-100 similarity of two canonical argument values: 100 if equal; numbers by relative
    difference, 100 * (1 - |a-b| / max(|a|,|b|)); booleans and null only equal or not; everything
    else rapidfuzz's `fuzz.ratio` of the text (strings as they are, others as canonical JSON, so
    "5" and 5 compare as text and score 100 without being an exact match)."""
    key_a, kind_a, text_a, number_a = index_value(a)
    key_b, kind_b, text_b, number_b = index_value(b)
    if key_a == key_b:
        return 100.0
    if kind_a == NUMBER and kind_b == NUMBER:
        return number_similarity(number_a, number_b)
    if EXACT_ONLY in (kind_a, kind_b):
        return 0.0
    return fuzz.ratio(text_a, text_b)


def argument_similarity(query: Mapping[str, Any], entry: Mapping[str, Any]) -> float:
    """The fuzzy score of two canonical argument dicts: the per-argument `value_similarity`
    summed over the names they share, divided by the number of names in either (a name missing
    on one side scores 0). Two empty dicts score 100."""
    names = set(query) | set(entry)
    if not names:
        return 100.0
    shared = sorted(set(query) & set(entry))
    return sum(value_similarity(query[name], entry[name]) for name in shared) / len(names)
