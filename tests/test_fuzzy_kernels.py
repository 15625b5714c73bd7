"""The tool cache's C inner loops (`cacherl_jax/agent/_fuzzy_kernels.c`) against the Python code
they replace: rapidfuzz's ratio bit for bit, the edit hashes, the neighbour search (dict order
included), the scoring loop with its memo, and whole cache searches with and without them."""

import math
import random
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rapidfuzz import fuzz

from cacherl_jax.agent import tool_cache as tc
from cacherl_jax.agent.tool_cache import ToolCache, ToolRecord, canonical_value

kernels = tc._fuzzy_kernels


def test_the_kernels_are_built_by_the_install():
    """`make test` installs the project with its C extension; a failed build would otherwise
    pass every other test on the Python fallback."""
    assert tc.COMPILED and kernels is not None
    # The edit search hands the kernels texts up to EDIT_MAX_LENGTH characters.
    assert tc.EDIT_MAX_LENGTH <= kernels.MAX_TEXT


ALPHABET = "ab c\u00e9\u00ff\u0100\u4e2d\U0001f600\x00"


@settings(max_examples=400, deadline=None)
@given(a=st.text(ALPHABET, max_size=90), b=st.text(ALPHABET, max_size=90))
def test_indel_ratio_is_rapidfuzz_ratio_bit_for_bit(a, b):
    assert kernels.indel_ratio(a, b) == fuzz.ratio(a, b)


def test_indel_ratio_on_near_strings_and_at_the_word_boundary():
    rng = random.Random(0)
    for _ in range(3000):
        length = rng.choice([0, 1, 2, 15, 16, 63, 64, 65, 100, 200])
        a = "".join(rng.choices("abcxyz\u00e9\u4e2d", k=length))
        b = list(a)
        for _ in range(rng.randint(0, 3)):
            if b and rng.random() < 0.5:
                del b[rng.randrange(len(b))]
            else:
                b.insert(rng.randint(0, len(b)), rng.choice("abq\U0001f600"))
        b = "".join(b)
        assert kernels.indel_ratio(a, b) == fuzz.ratio(a, b), (a, b)
        assert kernels.indel_ratio(b, a) == fuzz.ratio(b, a), (a, b)


@settings(max_examples=300, deadline=None)
@given(text=st.text(ALPHABET, max_size=tc.EDIT_MAX_LENGTH))
def test_edit_hashes_match_the_python_reference(text):
    assert kernels.edit_hashes(text) == tc._edit_hashes(text)


def test_bad_arguments_are_python_errors_not_crashes():
    with pytest.raises(ValueError, match="at most 64"):
        kernels.edit_hashes("x" * 65)
    with pytest.raises(TypeError):
        kernels.indel_ratio("a", 1)
    with pytest.raises(TypeError):
        kernels.best_entry([0], "not a list")
    with pytest.raises(TypeError, match="each column"):
        kernels.best_entry([0], [("too", "short")])


def _dense_column(rng: random.Random, added: list) -> tc._Column:
    """Text values over a 3-letter alphabet (so a query has many neighbours), numbers, booleans
    and null, an index built, then `added` values it does not hold."""
    values = {"".join(rng.choices("abc", k=rng.randint(1, 9))) for _ in range(600)}
    column = tc._Column()
    for value in [*sorted(values), 12, 2.5, True, None, "a" * 70]:
        column.add(*tc._value(canonical_value(value)))
    column.edit_neighbours("abc")  # builds the index
    for value in added:
        column.add(*tc._value(canonical_value(value)))
    return column


@pytest.mark.parametrize("added", [[], ["abcabcab", "cc", False, 7, "bacab"]])
def test_edit_neighbours_equal_the_python_search_in_order(monkeypatch, added):
    rng = random.Random(1)
    column = _dense_column(rng, added)
    for _ in range(300):
        query = "".join(rng.choices("abcd", k=rng.randint(1, 12)))
        compiled = column.edit_neighbours(query)
        monkeypatch.setattr(tc, "COMPILED", False)
        python = column.edit_neighbours(query)
        monkeypatch.setattr(tc, "COMPILED", True)
        assert list(compiled[0].items()) == list(python[0].items())
        assert compiled[1] == python[1]


def _block(rng: random.Random, entries: int) -> tc._Block:
    names = ("flag", "price", "query")
    block = tc._Block(names)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 6))) for _ in range(30)]
    for index in range(entries):
        arguments = {
            "flag": rng.choice([True, False, None, "yes", 1]),
            "price": rng.choice([0, -0.5, 3, 1e300, 2.5, rng.uniform(-100, 100), "12"]),
            "query": " ".join(rng.choices(words, k=rng.randint(1, 3))) + "x" * rng.choice([0, 80]),
        }
        block.add(canonical_value(arguments), index)
    return block


