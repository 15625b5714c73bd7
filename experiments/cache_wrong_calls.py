"""What the tool cache shows a wrong call: why cache-backed GRPO learns copying more slowly.

Replays the calls of committed validation records (`reproduce_paper.py`'s `OUT/runs/seed<S>/
<variant>/validation_<stage>.jsonl`) against a cache built the way GRPO builds its own (the
seed's reference trajectories, one scope per task, the GRPO config's threshold) and against the
live tools, and counts, per domain, the calls that match no reference call (a value mis-copied, a
wrong tool) and what each side showed them (`cacherl_jax.eval.wrong_calls`). Reads files only:
no model runs, seconds on a CPU.

    .venv/bin/python experiments/cache_wrong_calls.py --write           # experiments/results
    .venv/bin/python experiments/cache_wrong_calls.py --results DIR --runs full:sft full:grpo

Prints the table and, last, one JSON object; with --write, also `RESULTS/cache_wrong_calls.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cacherl_jax.eval import wrong_calls
from cacherl_jax.pipeline_demo import load_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = ("full:sft", "full:grpo", "trusted_reward:grpo", "live_tools:grpo")
COMMAND = ".venv/bin/python experiments/cache_wrong_calls.py --write"


def report(totals: wrong_calls.Totals, seeds: int) -> str:
    return (
        f"# What the cache shows a wrong call ({seeds} seed(s), validation records)\n\n"
        "Every call of the validation records, replayed on a cache built from the seed's "
        "validation reference trajectories the way GRPO builds its own, and on the live tools. "
        "`unmatched`: calls that match no reference call (a value mis-copied, a wrong tool); "
        "`unmatched_<tier>`: the tier the cache would answer them with; "
        "`cache_shows_reference`: the cache's answer is a reference call's live result while the "
        "call's own live result is not; `live_shows_reference`: the live result is a reference "
        f"call's anyway. Command: `{COMMAND}`.\n\n" + wrong_calls.markdown_table(totals)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=REPO / "experiments" / "results")
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="VARIANT:STAGE")
    parser.add_argument("--write", action="store_true", help="write RESULTS/cache_wrong_calls.md")
    args = parser.parse_args()
    seeds = wrong_calls.seed_dirs(args.results)
    if not seeds:
        sys.exit(f"{args.results}/runs: no seed<S>/ folders (run experiments/reproduce_paper.py)")
    totals = wrong_calls.measure(args.results, args.runs, load_config("grpo", "tiny").cache)
    text = report(totals, len(seeds))
    print(text)
    if args.write:
        (args.results / "cache_wrong_calls.md").write_text(text)
    print(json.dumps(wrong_calls.shares(totals)))


if __name__ == "__main__":
    main()
