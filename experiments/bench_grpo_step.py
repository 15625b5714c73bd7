"""A GRPO step's wall time by phase: tool calls answered by the cache vs live tools with latency.

    .venv/bin/python experiments/bench_grpo_step.py [--checkpoint runs/demo/sft/hf] \\
        [--latencies 0.1 1.0] [--steps 2] [--live-steps 2] [--out experiments/results]

Model: an SFT'd tiny Qwen3 (the demo's `sft/hf`, or a quick SFT of `--sft-steps` steps made here
on procedural trajectories). One step = G rollouts for each of `--tasks` procedural training
tasks (CacheAgentLoop), rewards, advantages, one jitted GRPO update. Rows: `cache` (every call
answered by the tool cache) and `live @ L` for each latency L of `--latencies`: the same tasks
on the real environments, each call sleeping L seconds first (`make_environment(task,
latency_s=L)`, what `loop.tool_latency_s` sets in `cacherl grpo` and `cacherl rft`), a stand-in
for real tools (APIs, databases, sandboxes). One untimed step per side compiles; the table holds
each row's mean over `--steps` timed steps (`--live-steps` for the live rows), all rows running
the same tasks and taking turns within each step. On a shared CPU the sampling and update times
are noisy; the tool phase is not.

The loop answers a round's calls one after another (`CacheAgentLoop._answer`), so the live tool
phase is the serial cost, calls x latency. A concurrent tool executor would bring it down to
about `tool rounds` x latency (the rounds of the step in which any rollout called a tool); the
cache removes the phase either way. Prints the markdown table and, last, one JSON object:
`ratio` (live / cache step time at 100 ms, or the first latency), `tool_ratio` and
`step_ratio` per latency, and the raw means. `--out DIR` writes both to
`DIR/cache_vs_live_timing.md` and `.json`.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cacherl_jax.agent.factory import make_environment
from cacherl_jax.agent.loop import CacheAgentLoop, LoopConfig, Rollout
from cacherl_jax.agent.procedural import generate_tasks, write_trajectories
from cacherl_jax.agent.tool_cache import ToolCache, ToolCacheConfig, build_from_trajectories
from cacherl_jax.chat import load_tokenizer
from cacherl_jax.model import load_hf_checkpoint
from cacherl_jax.rl.rewards import RewardConfig
from cacherl_jax.rl.scoring import score_rollouts
from cacherl_jax.sampling import Sampler
from cacherl_jax.train import grpo, sft
from cacherl_jax.train.grpo_step import GrpoStepConfig, make_grpo_step
from cacherl_jax.train.optimizer import make_optimizer

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `configs` for the quick SFT, from any working directory
    sys.path.insert(0, str(REPO))

COLUMNS = {  # key in a row's means -> table header
    "sampling_s": "sampling s",
    "tools_s": "tools s",
    "update_s": "update s",
    "other_s": "other s",
    "step_s": "step s",
    "calls": "tool calls",
    "tool_ms_per_call": "tool ms/call",
    "tool_rounds": "tool rounds",
}


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="", help="an HF dir; empty: a quick SFT here")
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--latencies", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps of the cache row")
    parser.add_argument("--live-steps", type=int, default=0, help="of each live row; 0: --steps")
    parser.add_argument("--out", default="", help="a directory for cache_vs_live_timing.md/json")
    args = parser.parse_args()
    args.live_steps = args.live_steps or args.steps
    if min(args.latencies) < 0 or min(args.steps, args.live_steps) < 1:
        parser.error("latencies must be >= 0 and step counts >= 1")
    return args


def _sft_checkpoint(workdir: Path, steps: int) -> Path:
    """A quick SFT of the tiny config on the procedural trajectories; its `hf/` export."""
    from configs import sft as sft_configs

    config = sft_configs.get_config("tiny")
    config.data.train = str(workdir / "train.jsonl")
    config.train.steps = steps
    config.train.checkpoint_every = steps
    sft.train(config, workdir / "sft", progress=False)
    return workdir / "sft" / "hf"


class _Bench:
    """The model, cache, tasks and GRPO update every row shares; `step` times one GRPO step."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.tasks = generate_tasks("train", 1000, seed=0)
        write_trajectories(workdir / "train.jsonl", self.tasks)
        checkpoint = (
            Path(args.checkpoint) if args.checkpoint else _sft_checkpoint(workdir, args.sft_steps)
        )
        self.tokenizer = load_tokenizer(checkpoint)
        model, params = load_hf_checkpoint(checkpoint)
        self.cache = ToolCache(ToolCacheConfig(workdir / "cache.sqlite", scope_mode="scoped"))
        build_from_trajectories(self.cache, [workdir / "train.jsonl"], scope_per_trajectory=True)
        self.sampler = Sampler(params, model)
        train = ml_collections.ConfigDict(dict(lr=1e-5, steps=100, warmup_steps=0, schedule="cosine",
            end_lr_ratio=0.5, weight_decay=0.0, b1=0.9, b2=0.99, eps=1e-8, max_grad_norm=1.0))  # fmt: skip
        tx, schedule = make_optimizer(train)
        self.update = jax.jit(make_grpo_step(GrpoStepConfig(model), tx, schedule))
        self.state = {"step": jnp.int32(0), "trainable": params, "opt_state": tx.init(params)}
        self.batch_config = ml_collections.ConfigDict({"loop": {"max_len": 512}})

    def loop(self, latency_s: float | None) -> CacheAgentLoop:
        """The cache loop (None), or a live one whose every call sleeps `latency_s`."""
        mode = "cache" if latency_s is None else "live"
        config = LoopConfig(mode=mode, group_size=self.args.group_size, max_len=512,
                            cache_len=1536, max_new_tokens=96)  # fmt: skip
        if latency_s is None:
            return CacheAgentLoop(self.sampler, self.tokenizer, self.cache, config)
        make_env = functools.partial(make_environment, latency_s=latency_s)
        return CacheAgentLoop(self.sampler, self.tokenizer, None, config, make_env=make_env)

    def step(self, loop: CacheAgentLoop, step: int) -> dict[str, float]:
        """Sampling (with the tools), rewards and advantages, one update: seconds by phase."""
        chosen = grpo.step_tasks(self.tasks, step, self.args.tasks, seed=0)
        start = time.perf_counter()
        rollouts = loop.run(chosen, seed=step)
        results = score_rollouts(chosen, rollouts, RewardConfig())
        rewards = np.array([r.reward.total for r in results]).reshape(len(chosen), -1)
        adv, keep = grpo.advantages_for(rewards, normalize_std=True, skip_equal=False)
        batch = grpo._batch(
            rollouts, adv.reshape(-1), keep.reshape(-1), self.batch_config, self.tokenizer
        )
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        batch["ref_logp_BxT"] = jnp.zeros_like(batch["old_logp_BxT"])
        update_start = time.perf_counter()
        self.state, metrics = self.update(self.state, None, batch)
        jax.block_until_ready(metrics)
        end = time.perf_counter()
        return _phases(loop.metrics, rollouts, update_s=end - update_start, step_s=end - start)


