"""The tool cache's nearest-entry search and its indexes: lookups against a brute-force scan of
every entry, the one-edit and number neighbours against every value (their bounds included), the
proven step of the search, postings, the same hits after reopening, an index the garbage
collector does not walk, and the scoring paths (a loop over `fuzz.ratio` or one `process.cdist`;
Python or numpy sums) giving the same answers."""

import math
import random
import string

import numpy as np
import pytest
from rapidfuzz import fuzz
from rapidfuzz.distance import Levenshtein

from cacherl_jax.agent.tool_cache import (
    ToolCache,
    ToolRecord,
    argument_similarity,
    canonical_key,
    canonical_value,
    limits,
)
from cacherl_jax.agent.tool_cache.block import Block
from cacherl_jax.agent.tool_cache.column import Column
from cacherl_jax.agent.tool_cache.keys import EXACT_ONLY, TEXT, index_value, number_similarity
from cacherl_jax.agent.tool_cache.neighbours import edit_hash_array, edit_hashes

# --- nearest-entry search against brute force ---------------------------------------------------


def _random_calls(rng: random.Random, count: int) -> list[dict]:
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8))) for _ in range(60)]
    calls = []
    for _ in range(count):
        call = {
            "query": " ".join(rng.choices(words, k=rng.randint(1, 4))),
            "limit": rng.randint(0, 500),
            "price": round(rng.uniform(-50, 500), 2),
            "mode": rng.choice(["fast", "slow", "exact"]),
        }
        calls.append({k: v for k, v in call.items() if k != "price" or rng.random() < 0.7})
    return calls


def _perturb(rng: random.Random, call: dict) -> dict:
    out = dict(call)
    name = rng.choice(["query", "limit"])
    if name == "query":
        text = out["query"]
        position = rng.randrange(len(text))
        out["query"] = text[:position] + rng.choice("xyz") + text[position + 1 :]
    else:
        out["limit"] += rng.choice([-3, -1, 1, 2])
    return out


def _brute_force_best(calls: list[dict], query: dict) -> float:
    canonical = canonical_value(query)
    same_names = [canonical_value(c) for c in calls if set(c) == set(query)]
    return max(argument_similarity(canonical, call) for call in same_names)


@pytest.mark.parametrize(
    "indexed, vectorise_above, loop_ratios",
    [(False, 24, 12), (True, 10**9, 10**9), (True, 0, 12), (True, 0, 0)],
    ids=["scored-whole", "indexed", "indexed-numpy", "indexed-cdist"],
)
def test_search_finds_the_brute_force_nearest_entry(
    tmp_path, monkeypatch, indexed, vectorise_above, loop_ratios
):
    monkeypatch.setattr(limits, "LOOP_RATIOS", loop_ratios)  # fuzz.ratio loops or one cdist
    if indexed:  # force every search step, the indexes and their rebuilds on a small cache
        monkeypatch.setattr(limits, "FULL_SCORE_MAX_ENTRIES", 0)
        monkeypatch.setattr(limits, "SMALL_VOCABULARY", 8)
        monkeypatch.setattr(limits, "REBUILD_AFTER", 16)
        monkeypatch.setattr(limits, "FEW_SHARING", 2)
        monkeypatch.setattr(limits, "SHORTCUT_ENTRIES", 4)
        monkeypatch.setattr(limits, "VECTORISE_ABOVE", vectorise_above)  # Python or numpy scoring
    else:
        monkeypatch.setattr(limits, "FULL_SCORE_MAX_ENTRIES", 10**9)
    rng = random.Random(0)
    calls = _random_calls(rng, 400)
    cache = ToolCache(tmp_path / "cache.db")
    cache.record_many(
        [ToolRecord("search", call, f"result {i}") for i, call in enumerate(calls[:300])]
    )
    cache.lookup("search", _perturb(rng, calls[0]))  # builds the indexes ...
    cache.record_many(
        [ToolRecord("search", call, f"result {i}") for i, call in enumerate(calls[300:], 300)]
    )
    stored = calls  # ... which then hold 100 entries recorded after them

    found = 0
    queries = [_perturb(rng, rng.choice(stored)) for _ in range(150)]
    for query in queries:
        hit = cache.lookup("search", query)
        best = _brute_force_best(stored, query)
        assert hit.score <= best + 1e-9
        assert hit.score == pytest.approx(
            argument_similarity(canonical_value(query), hit.entry.arguments)
        )
        if canonical_key(query) in {canonical_key(call) for call in stored}:
            assert hit.tier == "exact"  # a perturbation can land on another recorded call
        else:
            threshold = cache.config.fuzzy_threshold
            assert hit.tier == ("fuzzy" if hit.score >= threshold else "best_effort")
        found += abs(hit.score - best) < 1e-9
    if indexed:  # an index search may miss the nearest entry, rarely; scored whole, never
        assert found >= 0.95 * len(queries)
    else:
        assert found == len(queries)
    unrelated = {"query": "qqqq", "limit": 10**6, "mode": "none"}
    hit = cache.lookup("search", unrelated)
    assert hit.tier == "best_effort" and hit.entry is not None
    if not indexed:
        assert hit.score == pytest.approx(_brute_force_best(stored, unrelated))


