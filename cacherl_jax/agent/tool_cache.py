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
in-memory index built from it: a dict per tool for exact keys, and for fuzzy search per
(tool, argument names) "blocks" holding, per argument, its distinct values with posting lists of
the entries that hold them, a trigram index over string values and a sorted array of numbers.
A fuzzy lookup scores only entries that share a near value on some argument, so its cost follows
the number of near values, not the number of entries of the tool (see `_Block`).

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
import os
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
from rapidfuzz import fuzz, process

if TYPE_CHECKING:
    from cacherl_jax.data.trajectory import Trajectory

SCHEMA_VERSION = 1
FORMAT_NAME = "cacherl_jax.tool_cache"
SQLITE_HEADER = b"SQLite format 3\x00"

Tier = Literal["exact", "fuzzy", "best_effort"]
TIERS: tuple[Tier, ...] = ("exact", "fuzzy", "best_effort")
SCOPE_MODES = ("global", "scoped")

# Search sizes of the fuzzy index. Blocks this small are scored whole (exact nearest entry).
FULL_SCORE_MAX_ENTRIES = 32
# String vocabularies up to this size are compared whole; larger ones go through a trigram index.
SMALL_VOCABULARY = 1024
NEAR_VALUES = 8  # nearest distinct values kept per argument
POSTINGS_BUDGET = 1024  # entries gathered as candidates per lookup, rarest values first
GRAM_POSTINGS_BUDGET = 8192  # trigram postings read per string value, rarest trigrams first
RESCORE_CANDIDATES = 64  # candidates scored exactly after ranking by a partial score
SHORTCUT_ENTRIES = 512  # entries sharing the query's rarest recorded value, scored first
VECTORISE_ABOVE = 48  # candidates scored with numpy rather than plain Python
REBUILD_AFTER = 1024  # values added since an index was built before it is rebuilt

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


class ToolCacheError(ValueError):
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
        text = repr(value) if math.isfinite(value) else _dumps_canonical(value)
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
    """

    path: str
    fuzzy_threshold: float = 80.0
    scope_mode: Literal["global", "scoped"] = "global"
    busy_timeout_s: float = 30.0

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


class _Column:
    """One argument of a block: its distinct values (ids in order of first appearance), the
    entries holding each value, and each entry's value id."""

    __slots__ = (
        "entry_value_ids",
        "grams",
        "kinds",
        "number_index",
        "numbers",
        "postings",
        "texts",
        "vocabulary",
    )

    def __init__(self):
        self.vocabulary: dict[Any, int] = {}
        self.texts: list[str] = []
        self.kinds = bytearray()
        self.numbers = array.array("d")
        self.postings: list[array.array] = []
        self.entry_value_ids = array.array("i")
        self.grams: _GramIndex | None = None
        self.number_index: _NumberIndex | None = None

    def add(self, key: Any, kind: int, text: str, number: float, local_id: int) -> None:
        value_id = self.vocabulary.get(key)
        if value_id is None:
            value_id = len(self.texts)
            self.vocabulary[key] = value_id
            self.texts.append(text)
            self.kinds.append(kind)
            self.numbers.append(number)
            self.postings.append(array.array("i"))
        self.postings[value_id].append(local_id)
        self.entry_value_ids.append(value_id)

    def similarity(self, query: tuple[Any, int, str, float], value_id: int) -> float:
        """`value_similarity(query, value)` for one value id, as `similarities` computes it."""
        key, kind, text, number = query
        if self.vocabulary.get(key) == value_id:
            return 100.0
        value_kind = self.kinds[value_id]
        if kind == _NUMBER and value_kind == _NUMBER:
            return _number_similarity(number, self.numbers[value_id])
        if kind == _EXACT_ONLY or value_kind == _EXACT_ONLY:
            return 0.0
        return fuzz.ratio(text, self.texts[value_id])

    def similarities(self, query: tuple[Any, int, str, float], value_ids: np.ndarray) -> np.ndarray:
        """`value_similarity(query, value)` for each value id."""
        key, kind, text, number = query
        similarity = np.zeros(len(value_ids))
        if not len(value_ids):
            return similarity
        kinds = np.frombuffer(self.kinds, dtype=np.uint8)[value_ids]
        if kind != _EXACT_ONLY:
            as_text = kinds == _TEXT
            if kind == _NUMBER:
                numeric = kinds == _NUMBER
                numbers = np.frombuffer(self.numbers, dtype=np.float64)[value_ids[numeric]]
                similarity[numeric] = _number_similarities(number, numbers)
            else:
                as_text |= kinds == _NUMBER
            positions = np.flatnonzero(as_text)
            if len(positions):
                texts = [self.texts[i] for i in value_ids[positions].tolist()]
                similarity[positions] = process.cdist(
                    [text], texts, scorer=fuzz.ratio, dtype=np.float64
                )[0]
        query_id = self.vocabulary.get(key)
        if query_id is not None:
            similarity[value_ids == query_id] = 100.0
        return similarity

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
            kinds = np.frombuffer(self.kinds, dtype=np.uint8)[built:]
            comparable = kinds == _NUMBER if kind == _NUMBER else kinds != _EXACT_ONLY
            del kinds  # release the buffer so `add` can grow the bytearray
            found = np.concatenate([found, built + np.flatnonzero(comparable)])
        if not len(found):
            return {}
        similarity = self.similarities(query, found)
        if len(found) > limit:
            best = np.argpartition(-similarity, limit)[:limit]
            found, similarity = found[best], similarity[best]
        return dict(zip(found.tolist(), similarity.tolist(), strict=True))