def _phases(
    metrics: dict[str, float], rollouts: list[Rollout], *, update_s: float, step_s: float
) -> dict[str, float]:
    calls = sum(len(r.calls) for r in rollouts)
    # Rows move in lockstep, one assistant turn per round: a rollout's k-th turn with calls is
    # round k, so the rounds with any call are the most call turns of one rollout.
    rounds = max((len({c.turn for c in r.calls}) for r in rollouts), default=0)
    return {
        "sampling_s": metrics["sampling_s"],
        "tools_s": metrics["tools_s"],
        "update_s": update_s,
        "other_s": step_s - metrics["sampling_s"] - metrics["tools_s"] - update_s,
        "step_s": step_s,
        "calls": float(calls),
        "tool_ms_per_call": 1e3 * metrics["tools_s"] / max(calls, 1),
        "tool_rounds": float(rounds),
    }


def _mean(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([run[key] for run in runs])) for key in runs[0]}


def _row_name(latency_s: float) -> str:
    return f"live @ {latency_s * 1e3:g} ms" if latency_s < 1 else f"live @ {latency_s:g} s"


def _summary(rows: dict[str, dict[str, float]], latencies: list[float]) -> dict[str, Any]:
    cache = rows["cache"]
    tool_ratio, step_ratio = {}, {}
    for latency_s in latencies:
        live = rows[_row_name(latency_s)]
        # None when the cache row made no call (nothing to compare).
        tool_ratio[f"{latency_s:g}"] = (
            live["tools_s"] / cache["tools_s"] if cache["tools_s"] > 0 else None
        )
        step_ratio[f"{latency_s:g}"] = live["step_s"] / cache["step_s"]
    headline = 0.1 if 0.1 in latencies else latencies[0]
    return {
        "ratio": round(step_ratio[f"{headline:g}"], 3),
        "ratio_latency_s": headline,
        "tool_ratio": {k: None if v is None else round(v, 1) for k, v in tool_ratio.items()},
        "step_ratio": {k: round(v, 3) for k, v in step_ratio.items()},
        "rows": {name: {k: round(v, 4) for k, v in row.items()} for name, row in rows.items()},
    }


