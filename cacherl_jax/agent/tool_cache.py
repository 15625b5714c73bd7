"""The three-tier tool cache: recorded (tool, arguments) -> result pairs that answer rollouts' calls.

Every `ToolCache.lookup` returns a `CacheHit` (result, tier, score, entry):

- **exact**: an entry of the same tool whose arguments are canonically equal (`canonical_key`:
  key order, 1 == 1.0, whitespace runs in strings collapsed and trimmed, Unicode NFC).
- **fuzzy**: the most similar entry of the same tool with the *same argument names*, scoring at
  least `fuzzy_threshold` (`argument_similarity`: the mean over arguments of a 0-100 per-value
  similarity -- rapidfuzz's `ratio` for strings, relative difference for numbers).
- **best_effort**: the nearest entry of the tool found below the threshold (or with other argument
  names, which are never fuzzy), or -- for a tool never recorded -- a JSON "no recorded result"
  response shaped by the tool's schema when one is known (`entry` is then None).

Scores are on rapidfuzz's 0-100 scale: 100 for exact hits, 0 for a tool never seen.

Entries live in SQLite (WAL, so several processes read and write one file at once; a unique
(scope, tool, arguments) key with INSERT OR IGNORE makes the first recorded result win) and in an
in-memory index built from it: a dict per tool for exact keys (an exact lookup is the canonical
key and one dict lookup), and for fuzzy search per (tool, argument names) "blocks" holding, per
argument, its distinct values with the entries that hold them (one array grouped by value), an
index of the hashes of every text value and of its one-character deletions (`_EditIndex`: finds
all values within one edit of a text), a trigram index over text values and a sorted array of
numbers. A fuzzy lookup scores only entries that share the query's rare values or hold a near
value, so its cost follows the number of near values, not the number of entries of the tool; for
a call with one argument changed by an edit, or a number, it usually proves the entry it finds
the nearest (see `_Block`).

Scopes: each entry is stored with a scope string ("" when none is given). With
`scope_mode="global"` every lookup sees every entry; with `"scoped"` a lookup in scope S sees only
entries recorded in S (use one scope per task or environment snapshot when results depend on
state). Entries written by other processes become visible after `refresh()`.

A `ToolCache` is safe to share between threads (one lock) but not across `fork`: open one per
process.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import json
import math
import operator
import os
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
from rapidfuzz import fuzz, process

from cacherl_jax.errors import UserError

try:  # the C inner loops (_fuzzy_kernels.c), built at install where a compiler is found
    from cacherl_jax.agent import _fuzzy_kernels
except ImportError:  # the same search in Python
    _fuzzy_kernels = None

if TYPE_CHECKING:
    from cacherl_jax.chat.trajectory import Trajectory

SCHEMA_VERSION = 1
FORMAT_NAME = "cacherl_jax.tool_cache"
SQLITE_HEADER = b"SQLite format 3\x00"

Tier = Literal["exact", "fuzzy", "best_effort"]
TIERS: tuple[Tier, ...] = ("exact", "fuzzy", "best_effort")
SCOPE_MODES = ("global", "scoped")

# Search sizes of the fuzzy index. Blocks this small are scored whole (exact nearest entry).
FULL_SCORE_MAX_ENTRIES = 32
# String vocabularies up to this size are compared whole; larger ones go through a trigram index
# and an index of one-character deletions (`_EditIndex`).
SMALL_VOCABULARY = 1024
EDIT_MAX_LENGTH = 64  # longer strings are left out of the deletion index (it grows with length)
NEAR_VALUES = 8  # nearest distinct values kept per argument
POSTINGS_BUDGET = 1024  # entries gathered as candidates per lookup, rarest values first
GRAM_POSTINGS_BUDGET = 8192  # trigram postings read per string value, rarest trigrams first
RESCORE_CANDIDATES = 64  # candidates scored exactly after ranking by a partial score
FEW_SHARING = 4  # entries sharing the query's rarest recorded value, scored first
SHORTCUT_ENTRIES = 512  # entries sharing the rarest recorded value, scored when no proof is found
VECTORISE_ABOVE = 24  # candidates scored with numpy rather than plain Python
LOOP_RATIOS = 12  # strings compared by a Python loop over fuzz.ratio rather than one cdist
NEIGHBOUR_SLACK = 1.0  # how far below their bound step 2's neighbours still stand for near values
REBUILD_AFTER = 1024  # values added since an index was built before it is rebuilt
COMPILED = _fuzzy_kernels is not None  # whether the C inner loops run (else their Python twins)

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (
    id INTEGER PRIMARY KEY,
    scope TEXT NOT NULL,
    tool TEXT NOT NULL,
    arguments TEXT NOT NULL,
    result TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (scope, tool, arguments)
);
CREATE TABLE tools (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, schema TEXT NOT NULL);
"""
_TABLES = {"meta", "entries", "tools"}


