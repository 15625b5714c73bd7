"""Canonical keys (the exact tier) and the similarity of arguments (the fuzzy score), checked
against independent references: a textbook LCS table for rapidfuzz's `fuzz.ratio` (100 * (1 -
Indel distance / sum of the lengths)), the formula of the relative difference for numbers, and
the json module for keys."""

import json
import math
import random
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cacherl_jax.agent.tool_cache import (
    ToolCacheError,
    argument_similarity,
    canonical_arguments,
    canonical_key,
    canonical_value,
    limits,
    value_similarity,
)
from cacherl_jax.agent.tool_cache.column import Column
from cacherl_jax.agent.tool_cache.keys import EXACT_ONLY, index_value, ratios

# --- canonical keys ----------------------------------------------------------------------------


def test_key_order_and_number_format_give_one_exact_key():
    assert canonical_key({"a": 1, "b": 2}) == canonical_key({"b": 2, "a": 1.0})
    assert canonical_key({"a": 1, "b": 2}) == canonical_key('{"b": 2, "a": 1.0}')  # JSON text
    assert canonical_key({"x": -0.0}) == canonical_key({"x": 0})
    assert canonical_key({"x": 1.5}) != canonical_key({"x": 1})
    assert canonical_key({"x": True}) != canonical_key({"x": 1})  # JSON booleans are not numbers
    assert canonical_key({"x": "1"}) != canonical_key({"x": 1})
    assert canonical_key(None) == canonical_key({}) == "{}"


def test_strings_are_trimmed_and_whitespace_collapsed_in_nested_values():
    messy = {"q": {"b": [" New   York ", 2.0], "a": "x\t\ny"}, "n": "caf\u0065\u0301"}
    clean = {"n": "caf\u00e9", "q": {"a": "x y", "b": ["New York", 2]}}
    assert canonical_key(messy) == canonical_key(clean)
    assert canonical_value(messy) == clean
    assert canonical_key({"Q": 1}) != canonical_key({"q": 1})  # argument names are exact


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ToolCacheError, match="not valid JSON"):
        canonical_key("{oops")
    with pytest.raises(ToolCacheError, match="must be a JSON object"):
        canonical_key("[1, 2]")
    with pytest.raises(TypeError, match="not a JSON value"):
        canonical_key({"x": object()})


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


def _rewritten(value, rng: random.Random):
    """The same value written differently: shuffled keys, ints as floats, padded strings."""
    if isinstance(value, dict):
        items = [(key, _rewritten(item, rng)) for key, item in value.items()]
        rng.shuffle(items)
        return dict(items)
    if isinstance(value, list):
        return [_rewritten(item, rng) for item in value]
    if isinstance(value, str):
        return " " + value.replace(" ", "  ") + "\n"
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value) if abs(value) < 2**53 else value
    return value


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=6), _json_values, max_size=4), st.integers(0, 2**32))
def test_canonical_key_ignores_formatting_and_is_idempotent(arguments, seed):
    key = canonical_key(arguments)
    assert canonical_key(_rewritten(arguments, random.Random(seed))) == key
    assert canonical_key(json.loads(key)) == key  # the stored key reads back as itself
    assert canonical_key(json.dumps(arguments)) == key
    # The key is plain compact JSON with sorted keys (the fast writer matches the json module).
    assert key == json.dumps(canonical_value(arguments), sort_keys=True, separators=(",", ":"))


_FLAT_VALUES = st.one_of(
    st.text(' \t\n\x0b\x0c\r\x1c\x1f\x7f\x00"\\/abc\u00e9e\u0301\u00a0\u2028\x85', max_size=12),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 2.5, 1e300, 1e-7, 1e16, True, False, None]),
    st.lists(st.integers() | st.text("a b", max_size=3), max_size=2),
)


def _reference_canonical(value):
    """The canonical value as the contract states it, written independently."""
    if isinstance(value, str):
        return " ".join(unicodedata.normalize("NFC", value).split())
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_reference_canonical(item) for item in value]
    return value  # bool, None, int, other floats


@settings(max_examples=500, deadline=None)
@given(arguments=st.dictionaries(st.text('ab\u00e9"\n', min_size=1, max_size=3), _FLAT_VALUES))
def test_canonical_arguments_equal_a_reference_written_with_the_json_module(arguments):
    canonical, key = canonical_arguments(arguments)
    reference = {name: _reference_canonical(value) for name, value in arguments.items()}
    assert key == json.dumps(reference, sort_keys=True, separators=(",", ":"))
    assert list(canonical) == list(arguments)  # names in the call's order
    for name, value in reference.items():
        assert type(canonical[name]) is type(value)
        assert canonical[name] == value or (value != value and canonical[name] != value)


# --- similarity against independent references ------------------------------------------------


def indel_ratio(a: str, b: str) -> float:
    """100 * (1 - Indel distance / (len(a) + len(b))), the Indel distance (insertions and
    deletions only) being len(a) + len(b) - 2 * LCS, from the textbook LCS table; 100 for two
    empty strings."""
    total = len(a) + len(b)
    if not total:
        return 100.0
    previous = [0] * (len(b) + 1)
    for char_a in a:
        row = [0]
        for j, char_b in enumerate(b):
            row.append(previous[j] + 1 if char_a == char_b else max(previous[j + 1], row[j]))
        previous = row
    return 100.0 * (1.0 - (total - 2 * previous[-1]) / total)