def _markdown(args: argparse.Namespace, summary: dict[str, Any], command: str) -> str:
    rows = summary["rows"]
    lines = [
        f"GRPO step, tiny Qwen3, {args.tasks} tasks x G={args.group_size}; mean of {args.steps} "
        f"timed steps (cache) and {args.live_steps} (live) after a compile step; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s).",
        "",
        "| row | " + " | ".join(COLUMNS.values()) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(key, row[key]) for key in COLUMNS) + " |")
    lines += ["", "| latency | tool phase live / cache | step live / cache |", "|---|---|---|"]
    for latency, ratio in summary["tool_ratio"].items():
        if ratio is None:
            tools = "n/a (no tool call with the cache)"
        else:
            tools = f"{ratio:,.0f}x ({'>= 100x' if ratio >= 100 else 'below 100x'})"
        lines.append(f"| {latency} s | {tools} | {summary['step_ratio'][latency]:.2f}x |")
    lines += [
        "",
        "Live calls run one after another (the loop's serial tool phase); a concurrent executor "
        "would cost about `tool rounds` x latency per step. The whole-step ratio is what the "
        "CPU's sampling and update leave of the tool phase. `other` is parsing, rendering, "
        "rewards and the batch.",
        "",
        f"`{command}`",
    ]
    return "\n".join(lines)


def _cell(key: str, value: float) -> str:
    if key in ("calls", "tool_rounds"):
        return f"{value:.1f}"
    if key == "tool_ms_per_call":
        return f"{value:.2f}"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def _write(out: str, markdown: str, summary: dict[str, Any]) -> None:
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cache_vs_live_timing.md").write_text(markdown + "\n")
    (directory / "cache_vs_live_timing.json").write_text(json.dumps(summary, indent=2) + "\n")


def _timed_rows(
    bench: _Bench, args: argparse.Namespace, log: Callable[[str], None]
) -> dict[str, dict[str, float]]:
    """Each row's mean over timed steps 1..N, after one untimed step that compiles."""
    latencies = {"cache": None, **{_row_name(latency): latency for latency in args.latencies}}
    loops = {name: bench.loop(latency) for name, latency in latencies.items()}
    steps = {name: args.steps if name == "cache" else args.live_steps for name in loops}
    log("compiling (one untimed step with the cache, one live without latency)")
    bench.step(loops["cache"], 0)
    bench.step(bench.loop(0.0), 0)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in loops}
    names = list(loops)
    for step in range(1, 1 + max(steps.values())):
        # The rows take turns within a step, a different one first each step, so the machine's
        # load drifting and shapes compiled late do not all land on one row.
        shift = (step - 1) % len(names)
        for name in names[shift:] + names[:shift]:
            if step <= steps[name]:
                log(f"step {step}: {name}")
                runs[name].append(bench.step(loops[name], step))
    return {name: _mean(runs[name]) for name in names}


def main() -> None:
    args = _args()
    command = "python experiments/bench_grpo_step.py " + shlex.join(sys.argv[1:])

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        bench = _Bench(args, Path(tmp))
        rows = _timed_rows(bench, args, log)
    summary = _summary(rows, args.latencies)
    summary["settings"] = {
        "tasks": args.tasks,
        "group_size": args.group_size,
        "steps": args.steps,
        "live_steps": args.live_steps,
        "checkpoint": args.checkpoint or f"quick SFT, {args.sft_steps} steps",
        "latencies_s": args.latencies,
    }
    markdown = _markdown(args, summary, command.strip())
    if args.out:
        _write(args.out, markdown, summary)
    print(markdown)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
