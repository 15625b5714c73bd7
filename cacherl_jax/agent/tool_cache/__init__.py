"""The three-tier tool cache: recorded (tool, arguments) -> result pairs that answer rollouts' calls.

Every `ToolCache.lookup` returns a `CacheHit` (result, tier, score, entry):

- **exact**: an entry of the same tool whose arguments are canonically equal (`canonical_key`:
  key order, 1 == 1.0, whitespace runs in strings collapsed and trimmed, Unicode NFC).
- **fuzzy**: the most similar entry of the same tool with the *same argument names*, scoring at
  least `fuzzy_threshold` (`argument_similarity`: the mean over arguments of a 0-100 per-value
  similarity -- rapidfuzz's `fuzz.ratio` for strings, relative difference for numbers).
- **best_effort**: the nearest entry of the tool found below the threshold (or with other argument
  names, which are never fuzzy), or -- for a tool never recorded -- a JSON "no recorded result"
  response shaped by the tool's schema when one is known (`entry` is then None).

Scores are on rapidfuzz's 0-100 scale: 100 for exact hits, 0 for a tool never seen.

Entries live in SQLite (`storage`: WAL, so several processes read and write one file at once; a
unique (scope, tool, arguments) key with INSERT OR IGNORE makes the first recorded result win) and
in an in-memory index built from it (`index`): a dict per tool for exact keys (an exact lookup is
the canonical key and one dict lookup), and for fuzzy search per (tool, argument names) blocks
(`block`) holding, per argument (`column`), its distinct values with the entries that hold them,
an index of the hashes of every text value and of its one-character deletions (finds all values
within one edit of a text), a trigram index over text values and a sorted array of numbers
(`neighbours`). A fuzzy lookup scores only entries that share the query's rare values or hold a
near value, so its cost follows the number of near values, not the number of entries of the tool;
for a call with one argument changed by an edit, or a number, it usually proves the entry it finds
the nearest (see `block.Block`). Scoring is rapidfuzz's (`fuzz.ratio`, `process.cdist`,
`process.extract`) and numpy's; the search sizes are in `limits`.

Scopes: each entry is stored with a scope string ("" when none is given). With
`scope_mode="global"` every lookup sees every entry; with `"scoped"` a lookup in scope S sees only
entries recorded in S (use one scope per task or environment snapshot when results depend on
state). Entries written by other processes become visible after `refresh()`.

A `ToolCache` is safe to share between threads (one lock) but not across `fork`: open one per
process. On a pod every host works on a local copy (`snapshot`) and the hosts' hybrid-mode writes
are merged in (step, process, row) order (`take_delta`, `sync`, `merge`; see `snapshot`).
"""

from cacherl_jax.agent.tool_cache.cache import SCOPE_MODES, ToolCache, ToolCacheConfig
from cacherl_jax.agent.tool_cache.ingest import BuildReport, build_from_trajectories, paired_calls
from cacherl_jax.agent.tool_cache.keys import (
    argument_similarity,
    canonical_arguments,
    canonical_key,
    canonical_value,
    normalise_string,
    value_similarity,
)
from cacherl_jax.agent.tool_cache.records import (
    TIERS,
    CacheEntry,
    CacheHit,
    RecordReport,
    Tier,
    ToolCacheError,
    ToolRecord,
    no_record_response,
)
from cacherl_jax.agent.tool_cache.snapshot import (
    Delta,
    Origin,
    delta_from_json,
    delta_to_json,
    merge,
    snapshot,
    sync,
    take_delta,
)
from cacherl_jax.agent.tool_cache.storage import FORMAT_NAME, SCHEMA_VERSION

__all__ = [
    "FORMAT_NAME",
    "SCHEMA_VERSION",
    "SCOPE_MODES",
    "TIERS",
    "BuildReport",
    "CacheEntry",
    "CacheHit",
    "Delta",
    "Origin",
    "RecordReport",
    "Tier",
    "ToolCache",
    "ToolCacheConfig",
    "ToolCacheError",
    "ToolRecord",
    "argument_similarity",
    "build_from_trajectories",
    "canonical_arguments",
    "canonical_key",
    "canonical_value",
    "delta_from_json",
    "delta_to_json",
    "merge",
    "no_record_response",
    "normalise_string",
    "paired_calls",
    "snapshot",
    "sync",
    "take_delta",
    "value_similarity",
]
