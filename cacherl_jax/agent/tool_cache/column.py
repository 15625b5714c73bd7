"""One argument of a block of entries (`block.Block`): its distinct values, which entries hold
each one ("postings"), and the values nearest a query value, scored with rapidfuzz."""

from __future__ import annotations

import array
import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
from rapidfuzz import fuzz, process

from cacherl_jax.agent.tool_cache import limits
from cacherl_jax.agent.tool_cache.keys import (
    EXACT_ONLY,
    NUMBER,
    TEXT,
    IndexValue,
    number_similarities,
    number_similarity,
    ratios,
)
from cacherl_jax.agent.tool_cache.neighbours import EditIndex, GramIndex, NumberIndex

ONLY_TEXT, ONLY_NUMBER = 1 << TEXT, 1 << NUMBER  # `Column.kinds_seen` of one kind only
_NO_IDS = array.array("i")


class Column:
    """One argument of a block: its distinct values (ids in order of first appearance), each
    entry's value id, and the entries holding each value ("postings", built on first use as one
    array grouped by value id, plus lists for the entries added since)."""

    __slots__ = (
        "edits",
        "entry_value_ids",
        "grams",
        "kinds",
        "kinds_seen",
        "number_index",
        "numbers",
        "post_ids",
        "post_starts",
        "post_tail",
        "post_tail_size",
        "texts",
        "vocabulary",
    )

    def __init__(self):
        self.vocabulary: dict[Any, int] = {}
        # A list while values are added, a tuple from the next index build (postings, edit
        # index) on: the garbage collector untracks tuples of strings, so full collections skip
        # the vocabulary. Growing it again costs one copy per rebuild cycle.
        self.texts: list[str] | tuple[str, ...] = []
        self.kinds = bytearray()
        self.kinds_seen = 0  # bit set of the kinds of the values
        self.numbers = array.array("d")
        self.entry_value_ids = array.array("i")
        # Postings: local ids grouped by value id (ascending within one) and where each value's
        # group starts, for the entries there were when built; later entries in `post_tail`.
        self.post_ids: array.array | None = None
        self.post_starts = array.array("q")
        self.post_tail: dict[int, list[int]] = {}
        self.post_tail_size = 0
        self.grams: GramIndex | None = None
        self.number_index: NumberIndex | None = None
        self.edits: EditIndex | None = None

    # -- values and postings ---------------------------------------------------------------------

    def add(self, key: Any, kind: int, text: str, number: float) -> None:
        """Appends the next entry's value (an `index_value`)."""
        value_id = self.vocabulary.get(key)
        if value_id is None:
            value_id = self._new_value(key, kind, text, number)
        if self.post_ids is not None:
            local_id = len(self.entry_value_ids)
            tail = self.post_tail.get(value_id)
            if tail is None:
                self.post_tail[value_id] = [local_id]
            else:
                tail.append(local_id)
            self.post_tail_size += 1
        self.entry_value_ids.append(value_id)

    def _new_value(self, key: Any, kind: int, text: str, number: float) -> int:
        value_id = len(self.texts)
        self.vocabulary[key] = value_id
        if type(self.texts) is tuple:  # first value since the last build: O(n), once
            self.texts = list(self.texts)
        self.texts.append(text)
        self.kinds.append(kind)
        self.kinds_seen |= 1 << kind
        self.numbers.append(number)
        return value_id

    def build_postings(self) -> None:
        value_ids = np.frombuffer(self.entry_value_ids, dtype=np.int32)
        order = np.argsort(value_ids, kind="stable").astype(np.int32)
        starts = np.zeros(len(self.texts) + 1, dtype=np.int64)
        np.cumsum(np.bincount(value_ids, minlength=len(self.texts)), out=starts[1:])
        del value_ids  # release the buffer so `add` can grow the array
        self.post_ids = array.array("i", order.tobytes())
        self.post_starts = array.array("q", starts.tobytes())
        self.texts = tuple(self.texts)  # untracked by the garbage collector (see __init__)
        self.post_tail, self.post_tail_size = {}, 0

    def build_indexes(self) -> None:
        """Builds the postings and every value index the column's kinds use."""
        self.build_postings()
        if NUMBER in self.kinds:
            self.number_index = NumberIndex(self.numbers, self.kinds)
        if self.kinds_seen & ONLY_TEXT:
            self.edits = EditIndex(self.texts, self.kinds)
            if len(self.texts) > limits.SMALL_VOCABULARY:
                self.grams = GramIndex(self.texts, self.kinds)

    def _ready_postings(self) -> None:
        """Builds the postings on first use, and again once many entries were added since."""
        if self.post_ids is None or self.post_tail_size > limits.REBUILD_AFTER:
            self.build_postings()

    def count(self, value_id: int) -> int:
        """How many entries hold the value."""
        self._ready_postings()
        starts = self.post_starts
        count = starts[value_id + 1] - starts[value_id] if value_id + 1 < len(starts) else 0
        if self.post_tail_size:
            tail = self.post_tail.get(value_id)
            if tail:
                count += len(tail)
        return count

    def postings(self, value_id: int) -> array.array:
        """Local ids of the entries holding the value, ascending."""
        self._ready_postings()
        starts = self.post_starts
        if value_id + 1 < len(starts):
            ids = self.post_ids[starts[value_id] : starts[value_id + 1]]
        else:
            ids = _NO_IDS
        tail = self.post_tail.get(value_id)
        return ids + array.array("i", tail) if tail else ids

    # -- similarity ------------------------------------------------------------------------------

    def similarity(self, query: IndexValue, value_id: int) -> float:
        """`value_similarity(query, value)` for one value id that is not the query's own value
        (that one scores 100: callers know it), as `similarities` computes it."""
        _, kind, text, number = query
        value_kind = self.kinds[value_id]
        if kind == NUMBER and value_kind == NUMBER:
            return number_similarity(number, self.numbers[value_id])
        if kind == EXACT_ONLY or value_kind == EXACT_ONLY:
            return 0.0
        return fuzz.ratio(text, self.texts[value_id])

    def similarities(self, query: IndexValue, value_ids: np.ndarray) -> np.ndarray:
        """`value_similarity(query, value)` for each value id (repeats allowed)."""
        key, kind, text, number = query
        if not len(value_ids):
            return np.zeros(0)
        if kind == TEXT and self.kinds_seen == ONLY_TEXT:  # the usual cases, without masks
            similarity = ratios(text, self._texts(value_ids))
        elif kind == NUMBER and self.kinds_seen == ONLY_NUMBER:
            similarity = number_similarities(number, self._numbers(value_ids))
        else:
            similarity = self._mixed_similarities(query, value_ids)
        query_id = self.vocabulary.get(key)
        if query_id is not None:
            similarity[value_ids == query_id] = 100.0
        return similarity

    def _mixed_similarities(self, query: IndexValue, value_ids: np.ndarray) -> np.ndarray:
        """`similarities` in a column holding several kinds of values."""
        _, kind, text, number = query
        similarity = np.zeros(len(value_ids))
        if kind == EXACT_ONLY:
            return similarity
        kinds = np.frombuffer(self.kinds, dtype=np.uint8)[value_ids]
        as_text = kinds == TEXT
        if kind == NUMBER:
            numeric = kinds == NUMBER
            similarity[numeric] = number_similarities(number, self._numbers(value_ids[numeric]))
        else:
            as_text |= kinds == NUMBER
        positions = np.flatnonzero(as_text)
        if len(positions):
            similarity[positions] = ratios(text, self._texts(value_ids[positions]))
        return similarity

    def _texts(self, value_ids: np.ndarray) -> Sequence[str]:
        if len(value_ids) == 1:
            return [self.texts[int(value_ids[0])]]
        return operator.itemgetter(*value_ids.tolist())(self.texts)

    def _numbers(self, value_ids: np.ndarray) -> np.ndarray:
        return np.frombuffer(self.numbers, dtype=np.float64)[value_ids]

    # -- near values -----------------------------------------------------------------------------

    def _added_since(self, built: int, kind: int) -> np.ndarray:
        """Ids of the values added since an index over the first `built` was made that a query
        of `kind` is compared with."""
        kinds = np.frombuffer(self.kinds, dtype=np.uint8)[built:]
        comparable = kinds == NUMBER if kind == NUMBER else kinds != EXACT_ONLY
        del kinds  # release the buffer so `add` can grow the bytearray
        return built + np.flatnonzero(comparable)

    def _number_index(self) -> NumberIndex:
        """The number index, built on first use and rebuilt after REBUILD_AFTER new values."""
        index = self.number_index
        if index is None or len(self.texts) - index.size > limits.REBUILD_AFTER:
            index = self.number_index = NumberIndex(self.numbers, self.kinds)
        return index

    def near(self, query: IndexValue, limit: int) -> dict[int, float]:
        """Up to `limit` values most similar to `query`, {value id: similarity}: all values
        compared for a small vocabulary, else the candidates of the trigram or number index plus
        the values added since it was built (rebuilt after REBUILD_AFTER of those)."""
        _, kind, text, number = query
        size = len(self.texts)
        if kind == EXACT_ONLY or not size:
            return {}
        if kind == NUMBER:
            index = self._number_index()
            built, found = index.size, index.candidates(number, limit)
        elif size <= limits.SMALL_VOCABULARY:  # one rapidfuzz pass beats the index's numpy calls
            matches = process.extract(text, self.texts, scorer=fuzz.ratio, limit=limit)
            return {i: score for _, score, i in matches if self.kinds[i] != EXACT_ONLY}
        else:
            if self.grams is None or size - self.grams.size > limits.REBUILD_AFTER:
                self.grams = GramIndex(self.texts, self.kinds)
            built, found = self.grams.size, self.grams.candidates(text, 2 * limit)
        if built < size:  # values added since the index was built
            found = np.concatenate([found, self._added_since(built, kind)])
        if not len(found):
            return {}
        similarity = self.similarities(query, found)
        if len(found) > limit:
            best = np.argpartition(-similarity, limit)[:limit]
            found, similarity = found[best], similarity[best]
        return dict(zip(found.tolist(), similarity.tolist(), strict=True))

    def number_neighbours(self, number: float) -> tuple[dict[int, float], float] | None:
        """`edit_neighbours` for a number in a column of numbers: the NEAR_VALUES nearest values
        on each side in sorted order, the bound being the better of the next value on either side
        (similarity falls monotonically away from the number). None for a number that is not
        finite."""
        if not math.isfinite(number):
            return None
        index = self._number_index()
        numbers, near = index.numbers, limits.NEAR_VALUES
        slot = int(np.searchsorted(numbers, number))
        start, stop = max(0, slot - near), slot + near
        bound = 0.0
        if start > 0:
            bound = number_similarity(number, float(numbers[start - 1]))
        if stop < len(numbers):
            bound = max(bound, number_similarity(number, float(numbers[stop])))
        found = index.value_ids[start:stop]
        if index.size < len(self.texts):
            found = np.concatenate([found, self._added_since(index.size, NUMBER)])
        similarity = number_similarities(number, self._numbers(found))
        return dict(zip(found.tolist(), similarity.tolist(), strict=True)), bound

    def edit_neighbours(self, text: str) -> tuple[dict[int, float], float]:
        """({value id: similarity} of the values within one edit of `text`, ids ascending, bound):
        no other value of the column is more similar than `bound` (see `EditIndex`). The values
        added since the index was built are all compared."""
        size = len(self.texts)
        if self.edits is None or size - self.edits.size > limits.REBUILD_AFTER:
            self.edits = EditIndex(self.texts, self.kinds)
            self.texts = tuple(self.texts)  # as in build_postings
        edits = self.edits
        found = edits.neighbours(text)
        if edits.size < size:
            found.update(self._added_since(edits.size, TEXT).tolist())
        kinds, texts = self.kinds, self.texts
        value_ids = [value_id for value_id in sorted(found) if kinds[value_id] != EXACT_ONLY]
        similarity = ratios(text, [texts[value_id] for value_id in value_ids]).tolist()
        return dict(zip(value_ids, similarity, strict=True)), edits.bound(len(text))