class ToolCacheError(UserError, ValueError):
    """A cache file that cannot be used (not SQLite, someone else's database, another schema
    version, corrupt, unwritable) or a bad argument to a cache command. str(): 'path: message'."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message if self.path is None else f"{self.path}: {self.message}"

    def __reduce__(self):
        return (type(self), (self.message, self.path))


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


def _dumps_canonical(value: Any) -> str:
    """Compact JSON with sorted keys. Flat objects, the usual arguments, are written here
    (the same text as `_encode`, several times faster); anything nested goes to `_encode`."""
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
    if type(arguments) is dict:
        if COMPILED:  # flat arguments, the usual call, in C (else None)
            flat = _fuzzy_kernels.canonical_arguments(arguments, normalise_string, _escape)
            if flat is not None:
                return flat
        canonical = canonical_value(arguments)
        return canonical, _dumps_canonical(canonical)
    if arguments is None:
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ToolCacheError(f"arguments are not valid JSON: {exc.msg}") from None
    if not isinstance(arguments, Mapping):
        raise ToolCacheError(f"arguments must be a JSON object, got {type(arguments).__name__}")
    canonical = canonical_value(arguments)
    return canonical, _dumps_canonical(canonical)


def canonical_key(arguments: Mapping[str, Any] | str | None) -> str:
    """The exact-tier key: `{"a":1,"b":2}` and `{"b": 2, "a": 1.0}` give the same string."""
    return canonical_arguments(arguments)[1]


# --- similarity -------------------------------------------------------------------------------

# A value as the fuzzy index sees it: (vocabulary key, kind, text, number).
_TEXT, _NUMBER, _EXACT_ONLY = 0, 1, 2  # str/list/object; int/float; bool/null


def _value(value: Any) -> tuple[Any, int, str, float]:
    """`value` must already be canonical."""
    value_type = type(value)
    if value_type is str:
        return value, _TEXT, value, math.nan
    if value_type is int or value_type is float:
        # json writes ints and finite floats as repr does; repr is much faster.
        finite = value_type is int or math.isfinite(value)  # isfinite(huge int) overflows
        text = repr(value) if finite else _dumps_canonical(value)
        try:
            return ("number", text), _NUMBER, text, float(value)
        except OverflowError:  # an int beyond float range: compared as text
            return ("number", text), _TEXT, text, math.nan
    text = _dumps_canonical(value)
    if value is None or value_type is bool:
        return ("json", text), _EXACT_ONLY, text, math.nan
    return ("json", text), _TEXT, text, math.nan


def _number_similarity(a: float, b: float) -> float:
    if a == b:
        return 100.0
    similarity = 100.0 * max(0.0, 1.0 - abs(a - b) / max(abs(a), abs(b)))
    return similarity if math.isfinite(similarity) else 0.0


def _number_similarities(x: float, values: np.ndarray) -> np.ndarray:
    """`_number_similarity(x, v)` for each v, with the same float operations."""
    with np.errstate(all="ignore"):
        similarity = 100.0 * np.maximum(
            0.0, 1.0 - np.abs(x - values) / np.maximum(abs(x), np.abs(values))
        )
    similarity[~np.isfinite(similarity)] = 0.0
    similarity[values == x] = 100.0
    return similarity


def value_similarity(a: Any, b: Any) -> float:
    """0-100 similarity of two canonical argument values: 100 if equal; numbers by relative
    difference, 100 * (1 - |a-b| / max(|a|,|b|)); booleans and null only equal or not; everything
    else rapidfuzz's `ratio` of the text (strings as they are, others as canonical JSON, so
    "5" and 5 compare as text and score 100 without being an exact match)."""
    key_a, kind_a, text_a, number_a = _value(a)
    key_b, kind_b, text_b, number_b = _value(b)
    if key_a == key_b:
        return 100.0
    if kind_a == _NUMBER and kind_b == _NUMBER:
        return _number_similarity(number_a, number_b)
    if _EXACT_ONLY in (kind_a, kind_b):
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


# --- public records -----------------------------------------------------------------------------


class CacheEntry(NamedTuple):
    """One recorded call. `canonical_args` is the exact-tier key; `arguments` parses it."""

    rowid: int
    scope: str
    tool: str
    canonical_args: str
    result: str
    source: str

    @property
    def arguments(self) -> dict[str, Any]:
        return json.loads(self.canonical_args)


class CacheHit(NamedTuple):
    """A lookup's answer: (result, tier, score, entry). `score` is 0-100 (100 exact, 0 for a tool
    never seen); `entry` is the recorded call that answers, None for a tool never seen."""

    result: str
    tier: Tier
    score: float
    entry: CacheEntry | None


@dataclasses.dataclass(frozen=True)
class ToolRecord:
    """A call and its result to store: `ToolCache.record_many` takes these."""

    tool: str
    arguments: Mapping[str, Any] | str | None
    result: str
    scope: str | None = None
    source: str = "live"


@dataclasses.dataclass
class RecordReport:
    """What `record_many` did: `recorded` new entries; `already_present` calls whose key was
    stored before (the first result stays); `conflicting` of those, the ones whose result differs
    from the result the cache answers with."""

    records: int = 0
    recorded: int = 0
    already_present: int = 0
    conflicting: int = 0


@dataclasses.dataclass(frozen=True)
class ToolCacheConfig:
    """Where the cache lives and how it answers. Build one from an ml-collections ConfigDict with
    `ToolCacheConfig.from_config(config.tool_cache)`.

    fuzzy_threshold: the lowest `argument_similarity` (0-100) that is a fuzzy hit.
    scope_mode: "global" (lookups see all entries) or "scoped" (a lookup in scope S sees only S).
    busy_timeout_s: how long a write waits for another process's write to finish.
    exact_only: answer only exact hits from the cache; every other call gets the "no recorded
        result" response (tier best-effort, score 0), as for a tool never seen (an ablation).
    """

    path: str
    fuzzy_threshold: float = 80.0
    scope_mode: Literal["global", "scoped"] = "global"
    busy_timeout_s: float = 30.0
    exact_only: bool = False

    def __post_init__(self):
        object.__setattr__(self, "path", os.fspath(self.path))
        if not 0.0 <= self.fuzzy_threshold <= 100.0:
            raise ValueError(f"fuzzy_threshold must be in [0, 100], got {self.fuzzy_threshold}")
        if self.scope_mode not in SCOPE_MODES:
            raise ValueError(f"scope_mode must be one of {SCOPE_MODES}, got {self.scope_mode!r}")
        if self.busy_timeout_s < 0:
            raise ValueError(f"busy_timeout_s must be >= 0, got {self.busy_timeout_s}")

    @classmethod
    def from_config(cls, config: Any) -> ToolCacheConfig:
        """From a mapping or an ml-collections ConfigDict (anything with `to_dict()`)."""
        if isinstance(config, cls):
            return config
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown tool cache settings {unknown}; known: {sorted(known)}")
        return cls(**values)


# --- "no recorded result" ----------------------------------------------------------------------


def no_record_response(
    tool: str, arguments: Mapping[str, Any], schema: Mapping[str, Any] | None = None
) -> str:
    """The JSON text answering a call of a tool the cache never saw: it says no result is recorded
    and, when the tool's schema is known, what the tool takes (and returns, if the schema says)."""
    response: dict[str, Any] = {
        "error": "no_recorded_result",
        "tool": tool,
        "arguments": dict(arguments),
        "message": f"No recorded result: the tool cache holds no call of {tool}, so what it "
        "would return here is unknown.",
    }
    if schema:
        if schema.get("description"):
            response["description"] = schema["description"]
        properties = (schema.get("parameters") or {}).get("properties") or {}
        if isinstance(properties, Mapping):
            response["parameters"] = {
                name: spec.get("type", "any") if isinstance(spec, Mapping) else "any"
                for name, spec in properties.items()
            }
        for returns_key in ("returns", "response", "output"):
            if returns_key in schema:
                response["returns"] = schema[returns_key]
                break
    return json.dumps(response, ensure_ascii=False)


