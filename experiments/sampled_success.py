"""Which validation tasks GRPO could still teach a model: greedy against sampled success, per kind.

GRPO pushes toward success only from groups whose successes differ, so a task no sample ever
solves cannot be taught by sharpening the policy, however long GRPO runs. This evaluates a checkpoint on the demo's
validation tasks twice with live tools: greedily (what the stage tables report) and with
`--samples` rollouts per task at the GRPO run's sampling settings (`--temperature`). Per kind it
reports greedy successes, the sampled success rate, the tasks some sample solves (pass@samples),
the groups with mixed outcomes, and `reachable`: the tasks greedy fails but some sample solves,
the most that GRPO's sharpening can add to greedy success.

    .venv/bin/python experiments/sampled_success.py --checkpoint runs/demo/sft/hf --write

Prints the table and, last, one JSON object; with --write, also `OUT/sampled_success_seed<S>.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from cacherl_jax.agent.procedural import generate_tasks
from cacherl_jax.eval.suite import evaluate_checkpoint
from cacherl_jax.eval.taxonomy import (
    GroupSignal,
    group_signal_by_kind,
    reachable_by_kind,
    validation_record,
)
from cacherl_jax.pipeline_demo import LOOP_SHAPE, apply_overrides, load_config
from cacherl_jax.train.rollout_setup import loop_config

REPO = Path(__file__).resolve().parents[1]


def demo_loop(samples: int, temperature: float):
    """The demo GRPO run's rollout settings (lengths, turns), with live tools."""
    config = apply_overrides(load_config("grpo", "tiny"), LOOP_SHAPE)
    return dataclasses.replace(
        loop_config(config), group_size=samples, temperature=temperature, mode="live"
    )


def records_of(checkpoint: str, tasks, loop, seed: int) -> list[dict]:
    by_id = {task.id: task for task in tasks}
    _, results = evaluate_checkpoint(checkpoint, tasks, seed=seed, loop_config=loop)
    return [validation_record(by_id[result.task_id], result) for result in results]


def greedy_successes(greedy: list[dict], kinds) -> dict[str, int]:
    counts = dict.fromkeys(kinds, 0)
    for record in greedy:
        counts[record["kind"]] += bool(record["success"])
    return counts


def totals(greedy_ok: dict[str, int], signal: dict[str, GroupSignal], reachable) -> dict:
    """The table's last row and the JSON line's counts."""
    return {
        "tasks": sum(s.tasks for s in signal.values()),
        "greedy": sum(greedy_ok.values()),
        "solved_by_a_sample": sum(s.solved_any for s in signal.values()),
        "mixed_groups": sum(s.mixed for s in signal.values()),
        "reachable": sum(reachable.values()),
    }


def table(greedy_ok: dict[str, int], signal: dict[str, GroupSignal], reachable, total) -> str:
    lines = [
        "| kind | tasks | greedy successes | sampled success | solved by a sample | mixed groups "
        "| reachable |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, s in signal.items():
        lines.append(
            f"| {kind} | {s.tasks} | {greedy_ok[kind]} | {s.success_rate:.2f} | {s.solved_any} "
            f"| {s.mixed} | {reachable[kind]} |"
        )
    lines.append(
        f"| all | {total['tasks']} | {total['greedy']} | | {total['solved_by_a_sample']} "
        f"| {total['mixed_groups']} | {total['reachable']} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(REPO / "runs" / "demo" / "sft" / "hf"))
    parser.add_argument("--seed", type=int, default=0, help="the validation tasks' seed")
    parser.add_argument("--val-tasks", type=int, default=96)
    parser.add_argument("--samples", type=int, default=8, help="rollouts per task")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results")
    parser.add_argument("--write", action="store_true", help="write OUT/sampled_success_seed<S>.md")
    args = parser.parse_args()
    tasks = generate_tasks("validation", args.val_tasks, args.seed)
    greedy = records_of(args.checkpoint, tasks, demo_loop(1, 0.0), args.seed)
    sampled = records_of(
        args.checkpoint, tasks, demo_loop(args.samples, args.temperature), args.seed
    )
    signal = group_signal_by_kind(sampled)
    reachable = reachable_by_kind(greedy, sampled)
    greedy_ok = greedy_successes(greedy, signal)
    total = totals(greedy_ok, signal, reachable)
    text = (
        f"# Greedy against sampled success ({args.samples} samples at temperature "
        f"{args.temperature}, live tools)\n\n"
        f"Checkpoint `{args.checkpoint}`, {len(tasks)} validation tasks of seed {args.seed}. "
        "`reachable`: tasks greedy fails but some sample solves, the most GRPO's sharpening can "
        "add to greedy success. Command: `.venv/bin/python experiments/sampled_success.py "
        f"--checkpoint {args.checkpoint} --seed {args.seed} --samples {args.samples} --write`.\n\n"
        + table(greedy_ok, signal, reachable, total)
        + "\n"
    )
    print(text)
    if args.write:
        (args.out / f"sampled_success_seed{args.seed}.md").write_text(text)
    counts = {key: value for key, value in total.items() if key != "greedy"}
    print(
        json.dumps(
            {
                **counts,
                "greedy_success": total["greedy"] / len(tasks),
                "sampled_success": sum(r["success"] for r in sampled) / len(sampled),
            }
        )
    )


if __name__ == "__main__":
    main()