def test_edit_hashes_of_numpy_and_python_agree():
    rng = random.Random(1)
    alphabet = "ab c\u00e9\U0001f600\x00"
    texts = ["", "a", *("".join(rng.choices(alphabet, k=rng.randint(0, 12))) for _ in range(500))]
    hashes, owner = edit_hash_array(texts)
    for index, text in enumerate(texts):
        python = edit_hashes(text)
        assert sorted(hashes[owner == index].tolist()) == sorted(python)
        # Deleting character j gives the hash of the text without it.
        for j in range(len(text)):
            assert python[1 + j] == edit_hashes(text[:j] + text[j + 1 :])[0]


def _column(values):
    column = Column()
    for value in values:
        column.add(*index_value(canonical_value(value)))
    return column


@pytest.mark.parametrize("max_length", [64, 5])  # 5: longer values are left out of the index
def test_edit_neighbours_bound_every_value_they_do_not_return(monkeypatch, max_length):
    """Every value within one edit is returned, and no value left out beats the bound: checked
    against fuzz.ratio of every value, on a dense column (a 3-letter alphabet)."""
    monkeypatch.setattr(limits, "EDIT_MAX_LENGTH", max_length)
    rng = random.Random(2)
    values = {"".join(rng.choices("abc", k=rng.randint(1, 8))) for _ in range(400)}
    column = _column([*sorted(values), True, None])  # booleans, null: never text neighbours
    added = ["abcabcab", "cc", "bacab"]  # after the index is built: compared directly
    column.edit_neighbours("abc")
    for value in added:
        column.add(*index_value(value))
    for _ in range(200):
        query = "".join(rng.choices("abc", k=rng.randint(1, max_length)))
        found, bound = column.edit_neighbours(query)
        for value_id, text in enumerate(column.texts):
            if column.kinds[value_id] == EXACT_ONLY:
                assert value_id not in found
                continue
            score = fuzz.ratio(query, text)
            if value_id in found:
                assert found[value_id] == score
            else:
                assert score <= bound + 1e-9, (query, text, score, bound)
                if len(text) <= max_length and abs(len(text) - len(query)) <= 1:
                    assert Levenshtein.distance(query, text) > 1, (query, text)


def test_number_neighbours_bound_every_value_they_do_not_return():
    rng = random.Random(3)
    values = [
        0,
        -5,
        5,
        1e-9,
        *(round(rng.uniform(-1000, 1000), rng.randint(0, 3)) for _ in range(500)),
    ]
    column = _column(values)
    assert column.number_neighbours(float("inf")) is None
    for query in [0.0, -5.0, 2000.0, -2000.0, *(rng.uniform(-1100, 1100) for _ in range(100))]:
        found, bound = column.number_neighbours(query)
        for value_id, number in enumerate(column.numbers):
            similarity = number_similarity(query, number)
            if value_id in found:
                assert found[value_id] == pytest.approx(similarity)
            else:
                assert similarity <= bound


