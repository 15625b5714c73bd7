"""What the tool cache shows a wrong call, counted over a run's validation records.

    totals = measure(results_dir, ["full:sft", "full:grpo"], cache_settings)
    print(markdown_table(totals))

A results folder (`experiments/reproduce_paper.py`'s `runs/seed<S>/<variant>/`) keeps every
validation task's calls. Each seed's validation tasks are generated again, a cache is built from
their reference trajectories the way GRPO builds its own (one scope per task), and every call is
replayed on it and on the live tools (`fidelity.wrong_call_answers`). The counts are per domain
(the part of the task kind before the dot), summed over seeds. Reads files only: no model runs.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cacherl_jax.agent.environment import Task
from cacherl_jax.agent.fidelity import wrong_call_answers
from cacherl_jax.agent.procedural import generate_tasks, write_trajectories
from cacherl_jax.agent.tool_cache import ToolCache, ToolCacheConfig, build_from_trajectories

COLUMNS = (
    "calls",
    "matched",
    "unmatched",
    "unmatched_exact",
    "unmatched_fuzzy",
    "unmatched_best_effort",
    "cache_shows_reference",
    "live_shows_reference",
)
Totals = dict[str, dict[str, Counter]]  # {"variant:stage": {domain: counts}}


def validation_cache(
    seed: int, n_tasks: int, workdir: Path, cache_settings: Mapping[str, Any]
) -> tuple[dict[str, Task], ToolCache]:
    """The seed's validation tasks by id, and a cache of their reference trajectories built as
    GRPO builds its cache from its training trajectories (`cache_settings`: the GRPO config's
    `fuzzy_threshold` and `scope_mode`)."""
    tasks = generate_tasks("validation", n_tasks, seed)
    trajectories = workdir / f"validation_seed{seed}.jsonl"
    write_trajectories(trajectories, tasks, reasoning=False)
    config = ToolCacheConfig(
        str(workdir / f"cache_seed{seed}.sqlite"),
        fuzzy_threshold=cache_settings["fuzzy_threshold"],
        scope_mode=cache_settings["scope_mode"],
    )
    cache = ToolCache(config)
    build_from_trajectories(cache, [str(trajectories)], scope_per_trajectory=True)
    return {task.id: task for task in tasks}, cache


def count_records(
    records: Sequence[dict], tasks: Mapping[str, Task], cache: ToolCache
) -> dict[str, Counter]:
    """Per domain, `wrong_call_answers` summed over the records' tasks (`calls`: every call,
    the unparsed ones too)."""
    by_domain: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        calls = [(c["name"], c["arguments"]) for c in record["calls"]
                 if isinstance(c.get("arguments"), dict)]  # fmt: skip
        counts = wrong_call_answers(tasks[record["task_id"]], calls, cache)
        counts["calls"] = len(record["calls"])
        by_domain[record["kind"].split(".")[0]].update(counts)
    return by_domain


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def seed_dirs(results: Path) -> list[tuple[int, Path]]:
    """The `runs/seed<S>/` folders of a results folder, by seed."""
    found = []
    for path in (results / "runs").glob("seed*"):
        match = re.fullmatch(r"seed(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def measure(results: Path, runs: Sequence[str], cache_settings: Mapping[str, Any]) -> Totals:
    """{"variant:stage": {domain: counts}} summed over every seed of `results`; a seed without a
    run's validation file is left out of that run. Each seed's tasks and cache are built once,
    for all its runs."""
    totals: Totals = {run: defaultdict(Counter) for run in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for seed, seed_dir in seed_dirs(results):
            records_by_run = {}
            for run in runs:
                variant, stage = run.split(":")
                path = seed_dir / variant / f"validation_{stage}.jsonl"
                if path.exists():
                    records_by_run[run] = _read_jsonl(path)
            if not records_by_run:
                continue
            n_tasks = max(len({r["task_id"] for r in rs}) for rs in records_by_run.values())
            tasks, cache = validation_cache(seed, n_tasks, Path(tmp), cache_settings)
            with cache:
                for run, records in records_by_run.items():
                    for domain, counts in count_records(records, tasks, cache).items():
                        totals[run][domain].update(counts)
    return totals


def table_rows(totals: Totals) -> list[list[Any]]:
    """One row per run and domain, then the run's total ("all"), in `COLUMNS` order; runs without
    records are left out."""
    rows = []
    for run, by_domain in totals.items():
        if not by_domain:
            continue
        for domain in [*sorted(by_domain), "all"]:
            counts = by_domain[domain] if domain != "all" else sum(by_domain.values(), Counter())
            rows.append([run, domain, *(counts[c] for c in COLUMNS)])
    return rows


def markdown_table(totals: Totals) -> str:
    lines = ["| run | domain | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table_rows(totals)]
    return "\n".join(lines) + "\n"


def shares(totals: Totals) -> dict[str, dict[str, float]]:
    """Per run with records: the unmatched calls, and the shares of them the cache and the live
    tools showed a reference call's result."""
    out = {}
    for run, by_domain in totals.items():
        if not by_domain:
            continue
        total = sum(by_domain.values(), Counter())
        unmatched = total["unmatched"]
        out[run] = {
            "unmatched": unmatched,
            "cache_shows_reference": total["cache_shows_reference"] / max(unmatched, 1),
            "live_shows_reference": total["live_shows_reference"] / max(unmatched, 1),
        }
    return out