def _function_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The function part of an OpenAI tool ({"type": "function", "function": {...}}) or a bare one."""
    function = schema.get("function") if schema.get("type") == "function" else schema
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ToolCacheError("a tool schema needs a function name")
    return dict(function)


# --- in-memory index ----------------------------------------------------------------------------


# np.unique in numpy 2.4 hashes and is 10-20x slower than sorting for these sizes.
def _sorted_unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values ascending, index of each one's first position in the sorted order)."""
    ordered = np.sort(values)
    first = np.empty(len(ordered), dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    return ordered[starts], starts


def _unique_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unique, starts = _sorted_unique(values)
    return unique, np.diff(starts, append=len(values))


def _unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values, index into them of each value)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first = np.empty(len(ordered), dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    inverse = np.empty(len(values), dtype=np.intp)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse


def _ratios(text: str, choices: Sequence[str]) -> np.ndarray:
    """`fuzz.ratio(text, choice)` for each choice: a Python loop for a few (cdist costs ~4 us to
    start), one `cdist` for more."""
    if len(choices) <= LOOP_RATIOS:
        ratio = fuzz.ratio
        return np.array([ratio(text, choice) for choice in choices], dtype=np.float64)
    return process.cdist([text], choices, scorer=fuzz.ratio, dtype=np.float64)[0]


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


class _GramIndex:
    """Trigram -> ids of the text values holding it (CSR), over a column's first `size` values."""

    def __init__(self, column: _Column):
        kinds = np.frombuffer(column.kinds, dtype=np.uint8).copy()
        self.size = len(kinds)
        value_ids = np.flatnonzero(kinds == _TEXT)
        codes, owner = _gram_codes([column.texts[i] for i in value_ids])
        order = np.argsort(codes, kind="stable")
        self.value_ids = value_ids[owner[order]].astype(np.int32)
        self.codes, starts = _sorted_unique(codes[order])
        self.starts = np.append(starts, len(order))

    def candidates(self, text: str, limit: int) -> np.ndarray:
        """Ids of up to `limit` values sharing the most trigrams with `text`, counting only the
        rarest trigrams (up to GRAM_POSTINGS_BUDGET postings): common ones say little."""
        padded = f"\x02{text}\x03"
        grams = {
            (ord(a) << 42) | (ord(b) << 21) | ord(c)
            for a, b, c in zip(padded, padded[1:], padded[2:], strict=False)
        }
        query_codes = np.array(sorted(grams), dtype=np.uint64)
        slots = np.searchsorted(self.codes, query_codes)
        slots[slots == len(self.codes)] = 0
        slots = slots[self.codes[slots] == query_codes]
        if not len(slots):
            return np.zeros(0, dtype=np.int32)
        starts, ends = self.starts[slots], self.starts[slots + 1]
        order = np.argsort(ends - starts)
        taken = np.searchsorted(np.cumsum((ends - starts)[order]), GRAM_POSTINGS_BUDGET, "right")
        order = order[: max(1, int(taken))]
        parts = [
            self.value_ids[start:end]
            for start, end in zip(starts[order].tolist(), ends[order].tolist(), strict=True)
        ]
        value_ids, counts = _unique_counts(np.concatenate(parts))
        if len(value_ids) > limit:
            value_ids = value_ids[np.argpartition(-counts, limit)[:limit]]
        return value_ids


# Polynomial string hashes mod 2**64 (each character as its code point + 1, the length mixed
# in), which a one-character deletion updates in O(1), kept to their top 32 bits (a rare collision
# only adds a value to compare): `_edit_hash_array` computes them for many texts with numpy,
# `_edit_hashes` for one query in plain Python; they agree exactly.
_MASK = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
_BASE = 0x9E3779B97F4A7C15
_BASE_INVERSE = pow(_BASE, -1, 1 << 64)
_LENGTH_MIX = 0xD6E8FEB86659FD93
_BASE_POWERS = [pow(_BASE, k, 1 << 64) for k in range(EDIT_MAX_LENGTH + 1)]
_FACTOR = 1 - _BASE
# _DELETION_POWERS[n][j]: the weight of character j of an n-character text, B^(n-1-j).
_DELETION_POWERS = [_BASE_POWERS[:n][::-1] for n in range(EDIT_MAX_LENGTH + 1)]


def _edit_hashes(text: str) -> list[int]:
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


def _edit_hash_array(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """`_edit_hashes` of every text (each at most EDIT_MAX_LENGTH characters) as one uint32 array,
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
    `_EditIndex` search did not find (`indexed`: values of that length are in the index), for each
    query length (rows) and value length (columns)."""
    gap = np.abs(query_lengths[:, None] - lengths[None, :])
    # Found: all values within 1, and those of the query's length within 2.
    in_index = np.where(gap < 3, np.array([4, 3, 2])[np.minimum(gap, 2)], gap)
    return np.where(indexed[None, :], in_index, np.where(gap == 0, 2, gap))


class _EditIndex:
    """The `_edit_hashes` of a column's text values (up to EDIT_MAX_LENGTH characters), sorted,
    over its first `size` values. A query's hashes meet a value's when one is the other less a
    character, or both less one are equal: the search finds every value within Indel distance 1
    of the query and every value of its length within 2 (a substitution, an adjacent swap).
    `bound` is then the highest `fuzz.ratio` any value it did not find can have, from the lengths
    of the values (rapidfuzz's ratio is 100 * (1 - Indel distance / sum of the lengths))."""

    def __init__(self, column: _Column):
        kinds = np.frombuffer(column.kinds, dtype=np.uint8).copy()
        self.size = len(kinds)
        value_ids = np.flatnonzero(kinds != _EXACT_ONLY)
        texts = [column.texts[i] for i in value_ids.tolist()]
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        short = lengths <= EDIT_MAX_LENGTH
        hashes, owner = _edit_hash_array([text for text, s in zip(texts, short, strict=True) if s])
        order = np.argsort(hashes)
        hashes = hashes[order]
        # Hashes sorted, in 2**bits buckets by their top bits (one to two per bucket): a lookup
        # reads one bucket rather than binary-searching the whole array.
        self.bits = min(31, max(1, len(hashes).bit_length() - 1))
        top = (hashes >> np.uint32(32 - self.bits)).astype(np.int64)
        starts = np.searchsorted(top, np.arange((1 << self.bits) + 1))
        offsets = "i" if len(hashes) < 2**31 else "q"
        self.starts = array.array(offsets, starts.astype(offsets).tobytes())
        self.hashes = array.array("I", hashes.tobytes())
        self.value_ids = array.array("i", value_ids[short][owner[order]].astype(np.int32).tobytes())
        # bounds[n]: the highest ratio a value the search misses can have, for an n-character
        # query (computed for every n once: lazily it cost more than the search itself).
        value_lengths = np.concatenate([np.unique(lengths[short]), np.unique(lengths[~short])])
        indexed = np.arange(len(value_lengths)) < len(np.unique(lengths[short]))
        query_lengths = np.arange(EDIT_MAX_LENGTH + 1)
        totals = query_lengths[:, None] + value_lengths[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = 100.0 * (1.0 - _min_indels(query_lengths, value_lengths, indexed) / totals)
        self.bounds = np.where(totals > 0, ratios, 0.0).max(axis=1, initial=0.0).tolist()

    def neighbours(self, text: str) -> set[int]:
        """Ids of the values the hashes of `text` meet (a rare collision adds a stray one)."""
        hashes, value_ids, starts, shift = self.hashes, self.value_ids, self.starts, 32 - self.bits
        found: set[int] = set()
        for code in _edit_hashes(text):
            bucket = code >> shift
            for slot in range(starts[bucket], starts[bucket + 1]):
                if hashes[slot] == code:
                    found.add(value_ids[slot])
        return found

    def bound(self, query_length: int) -> float:
        return self.bounds[query_length]


class _NumberIndex:
    """A column's numbers sorted, over its first `size` values: similarity by relative difference
    falls monotonically on each side of a number, so the nearest values sit next to it."""

    def __init__(self, column: _Column):
        kinds = np.frombuffer(column.kinds, dtype=np.uint8).copy()
        self.size = len(kinds)
        value_ids = np.flatnonzero(kinds == _NUMBER)
        numbers = np.frombuffer(column.numbers, dtype=np.float64)[value_ids]
        order = np.argsort(numbers, kind="stable")
        self.value_ids = value_ids[order]
        self.numbers = numbers[order]

    def candidates(self, number: float, limit: int) -> np.ndarray:
        slot = int(np.searchsorted(self.numbers, number))
        return self.value_ids[max(0, slot - limit) : slot + limit]


_ONLY_TEXT, _ONLY_NUMBER = 1 << _TEXT, 1 << _NUMBER
_NO_IDS = array.array("i")


class _Column:
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
        self.grams: _GramIndex | None = None
        self.number_index: _NumberIndex | None = None
        self.edits: _EditIndex | None = None

    def add(self, key: Any, kind: int, text: str, number: float) -> None:
        value_id = self.vocabulary.get(key)
        if value_id is None:
            value_id = len(self.texts)
            self.vocabulary[key] = value_id
            if type(self.texts) is tuple:  # first value since the last build: O(n), once
                self.texts = list(self.texts)
            self.texts.append(text)
            self.kinds.append(kind)
            self.kinds_seen |= 1 << kind
            self.numbers.append(number)
        if self.post_ids is not None:
            local_id = len(self.entry_value_ids)
            tail = self.post_tail.get(value_id)
            if tail is None:
                self.post_tail[value_id] = [local_id]
            else:
                tail.append(local_id)
            self.post_tail_size += 1
        self.entry_value_ids.append(value_id)

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

    def ready_postings(self) -> None:
        """Builds the postings on first use, and again once many entries were added since."""
        if self.post_ids is None or self.post_tail_size > REBUILD_AFTER:
            self.build_postings()

    def count(self, value_id: int) -> int:
        """How many entries hold the value."""
        if self.post_ids is None or self.post_tail_size > REBUILD_AFTER:  # (inline: a hot path)
            self.build_postings()
        starts = self.post_starts
        count = starts[value_id + 1] - starts[value_id] if value_id + 1 < len(starts) else 0
        if self.post_tail_size:
            tail = self.post_tail.get(value_id)
            if tail:
                count += len(tail)
        return count

    def postings(self, value_id: int) -> array.array:
        """Local ids of the entries holding the value, ascending."""
        if self.post_ids is None or self.post_tail_size > REBUILD_AFTER:
            self.build_postings()
        starts = self.post_starts
        if value_id + 1 < len(starts):
            ids = self.post_ids[starts[value_id] : starts[value_id + 1]]
        else:
            ids = _NO_IDS
        tail = self.post_tail.get(value_id)
        return ids + array.array("i", tail) if tail else ids

    def similarity(self, query: tuple[Any, int, str, float], value_id: int) -> float:
        """`value_similarity(query, value)` for one value id that is not the query's own value
        (that one scores 100: callers know it), as `similarities` computes it."""
        _, kind, text, number = query
        value_kind = self.kinds[value_id]
        if kind == _NUMBER and value_kind == _NUMBER:
            return _number_similarity(number, self.numbers[value_id])
        if kind == _EXACT_ONLY or value_kind == _EXACT_ONLY:
            return 0.0
        return fuzz.ratio(text, self.texts[value_id])

    def similarities(self, query: tuple[Any, int, str, float], value_ids: np.ndarray) -> np.ndarray:
        """`value_similarity(query, value)` for each value id (repeats allowed)."""
        key, kind, text, number = query
        if not len(value_ids):
            return np.zeros(0)
        if kind == _TEXT and self.kinds_seen == _ONLY_TEXT:  # the usual cases, without masks
            similarity = _ratios(text, self._texts(value_ids))
        elif kind == _NUMBER and self.kinds_seen == _ONLY_NUMBER:
            numbers = np.frombuffer(self.numbers, dtype=np.float64)[value_ids]
            similarity = _number_similarities(number, numbers)
        else:
            similarity = np.zeros(len(value_ids))
            if kind != _EXACT_ONLY:
                kinds = np.frombuffer(self.kinds, dtype=np.uint8)[value_ids]
                as_text = kinds == _TEXT
                if kind == _NUMBER:
                    numeric = kinds == _NUMBER
                    numbers = np.frombuffer(self.numbers, dtype=np.float64)[value_ids[numeric]]
                    similarity[numeric] = _number_similarities(number, numbers)
                else:
                    as_text |= kinds == _NUMBER
                positions = np.flatnonzero(as_text)
                if len(positions):
                    similarity[positions] = _ratios(text, self._texts(value_ids[positions]))
        query_id = self.vocabulary.get(key)
        if query_id is not None:
            similarity[value_ids == query_id] = 100.0
        return similarity

    def _texts(self, value_ids: np.ndarray) -> Sequence[str]:
        if len(value_ids) == 1:
            return [self.texts[int(value_ids[0])]]
        return operator.itemgetter(*value_ids.tolist())(self.texts)

    def _added_since(self, built: int, kind: int) -> np.ndarray:
        """Ids of the values added since an index over the first `built` was made that a query
        of `kind` is compared with."""
        kinds = np.frombuffer(self.kinds, dtype=np.uint8)[built:]
        comparable = kinds == _NUMBER if kind == _NUMBER else kinds != _EXACT_ONLY
        del kinds  # release the buffer so `add` can grow the bytearray
        return built + np.flatnonzero(comparable)

    def near(self, query: tuple[Any, int, str, float], limit: int) -> dict[int, float]:
        """Up to `limit` values most similar to `query`, {value id: similarity}: all values
        compared for a small vocabulary, else the candidates of the trigram or number index plus
        the values added since it was built (rebuilt after REBUILD_AFTER of those)."""
        _, kind, text, number = query
        size = len(self.texts)
        if kind == _EXACT_ONLY or not size:
            return {}
        if kind == _NUMBER:
            if self.number_index is None or size - self.number_index.size > REBUILD_AFTER:
                self.number_index = _NumberIndex(self)
            built, found = self.number_index.size, self.number_index.candidates(number, limit)
        elif size <= SMALL_VOCABULARY:  # one rapidfuzz pass beats the index's numpy calls
            matches = process.extract(text, self.texts, scorer=fuzz.ratio, limit=limit)
            return {i: score for _, score, i in matches if self.kinds[i] != _EXACT_ONLY}
        else:
            if self.grams is None or size - self.grams.size > REBUILD_AFTER:
                self.grams = _GramIndex(self)
            built, found = self.grams.size, self.grams.candidates(text, 2 * limit)
        if built < size:  # values added since the index was built (all, for small vocabularies)
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
        size = len(self.texts)
        index = self.number_index
        if index is None or size - index.size > REBUILD_AFTER:
            index = self.number_index = _NumberIndex(self)
        numbers = index.numbers
        slot = int(np.searchsorted(numbers, number))
        start, stop = max(0, slot - NEAR_VALUES), slot + NEAR_VALUES
        bound = 0.0
        if start > 0:
            bound = _number_similarity(number, float(numbers[start - 1]))
        if stop < len(numbers):
            bound = max(bound, _number_similarity(number, float(numbers[stop])))
        found = index.value_ids[start:stop]
        if index.size < size:
            found = np.concatenate([found, self._added_since(index.size, _NUMBER)])
        similarity = _number_similarities(number, np.frombuffer(self.numbers, np.float64)[found])
        return dict(zip(found.tolist(), similarity.tolist(), strict=True)), bound

    def edit_neighbours(self, text: str) -> tuple[dict[int, float], float]:
        """({value id: similarity} of the values within one edit of `text`, ids ascending, bound):
        no other value of the column is more similar than `bound` (see `_EditIndex`). The values
        added since the index was built are all compared."""
        size = len(self.texts)
        if self.edits is None or size - self.edits.size > REBUILD_AFTER:
            self.edits = _EditIndex(self)
            self.texts = tuple(self.texts)  # as in build_postings
        edits = self.edits
        bound = edits.bound(len(text))
        added = self._added_since(edits.size, _TEXT).tolist() if edits.size < size else None
        if COMPILED:  # the loops below in C
            index = (edits.hashes, edits.starts, edits.value_ids, 32 - edits.bits)
            found = _fuzzy_kernels.edit_neighbours(text, *index, self.texts, self.kinds, added)
            return found, bound
        found = edits.neighbours(text)
        if added:
            found.update(added)
        neighbours = {}
        texts, kinds, ratio = self.texts, self.kinds, fuzz.ratio
        for value_id in sorted(found):
            if kinds[value_id] != _EXACT_ONLY:
                neighbours[value_id] = ratio(text, texts[value_id])
        return neighbours, bound


class _Block:
    """The entries of one tool (in one partition) with one set of argument names.

    Search, for a block too large to score whole (FULL_SCORE_MAX_ENTRIES), with the query's
    recorded values (those some entry holds) and the entries found so far:
    1. If at most FEW_SHARING entries hold the query's least common recorded value (the usual
       case when one argument of a recorded call was changed), those are scored and the best
       answers if it reaches the fuzzy threshold.
    2. If every argument that is not recorded is a text (up to EDIT_MAX_LENGTH characters) or a
       number in a column of numbers, its neighbour values are looked up (those within one edit,
       by `_EditIndex`; the nearest numbers on each side) and the entries holding them scored. An
       entry not found has, on each such argument, at most the lookup's bound and on the others
       at most 100: when the best found reaches that sum it is the nearest entry, proven, and
       answers.
    3. If at most SHORTCUT_ENTRIES entries hold the least common recorded value, they are scored
       and the best answers if it reaches the fuzzy threshold.
    4. Otherwise, per query argument, the candidate values are the query's own value when recorded
       (unless so common that it says little) or else its NEAR_VALUES nearest values (all values
       compared for small vocabularies, a trigram index for large ones, sorted order for numbers).
       The entries holding them, rarest values first up to POSTINGS_BUDGET, are ranked by the
       similarities those lists give and the best RESCORE_CANDIDATES are scored exactly.
    The answer is the best entry scored. It is the true nearest entry when step 2 proves it, and
    otherwise unless none of that entry's values is among the candidates (or, in steps 1 and 3, a
    better entry does not share the rare value): on the benchmark 99.6% of perturbed calls get the
    exhaustive best score (the others: a number moved, answered in step 1 or 3 by the entry that
    shares the other values, where one with two numbers a little off scores higher).
    """

    __slots__ = ("columns", "names", "rows")

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.rows = array.array("q")  # global entry index per local entry id
        self.columns = {name: _Column() for name in names}

    def add(self, arguments: Mapping[str, Any], entry_index: int) -> None:
        self.rows.append(entry_index)
        for name, column in self.columns.items():
            value = arguments[name]
            if type(value) is str:  # the common case, without building a tuple
                column.add(value, _TEXT, value, math.nan)
            else:
                column.add(*_value(value))

    def build_indexes(self) -> None:
        if len(self.rows) <= FULL_SCORE_MAX_ENTRIES:
            return
        for column in self.columns.values():
            column.build_postings()
            if _NUMBER in column.kinds:
                column.number_index = _NumberIndex(column)
            if column.kinds_seen & _ONLY_TEXT:
                column.edits = _EditIndex(column)
                if len(column.texts) > SMALL_VOCABULARY:
                    column.grams = _GramIndex(column)

    def search(
        self, query: dict[str, tuple], union_size: int, good_enough: float
    ) -> tuple[float, int]:
        """(score, entry index) of the best entry found for the query values of shared names;
        ties go to the earliest entry found. When the entries sharing the query's rarest recorded
        value hold one scoring `good_enough`, the best of those answers without a further
        search."""
        rows = self.rows
        columns = self.columns
        recorded: dict[str, int] = {}  # name -> value id of the query's value, where recorded
        for name, value in query.items():
            value_id = columns[name].vocabulary.get(value[0])
            if value_id is not None:
                recorded[name] = value_id
        # Similarities computed, per name and value id: 100 for the query's own values.
        known = {name: {value_id: 100.0} for name, value_id in recorded.items()}
        if len(rows) <= FULL_SCORE_MAX_ENTRIES:
            total, local_id = self._best(query, range(len(rows)), known)
            return total / union_size, rows[local_id]
        rarest, rarest_count = "", 0
        for name, value_id in recorded.items():
            count = columns[name].count(value_id)
            if not rarest or count < rarest_count:
                rarest, rarest_count = name, count

        best = (-1.0, 0)  # (summed similarity, local id)
        if rarest and rarest_count <= FEW_SHARING:  # step 1
            local_ids = columns[rarest].postings(recorded[rarest])
            if rarest_count == 1:  # the usual case, without `_best`'s bookkeeping
                (local_id,) = local_ids
                total = 0.0
                for name, value in query.items():
                    column = columns[name]
                    value_id = column.entry_value_ids[local_id]
                    if recorded.get(name) == value_id:
                        total += 100.0
                    else:
                        total += column.similarity(value, value_id)
                best = (total, local_id)
            else:
                best = self._best(query, local_ids, known)
            if best[0] / union_size >= good_enough:
                return best[0] / union_size, rows[best[1]]
        neighbours: dict[str, tuple[dict[int, float], float]] = {}
        if len(recorded) < len(query):  # step 2
            upper, local_ids = self._neighbour_candidates(query, recorded, neighbours)
            for name, (found, _) in neighbours.items():
                known.setdefault(name, {}).update(found)
            if local_ids:
                best = _better(best, self._best(query, local_ids, known))
            if best[0] >= upper - 1e-9:
                return best[0] / union_size, rows[best[1]]
        if rarest and FEW_SHARING < rarest_count <= SHORTCUT_ENTRIES:  # step 3
            local_ids = self.columns[rarest].postings(recorded[rarest])
            if rarest_count <= VECTORISE_ABOVE:
                best = _better(best, self._best(query, local_ids, known))
            else:
                local_ids = np.frombuffer(local_ids, dtype=np.int32)
                best = _better(best, self._best_of_many(query, local_ids, rarest))
            if best[0] / union_size >= good_enough:
                return best[0] / union_size, rows[best[1]]
        local_ids = self._candidates(query, recorded, neighbours, known)
        best = _better(best, self._best(query, local_ids, known))
        return best[0] / union_size, rows[best[1]]

    def _neighbour_candidates(
        self,
        query: dict[str, tuple],
        recorded: dict[str, int],
        neighbours: dict[str, tuple[dict[int, float], float]],
    ) -> tuple[float, list[int]]:
        """(upper bound, ascending local ids) for step 2 of the search: the entries holding a
        neighbour value (`edit_neighbours`, `number_neighbours`: stored in `neighbours` per name,
        with their bound) more similar than the bound on some argument that is not recorded, and
        the highest summed similarity any other entry can have. The bound is infinite when an
        argument that is not recorded is neither a text nor a number in a column of numbers, and
        no entries are returned when there would be more than POSTINGS_BUDGET."""
        upper = 100.0 * len(recorded)
        for name, value in query.items():
            if name in recorded:
                continue
            column = self.columns[name]
            kind, text = value[1], value[2]
            found = None
            if kind == _NUMBER and column.kinds_seen == _ONLY_NUMBER:
                found = column.number_neighbours(value[3])
            elif (
                kind == _TEXT
                and 0 < len(text) <= EDIT_MAX_LENGTH
                and column.kinds_seen & _ONLY_TEXT
            ):
                found = column.edit_neighbours(text)
            if found is None:
                return math.inf, []
            neighbours[name] = found
            upper += found[1]
        if COMPILED:  # the loop below in C
            lists = []
            for name, (found, bound) in neighbours.items():
                column = self.columns[name]
                column.ready_postings()
                lists.append((found, bound, column.post_ids, column.post_starts, column.post_tail))
            local_ids = _fuzzy_kernels.gather_postings(lists, POSTINGS_BUDGET)
            return (math.inf, []) if local_ids is None else (upper, local_ids)
        chosen: set[int] = set()
        for name, (found, bound) in neighbours.items():
            column = self.columns[name]
            for value_id, similarity in found.items():
                if similarity > bound:  # the others count no more than the bound
                    chosen.update(column.postings(value_id))
                    if len(chosen) > POSTINGS_BUDGET:
                        return math.inf, []
        return upper, sorted(chosen)

    def _best_of_many(
        self, query: dict[str, tuple], local_ids: np.ndarray, holding: str = ""
    ) -> tuple[float, int]:
        """`_best` with numpy; every entry holds the query's value of the name `holding`."""
        total = np.zeros(len(local_ids))
        for name, value in query.items():
            if name == holding:
                total += 100.0
                continue
            column = self.columns[name]
            value_ids = np.frombuffer(column.entry_value_ids, dtype=np.int32)[local_ids]
            if len(column.texts) > SMALL_VOCABULARY or column.kinds_seen == _ONLY_NUMBER:
                total += column.similarities(value, value_ids)  # few repeats: each one
            else:
                unique_ids, inverse = _unique_inverse(value_ids)
                total += column.similarities(value, unique_ids)[inverse]
        best = int(total.argmax())  # the first maximum
        return float(total[best]), int(local_ids[best])

    def _best(
        self,
        query: dict[str, tuple],
        local_ids: Sequence[int],
        known: dict[str, dict[int, float]],
    ) -> tuple[float, int]:
        """(summed similarity, local id) of the best of some entries (ascending ids, so ties keep
        the earliest). Plain Python for a few entries, reusing the similarities already known
        (`known` holds 100 for the query's own value wherever it is recorded); numpy for many,
        where Python's per-entry work would dominate."""
        if len(local_ids) > VECTORISE_ABOVE:
            return self._best_of_many(query, np.asarray(local_ids, dtype=np.intp))
        columns = []
        for name, value in query.items():
            memo = known.get(name)
            if memo is None:
                memo = known[name] = {}
            c = self.columns[name]
            if COMPILED:  # what the C loop reads
                columns.append((c.entry_value_ids, memo, c.kinds, c.texts, c.numbers, value))
            else:
                columns.append((c, value, memo))
        if COMPILED:  # the loop below in C
            return _fuzzy_kernels.best_entry(local_ids, columns)
        best_total, best_id = -1.0, 0
        for local_id in local_ids:
            total = 0.0
            for column, value, memo in columns:
                value_id = column.entry_value_ids[local_id]
                similarity = memo.get(value_id)
                if similarity is None:
                    similarity = memo[value_id] = column.similarity(value, value_id)
                total += similarity
            if total > best_total:
                best_total, best_id = total, local_id
        return best_total, best_id

    def _candidates(
        self,
        query: dict[str, tuple],
        recorded: dict[str, int],
        neighbours: dict[str, tuple[dict[int, float], float]],
        known: dict[str, dict[int, float]],
    ) -> list[int]:
        """Ascending local ids to score (step 4); adds the similarities it computes to `known`.
        The near values of an argument are its step 2 neighbours when the best of them comes
        within NEIGHBOUR_SLACK of their bound (no other value is more similar by more than that),
        else those of `_Column.near`."""
        lists: list[tuple[float, int, str, int]] = []  # similarity, postings, name, value id
        common: tuple[int, str, int] | None = None  # the least common over-budget exact value
        for name, value in query.items():
            column = self.columns[name]
            value_id = recorded.get(name)
            if value_id is not None:
                count = column.count(value_id)
                if count <= POSTINGS_BUDGET:
                    lists.append((100.0, count, name, value_id))
                elif common is None or count < common[0]:
                    common = (count, name, value_id)
                continue
            near, bound = neighbours.get(name, ({}, math.inf))
            if not near or max(near.values()) < bound - NEIGHBOUR_SLACK:
                near = column.near(value, NEAR_VALUES)
                known.setdefault(name, {}).update(near)
            lists.extend(
                (similarity, column.count(value_id), name, value_id)
                for value_id, similarity in near.items()
            )
        lists.sort(key=lambda item: (-item[0], item[1]))

        chosen: set[int] = set()
        for _, count, name, value_id in lists:
            if chosen and len(chosen) + count > POSTINGS_BUDGET:
                break
            chosen.update(self.columns[name].postings(value_id))
        if not chosen:  # only very common values: a slice of the least common one, or entry 0
            if common is None:
                return [0]
            _, name, value_id = common
            chosen.update(self.columns[name].postings(value_id)[:POSTINGS_BUDGET])
        if len(chosen) <= RESCORE_CANDIDATES:
            return sorted(chosen)
        return self._rank(np.array(sorted(chosen)), known)

    def _rank(self, local_ids: np.ndarray, known: dict[str, dict[int, float]]) -> list[int]:
        """The RESCORE_CANDIDATES entries (more on ties, up to twice that) with the highest sum
        of known similarities, ascending."""
        partial = np.zeros(len(local_ids))
        for name, similarities in known.items():
            if not similarities:
                continue
            value_ids = np.array(sorted(similarities))
            similarity = np.array([similarities[i] for i in value_ids.tolist()])
            held = np.frombuffer(self.columns[name].entry_value_ids, dtype=np.int32)[local_ids]
            slots = np.minimum(np.searchsorted(value_ids, held), len(value_ids) - 1)
            partial += np.where(value_ids[slots] == held, similarity[slots], 0.0)
        cut = np.partition(partial, -RESCORE_CANDIDATES)[-RESCORE_CANDIDATES]
        return local_ids[partial >= cut][: 2 * RESCORE_CANDIDATES].tolist()


def _better(a: tuple[float, int], b: tuple[float, int]) -> tuple[float, int]:
    """The higher of two (summed similarity, local id), the earlier entry on a tie."""
    if b[0] > a[0] or (b[0] == a[0] and b[1] < a[1]):
        return b
    return a


_CHUNK_BITS = 12  # entries per chunk of an _EntryStore: 4096
_CHUNK_MASK = (1 << _CHUNK_BITS) - 1


class _EntryStore:
    """Every entry as a (rowid, scope, tool, key, result, source) tuple, in tuples of 4096.

    The garbage collector stops tracking a tuple once it holds only untracked objects (strings,
    ints, such tuples), so its full collections skip the stored entries. As five parallel lists
    they cost every full collection five million pointer visits at 1M entries (~0.1 s, every
    few thousand lookups, inside whichever lookup triggered it)."""

    __slots__ = ("chunks", "tail")

    def __init__(self):
        self.chunks: list[tuple[tuple, ...]] = []
        self.tail: list[tuple] = []

    def __len__(self) -> int:
        return (len(self.chunks) << _CHUNK_BITS) + len(self.tail)

    def __getitem__(self, index: int) -> tuple:
        chunk = index >> _CHUNK_BITS
        if chunk < len(self.chunks):
            return self.chunks[chunk][index & _CHUNK_MASK]
        return self.tail[index & _CHUNK_MASK]

    def __iter__(self) -> Iterator[tuple]:
        for chunk in self.chunks:
            yield from chunk
        yield from self.tail

    def append(self, entry: tuple) -> None:
        self.tail.append(entry)
        if len(self.tail) > _CHUNK_MASK:
            self.chunks.append(tuple(self.tail))
            self.tail = []


@dataclasses.dataclass
class _ToolIndex:
    exact: dict[str, int] = dataclasses.field(default_factory=dict)  # key -> entry index
    blocks: dict[tuple[str, ...], _Block] = dataclasses.field(default_factory=dict)
    # Entries not yet in a block: blocks are filled on the tool's first non-exact lookup, so
    # opening a large cache only builds the exact index.
    pending: array.array = dataclasses.field(default_factory=lambda: array.array("q"))

    def index_pending(self, entries: _EntryStore) -> None:
        for entry_index in self.pending:
            arguments = json.loads(entries[entry_index][3])
            names = tuple(arguments)  # stored with sorted keys
            block = self.blocks.get(names)
            if block is None:
                block = self.blocks[names] = _Block(names)
            block.add(arguments, entry_index)
        self.pending = array.array("q")


# --- the cache ---------------------------------------------------------------------------------


class ToolCache:
    """A tool cache on one SQLite file; see the module docstring for the tiers.

    `ToolCache(path_or_config)` opens (creating unless create=False) the file and loads its
    entries. Raises ToolCacheError for a file that is not a tool cache of this schema version.
    """

    def __init__(self, config: ToolCacheConfig | str | os.PathLike[str], *, create: bool = True):
        if not isinstance(config, ToolCacheConfig):
            config = ToolCacheConfig(path=os.fspath(config))
        self.config = config
        self.path = config.path
        self._scoped = config.scope_mode == "scoped"
        self._lock = threading.RLock()
        self._connection = self._connect(create)
        self._entries = _EntryStore()  # in rowid order
        self._strings: dict[str, str] = {}  # one copy of each scope, tool and source name
        self._index: dict[tuple[str, str], _ToolIndex] = {}  # (partition, tool) -> index
        self._schemas: dict[str, dict[str, Any]] = {}
        self._last_rowid = 0
        self._last_tool_rowid = 0
        self._counts = dict.fromkeys((*TIERS, "unseen_tool"), 0)
        try:
            self.refresh()
        except BaseException:
            self._connection.close()
            raise

    # -- opening ---------------------------------------------------------------------------------

    def _error(self, message: str) -> ToolCacheError:
        return ToolCacheError(message, self.path)

    def _connect(self, create: bool) -> sqlite3.Connection:
        path = self.path
        if os.path.isdir(path):
            raise self._error("is a directory, expected a tool cache file")
        exists = os.path.exists(path)
        if not exists and not create:
            raise self._error("no such tool cache file")
        if exists and os.path.getsize(path) > 0:
            try:
                with open(path, "rb") as file:
                    header = file.read(len(SQLITE_HEADER))
            except OSError as exc:
                raise self._error(f"cannot read: {exc.strerror or exc}") from None
            if header != SQLITE_HEADER:
                raise self._error("not a SQLite database (no SQLite header), so not a tool cache")
        try:
            # Autocommit: every write below opens its own BEGIN IMMEDIATE transaction.
            connection = sqlite3.connect(
                path, timeout=self.config.busy_timeout_s, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise self._error(f"cannot open: {exc}") from None
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(self.config.busy_timeout_s * 1000)}")
            self._check_schema(connection, create)
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")  # WAL: durable up to the last sync
        except ToolCacheError:
            connection.close()
            raise
        except sqlite3.DatabaseError as exc:
            connection.close()
            raise self._error(f"corrupt or unreadable SQLite database: {exc}") from None
        return connection

    def _check_schema(self, connection: sqlite3.Connection, create: bool) -> None:
        tables = _tables(connection)
        if not tables:
            if not create:
                raise self._error("an empty database, not a tool cache")
            with _transaction(connection):
                if not _tables(connection):  # another process may have created it meanwhile
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            connection.execute(statement)
                    connection.executemany(
                        "INSERT INTO meta (key, value) VALUES (?, ?)",
                        [("format", FORMAT_NAME), ("schema_version", str(SCHEMA_VERSION))],
                    )
            tables = _tables(connection)
        if "meta" not in tables:
            names = ", ".join(sorted(tables))
            raise self._error(
                f"a SQLite database without the tool cache schema (its tables: {names})"
            )
        meta = dict(connection.execute("SELECT key, value FROM meta"))
        if meta.get("format") != FORMAT_NAME:
            raise self._error(
                f"a SQLite database of another format ({meta.get('format')!r}), not a tool cache"
            )
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise self._error(
                f"tool cache schema version {meta.get('schema_version')}, but this cacherl_jax "
                f"reads version {SCHEMA_VERSION}: rebuild it with `cacherl cache build`"
            )
        missing = _TABLES - tables
        if missing:
            raise self._error(f"tool cache is missing tables: {', '.join(sorted(missing))}")

    @contextlib.contextmanager
    def _database(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as exc:
            raise self._error(f"{doing} failed: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def __enter__(self) -> ToolCache:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._entries)

    # -- loading ---------------------------------------------------------------------------------

    def refresh(self) -> int:
        """Loads entries and tool schemas stored since the last refresh (by any process); returns
        how many entries were added. Incremental: rowids only grow."""
        with self._lock, self._database("reading entries"):
            before = len(self._entries)
            for name, schema in self._connection.execute(
                "SELECT name, schema FROM tools WHERE id > ? ORDER BY id", (self._last_tool_rowid,)
            ):
                self._schemas[name] = json.loads(schema)
            row = self._connection.execute("SELECT max(id) FROM tools").fetchone()
            self._last_tool_rowid = row[0] or 0
            cursor = self._connection.execute(
                "SELECT id, scope, tool, arguments, result, source FROM entries WHERE id > ? "
                "ORDER BY id",
                (self._last_rowid,),
            )
            while rows := cursor.fetchmany(4096):
                for row in rows:
                    self._add(*row)
            return len(self._entries) - before

    def _add(self, rowid: int, scope: str, tool: str, key: str, result: str, source: str) -> None:
        strings = self._strings
        scope = strings.setdefault(scope, scope)
        tool = strings.setdefault(tool, tool)
        source = strings.setdefault(source, source)
        entry_index = len(self._entries)
        self._entries.append((rowid, scope, tool, key, result, source))
        self._last_rowid = rowid

        partition = scope if self.config.scope_mode == "scoped" else ""
        tool_index = self._index.get((partition, tool))
        if tool_index is None:
            tool_index = self._index[(partition, tool)] = _ToolIndex()
        if key in tool_index.exact:  # the same call in another scope: the first one answers
            return
        tool_index.exact[key] = entry_index
        tool_index.pending.append(entry_index)

    def build_indexes(self) -> None:
        """Builds every lazily built search index now, so no lookup pays for it (benchmarks)."""
        with self._lock:
            for tool_index in self._index.values():
                tool_index.index_pending(self._entries)
                for block in tool_index.blocks.values():
                    block.build_indexes()

    # -- lookups ---------------------------------------------------------------------------------

    def _partition(self, scope: str | None) -> str:
        return (scope or "") if self.config.scope_mode == "scoped" else ""

    def _entry(self, entry_index: int) -> CacheEntry:
        # _EntryStore.__getitem__ inline, and tuple.__new__ skips NamedTuple's keyword-handling
        # __new__: both on every hit (exact hits take ~5 us).
        chunks, chunk = self._entries.chunks, entry_index >> _CHUNK_BITS
        if chunk < len(chunks):
            return tuple.__new__(CacheEntry, chunks[chunk][entry_index & _CHUNK_MASK])
        return tuple.__new__(CacheEntry, self._entries.tail[entry_index & _CHUNK_MASK])

    def lookup(
        self,
        tool: str,
        arguments: Mapping[str, Any] | str | None,
        *,
        scope: str | None = None,
        schema: Mapping[str, Any] | None = None,
    ) -> CacheHit:
        """Answers a call from the cache; never raises for an unknown tool (see the tiers).

        `scope` matters only with scope_mode="scoped". `schema` (an OpenAI tool or function
        schema) shapes the "no recorded result" response when the tool has no entries; otherwise
        a schema stored by `register_tools` is used."""
        canonical, key = canonical_arguments(arguments)
        partition = (scope or "") if self._scoped else ""
        with self._lock:
            tool_index = self._index.get((partition, tool))
            if tool_index is not None:
                entry_index = tool_index.exact.get(key)
                if entry_index is not None:  # the exact tier: one dict lookup
                    self._counts["exact"] += 1
                    entry = self._entry(entry_index)
                    return tuple.__new__(CacheHit, (entry[4], "exact", 100.0, entry))
            if tool_index is not None and not self.config.exact_only:
                score, entry_index, same_names = self._nearest(tool_index, canonical)
                tier: Tier = (
                    "fuzzy"
                    if same_names and score >= self.config.fuzzy_threshold
                    else "best_effort"
                )
                self._counts[tier] += 1
                entry = self._entry(entry_index)
                return tuple.__new__(CacheHit, (entry[4], tier, score, entry))
            self._counts["best_effort"] += 1
            if tool_index is None:
                self._counts["unseen_tool"] += 1
            known = self._schemas.get(tool)
            if schema:
                with contextlib.suppress(ToolCacheError):  # a schema without a name: ignored
                    known = _function_schema(schema)
            return CacheHit(no_record_response(tool, canonical, known), "best_effort", 0.0, None)

    def _nearest(
        self, tool_index: _ToolIndex, canonical: dict[str, Any]
    ) -> tuple[float, int, bool]:
        """(score, entry index, whether the argument names agree) of the nearest entry found."""
        if tool_index.pending:
            tool_index.index_pending(self._entries)
        names = tuple(sorted(canonical))
        query = {}
        for name in names:
            value = canonical[name]
            query[name] = (value, _TEXT, value, math.nan) if type(value) is str else _value(value)
        block = tool_index.blocks.get(names)
        if block is not None:
            score, entry_index = block.search(query, len(names) or 1, self.config.fuzzy_threshold)
            return score, entry_index, True

        # Other argument names: the block sharing the most names (then the largest) answers,
        # scored over the names of both (a missing name scores 0), and never as fuzzy.
        def overlap(block: _Block) -> tuple[float, int]:
            union = len(set(names) | set(block.names)) or 1
            return len(set(names) & set(block.names)) / union, len(block.rows)

        block = max(tool_index.blocks.values(), key=overlap)
        shared = {name: value for name, value in query.items() if name in block.columns}
        union = len(set(names) | set(block.names)) or 1
        score, entry_index = block.search(shared, union, math.inf)
        return score, entry_index, False

    # -- recording -------------------------------------------------------------------------------

    def record(
        self,
        tool: str,
        arguments: Mapping[str, Any] | str | None,
        result: str,
        *,
        scope: str | None = None,
        source: str = "live",
    ) -> CacheEntry:
        """Stores one executed call (the first result recorded for a key stays) and returns the
        entry the cache now answers that call with."""
        self.record_many([ToolRecord(tool, arguments, result, scope, source)])
        with self._lock:
            entry_index = self._exact_index(tool, canonical_key(arguments), scope)
            assert entry_index is not None, "a recorded call must be an exact hit"
            return self._entry(entry_index)

    def _exact_index(self, tool: str, key: str, scope: str | None) -> int | None:
        tool_index = self._index.get((self._partition(scope), tool))
        return None if tool_index is None else tool_index.exact.get(key)

    def record_many(self, records: Iterable[ToolRecord]) -> RecordReport:
        """Stores calls in one transaction (INSERT OR IGNORE on (scope, tool, arguments)), then
        refreshes; safe while other processes write the same file."""
        report = RecordReport()
        rows, now = [], time.time()
        for record in records:
            if not isinstance(record.tool, str) or not record.tool:
                raise ToolCacheError(f"a tool name must be a non-empty string, got {record.tool!r}")
            if not isinstance(record.result, str):
                raise ToolCacheError(
                    f"a result must be a string (the text the tool returned), got "
                    f"{type(record.result).__name__} for {record.tool}"
                )
            key = canonical_key(record.arguments)
            rows.append((record.scope or "", record.tool, key, record.result, record.source, now))
        report.records = len(rows)
        with self._lock:
            with self._database("recording"), _transaction(self._connection):
                before = self._connection.total_changes
                try:
                    self._connection.executemany(
                        "INSERT OR IGNORE INTO entries "
                        "(scope, tool, arguments, result, source, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                except UnicodeEncodeError as exc:
                    raise self._error(f"a result or argument is not valid Unicode: {exc}") from None
                report.recorded = self._connection.total_changes - before
            self.refresh()
            for scope, tool, key, result, _, _ in rows:
                entry_index = self._exact_index(tool, key, scope)
                if entry_index is not None and self._entries[entry_index][4] != result:
                    report.conflicting += 1
        report.already_present = report.records - report.recorded
        return report

    def register_tools(self, schemas: Iterable[Mapping[str, Any]]) -> int:
        """Stores tool schemas (OpenAI tool or bare function objects; the first one per name
        stays) for "no recorded result" responses; returns how many were new."""
        rows = []
        for schema in schemas:
            function = _function_schema(schema)
            rows.append((function["name"], json.dumps(function, ensure_ascii=False)))
        with self._lock:
            with self._database("recording tool schemas"), _transaction(self._connection):
                before = self._connection.total_changes
                self._connection.executemany(
                    "INSERT OR IGNORE INTO tools (name, schema) VALUES (?, ?)", rows
                )
                added = self._connection.total_changes - before
            self.refresh()
        return added

    # -- statistics ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Lookups answered per tier since opening (or `reset_stats`), in this process; with
        'unseen_tool' the best-effort answers for tools without entries, and the entry counts."""
        with self._lock:
            lookups = sum(self._counts[tier] for tier in TIERS)
            return {
                "lookups": lookups,
                **self._counts,
                "entries": len(self._entries),
                "tools": len({tool for _, tool in self._index}),
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._counts = dict.fromkeys(self._counts, 0)

    def summary(self, top: int = 10) -> dict[str, Any]:
        """What the file holds (read from the database, not the in-memory index): entries,
        tools, scopes, schemas, and the `top` tools by entry count."""
        with self._lock, self._database("reading the summary"):
            execute = self._connection.execute
            entries, tools, scopes = execute(
                "SELECT count(*), count(DISTINCT tool), count(DISTINCT scope) FROM entries"
            ).fetchone()
            top_tools = execute(
                "SELECT tool, count(*) AS n FROM entries GROUP BY tool ORDER BY n DESC, tool "
                "LIMIT ?",
                (top,),
            ).fetchall()
            schemas = execute("SELECT count(*) FROM tools").fetchone()[0]
        return {
            "path": self.path,
            "schema_version": SCHEMA_VERSION,
            "entries": entries,
            "tools": tools,
            "scopes": scopes,
            "tool_schemas": schemas,
            "top_tools": [{"tool": tool, "entries": count} for tool, count in top_tools],
        }


def _tables(connection: sqlite3.Connection) -> set[str]:
    rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    return {name for (name,) in rows}


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front (waiting up to busy_timeout): a deferred transaction
    # that reads first could not upgrade once another process has written, and fails at once.
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


# --- building from trajectories -----------------------------------------------------------------


@dataclasses.dataclass
class BuildReport:
    """What `build_from_trajectories` found and stored."""

    trajectories: int = 0
    calls: int = 0  # tool calls answered by a tool message, all offered to the cache
    unanswered_calls: int = 0  # tool calls no tool message answered
    orphan_results: int = 0  # tool messages answering no pending call
    tool_schemas: int = 0  # new tool schemas stored
    records: RecordReport = dataclasses.field(default_factory=RecordReport)


def paired_calls(trajectory: Trajectory) -> tuple[list[tuple[str, Any, str]], int, int]:
    """The (tool, arguments, result) of each answered call of a trajectory, in order, with the
    counts of unanswered calls and orphan tool messages.

    A tool message answers the pending call (of the latest assistant turn) with its
    `tool_call_id`, or else the first pending call: trajectories without ids pair in order.
    """
    pairs: list[tuple[str, Any, str]] = []
    pending: list[dict[str, Any]] = []
    unanswered = orphans = 0
    for message in trajectory.messages:
        if message["role"] == "assistant":
            unanswered += len(pending)
            pending = list(message.get("tool_calls", []))
        elif message["role"] == "tool":
            call_id = message.get("tool_call_id")
            call = next((c for c in pending if call_id and c.get("id") == call_id), None)
            if call is None and pending:
                call = pending[0]
            if call is None:
                orphans += 1
                continue
            pending.remove(call)
            function = call["function"]
            pairs.append((function["name"], function["arguments"], message["content"]))
        elif message["role"] == "user":
            unanswered += len(pending)
            pending = []
    return pairs, unanswered + len(pending), orphans


def build_from_trajectories(
    cache: ToolCache,
    paths: Iterable[str | os.PathLike[str]],
    *,
    scope: str | None = None,
    scope_per_trajectory: bool = False,
    batch_size: int = 10_000,
) -> BuildReport:
    """Records every answered tool call of the trajectories JSONL files (and their tool schemas).

    Entries get `scope`, or with `scope_per_trajectory` the trajectory's id (for tools whose
    results depend on the task's state). Raises TrajectoryError for a bad record."""
    from cacherl_jax.chat.trajectory import read_jsonl

    report = BuildReport()
    batch: list[ToolRecord] = []

    def flush() -> None:
        done = cache.record_many(batch)
        for field in dataclasses.fields(RecordReport):
            value = getattr(report.records, field.name) + getattr(done, field.name)
            setattr(report.records, field.name, value)
        batch.clear()

    for path in paths:
        for trajectory in read_jsonl(path):
            report.trajectories += 1
            if trajectory.tools:
                report.tool_schemas += cache.register_tools(trajectory.tools)
            pairs, unanswered, orphans = paired_calls(trajectory)
            report.unanswered_calls += unanswered
            report.orphan_results += orphans
            entry_scope = trajectory.id if scope_per_trajectory else scope
            for tool, arguments, result in pairs:
                batch.append(
                    ToolRecord(tool, arguments, result, entry_scope, f"trajectory:{trajectory.id}")
                )
            report.calls += len(pairs)
            if len(batch) >= batch_size:
                flush()
    if batch:
        flush()
    return report
