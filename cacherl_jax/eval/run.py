"""`cacherl eval`: a local checkpoint on the procedural suite and on BFCL v4, with a results table.

    cacherl eval --checkpoint runs/grpo/hf --suite validation --n 64 --output runs/eval
    cacherl eval --checkpoint runs/grpo/hf --bfcl simple_python,multiple,multi_turn_base --limit 50

Suites run the CacheAgentLoop greedily with live tools (success judged on the real final state).
BFCL single-turn entries are one greedy generation each, parsed and scored with BFCL's AST rules;
BFCL multi-turn entries run the loop live in our BFCL environments and are scored on state and
responses. Tables go to `<output>/suite.md|json` and `<output>/bfcl.md|json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

from cacherl_jax import parallel
from cacherl_jax.agent import bfcl as bfcl_tasks
from cacherl_jax.agent.loop import CacheAgentLoop, LoopConfig, PromptTooLongError
from cacherl_jax.agent.procedural import generate_tasks
from cacherl_jax.chat.parse import parse_assistant
from cacherl_jax.chat.template import render_prompt
from cacherl_jax.chat.template_check import load_checked_tokenizer
from cacherl_jax.errors import UserError
from cacherl_jax.eval import bfcl_scoring, report
from cacherl_jax.model import load_hf_checkpoint
from cacherl_jax.rl.rewards import RewardConfig
from cacherl_jax.rl.scoring import evaluate
from cacherl_jax.sampling import Sampler, SamplingParams


class EvalError(UserError, ValueError):
    pass


def register_cli(commands) -> None:
    parser = commands.add_parser(
        "eval", help="evaluate a checkpoint: procedural suite and/or BFCL v4"
    )
    parser.add_argument("--checkpoint", required=True, help="HF checkpoint directory")
    parser.add_argument("--tokenizer", default="", help="default: the checkpoint's tokenizer.json")
    parser.add_argument("--suite", choices=["", "train", "validation", "test"], default="")
    parser.add_argument("--n", type=int, default=64, help="suite tasks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bfcl", default="", help="comma-separated BFCL categories")
    parser.add_argument("--limit", type=int, default=0, help="entries per BFCL category (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--output", default="runs/eval")
    parser.add_argument(
        "--rollout-tensor",
        type=int,
        default=1,
        help="split the weights over this many of each process's devices (1: a copy per device)",
    )
    multi = parser.add_argument_group("many processes (one per host; see docs/launch.md)")
    multi.add_argument(
        "--distributed",
        action="store_true",
        help="join the other processes with jax.distributed (auto-detected on TPU pods, SLURM)",
    )
    multi.add_argument("--coordinator-address", default="", help="host:port of process 0")
    multi.add_argument("--num-processes", type=int, default=0)
    multi.add_argument("--process-id", type=int, default=-1)
    parser.set_defaults(run=main)


def _start(args: argparse.Namespace) -> jax.sharding.Mesh:
    """Joins the other processes when asked; returns this process's sampling mesh."""
    parallel.initialize_distributed(
        {
            "enabled": args.distributed,
            "coordinator_address": args.coordinator_address,
            "num_processes": args.num_processes,
            "process_id": args.process_id,
        }
    )
    return parallel.local_mesh(args.rollout_tensor)


def main(args: argparse.Namespace) -> dict:
    if not args.suite and not args.bfcl:
        raise EvalError("nothing to evaluate: give --suite and/or --bfcl")
    mesh = _start(args)
    tokenizer = load_checked_tokenizer(args.tokenizer, args.checkpoint)
    config, params = load_hf_checkpoint(args.checkpoint, mesh=mesh)
    sampler = Sampler(params, config, mesh=mesh)
    loop_config = LoopConfig(
        group_size=1,
        mode="live",
        temperature=0.0,
        max_new_tokens=args.max_new_tokens,
        max_len=args.max_len,
    )
    loop = CacheAgentLoop(sampler, tokenizer, None, loop_config)
    # Every process evaluates its share; all of them get every result; process 0 writes.
    writer = jax.process_index() == 0
    output = Path(args.output)
    if writer:
        output.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    if args.suite:
        tasks = generate_tasks(args.suite, args.n, args.seed)
        metrics, results = evaluate(loop, tasks, RewardConfig(), seed=args.seed)
        lines = ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
        if writer:
            (output / "suite.json").write_text(
                json.dumps(
                    {"metrics": metrics, "results": [r.to_dict() for r in results]}, indent=1
                )
            )
            (output / "suite.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        summary["suite"] = metrics
    if args.bfcl:
        verdicts = []
        for category in [c.strip() for c in args.bfcl.split(",") if c.strip()]:
            entries = bfcl_scoring.load_category(category)
            if args.limit:
                entries = entries[: args.limit]
            own = parallel.process_share(entries, even=False)
            if category in bfcl_scoring.SINGLE_TURN_CATEGORIES:
                own_verdicts = _single_turn(category, own, sampler, tokenizer, args)
            else:
                own_verdicts = _multi_turn(category, own, loop)
            verdicts += [v for part in parallel.allgather_objects(own_verdicts) for v in part]
        results = report.summarize(verdicts)
        if writer:
            report.write_report(results, output, stem="bfcl", title="BFCL v4")
        print(report.render_markdown(results, title="BFCL v4"))
        summary["bfcl"] = report.to_json(results)
    return summary


def _single_turn(category, entries, sampler, tokenizer, args):
    prompts = []
    for entry in entries:
        messages = entry["question"][0]
        prompts.append(
            render_prompt(messages, bfcl_scoring.single_turn_tools(entry), tokenizer).token_ids
        )
    special = tokenizer.special
    sampling = SamplingParams(
        temperature=0.0,
        max_new_tokens=args.max_new_tokens,
        stop_token_ids=(special.im_end, special.endoftext),
    )
    verdicts = []
    batch = 16
    for start in range(0, len(entries), batch):
        generations = sampler.generate(
            [p.tolist() for p in prompts[start : start + batch]], sampling
        )
        for entry, generation in zip(entries[start : start + batch], generations, strict=True):
            calls = parse_assistant(tokenizer.decode(generation.token_ids.tolist())).tool_calls
            verdicts.append(bfcl_scoring.score_single_turn(category, entry, calls))
    return verdicts


def _multi_turn(category, entries, loop):
    tasks = [bfcl_tasks.task_from_entry(entry, category) for entry in entries]
    verdicts = []
    too_long = 0
    for task in tasks:
        calls_per_turn = [[] for _ in task.turns]
        try:
            (rollout,) = loop.run([task])
        except PromptTooLongError:
            too_long += 1  # scored as a model that made no calls: it never got to answer
        else:
            for call in rollout.calls:
                calls_per_turn[call.user_turn].append((call.name, call.arguments or {}))
        verdicts.append(bfcl_scoring.score_multi_turn(task, calls_per_turn))
    if too_long:
        print(
            f"{category}: {too_long} of {len(tasks)} prompts exceed --max-len; scored as no calls"
        )
    return verdicts