class _Block:
    """The entries of one tool (in one partition) with one set of argument names.

    Search, for a block too large to score whole (FULL_SCORE_MAX_ENTRIES):
    1. If at most SHORTCUT_ENTRIES entries hold the query's least common recorded value (the
       usual case when one argument of a recorded call was changed), those are scored and the best
       answers if it reaches the fuzzy threshold.
    2. Otherwise, per query argument, the candidate values are the query's own value when recorded
       (unless so common that it says little) or else its NEAR_VALUES nearest values (all values
       compared for small vocabularies, a trigram index for large ones, sorted order for numbers).
       The entries holding them, rarest values first up to POSTINGS_BUDGET, are ranked by the
       similarities those lists give and the best RESCORE_CANDIDATES are scored exactly.
    The answer is the best entry scored. It is the true nearest entry unless none of that entry's
    values is among the candidates (or, in step 1, a better entry does not share the rare value):
    on the benchmark, 96-99% of perturbed calls get the exhaustive best score.
    """

    __slots__ = ("columns", "names", "rows")

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.rows = array.array("q")  # global entry index per local entry id
        self.columns = {name: _Column() for name in names}

    def add(self, arguments: Mapping[str, Any], entry_index: int) -> None:
        local_id = len(self.rows)
        self.rows.append(entry_index)
        for name, column in self.columns.items():
            value = arguments[name]
            if type(value) is str:  # the common case, without building a tuple
                column.add(value, _TEXT, value, math.nan, local_id)
            else:
                column.add(*_value(value), local_id)

    def search(
        self, query: dict[str, tuple], union_size: int, good_enough: float
    ) -> tuple[float, int]:
        """(score, entry index) of the best entry found for the query values of shared names;
        ties go to the earliest entry. When the entries sharing the query's rarest recorded value
        hold one scoring `good_enough`, the best of those answers without a near-value search."""
        if len(self.rows) <= FULL_SCORE_MAX_ENTRIES:
            total, local_id = self._best(query, list(range(len(self.rows))), {})
            return total / union_size, self.rows[local_id]
        known: dict[str, dict[int, float]] = {}
        sharing = self._sharing_rarest_value(query, known)
        if sharing:
            total, local_id = self._best(query, sharing, known)
            if total / union_size >= good_enough:
                return total / union_size, self.rows[local_id]
        total, local_id = self._best(query, self._candidates(query, known), known)
        return total / union_size, self.rows[local_id]

    def _best_of_many(self, query: dict[str, tuple], local_ids: np.ndarray) -> tuple[float, int]:
        total = np.zeros(len(local_ids))
        for name, value in query.items():
            column = self.columns[name]
            value_ids = np.frombuffer(column.entry_value_ids, dtype=np.int32)[local_ids]
            unique_ids, inverse = _unique_inverse(value_ids)
            total += column.similarities(value, unique_ids)[inverse]
        best = int(np.argmax(total))  # the first maximum
        return float(total[best]), int(local_ids[best])

    def _sharing_rarest_value(
        self, query: dict[str, tuple], known: dict[str, dict[int, float]]
    ) -> list[int]:
        """The entries holding the query's least common recorded value, if at most
        SHORTCUT_ENTRIES do."""
        rarest: array.array | None = None
        for name, value in query.items():
            column = self.columns[name]
            value_id = column.vocabulary.get(value[0])
            if value_id is not None:
                known.setdefault(name, {})[value_id] = 100.0
                postings = column.postings[value_id]
                if rarest is None or len(postings) < len(rarest):
                    rarest = postings
        return rarest.tolist() if rarest is not None and len(rarest) <= SHORTCUT_ENTRIES else []

    def _best(
        self, query: dict[str, tuple], local_ids: list[int], known: dict[str, dict[int, float]]
    ) -> tuple[float, int]:
        """(summed similarity, local id) of the best of some entries (ascending ids, so ties keep
        the earliest). Plain Python for a few entries, reusing the similarities already known;
        numpy for many, where Python's per-entry work would dominate."""
        if len(local_ids) > VECTORISE_ABOVE:
            return self._best_of_many(query, np.array(local_ids))
        totals = [0.0] * len(local_ids)
        for name, value in query.items():
            column = self.columns[name]
            memo = known.setdefault(name, {})
            entry_value_ids = column.entry_value_ids
            value_ids = [entry_value_ids[local_id] for local_id in local_ids]
            missing = [value_id for value_id in set(value_ids) if value_id not in memo]
            if len(missing) > 4:  # one rapidfuzz call for many
                similarity = column.similarities(value, np.array(missing)).tolist()
                memo.update(zip(missing, similarity, strict=True))
            else:
                memo.update((value_id, column.similarity(value, value_id)) for value_id in missing)
            totals = [total + memo[i] for total, i in zip(totals, value_ids, strict=True)]
        best = max(range(len(totals)), key=totals.__getitem__)
        return totals[best], local_ids[best]

    def _candidates(self, query: dict[str, tuple], known: dict[str, dict[int, float]]) -> list[int]:
        """Ascending local ids to score; adds the similarities it computes to `known`."""
        lists: list[tuple[float, int, str, int]] = []  # similarity, postings, name, value id
        common: tuple[int, str, int] | None = None  # the least common over-budget exact value
        for name, value in query.items():
            column = self.columns[name]
            value_id = column.vocabulary.get(value[0])
            if value_id is not None:
                known.setdefault(name, {})[value_id] = 100.0
                count = len(column.postings[value_id])
                if count <= POSTINGS_BUDGET:
                    lists.append((100.0, count, name, value_id))
                elif common is None or count < common[0]:
                    common = (count, name, value_id)
                continue
            near = column.near(value, NEAR_VALUES)
            known.setdefault(name, {}).update(near)
            lists.extend(
                (similarity, len(column.postings[value_id]), name, value_id)
                for value_id, similarity in near.items()
            )
        lists.sort(key=lambda item: (-item[0], item[1]))

        chosen: set[int] = set()
        for _, count, name, value_id in lists:
            if chosen and len(chosen) + count > POSTINGS_BUDGET:
                break
            chosen.update(self.columns[name].postings[value_id])
        if not chosen:  # only very common values: a slice of the least common one, or entry 0
            if common is None:
                return [0]
            _, name, value_id = common
            chosen.update(self.columns[name].postings[value_id][:POSTINGS_BUDGET])
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