def test_a_proven_neighbour_search_finds_the_brute_force_nearest_entry(tmp_path, monkeypatch):
    """Step 2 of the search: when its best entry reaches the bound it must be the nearest."""
    monkeypatch.setattr(limits, "FULL_SCORE_MAX_ENTRIES", 0)
    rng = random.Random(4)
    calls = [{k: v for k, v in c.items() if k != "price"} for c in _random_calls(rng, 300)]
    cache = ToolCache(tmp_path / "cache.db")
    cache.record_many([ToolRecord("search", call, f"r{i}") for i, call in enumerate(calls)])
    cache.build_indexes()
    proven = 0
    for _ in range(300):
        query = canonical_value(_perturb(rng, rng.choice(calls)))
        if rng.random() < 0.3:  # both arguments changed: nothing recorded on either
            query["mode"] = rng.choice(["fast", "slow", "exact"]) + "x"
        block = cache._index[("", "search")].blocks[tuple(sorted(query))]
        values = {name: index_value(value) for name, value in sorted(query.items())}
        recorded = {
            name: block.columns[name].vocabulary[value[0]]
            for name, value in values.items()
            if value[0] in block.columns[name].vocabulary
        }
        upper, local_ids = block._neighbour_candidates(values, recorded, {})
        if len(recorded) == len(values) or not local_ids:
            continue
        known = {name: {value_id: 100.0} for name, value_id in recorded.items()}
        total, _ = block._best(values, local_ids, known)
        if total >= upper - 1e-9:
            proven += 1
            assert total / len(values) == pytest.approx(_brute_force_best(calls, query))
        hit = cache.lookup("search", query)
        assert hit.score >= total / len(values) - 1e-9
    assert proven >= 50


def test_postings_follow_entries_added_after_they_were_built(monkeypatch):
    monkeypatch.setattr(limits, "REBUILD_AFTER", 5)
    rng = random.Random(5)
    column = Column()
    held: dict[str, list[int]] = {}
    for local_id in range(60):
        value = rng.choice("abcdefg")
        column.add(value, TEXT, value, float("nan"))
        held.setdefault(value, []).append(local_id)
        if local_id in (10, 13, 40):
            column.build_postings()
        for other, ids in held.items():
            value_id = column.vocabulary[other]
            assert list(column.postings(value_id)) == ids
            assert column.count(value_id) == len(ids)


def test_huge_integer_arguments_are_compared_as_text(tmp_path):
    with ToolCache(tmp_path / "cache.db") as cache:
        cache.record("f", {"n": 10**400}, "big")
        hit = cache.lookup("f", {"n": 10**400 + 1})
    assert hit.tier == "fuzzy" and hit.result == "big"


def test_reopened_cache_gives_the_same_hits(tmp_path):
    path = tmp_path / "cache.db"
    rng = random.Random(1)
    calls = _random_calls(rng, 120)
    queries = [c for c in calls[:20]] + [_perturb(rng, c) for c in calls[20:60]]
    queries += [{"query": "zzz", "limit": 7, "mode": "x"}, {"other": 1}]
    with ToolCache(path) as first:
        first.record_many([ToolRecord("search", c, f"r{i}\n\u00e9") for i, c in enumerate(calls)])
        before = [first.lookup("search", q) for q in queries] + [first.lookup("nope", {})]
    with ToolCache(path, create=False) as second:
        after = [second.lookup("search", q) for q in queries] + [second.lookup("nope", {})]
        assert len(second) == len(calls)
    assert after == before
    assert {hit.tier for hit in after} == {"exact", "fuzzy", "best_effort"}


def test_stored_entries_and_indexed_vocabularies_leave_the_garbage_collector(tmp_path):
    """A full collection must not walk the entries: at 1M entries five lists of them made every
    one take ~0.1 s, inside whichever lookup triggered it. Stored as tuples of tuples (and each
    indexed column's values as a tuple), the collector untracks them."""
    import gc

    entries = 3 * 4096 + 7
    with ToolCache(tmp_path / "cache.db") as cache:
        cache.record_many(
            [ToolRecord("search", {"q": f"query {i}", "n": i}, f"r{i}") for i in range(entries)]
        )
        cache.lookup("search", {"q": "query 12x", "n": -5})  # builds the indexes it searches
        gc.collect()
        store = cache._entries
        assert len(store) == entries and len(store.chunks) == 3
        assert store[5] == tuple(cache._entry(5)) and store[entries - 1][4] == f"r{entries - 1}"
        assert [row[4] for row in store][4095:4097] == ["r4095", "r4096"]
        assert not any(gc.is_tracked(chunk) for chunk in store.chunks)
        assert not gc.is_tracked(store[0]) and not gc.is_tracked(store[entries - 1])
        (block,) = cache._index[("", "search")].blocks.values()
        texts = block.columns["q"].texts
        assert type(texts) is tuple and len(texts) == entries and not gc.is_tracked(texts)
        cache.record("search", {"q": "a new one", "n": -1}, "new")  # the vocabulary grows again
        assert cache.lookup("search", {"q": "a new one", "n": -1}).result == "new"
        assert cache.lookup("search", {"q": "a new on", "n": -1}).result == "new"