def _as_number(value) -> float | None:
    """A JSON number within float range as a float; None for anything else (an int beyond float
    range is compared as text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def reference_similarity(a, b) -> float:
    """`value_similarity` as its contract states it, for canonical values."""
    if type(a) is type(b) and a == b:
        return 100.0
    x, y = _as_number(a), _as_number(b)
    if x is not None and y is not None:
        if x == y:
            return 100.0
        if not (math.isfinite(x) and math.isfinite(y)):
            return 0.0
        return max(0.0, 100.0 * (1.0 - abs(x - y) / max(abs(x), abs(y))))
    if any(v is None or isinstance(v, bool) for v in (a, b)):
        return 0.0

    def text(value):
        return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))

    return indel_ratio(text(a), text(b))


ALPHABET = "ab c\u00e9\u00ff\u0100\u4e2d\U0001f600\x00"


@settings(max_examples=300, deadline=None)
@given(a=st.text(ALPHABET, max_size=90), b=st.text(ALPHABET, max_size=90))
def test_text_similarity_is_the_indel_ratio(a, b):
    """Strings beyond 64 characters too (rapidfuzz's bit-parallel blocks)."""
    assert value_similarity(canonical_value(a), canonical_value(b)) == pytest.approx(
        indel_ratio(canonical_value(a), canonical_value(b)), abs=1e-9
    )


def test_ratios_of_a_loop_and_of_one_cdist_are_the_indel_ratio(monkeypatch):
    rng = random.Random(0)
    for _ in range(60):
        text = "".join(rng.choices("abcxyz\u00e9\u4e2d", k=rng.choice([0, 1, 15, 64, 65, 100])))
        choices = []
        for _ in range(rng.randint(1, 30)):
            edited = list(text)
            for _ in range(rng.randint(0, 4)):
                if edited and rng.random() < 0.5:
                    del edited[rng.randrange(len(edited))]
                else:
                    edited.insert(rng.randint(0, len(edited)), rng.choice("abq\U0001f600"))
            choices.append("".join(edited))
        expected = [indel_ratio(text, choice) for choice in choices]
        for loop_ratios in (0, 10**9):  # one cdist, a fuzz.ratio loop
            monkeypatch.setattr(limits, "LOOP_RATIOS", loop_ratios)
            assert ratios(text, choices).tolist() == pytest.approx(expected, abs=1e-9)


def test_known_similarities():
    assert value_similarity("abc", "abd") == pytest.approx(100 * (1 - 2 / 6))
    assert value_similarity(3, 4) == 75.0
    assert value_similarity(-2, 2) == 0.0  # relative difference over 1: floored at 0
    assert value_similarity(0, 1e-9) == 0.0
    assert value_similarity(True, 1) == 0.0 and value_similarity(None, "null") == 0.0
    assert value_similarity("5", 5) == 100.0  # compared as text
    assert value_similarity([1, 2], [1, 3]) == pytest.approx(indel_ratio("[1,2]", "[1,3]"))
    query = {"a": "abc", "b": 1}
    assert argument_similarity(query, {"a": "abd", "b": 2}) == pytest.approx(
        (100 * (1 - 2 / 6) + 50) / 2
    )
    assert argument_similarity(query, {"a": "abc"}) == 50.0  # a missing name scores 0
    assert argument_similarity({}, {}) == 100.0


_MIXED = [
    "abc", "abd", "", "a" * 70, "5", 5, 7, 2.5, -3, 0, 1e300, float("inf"), 10**400,
    True, False, None, [1, "a"], {"k": "v"},
]  # fmt: skip


@pytest.mark.parametrize("loop_ratios", [0, 10**9])
def test_column_similarities_of_mixed_kinds_match_the_reference(monkeypatch, loop_ratios):
    """A column holding every kind of value, each query kind against all of it, by the numpy path
    (`similarities`, with a loop or one cdist) and the one-value path (`similarity`)."""
    monkeypatch.setattr(limits, "LOOP_RATIOS", loop_ratios)
    column = Column()
    for value in _MIXED:
        column.add(*index_value(canonical_value(value)))
    value_ids = np.arange(len(column.texts))
    for query in [*_MIXED, "ab", 6, 1e-300, -1e300, float("-inf"), [1]]:
        canonical = canonical_value(query)
        expected = [reference_similarity(canonical, canonical_value(v)) for v in _MIXED]
        got = column.similarities(index_value(canonical), value_ids).tolist()
        assert got == pytest.approx(expected, abs=1e-9), query
        own = column.vocabulary.get(index_value(canonical)[0])
        for value_id in value_ids.tolist():
            if value_id != own:  # `similarity` is never asked for the query's own value
                one = column.similarity(index_value(canonical), value_id)
                assert one == pytest.approx(expected[value_id], abs=1e-9), (query, value_id)
                assert one == got[value_id]
        assert [column.kinds[i] == EXACT_ONLY for i in value_ids] == [
            v is None or isinstance(v, bool) for v in _MIXED
        ]