@dataclasses.dataclass
class _ToolIndex:
    exact: dict[str, int] = dataclasses.field(default_factory=dict)  # key -> entry index
    blocks: dict[tuple[str, ...], _Block] = dataclasses.field(default_factory=dict)
    # Entries not yet in a block: blocks are filled on the tool's first non-exact lookup, so
    # opening a large cache only builds the exact index.
    pending: array.array = dataclasses.field(default_factory=lambda: array.array("q"))

    def index_pending(self, keys: list[str]) -> None:
        for entry_index in self.pending:
            arguments = json.loads(keys[entry_index])
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
        self._lock = threading.RLock()
        self._connection = self._connect(create)
        # Entries in rowid order, column by column (less memory than one object per entry).
        self._rowids = array.array("q")
        self._scopes: list[str] = []
        self._tools: list[str] = []
        self._keys: list[str] = []
        self._results: list[str] = []
        self._sources: list[str] = []
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
        return len(self._rowids)

    # -- loading ---------------------------------------------------------------------------------

    def refresh(self) -> int:
        """Loads entries and tool schemas stored since the last refresh (by any process); returns
        how many entries were added. Incremental: rowids only grow."""
        with self._lock, self._database("reading entries"):
            before = len(self._rowids)
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
            return len(self._rowids) - before

    def _add(self, rowid: int, scope: str, tool: str, key: str, result: str, source: str) -> None:
        strings = self._strings
        scope = strings.setdefault(scope, scope)
        tool = strings.setdefault(tool, tool)
        source = strings.setdefault(source, source)
        entry_index = len(self._rowids)
        self._rowids.append(rowid)
        self._scopes.append(scope)
        self._tools.append(tool)
        self._keys.append(key)
        self._results.append(result)
        self._sources.append(source)
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
                tool_index.index_pending(self._keys)
                for block in tool_index.blocks.values():
                    if len(block.rows) <= FULL_SCORE_MAX_ENTRIES:
                        continue
                    for column in block.columns.values():
                        if _NUMBER in column.kinds:
                            column.number_index = _NumberIndex(column)
                        if len(column.texts) > SMALL_VOCABULARY and _TEXT in column.kinds:
                            column.grams = _GramIndex(column)

    # -- lookups ---------------------------------------------------------------------------------

    def _partition(self, scope: str | None) -> str:
        return (scope or "") if self.config.scope_mode == "scoped" else ""

    def _entry(self, entry_index: int) -> CacheEntry:
        # tuple.__new__ skips NamedTuple's keyword-handling __new__ (exact hits are ~10 us).
        return tuple.__new__(
            CacheEntry,
            (
                self._rowids[entry_index],
                self._scopes[entry_index],
                self._tools[entry_index],
                self._keys[entry_index],
                self._results[entry_index],
                self._sources[entry_index],
            ),
        )

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
        with self._lock:
            tool_index = self._index.get((self._partition(scope), tool))
            if tool_index is not None:
                entry_index = tool_index.exact.get(key)
                if entry_index is not None:
                    self._counts["exact"] += 1
                    entry = self._entry(entry_index)
                    return CacheHit(entry.result, "exact", 100.0, entry)
                score, entry_index, same_names = self._nearest(tool_index, canonical)
                tier: Tier = (
                    "fuzzy"
                    if same_names and score >= self.config.fuzzy_threshold
                    else "best_effort"
                )
                self._counts[tier] += 1
                return CacheHit(self._results[entry_index], tier, score, self._entry(entry_index))
            self._counts["best_effort"] += 1
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
            tool_index.index_pending(self._keys)
        names = tuple(sorted(canonical))
        query = {name: _value(canonical[name]) for name in names}
        block = tool_index.blocks.get(names)
        if block is not None:
            threshold = self.config.fuzzy_threshold
            return (*block.search(query, max(len(names), 1), threshold), True)

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
                if entry_index is not None and self._results[entry_index] != result:
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
                "entries": len(self._rowids),
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
    from cacherl_jax.data.trajectory import read_jsonl

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
