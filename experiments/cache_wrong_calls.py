"""What the tool cache shows a wrong call: why cache-backed GRPO learns copying more slowly.

Replays the calls of committed validation records (`reproduce_paper.py`'s `OUT/runs/seed<S>/
<variant>/validation_<stage>.jsonl`) against a cache built the way GRPO builds its own (the
seed's reference trajectories, one scope per task, the GRPO config's threshold) and against the
live tools, and counts, per domain, the calls that match no reference call (a value mis-copied, a
wrong tool) and what each side showed them (`fidelity.wrong_call_answers`). Reads files only: no
model runs, seconds on a CPU.

    .venv/bin/python experiments/cache_wrong_calls.py                      # experiments/results
    .venv/bin/python experiments/cache_wrong_calls.py --results DIR --runs full:sft full:grpo

Prints the table and, last, one JSON object; with --write, also `RESULTS/cache_wrong_calls.md`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from cacherl_jax.agent.fidelity import wrong_call_answers
from cacherl_jax.agent.procedural import generate_tasks, write_trajectories
from cacherl_jax.agent.tool_cache import ToolCache, ToolCacheConfig, build_from_trajectories
from cacherl_jax.pipeline_demo import load_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = ("full:sft", "full:grpo", "live_tools:grpo")
COLUMNS = ("calls", "matched", "unmatched", "unmatched_exact", "unmatched_fuzzy",
           "unmatched_best_effort", "cache_shows_reference", "live_shows_reference")  # fmt: skip


def read_records(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def seed_cache(seed: int, n_tasks: int, workdir: Path):
    """The seed's validation tasks and a cache of their reference trajectories, built as GRPO
    builds its cache from its training trajectories."""
    tasks = generate_tasks("validation", n_tasks, seed)
    trajectories = workdir / f"validation_seed{seed}.jsonl"
    write_trajectories(trajectories, tasks, reasoning=False)
    settings = load_config("grpo", "tiny").cache
    cache = ToolCache(
        ToolCacheConfig(
            str(workdir / f"cache_seed{seed}.sqlite"),
            fuzzy_threshold=settings.fuzzy_threshold,
            scope_mode=settings.scope_mode,
        )
    )
    build_from_trajectories(cache, [str(trajectories)], scope_per_trajectory=True)
    return {task.id: task for task in tasks}, cache


def count_run(records: list[dict], tasks: dict, cache: ToolCache) -> dict[str, Counter]:
    """Per domain, `wrong_call_answers` summed over the records' tasks."""
    by_domain: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        calls = [(c["name"], c["arguments"]) for c in record["calls"]
                 if isinstance(c.get("arguments"), dict)]  # fmt: skip
        counts = wrong_call_answers(tasks[record["task_id"]], calls, cache)
        counts["calls"] = len(record["calls"])
        by_domain[record["kind"].split(".")[0]].update(counts)
    return by_domain


def measure(results: Path, runs: list[str]) -> dict[str, dict[str, Counter]]:
    """{"variant:stage": {domain: counts}} summed over every seed under `results/runs`."""
    seed_dirs = sorted((results / "runs").glob("seed*"))
    if not seed_dirs:
        sys.exit(f"{results}/runs: no seed<S>/ folders (run experiments/reproduce_paper.py)")
    totals: dict[str, dict[str, Counter]] = {run: defaultdict(Counter) for run in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for seed_dir in seed_dirs:
            seed = int(re.fullmatch(r"seed(\d+)", seed_dir.name).group(1))
            for run in runs:
                variant, stage = run.split(":")
                path = seed_dir / variant / f"validation_{stage}.jsonl"
                if not path.exists():
                    sys.exit(f"{path}: not found (runs are VARIANT:STAGE, e.g. full:sft)")
                records = read_records(path)
                tasks, cache = seed_cache(seed, len({r["task_id"] for r in records}), Path(tmp))
                with cache:
                    for domain, counts in count_run(records, tasks, cache).items():
                        totals[run][domain].update(counts)
    return totals


def table(totals: dict[str, dict[str, Counter]], seeds: int) -> str:
    lines = [
        f"# What the cache shows a wrong call ({seeds} seed(s), validation records)",
        "",
        "Calls that match no reference call (`unmatched`), the cache tier that would answer each,"
        " and whether the cache shows the result a reference call gets live while the live tool"
        " does not (`cache_shows_reference`). Command: `.venv/bin/python"
        " experiments/cache_wrong_calls.py --write`.",
        "",
        "| run | domain | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for run, by_domain in totals.items():
        for domain in [*sorted(by_domain), "all"]:
            counts = by_domain[domain] if domain != "all" else sum(by_domain.values(), Counter())
            lines.append(f"| {run} | {domain} | " + " | ".join(str(counts[c]) for c in COLUMNS)
                         + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=REPO / "experiments" / "results")
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="VARIANT:STAGE")
    parser.add_argument("--write", action="store_true", help="write RESULTS/cache_wrong_calls.md")
    args = parser.parse_args()
    totals = measure(args.results, args.runs)
    seeds = len(list((args.results / "runs").glob("seed*")))
    text = table(totals, seeds)
    print(text)
    if args.write:
        (args.results / "cache_wrong_calls.md").write_text(text)
    summary = {}
    for run, by_domain in totals.items():
        total = sum(by_domain.values(), Counter())
        summary[run] = {
            "unmatched": total["unmatched"],
            "cache_shows_reference_share": total["cache_shows_reference"]
            / max(total["unmatched"], 1),
            "live_shows_reference_share": total["live_shows_reference"]
            / max(total["unmatched"], 1),
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