# --- the scoring paths agree ---------------------------------------------------------------------


def _mixed_block(rng: random.Random, entries: int) -> tuple[Block, list[dict]]:
    """A block whose columns mix every kind of value, some texts beyond EDIT_MAX_LENGTH, with
    the canonical arguments of its entries."""
    block = Block(("flag", "price", "query"))
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 6))) for _ in range(30)]
    calls = []
    for index in range(entries):
        arguments = canonical_value({
            "flag": rng.choice([True, False, None, "yes", 1]),
            "price": rng.choice([0, -0.5, 3, 1e300, 2.5, rng.uniform(-100, 100), "12"]),
            "query": " ".join(rng.choices(words, k=rng.randint(1, 3))) + "x" * rng.choice([0, 80]),
        })  # fmt: skip
        block.add(arguments, index)
        calls.append(arguments)
    return block, calls


@pytest.mark.parametrize("loop_ratios", [0, 10**9])
def test_python_and_numpy_scoring_find_the_same_best_entry(monkeypatch, loop_ratios):
    """`_best` (a Python loop with a memo of similarities) and `_best_of_many` (numpy) give the
    same entry and the same summed similarity: `argument_similarity` of the best entry times the
    number of names. What the memo learns is each value's similarity."""
    monkeypatch.setattr(limits, "LOOP_RATIOS", loop_ratios)
    monkeypatch.setattr(limits, "VECTORISE_ABOVE", 10**9)  # `_best` itself, never numpy
    rng = random.Random(2)
    block, calls = _mixed_block(rng, 300)
    queries = [
        {"flag": True, "price": 3, "query": "abc de"},
        {"flag": None, "price": 0.0, "query": "x" * 90},
        {"flag": "yes", "price": -1e308, "query": ""},
        {"flag": 1, "price": math.inf, "query": "12"},
        {"flag": "ye", "price": 2.6, "query": calls[7]["query"]},
    ]
    for arguments in queries:
        canonical = canonical_value(arguments)
        query = {name: index_value(value) for name, value in sorted(canonical.items())}
        for local_ids in [list(range(300)), [5], sorted(rng.sample(range(300), 40))]:
            known = {  # as the search seeds it: 100 for the query's own recorded values
                name: {block.columns[name].vocabulary[value[0]]: 100.0}
                for name, value in query.items()
                if value[0] in block.columns[name].vocabulary
            }
            python = block._best(query, local_ids, known)
            numpy = block._best_of_many(query, np.asarray(local_ids))
            assert python == numpy
            scores = [argument_similarity(canonical, calls[i]) for i in local_ids]
            assert python[0] / 3 == pytest.approx(max(scores), abs=1e-9)
            assert python[1] == local_ids[scores.index(max(scores))]  # the first best
            for name, memo in known.items():
                column, value = block.columns[name], query[name]
                for value_id, similarity in memo.items():
                    expected = column.similarities(value, np.array([value_id]))[0]
                    assert similarity == expected


def test_whole_searches_give_the_same_hits_by_every_scoring_path(tmp_path, monkeypatch):
    """Every search step on a small cache forced through the indexes: the same entry and the same
    score, bit for bit, whether similarities are summed in Python or numpy and texts compared by
    a `fuzz.ratio` loop or one `process.cdist`."""
    monkeypatch.setattr(limits, "FULL_SCORE_MAX_ENTRIES", 0)
    monkeypatch.setattr(limits, "SMALL_VOCABULARY", 8)
    monkeypatch.setattr(limits, "FEW_SHARING", 2)
    monkeypatch.setattr(limits, "SHORTCUT_ENTRIES", 4)
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

    answers = []
    for vectorise_above, loop_ratios in [(24, 12), (10**9, 10**9), (0, 0)]:
        monkeypatch.setattr(limits, "VECTORISE_ABOVE", vectorise_above)
        monkeypatch.setattr(limits, "LOOP_RATIOS", loop_ratios)
        with ToolCache(tmp_path / f"{vectorise_above}-{loop_ratios}.db") as cache:
            cache.record_many(records)
            hits = [cache.lookup("search", query) for query in queries]
        answers.append([(hit.tier, hit.score, hit.entry.canonical_args) for hit in hits])
    assert answers[0] == answers[1] == answers[2]
    assert {tier for tier, _, _ in answers[0]} == {"fuzzy", "best_effort"}
