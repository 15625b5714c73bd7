"""Does GRPO raise the validation reward of an SFT'd tiny model? A short run, evaluated as it goes.

    .venv/bin/python experiments/grpo_smoke.py --workdir runs/rise --seed 0 \
        --kinds shop.buy_special shop.buy_all_special --sft-steps 300 --plan-only-fraction 0.5 \
        --lr 3e-4 --steps 20 --val-tasks 16 --eval-samples 4

SFT of the tiny Qwen3 on procedural trajectories of `--kinds`, a `--plan-only-fraction` of them
written as a weak teacher would (a plan, no call), skipped when the workdir already holds it, so
several GRPO settings can share one SFT. Then GRPO from that checkpoint on the training tasks with
rollouts answered by a tool cache built from every task's reference trajectory, evaluating with
live tools on `--val-tasks` validation tasks every `--eval-every` steps (greedily, or by
`--eval-samples` rollouts per task at temperature 1). Prints the training reward per step, the
validation curve, and as its last line a JSON object with the validation reward before and after.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cacherl_jax.agent.procedural import generate_tasks, write_trajectories
from cacherl_jax.pipeline_demo import load_config
from cacherl_jax.train import grpo, sft
from cacherl_jax.train.metrics import read_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--kinds", nargs="+", default=["currency.rate", "currency.convert"])
    parser.add_argument("--train-tasks", type=int, default=600)
    parser.add_argument("--val-tasks", type=int, default=32)
    parser.add_argument(
        "--seq-len", type=int, default=512, help="SFT row length and rollout length in tokens"
    )
    parser.add_argument("--sft-steps", type=int, default=400)
    parser.add_argument(
        "--plan-only-fraction",
        type=float,
        default=0.0,
        help="share of SFT trajectories that answer with a plan instead of calling tools",
    )
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--tasks-per-step", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--fixed-weight", action="store_true", help="reward.tier_aware=False")
    parser.add_argument("--dr-grpo", action="store_true", help="advantages without std")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument(
        "--eval-samples", type=int, default=1, help="validation rollouts per task (1: greedy)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    data = root / "train.jsonl"  # SFT data: some trajectories plan-only with --plan-only-fraction
    reference = root / "reference.jsonl"  # every task solved: the calls the tool cache records
    sft_hf = root / "sft" / "hf"
    tasks = generate_tasks("train", args.train_tasks, args.seed, kinds=args.kinds)
    if not reference.exists():
        write_trajectories(reference, tasks)
    if not (sft_hf / "model.safetensors").exists():
        write_trajectories(data, tasks, plan_only_fraction=args.plan_only_fraction, seed=args.seed)
        config = load_config("sft", "tiny")
        config.seed = args.seed
        config.data.train = str(data)
        config.data.seq_len = args.seq_len
        config.train.steps = args.sft_steps
        config.train.checkpoint_every = args.sft_steps
        start = time.perf_counter()
        sft.train(config, root / "sft", progress=True)
        print(f"SFT: {args.sft_steps} steps in {time.perf_counter() - start:.0f} s")

    config = load_config("grpo", "tiny")
    config.seed = args.seed
    config.model.checkpoint = str(sft_hf)
    config.cache.build_from = str(reference)
    config.tasks.update(source="jsonl", path=str(data), n=0)
    config.eval_tasks.update(n=args.val_tasks, kinds=tuple(args.kinds), seed=args.seed)
    config.loop.update(
        max_len=args.seq_len,
        cache_len=1024,
        max_new_tokens=64,
        max_turns=4,
        group_size=args.group_size,
        temperature=args.temperature,
    )
    config.grpo.update(
        tasks_per_step=args.tasks_per_step, beta=args.beta, normalize_std=not args.dr_grpo
    )
    config.reward.tier_aware = not args.fixed_weight
    if args.eval_samples > 1:  # the expected reward under the policy, not its greedy answer
        config.eval.update(samples=args.eval_samples, temperature=1.0)
    config.train.update(
        lr=args.lr, steps=args.steps, eval_every=args.eval_every, export_hf=False,
        checkpoint_every=args.steps,
    )  # fmt: skip
    name = (
        f"grpo_lr{args.lr:g}_g{args.group_size}_t{args.tasks_per_step}_b{args.beta:g}"
        f"{'_fixed' if args.fixed_weight else ''}{'_dr' if args.dr_grpo else ''}"
        f"{f'_e{args.eval_samples}' if args.eval_samples > 1 else ''}"
    )
    start = time.perf_counter()
    grpo.train(config, root / name, progress=True)
    seconds = time.perf_counter() - start

    train_curve, val_curve = [], []
    for m in read_metrics(root / name):
        if "eval/reward/total" in m:
            val_curve.append((m["step"], m["eval/reward/total"], m["eval/success_rate"]))
        elif "reward/total" in m:
            train_curve.append((m["step"], m["reward/total"], m["tier/best_effort_fraction"]))
    print("step  train reward  best-effort share")
    for step, reward, best_effort in train_curve:
        print(f"{step:4d}  {reward:12.3f}  {best_effort:17.2f}")
    print("step  val. reward  val. success")
    for step, reward, success in val_curve:
        print(f"{step:4d}  {reward:11.3f}  {success:12.3f}")
    print(
        json.dumps(
            {
                "run": name,
                "val_reward_before": round(val_curve[0][1], 4),
                "val_reward_after": round(val_curve[-1][1], 4),
                "val_reward_max": round(max(r for _, r, _ in val_curve), 4),
                "train_reward_first": round(train_curve[0][1], 4),
                "train_reward_last": round(train_curve[-1][1], 4),
                "grpo_seconds": round(seconds, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
