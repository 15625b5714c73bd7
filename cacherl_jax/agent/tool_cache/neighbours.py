"""Indexes over one argument's distinct values that find the values near a query value without
comparing it with all of them: trigrams (`GramIndex`), one-character deletions (`EditIndex`,
with a bound on every value it does not return) and sorted numbers (`NumberIndex`).

Each is built from a column's values as they are (their texts or numbers, and kinds: see
`column.Column`), so it covers the first `size`; the column compares the values added since
directly and rebuilds the index after `limits.REBUILD_AFTER` of them.
"""

from __future__ import annotations

import array
from collections.abc import Sequence

import numpy as np

from cacherl_jax.agent.tool_cache import limits
from cacherl_jax.agent.tool_cache.keys import EXACT_ONLY, NUMBER, TEXT


# np.unique in numpy 2.4 hashes and is 10-20x slower than sorting for these sizes.
def sorted_unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values ascending, index of each one's first position in the sorted order)."""
    ordered = np.sort(values)
    first = np.empty(len(ordered), dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    return ordered[starts], starts


def unique_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unique, starts = sorted_unique(values)
    return unique, np.diff(starts, append=len(values))


def unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values, index into them of each value)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first = np.empty(len(ordered), dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    inverse = np.empty(len(values), dtype=np.intp)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse


def _kinds(kinds: bytearray) -> np.ndarray:
    return np.frombuffer(kinds, dtype=np.uint8).copy()  # a copy: the column may grow


# --- trigrams -----------------------------------------------------------------------------------


def _gram_codes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Character trigrams of each text (padded with \\x02 and \\x03 so short texts have some),
    as uint64 codes, with the index of the text each one came from."""
    padded = [f"\x02{text}\x03" for text in texts]
    lengths = np.fromiter(map(len, padded), dtype=np.int64, count=len(padded))
    codepoints = np.frombuffer("".join(padded).encode("utf-32-le"), dtype=np.uint32)
    codepoints = codepoints.astype(np.uint64)
    owner = np.repeat(np.arange(len(padded)), lengths)
    inside = owner[:-2] == owner[2:]  # windows that do not straddle two texts
    codes = (codepoints[:-2] << np.uint64(42)) | (codepoints[1:-1] << np.uint64(21))
    codes |= codepoints[2:]
    return codes[inside], owner[:-2][inside]


class GramIndex:
    """Trigram -> ids of the text values holding it (CSR), over a column's first `size` values."""

    def __init__(self, texts: Sequence[str], kinds: bytearray):
        kinds = _kinds(kinds)
        self.size = len(kinds)
        value_ids = np.flatnonzero(kinds == TEXT)
        codes, owner = _gram_codes([texts[i] for i in value_ids])
        order = np.argsort(codes, kind="stable")
        self.value_ids = value_ids[owner[order]].astype(np.int32)
        self.codes, starts = sorted_unique(codes[order])
        self.starts = np.append(starts, len(order))

    def candidates(self, text: str, limit: int) -> np.ndarray:
        """Ids of up to `limit` values sharing the most trigrams with `text`, counting only the
        rarest trigrams (up to GRAM_POSTINGS_BUDGET postings): common ones say little."""
        slots = self._slots(text)
        if not len(slots):
            return np.zeros(0, dtype=np.int32)
        starts, ends = self.starts[slots], self.starts[slots + 1]
        order = np.argsort(ends - starts)
        budget = limits.GRAM_POSTINGS_BUDGET
        taken = np.searchsorted(np.cumsum((ends - starts)[order]), budget, "right")
        order = order[: max(1, int(taken))]
        parts = [
            self.value_ids[start:end]
            for start, end in zip(starts[order].tolist(), ends[order].tolist(), strict=True)
        ]
        value_ids, counts = unique_counts(np.concatenate(parts))
        if len(value_ids) > limit:
            value_ids = value_ids[np.argpartition(-counts, limit)[:limit]]
        return value_ids

    def _slots(self, text: str) -> np.ndarray:
        """Where the trigrams of `text` that some value holds sit in `codes`."""
        padded = f"\x02{text}\x03"
        grams = {
            (ord(a) << 42) | (ord(b) << 21) | ord(c)
            for a, b, c in zip(padded, padded[1:], padded[2:], strict=False)
        }
        query_codes = np.array(sorted(grams), dtype=np.uint64)
        slots = np.searchsorted(self.codes, query_codes)
        slots[slots == len(self.codes)] = 0
        return slots[self.codes[slots] == query_codes]


# --- one-character deletions --------------------------------------------------------------------

# Polynomial string hashes mod 2**64 (each character as its code point + 1, the length mixed
# in), which a one-character deletion updates in O(1), kept to their top 32 bits (a rare collision
# only adds a value to compare): `edit_hash_array` computes them for many texts with numpy,
# `edit_hashes` for one query in plain Python; they agree exactly. The tables cover texts up to
# EDIT_MAX_LENGTH as it is at import (a test may lower it later, never raise it).
_MASK = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
_BASE = 0x9E3779B97F4A7C15
_BASE_INVERSE = pow(_BASE, -1, 1 << 64)
_LENGTH_MIX = 0xD6E8FEB86659FD93
_BASE_POWERS = [pow(_BASE, k, 1 << 64) for k in range(limits.EDIT_MAX_LENGTH + 1)]
_FACTOR = 1 - _BASE
# _DELETION_POWERS[n][j]: the weight of character j of an n-character text, B^(n-1-j).
_DELETION_POWERS = [_BASE_POWERS[:n][::-1] for n in range(limits.EDIT_MAX_LENGTH + 1)]


def edit_hashes(text: str) -> list[int]:
    """The hash of `text` (at most EDIT_MAX_LENGTH characters) followed by the hash of each of
    its one-character deletions."""
    n = len(text)
    codes = [ord(char) + 1 for char in text]
    prefixes, prefix = [], 0
    for code in codes:
        prefixes.append(prefix)
        prefix = (prefix * _BASE + code) & _MASK
    hashes = [((prefix + n * _LENGTH_MIX) >> 32) & _MASK32]
    shrunk = prefix + (n - 1) * _LENGTH_MIX
    powers = _DELETION_POWERS[n]
    for j, code in enumerate(codes):
        # Deleting character j: the hash less its term and with the prefix one power lower.
        hashes.append(((shrunk + (prefixes[j] * _FACTOR - code) * powers[j]) >> 32) & _MASK32)
    return hashes


def edit_hash_array(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """`edit_hashes` of every text (each at most EDIT_MAX_LENGTH characters) as one uint32 array,
    with the index of the text each hash belongs to."""
    u64 = np.uint64
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32).astype(u64) + u64(1)
    longest = int(lengths.max(initial=0))
    powers = np.ones(longest + 1, dtype=u64)
    inverse_powers = np.ones(longest + 1, dtype=u64)
    if longest:
        powers[1:] = np.cumprod(np.full(longest, _BASE, dtype=u64))
        inverse_powers[1:] = np.cumprod(np.full(longest, _BASE_INVERSE, dtype=u64))
    owner = np.repeat(np.arange(len(texts)), lengths)
    starts = np.cumsum(lengths) - lengths
    position = np.arange(len(codes)) - starts[owner]  # within its text
    # prefix_j = sum_{i<j} c_i B^(j-1-i) = B^(j-1) * sum_{i<j} c_i B^-i, by one running sum.
    weighted = codes * inverse_powers[position]
    running = np.concatenate([np.zeros(1, dtype=u64), np.cumsum(weighted, dtype=u64)])
    before = running[starts]
    prefix = (running[:-1] - before[owner]) * powers[position] * u64(_BASE_INVERSE)
    full = (running[starts + lengths] - before) * powers[lengths] * u64(_BASE_INVERSE)
    text_lengths = lengths.astype(u64)
    full_hashes = full + text_lengths * u64(_LENGTH_MIX)
    shrunk = full[owner] + (text_lengths[owner] - u64(1)) * u64(_LENGTH_MIX)
    tail_powers = powers[lengths[owner] - 1 - position]
    deletions = shrunk + (prefix * u64((1 - _BASE) & _MASK) - codes) * tail_powers
    hashes = (np.concatenate([full_hashes, deletions]) >> u64(32)).astype(np.uint32)
    return hashes, np.concatenate([np.arange(len(texts)), owner])


def _min_indels(query_lengths: np.ndarray, lengths: np.ndarray, indexed: np.ndarray) -> np.ndarray:
    """The smallest Indel distance between a query text and a value of each length that an
    `EditIndex` search did not find (`indexed`: values of that length are in the index), for each
    query length (rows) and value length (columns)."""
    gap = np.abs(query_lengths[:, None] - lengths[None, :])
    # Found: all values within 1, and those of the query's length within 2.
    in_index = np.where(gap < 3, np.array([4, 3, 2])[np.minimum(gap, 2)], gap)
    return np.where(indexed[None, :], in_index, np.where(gap == 0, 2, gap))


class EditIndex:
    """The `edit_hashes` of a column's text values (up to EDIT_MAX_LENGTH characters), sorted,
    over its first `size` values. A query's hashes meet a value's when one is the other less a
    character, or both less one are equal: the search finds every value within Indel distance 1
    of the query and every value of its length within 2 (a substitution, an adjacent swap).
    `bound` is then the highest `fuzz.ratio` any value it did not find can have, from the lengths
    of the values (`fuzz.ratio` is 100 * (1 - Indel distance / sum of the lengths))."""

    def __init__(self, texts: Sequence[str], kinds: bytearray):
        kinds = _kinds(kinds)
        self.size = len(kinds)
        value_ids = np.flatnonzero(kinds != EXACT_ONLY)
        texts = [texts[i] for i in value_ids.tolist()]
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        short = lengths <= limits.EDIT_MAX_LENGTH
        hashes, owner = edit_hash_array([text for text, s in zip(texts, short, strict=True) if s])
        order = np.argsort(hashes)
        self._store(hashes[order], value_ids[short][owner[order]])
        self.bounds = self._bounds(lengths[short], lengths[~short])

    def _store(self, hashes: np.ndarray, value_ids: np.ndarray) -> None:
        """Keeps the sorted hashes in 2**bits buckets by their top bits (one to two per bucket):
        a lookup reads one bucket rather than binary-searching the whole array. Python arrays,
        not numpy: the lookup reads single items, which numpy makes slow."""
        self.bits = min(31, max(1, len(hashes).bit_length() - 1))
        top = (hashes >> np.uint32(32 - self.bits)).astype(np.int64)
        starts = np.searchsorted(top, np.arange((1 << self.bits) + 1))
        offsets = "i" if len(hashes) < 2**31 else "q"
        self.starts = array.array(offsets, starts.astype(offsets).tobytes())
        self.hashes = array.array("I", hashes.tobytes())
        self.value_ids = array.array("i", value_ids.astype(np.int32).tobytes())

    @staticmethod
    def _bounds(indexed_lengths: np.ndarray, other_lengths: np.ndarray) -> list[float]:
        """bounds[n]: the highest ratio a value the search misses can have, for an n-character
        query (computed for every n once: lazily it cost more than the search itself)."""
        indexed_lengths, other_lengths = np.unique(indexed_lengths), np.unique(other_lengths)
        value_lengths = np.concatenate([indexed_lengths, other_lengths])
        indexed = np.arange(len(value_lengths)) < len(indexed_lengths)
        query_lengths = np.arange(limits.EDIT_MAX_LENGTH + 1)
        totals = query_lengths[:, None] + value_lengths[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = 100.0 * (1.0 - _min_indels(query_lengths, value_lengths, indexed) / totals)
        return np.where(totals > 0, ratios, 0.0).max(axis=1, initial=0.0).tolist()

    def neighbours(self, text: str) -> set[int]:
        """Ids of the values the hashes of `text` meet (a rare collision adds a stray one)."""
        hashes, value_ids, starts, shift = self.hashes, self.value_ids, self.starts, 32 - self.bits
        found: set[int] = set()
        for code in edit_hashes(text):
            bucket = code >> shift
            for slot in range(starts[bucket], starts[bucket + 1]):
                if hashes[slot] == code:
                    found.add(value_ids[slot])
        return found

    def bound(self, query_length: int) -> float:
        return self.bounds[query_length]


# --- numbers ------------------------------------------------------------------------------------


class NumberIndex:
    """A column's numbers sorted, over its first `size` values: similarity by relative difference
    falls monotonically on each side of a number, so the nearest values sit next to it."""

    def __init__(self, numbers: array.array, kinds: bytearray):
        kinds = _kinds(kinds)
        self.size = len(kinds)
        value_ids = np.flatnonzero(kinds == NUMBER)
        numbers = np.frombuffer(numbers, dtype=np.float64)[value_ids]
        order = np.argsort(numbers, kind="stable")
        self.value_ids = value_ids[order]
        self.numbers = numbers[order]

    def candidates(self, number: float, limit: int) -> np.ndarray:
        """Ids of the `limit` values on each side of `number` in sorted order."""
        slot = int(np.searchsorted(self.numbers, number))
        return self.value_ids[max(0, slot - limit) : slot + limit]