def test_best_entry_equals_the_python_loop_and_fills_the_memo_alike(monkeypatch):
    rng = random.Random(2)
    block = _block(rng, 300)
    monkeypatch.setattr(tc, "VECTORISE_ABOVE", 10**9)  # `_best` itself, never numpy
    queries = [
        {"flag": True, "price": 3, "query": "abc de"},
        {"flag": None, "price": 0.0, "query": "x" * 90},
        {"flag": "yes", "price": -1e308, "query": ""},
        {"flag": 1, "price": math.inf, "query": "12"},
    ]
    for arguments in queries:
        query = {name: tc._value(canonical_value(value)) for name, value in arguments.items()}
        for local_ids in [range(300), [], [5], sorted(rng.sample(range(300), 40))]:
            seed = {"flag": {block.columns["flag"].entry_value_ids[0]: 100.0}}
            compiled_memo = {name: dict(memo) for name, memo in seed.items()}
            python_memo = {name: dict(memo) for name, memo in seed.items()}
            compiled = block._best(query, local_ids, compiled_memo)
            monkeypatch.setattr(tc, "COMPILED", False)
            python = block._best(query, local_ids, python_memo)
            monkeypatch.setattr(tc, "COMPILED", True)
            assert compiled == python
            assert compiled_memo == python_memo


def test_whole_searches_give_the_same_hits_compiled_or_not(tmp_path, monkeypatch):
    """Every search step on a small cache forced through the indexes: the same entry and the
    same score (bit for bit) for each lookup."""
    monkeypatch.setattr(tc, "FULL_SCORE_MAX_ENTRIES", 0)
    monkeypatch.setattr(tc, "SMALL_VOCABULARY", 8)
    monkeypatch.setattr(tc, "FEW_SHARING", 2)
    monkeypatch.setattr(tc, "SHORTCUT_ENTRIES", 4)
    rng = random.Random(3)
    words = ["".join(rng.choices("abcdef", k=rng.randint(3, 7))) for _ in range(40)]

    def call():
        return {
            "query": " ".join(rng.choices(words, k=rng.randint(1, 3))),
            "limit": rng.randint(0, 300),
            "mode": rng.choice(["fast", "slow", True]),
        }

    records = [ToolRecord("search", call(), f"result {i}") for i in range(500)]
    queries = []
    for _ in range(200):
        query = dict(rng.choice(records).arguments)
        if rng.random() < 0.5:
            text = query["query"]
            position = rng.randrange(len(text))
            query["query"] = text[:position] + rng.choice("xyz") + text[position + 1 :]
        else:
            query["limit"] += rng.choice([-2, 1, 40])
        queries.append(query)
    queries += [call() for _ in range(50)]

    answers = {}
    for compiled in (True, False):
        monkeypatch.setattr(tc, "COMPILED", compiled)
        with ToolCache(tmp_path / f"{compiled}.db") as cache:
            cache.record_many(records)
            answers[compiled] = [cache.lookup("search", query) for query in queries]
    for with_c, without in zip(answers[True], answers[False], strict=True):
        assert (with_c.tier, with_c.score, with_c.entry.canonical_args) == (
            without.tier,
            without.score,
            without.entry.canonical_args,
        )


_FLAT_VALUES = st.one_of(
    st.text(' \t\n\x0b\x0c\r\x1c\x1f\x7f\x00"\\/abc\u00e9e\u0301\u00a0\u2028\x85', max_size=12),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 2.5, 1e300, 1e-7, 1e16, True, False, None]),
    st.lists(st.integers(), max_size=2),  # nested: left to the Python code
)


@settings(max_examples=500, deadline=None)
@given(arguments=st.dictionaries(st.text('ab\u00e9"\n', min_size=1, max_size=3), _FLAT_VALUES))
def test_canonical_arguments_equal_the_python_ones(arguments):
    compiled = tc.canonical_arguments(arguments)
    flat = kernels.canonical_arguments(arguments, tc.normalise_string, tc._escape)
    tc.COMPILED = False
    try:
        python = tc.canonical_arguments(arguments)
    finally:
        tc.COMPILED = True
    assert compiled[1] == python[1]
    assert list(compiled[0]) == list(python[0])  # names in the call's order
    for name, value in python[0].items():
        assert type(compiled[0][name]) is type(value)
        assert compiled[0][name] == value or (value != value and compiled[0][name] != value)
    # The C path answers every flat call and leaves nested values and inf/nan to Python.
    nested = any(
        isinstance(v, list) or (isinstance(v, float) and not math.isfinite(v))
        for v in arguments.values()
    )
    assert (flat is None) == nested
