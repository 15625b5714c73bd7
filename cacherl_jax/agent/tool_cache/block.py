"""The fuzzy search over one block: the entries of one tool (in one partition) with one set of
argument names. See `Block` for the search and when its answer is the true nearest entry."""

from __future__ import annotations

import array
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cacherl_jax.agent.tool_cache import limits
from cacherl_jax.agent.tool_cache.column import ONLY_NUMBER, ONLY_TEXT, Column
from cacherl_jax.agent.tool_cache.keys import NUMBER, TEXT, IndexValue, index_value
from cacherl_jax.agent.tool_cache.neighbours import unique_inverse

Query = dict[str, IndexValue]  # the query's value per argument name, ascending names
Known = dict[str, dict[int, float]]  # similarities computed, per name and value id
Neighbours = dict[str, tuple[dict[int, float], float]]  # per name: ({value id: sim}, bound)
Best = tuple[float, int]  # (summed similarity, local id)


class Block:
    """The entries of one tool (in one partition) with one set of argument names.

    Search, for a block too large to score whole (FULL_SCORE_MAX_ENTRIES), with the query's
    recorded values (those some entry holds) and the entries found so far:
    1. If at most FEW_SHARING entries hold the query's least common recorded value (the usual
       case when one argument of a recorded call was changed), those are scored and the best
       answers if it reaches the fuzzy threshold.
    2. If every argument that is not recorded is a text (up to EDIT_MAX_LENGTH characters) or a
       number in a column of numbers, its neighbour values are looked up (those within one edit,
       by `EditIndex`; the nearest numbers on each side) and the entries holding them scored. An
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
    better entry does not share the rare value): a call with one number moved can be answered in
    step 1 or 3 by the entry sharing its other values where another entry, with two numbers a
    little off, scores higher.
    """

    __slots__ = ("columns", "names", "rows")

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.rows = array.array("q")  # global entry index per local entry id
        self.columns = {name: Column() for name in names}

    def add(self, arguments: Mapping[str, Any], entry_index: int) -> None:
        """Appends an entry with these (canonical) arguments, one for each of the block's names."""
        self.rows.append(entry_index)
        for name, column in self.columns.items():
            value = arguments[name]
            if type(value) is str:  # the common case, without building a tuple
                column.add(value, TEXT, value, math.nan)
            else:
                column.add(*index_value(value))

    def build_indexes(self) -> None:
        """Builds every column's postings and value indexes now, rather than on first use."""
        if len(self.rows) > limits.FULL_SCORE_MAX_ENTRIES:
            for column in self.columns.values():
                column.build_indexes()

    # -- the search ------------------------------------------------------------------------------

    def search(self, query: Query, union_size: int, good_enough: float) -> tuple[float, int]:
        """(score, entry index) of the best entry found for the query values of shared names;
        ties go to the earliest entry found. The score is the summed similarity over
        `union_size`. When the entries sharing the query's rarest recorded value hold one scoring
        `good_enough`, the best of those answers without a further search."""
        recorded = self._recorded(query)
        known: Known = {name: {value_id: 100.0} for name, value_id in recorded.items()}
        if len(self.rows) <= limits.FULL_SCORE_MAX_ENTRIES:
            return self._answer(self._best(query, range(len(self.rows)), known), union_size)
        rarest, rarest_count = self._rarest(recorded)
        best: Best = (-1.0, 0)
        if rarest and rarest_count <= limits.FEW_SHARING:  # step 1
            best = self._score_sharing(query, rarest, recorded, rarest_count, known)
            if best[0] / union_size >= good_enough:
                return self._answer(best, union_size)
        neighbours: Neighbours = {}
        if len(recorded) < len(query):  # step 2
            upper, best = self._score_neighbours(query, recorded, neighbours, known, best)
            if best[0] >= upper - 1e-9:
                return self._answer(best, union_size)
        if rarest and limits.FEW_SHARING < rarest_count <= limits.SHORTCUT_ENTRIES:  # step 3
            best = _better(best, self._score_holders(query, rarest, recorded, known))
            if best[0] / union_size >= good_enough:
                return self._answer(best, union_size)
        local_ids = self._candidates(query, recorded, neighbours, known)  # step 4
        return self._answer(_better(best, self._best(query, local_ids, known)), union_size)

    def _answer(self, best: Best, union_size: int) -> tuple[float, int]:
        return best[0] / union_size, self.rows[best[1]]

    def _recorded(self, query: Query) -> dict[str, int]:
        """Name -> value id of the query's value, for the names where some entry holds it."""
        recorded = {}
        for name, value in query.items():
            value_id = self.columns[name].vocabulary.get(value[0])
            if value_id is not None:
                recorded[name] = value_id
        return recorded

    def _rarest(self, recorded: dict[str, int]) -> tuple[str, int]:
        """(name, entry count) of the recorded value the fewest entries hold; ("", 0) if none."""
        rarest, rarest_count = "", 0
        for name, value_id in recorded.items():
            count = self.columns[name].count(value_id)
            if not rarest or count < rarest_count:
                rarest, rarest_count = name, count
        return rarest, rarest_count

    def _score_sharing(
        self, query: Query, rarest: str, recorded: dict[str, int], count: int, known: Known
    ) -> Best:
        """Step 1: the best of the few entries holding the rarest recorded value."""
        local_ids = self.columns[rarest].postings(recorded[rarest])
        if count != 1:
            return self._best(query, local_ids, known)
        (local_id,) = local_ids  # the usual case, without `_best`'s bookkeeping
        total = 0.0
        for name, value in query.items():
            column = self.columns[name]
            value_id = column.entry_value_ids[local_id]
            if recorded.get(name) == value_id:
                total += 100.0
            else:
                total += column.similarity(value, value_id)
        return total, local_id

    def _score_neighbours(
        self,
        query: Query,
        recorded: dict[str, int],
        neighbours: Neighbours,
        known: Known,
        best: Best,
    ) -> tuple[float, Best]:
        """Step 2: (upper bound on any entry not scored, best so far) after scoring the entries
        holding a neighbour value; fills `neighbours` and `known`."""
        upper, local_ids = self._neighbour_candidates(query, recorded, neighbours)
        for name, (found, _) in neighbours.items():
            known.setdefault(name, {}).update(found)
        if local_ids:
            best = _better(best, self._best(query, local_ids, known))
        return upper, best

    def _score_holders(
        self, query: Query, rarest: str, recorded: dict[str, int], known: Known
    ) -> Best:
        """Step 3: the best of the entries holding the rarest recorded value."""
        local_ids = self.columns[rarest].postings(recorded[rarest])
        if len(local_ids) <= limits.VECTORISE_ABOVE:
            return self._best(query, local_ids, known)
        return self._best_of_many(query, np.frombuffer(local_ids, dtype=np.int32), rarest)

    def _neighbour_candidates(
        self, query: Query, recorded: dict[str, int], neighbours: Neighbours
    ) -> tuple[float, list[int]]:
        """(upper bound, ascending local ids) for step 2 of the search: the entries holding a
        neighbour value (`edit_neighbours`, `number_neighbours`: stored in `neighbours` per name,
        with their bound) more similar than the bound on some argument that is not recorded, and
        the highest summed similarity any other entry can have. The bound is infinite when an
        argument that is not recorded is neither a text nor a number in a column of numbers, and
        no entries are returned when there would be more than POSTINGS_BUDGET."""
        upper = 100.0 * len(recorded)
        for name, value in query.items():
            if name not in recorded:
                found = _value_neighbours(self.columns[name], value)
                if found is None:
                    return math.inf, []
                neighbours[name] = found
                upper += found[1]
        chosen: set[int] = set()
        budget = limits.POSTINGS_BUDGET
        for name, (found, bound) in neighbours.items():
            column = self.columns[name]
            for value_id, similarity in found.items():
                if similarity > bound:  # the others count no more than the bound
                    chosen.update(column.postings(value_id))
                    if len(chosen) > budget:
                        return math.inf, []
        return upper, sorted(chosen)

    # -- scoring entries -------------------------------------------------------------------------

    def _best(self, query: Query, local_ids: Sequence[int], known: Known) -> Best:
        """(summed similarity, local id) of the best of some entries (ascending ids, so ties keep
        the earliest). Plain Python for a few entries, reusing the similarities already known
        (`known` holds 100 for the query's own value wherever it is recorded); numpy for many,
        where Python's per-entry work would dominate."""
        if len(local_ids) > limits.VECTORISE_ABOVE:
            return self._best_of_many(query, np.asarray(local_ids, dtype=np.intp))
        columns = [
            (self.columns[name], value, known.setdefault(name, {})) for name, value in query.items()
        ]
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

    def _best_of_many(self, query: Query, local_ids: np.ndarray, holding: str = "") -> Best:
        """`_best` with numpy; every entry holds the query's value of the name `holding`."""
        total = np.zeros(len(local_ids))
        for name, value in query.items():
            if name == holding:
                total += 100.0
                continue
            column = self.columns[name]
            value_ids = np.frombuffer(column.entry_value_ids, dtype=np.int32)[local_ids]
            if len(column.texts) > limits.SMALL_VOCABULARY or column.kinds_seen == ONLY_NUMBER:
                total += column.similarities(value, value_ids)  # few repeats: each one
            else:
                unique_ids, inverse = unique_inverse(value_ids)
                total += column.similarities(value, unique_ids)[inverse]
        best = int(total.argmax())  # the first maximum
        return float(total[best]), int(local_ids[best])

    # -- step 4: candidates from near values -----------------------------------------------------

    def _candidates(
        self, query: Query, recorded: dict[str, int], neighbours: Neighbours, known: Known
    ) -> list[int]:
        """Ascending local ids to score (step 4); adds the similarities it computes to `known`.
        The near values of an argument are its step 2 neighbours when the best of them comes
        within NEIGHBOUR_SLACK of their bound (no other value is more similar by more than that),
        else those of `Column.near`."""
        lists, common = self._value_lists(query, recorded, neighbours, known)
        chosen: set[int] = set()
        budget = limits.POSTINGS_BUDGET
        for _, count, name, value_id in lists:
            if chosen and len(chosen) + count > budget:
                break
            chosen.update(self.columns[name].postings(value_id))
        if not chosen:  # only very common values: a slice of the least common one, or entry 0
            if common is None:
                return [0]
            _, name, value_id = common
            chosen.update(self.columns[name].postings(value_id)[:budget])
        if len(chosen) <= limits.RESCORE_CANDIDATES:
            return sorted(chosen)
        return self._rank(np.array(sorted(chosen)), known)

    def _value_lists(
        self, query: Query, recorded: dict[str, int], neighbours: Neighbours, known: Known
    ) -> tuple[list[tuple[float, int, str, int]], tuple[int, str, int] | None]:
        """The candidate values of step 4 as (similarity, entries holding it, name, value id),
        most similar then rarest first, and the least common recorded value held by more than
        POSTINGS_BUDGET entries as (count, name, value id), if any."""
        lists: list[tuple[float, int, str, int]] = []
        common: tuple[int, str, int] | None = None
        for name, value in query.items():
            column = self.columns[name]
            value_id = recorded.get(name)
            if value_id is not None:
                count = column.count(value_id)
                if count <= limits.POSTINGS_BUDGET:
                    lists.append((100.0, count, name, value_id))
                elif common is None or count < common[0]:
                    common = (count, name, value_id)
                continue
            near, bound = neighbours.get(name, ({}, math.inf))
            if not near or max(near.values()) < bound - limits.NEIGHBOUR_SLACK:
                near = column.near(value, limits.NEAR_VALUES)
                known.setdefault(name, {}).update(near)
            lists.extend(
                (similarity, column.count(value_id), name, value_id)
                for value_id, similarity in near.items()
            )
        lists.sort(key=lambda item: (-item[0], item[1]))
        return lists, common

    def _rank(self, local_ids: np.ndarray, known: Known) -> list[int]:
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
        keep = limits.RESCORE_CANDIDATES
        cut = np.partition(partial, -keep)[-keep]
        return local_ids[partial >= cut][: 2 * keep].tolist()


def _value_neighbours(column: Column, value: IndexValue) -> tuple[dict[int, float], float] | None:
    """The column's neighbours of a query value that is not recorded, with their bound (see
    `Column.edit_neighbours`), or None where no bound can be given: a value neither a text up to
    EDIT_MAX_LENGTH characters nor a number in a column of numbers."""
    _, kind, text, number = value
    if kind == NUMBER and column.kinds_seen == ONLY_NUMBER:
        return column.number_neighbours(number)
    if kind == TEXT and 0 < len(text) <= limits.EDIT_MAX_LENGTH and column.kinds_seen & ONLY_TEXT:
        return column.edit_neighbours(text)
    return None


def _better(a: Best, b: Best) -> Best:
    """The higher of two (summed similarity, local id), the earlier entry on a tie."""
    if b[0] > a[0] or (b[0] == a[0] and b[1] < a[1]):
        return b
    return a
