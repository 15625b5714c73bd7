"""One GRPO step's time by phase, with tool calls answered by the cache vs live tools that sleep.

    .venv/bin/python experiments/bench_grpo_step.py [--checkpoint runs/demo/sft/hf] [--tasks 8]

Model: an SFT'd tiny Qwen3 (the demo's `sft/hf`, or a quick SFT of `--sft-steps` steps made here
on procedural trajectories). One step = G rollouts for each of `--tasks` procedural training
tasks (CacheAgentLoop), rewards, advantages, one jitted GRPO update. The live side runs the same
tasks against the real environments with `--tool-latency` seconds of sleep per call (a stand-in
for real tools: APIs, databases, sandboxes). Both sides are compiled once before timing. Prints a
table and, last, a JSON line with `ratio` = live / cached step time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cacherl_jax.agent.factory import make_environment
from cacherl_jax.agent.loop import CacheAgentLoop, LoopConfig
from cacherl_jax.agent.procedural import generate_tasks, write_trajectories
from cacherl_jax.agent.tool_cache import ToolCache, ToolCacheConfig, build_from_trajectories
from cacherl_jax.chat import load_tokenizer
from cacherl_jax.model import load_hf_checkpoint
from cacherl_jax.rl.rewards import RewardConfig
from cacherl_jax.rl.scoring import score_rollouts
from cacherl_jax.sampling import Sampler
from cacherl_jax.train import grpo, sft
from cacherl_jax.train.grpo_step import GrpoStepConfig, make_grpo_step


class SlowTools:
    """An environment whose every call first sleeps, like a real tool behind a network."""

    def __init__(self, env, latency_s: float):
        self.env, self.latency_s, self.calls = env, latency_s, 0

    def execute(self, name, arguments):
        time.sleep(self.latency_s)
        self.calls += 1
        return self.env.execute(name, arguments)

    def __getattr__(self, name):
        return getattr(self.env, name)


def _sft_checkpoint(workdir: Path, steps: int) -> Path:
    config_path = Path(__file__).resolve().parents[1] / "configs" / "sft.py"
    import importlib.util

    spec = importlib.util.spec_from_file_location("sft_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.data.train = str(workdir / "train.jsonl")
    config.train.steps = steps
    config.train.checkpoint_every = steps
    sft.train(config, workdir / "sft", progress=False)
    return workdir / "sft" / "hf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--tool-latency", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tasks = generate_tasks("train", 1000, seed=0)
        write_trajectories(tmp / "train.jsonl", tasks)
        checkpoint = (
            Path(args.checkpoint) if args.checkpoint else _sft_checkpoint(tmp, args.sft_steps)
        )
        tokenizer = load_tokenizer(checkpoint)
        model, params = load_hf_checkpoint(checkpoint)
        cache = ToolCache(ToolCacheConfig(tmp / "cache.sqlite", scope_mode="scoped"))
        build_from_trajectories(cache, [tmp / "train.jsonl"], scope_per_trajectory=True)

        sampler = Sampler(params, model)
        envs: list[SlowTools] = []

        def slow_env(task):
            envs.append(SlowTools(make_environment(task), args.tool_latency))
            return envs[-1]

        base = dict(group_size=args.group_size, max_len=512, cache_len=1536, max_new_tokens=96)
        loops = {
            "cache": CacheAgentLoop(sampler, tokenizer, cache, LoopConfig(mode="cache", **base)),
            "live": CacheAgentLoop(
                sampler, tokenizer, None, LoopConfig(mode="live", **base), make_env=slow_env
            ),
        }
        train = ml_collections.ConfigDict(dict(lr=1e-5, steps=100, warmup_steps=0, schedule="cosine",
            end_lr_ratio=0.5, weight_decay=0.0, b1=0.9, b2=0.99, eps=1e-8, max_grad_norm=1.0))  # fmt: skip
        from cacherl_jax.train.optimizer import make_optimizer

        tx, schedule = make_optimizer(train)
        update = jax.jit(make_grpo_step(GrpoStepConfig(model), tx, schedule))
        state = {"step": jnp.int32(0), "trainable": params, "opt_state": tx.init(params)}
        reward_config = RewardConfig()
        config = ml_collections.ConfigDict({"loop": {"max_len": 512}})

        def one_step(side: str, step: int) -> dict[str, float]:
            nonlocal state
            chosen = grpo.step_tasks(tasks, step, args.tasks, seed=0)
            t0 = time.perf_counter()
            rollouts = loops[side].run(chosen, seed=step)
            t1 = time.perf_counter()
            results = score_rollouts(chosen, rollouts, reward_config)
            rewards = np.array([r.reward.total for r in results]).reshape(len(chosen), -1)
            adv, keep = grpo.advantages_for(rewards, normalize_std=True, skip_equal=False)
            t2 = time.perf_counter()
            batch = grpo._batch(rollouts, adv.reshape(-1), keep.reshape(-1), config, tokenizer)
            batch = {k: jnp.asarray(v) for k, v in batch.items()}
            batch["ref_logp_BxT"] = jnp.zeros_like(batch["old_logp_BxT"])
            state, metrics = update(state, None, batch)
            jax.block_until_ready(metrics)
            t3 = time.perf_counter()
            m = loops[side].metrics
            return {
                "sampling_s": m["sampling_s"],
                "tools_s": m["tools_s"],
                "rollouts_s": t1 - t0,
                "reward_s": t2 - t1,
                "update_s": t3 - t2,
                "step_s": t3 - t0,
                "calls": sum(len(r.calls) for r in rollouts),
                "generated_tokens": m["generated_tokens"],
            }

        for side in loops:  # compile every shape once, untimed
            one_step(side, 0)
        timings = {
            side: [one_step(side, step) for step in range(1, 1 + args.repeats)] for side in loops
        }

    medians = {
        side: {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
        for side, runs in timings.items()
    }
    keys = ["sampling_s", "tools_s", "rollouts_s", "reward_s", "update_s", "step_s", "calls"]
    print(
        f"GRPO step, tiny Qwen3, {args.tasks} tasks x G={args.group_size}, live tools sleep {args.tool_latency}s/call"
    )
    print(f"{'':<14}{'cache':>12}{'live':>12}")
    for key in keys:
        print(f"{key:<14}{medians['cache'][key]:>12.2f}{medians['live'][key]:>12.2f}")
    ratio = medians["live"]["step_s"] / medians["cache"]["step_s"]
    print(f"live / cached step time: {ratio:.2f}x")
    print(json.dumps({
        "cached_step_s": round(medians["cache"]["step_s"], 3),
        "live_step_s": round(medians["live"]["step_s"], 3),
        "cached_tools_s": round(medians["cache"]["tools_s"], 4),
        "live_tools_s": round(medians["live"]["tools_s"], 3),
        "calls_per_step": medians["cache"]["calls"],
        "rollouts_per_s_cached": round(args.tasks * args.group_size / medians["cache"]["rollouts_s"], 2),
        "rollouts_per_s_live": round(args.tasks * args.group_size / medians["live"]["rollouts_s"], 2),
        "ratio": round(ratio, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
