"""SFT on trajectories of which a share first make a failing call and then recover: the diagnostic
behind docs/model.md's "Training the answers only" (models that repeat a turn after a tool error,
because the reference trajectories never show one).

    .venv/bin/python experiments/sft_with_recoveries.py --data runs/demo/data --seed 0 \
        --base runs/tiny_base --steps 1500 --share 0.2 --out runs/recoveries_s0 [--grpo]

Reads a demo run's data directory (`train.jsonl` with the teacher's reasoning, `grpo.jsonl`),
writes a copy under `OUT/data` in which each trajectory, with probability `share`, first calls
its first tool with one string argument cut by a character, gets the live environment's error,
and then makes the original call with a thought that names the error (a cut value the
environment accepts leaves the trajectory unchanged). Then masked SFT (from `--base`, a
`build_tiny_base.py` output, or random weights without it) and the demo's greedy evaluation with
live tools, and with `--grpo` the demo's GRPO stage, in `OUT/run` (`report.md`, `stages.json`).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
from pathlib import Path
from typing import Any

from cacherl_jax import pipeline_demo
from cacherl_jax.agent.environment import Task
from cacherl_jax.agent.procedural.environment import ProceduralEnvironment


def with_recovery(trajectory: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
    """`trajectory` with a failed first call and its recovery before its first call, or None when
    the first call has no string argument to cut or the cut value is accepted."""
    messages = trajectory["messages"]
    first = next(
        (i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("tool_calls")),
        None,
    )
    if first is None:
        return None
    function = messages[first]["tool_calls"][0]["function"]
    name, arguments = function["name"], function["arguments"]
    keys = [key for key, value in arguments.items() if isinstance(value, str) and len(value) > 2]
    if not keys:
        return None
    key = rng.choice(keys)
    cut = {**arguments, key: arguments[key][:-1]}
    environment = ProceduralEnvironment()
    environment.reset(Task.from_dict(trajectory["metadata"]["task"]))
    result = environment.execute(name, cut)
    if result.ok:
        return None
    failed = copy.deepcopy(messages[first])
    failed["tool_calls"][0]["function"]["arguments"] = cut
    retried = copy.deepcopy(messages[first])
    retried["reasoning_content"] = (
        f'{name} returned an error: {result.text} The request says "{arguments[key]}", not '
        f'"{cut[key]}", so I call {name} again with {key} set to "{arguments[key]}".'
    )
    error = {"role": "tool", "name": name, "content": result.text}
    return {
        **trajectory,
        "messages": [*messages[:first], failed, error, retried, *messages[first + 1 :]],
    }


def write_data(source: Path, out: Path, share: float, seed: int) -> int:
    """The source's data files copied into `out`, `train.jsonl` with recoveries; returns how many
    trajectories got one."""
    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            shutil.copyfile(path, out / path.name)
    rng = random.Random(seed)
    trajectories, changed = [], 0
    for line in (source / "train.jsonl").read_text().splitlines():
        trajectory = json.loads(line)
        if rng.random() < share:
            recovered = with_recovery(trajectory, rng)
            if recovered is not None:
                trajectory, changed = recovered, changed + 1
        trajectories.append(trajectory)
    (out / "train.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trajectories))
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a demo run's data directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--share", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--base", default="", help="a pretrained base directory (default: none)")
    parser.add_argument("--grpo", action="store_true", help="also run the demo's GRPO stage")
    args = parser.parse_args()

    out = Path(args.out)
    changed = write_data(Path(args.data), out / "data", args.share, args.seed)
    print(f"{changed} trajectories with a failed call and its recovery", flush=True)
    base = {"model.checkpoint": args.base, "tokenizer.spec": args.base} if args.base else {}
    train = out / "data" / "train.jsonl"
    pipeline_demo.train_sft(
        out / "sft", train, args.steps, args.seed, thinking=True, overrides=base
    )
    pipeline_demo.run(
        out / "run", seed=args.seed, sft_dir_reuse=out / "sft", eval_base=False, run_grpo=args.grpo
    )


if __name__ == "__main__":
    main()
