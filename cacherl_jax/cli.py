"""`cacherl <command>`: the command-line entry point.

Each command lives in its own module and is imported only when run, so `cacherl --help` is fast
and a command's heavy dependencies load only for that command.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from cacherl_jax.agent.bfcl import BfclError
from cacherl_jax.agent.tool_cache import ToolCacheError
from cacherl_jax.chat.tokenizer import TokenizerError
from cacherl_jax.chat.trajectory import TrajectoryError
from cacherl_jax.eval.run import EvalError
from cacherl_jax.model.config import CheckpointError
from cacherl_jax.parallel import ShardingError
from cacherl_jax.precision import full_float32_matmuls
from cacherl_jax.train.errors import TrainingError
from cacherl_jax.train.host_memory import restart_with_huge_pages

# Commands that run XLA computations restart once with huge pages for XLA's buffers
# (`host_memory.huge_pages_environment`: ~9% off an SFT step on CPU); the others start faster.
XLA_COMMANDS = frozenset({"sft", "grpo", "rft", "plan", "check-model", "demo", "eval", "serve"})


def _convert(args: argparse.Namespace) -> None:
    import jax.numpy as jnp

    from cacherl_jax import parallel
    from cacherl_jax.model import hf_checkpoint, native_checkpoint

    dtype = jnp.dtype(args.dtype) if args.dtype else None
    mesh = parallel.make_mesh(parallel.DEFAULT_MESH_AXES)
    if args.direction == "hf-to-jax":
        config, params = hf_checkpoint.load_hf_checkpoint(
            args.source, mesh=mesh, dtype=dtype or jnp.float32, progress=True
        )
        native_checkpoint.save_params(config, params, args.destination)
    else:
        config, params = native_checkpoint.load_params(args.source, mesh=mesh, dtype=dtype)
        hf_checkpoint.save_hf_checkpoint(
            config,
            params,
            args.destination,
            max_shard_bytes=int(args.max_shard_gb * 1024**3),
            progress=True,
        )
    print(f"wrote {args.destination} ({args.direction}, mesh {parallel.describe(mesh)})")


def _demo(args: argparse.Namespace) -> None:
    from cacherl_jax import pipeline_demo

    pipeline_demo.run(
        args.workdir,
        train_tasks=args.train_tasks,
        val_tasks=args.val_tasks,
        sft_steps=args.sft_steps,
        grpo_steps=args.grpo_steps,
        seed=args.seed,
        teacher=args.teacher,
        eval_loop=args.eval_loop,
    )


def _check_model(args: argparse.Namespace) -> None:
    import jax

    from cacherl_jax import model_check, parallel

    # Simulated CPU devices must be requested before JAX creates its CPU backend; on a GPU or TPU
    # host the option only affects the (unused) CPU backend.
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    model_check.run(
        workdir=args.workdir, seq_len=args.seq_len, mesh_axes=parallel.parse_mesh_axes(args.mesh)
    )


def _tokenizer_train(args: argparse.Namespace) -> None:
    from cacherl_jax.chat.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(args.corpus, args.vocab_size, args.output)
    print(
        f"wrote {args.output}/tokenizer.json ({tokenizer.vocab_size} tokens, chat tags as single tokens)"
    )


def _chat_show(args: argparse.Namespace) -> None:
    from cacherl_jax.chat import inspect, load_tokenizer, render
    from cacherl_jax.chat.trajectory import load_jsonl

    trajectories, _ = load_jsonl(args.input)
    tokenizer = load_tokenizer(args.tokenizer)
    color = sys.stdout.isatty() and not args.no_color
    for trajectory in trajectories[args.index : args.index + args.count]:
        rendered = render(
            trajectory.messages, trajectory.tools, tokenizer, enable_thinking=args.enable_thinking
        )
        print(f"== {trajectory.id}: {inspect.summary(rendered)}")
        print(inspect.format_tokens(rendered, tokenizer, color=color))


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1]")
    return value


def _tasks(args: argparse.Namespace) -> None:
    from cacherl_jax.agent.procedural import generate_tasks, write_trajectories

    generated = generate_tasks(args.split, args.n, args.seed, tools=args.tools)
    print(
        write_trajectories(
            args.output,
            generated,
            reasoning=not args.no_reasoning,
            plan_only_fraction=args.plan_only_fraction,
            seed=args.seed,
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacherl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Listed for --help; these parse their own ml-collections flags (see CONFIG_COMMANDS).
    commands.add_parser("sft", help="masked SFT: --config=configs/sft.py:tiny --workdir=runs/x")
    commands.add_parser(
        "grpo", help="GRPO with cache-backed rollouts: --config=configs/grpo.py:tiny"
    )
    commands.add_parser("rft", help="iterative rejection-sampled SFT: --config=configs/rft.py:tiny")
    commands.add_parser("plan", help="memory per device of an SFT config, compiled ahead of time")

    convert = commands.add_parser(
        "convert",
        help="convert checkpoints between Hugging Face safetensors and our orbax format",
        description="Convert a Qwen3 checkpoint. hf-to-jax: a Hugging Face directory (config.json and "
        "safetensors) to a cacherl_jax checkpoint; jax-to-hf: the reverse, loadable by transformers.",
    )
    convert.add_argument("direction", choices=["hf-to-jax", "jax-to-hf"])
    convert.add_argument("source")
    convert.add_argument("destination")
    convert.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="parameter dtype of the output"
    )
    convert.add_argument(
        "--max-shard-gb", type=float, default=2.0, help="safetensors shard size (jax-to-hf)"
    )
    convert.set_defaults(run=_convert)

    tokenizer = commands.add_parser("tokenizer", help="tokenizer utilities")
    tokenizer_commands = tokenizer.add_subparsers(
        dest="tokenizer_command", required=True, metavar="COMMAND"
    )
    train = tokenizer_commands.add_parser(
        "train",
        help="train a small byte-level BPE with Qwen3's pre-tokenizer and chat tags",
        description="Train a byte-level BPE tokenizer on text files. It uses Qwen3's pre-tokenizer "
        "(single digits) and carries Qwen3's 26 special/tag tokens as single tokens (ids 0..25).",
    )
    train.add_argument(
        "--corpus", nargs="+", required=True, metavar="FILE", help="UTF-8 text files"
    )
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--output", required=True, metavar="DIR")
    train.set_defaults(run=_tokenizer_train)

    chat = commands.add_parser("chat", help="inspect rendered conversations")
    chat_commands = chat.add_subparsers(dest="chat_command", required=True, metavar="COMMAND")
    show = chat_commands.add_parser(
        "show",
        help="render trajectories and mark the trained tokens",
        description="Render trajectories from a JSONL file in Qwen3's chat format and show which tokens "
        "carry loss mask 1: green (or ⟦...⟧) for answers and tool calls, cyan (or ⟦think:...⟧) for thinking.",
    )
    show.add_argument("input", help="trajectories JSONL")
    show.add_argument("--tokenizer", default="qwen3", help="'qwen3' or a tokenizer directory")
    show.add_argument("--index", type=int, default=0, help="first record to show")
    show.add_argument("--count", type=int, default=1, help="how many records to show")
    show.add_argument(
        "--enable-thinking", type=lambda s: {"true": True, "false": False}[s.lower()], default=None
    )
    show.add_argument("--no-color", action="store_true")
    show.set_defaults(run=_chat_show)

    check = commands.add_parser(
        "check-model",
        help="a random HF Qwen3 through every model path, checked against transformers",
    )
    check.add_argument("--workdir", default="runs/check-model")
    check.add_argument("--seq-len", type=int, default=512)
    check.add_argument(
        "--mesh", default="data=1,fsdp=2,tensor=2", help="mesh axes, e.g. data=2,fsdp=-1"
    )
    check.add_argument(
        "--cpu-devices", type=int, default=4, help="simulated CPU devices (CPU backend only)"
    )
    check.set_defaults(run=_check_model)

    demo = commands.add_parser(
        "demo", help="the CacheRL pipeline in miniature on CPU (what `make demo` runs)"
    )
    demo.add_argument("--workdir", default="runs/demo")
    demo.add_argument("--train-tasks", type=int, default=3000)
    demo.add_argument("--val-tasks", type=int, default=48)
    demo.add_argument("--sft-steps", type=int, default=400)
    demo.add_argument("--grpo-steps", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--teacher", default="template", help="configs/augment.py variant: template|endpoint|local"
    )
    demo.add_argument(
        "--eval-loop",
        choices=["grpo", "default"],
        default="grpo",
        help="grpo: every stage evaluated alike with GRPO's evaluation loop; default: base and "
        "SFT with evaluate_checkpoint's longer loop, GRPO from its run's own validation",
    )
    demo.set_defaults(run=_demo)

    tasks = commands.add_parser(
        "tasks", help="procedural tasks and their reference trajectories (JSONL, for SFT)"
    )
    tasks.add_argument("--split", choices=["train", "validation", "test"], required=True)
    tasks.add_argument("--n", type=int, required=True, help="number of tasks")
    tasks.add_argument("--seed", type=int, default=0)
    tasks.add_argument(
        "--tools", choices=["kind", "domain"], default="kind", help="offer the task's tools or all"
    )
    tasks.add_argument("--no-reasoning", action="store_true", help="no short reasoning strings")
    tasks.add_argument(
        "--plan-only-fraction",
        type=_fraction,
        default=0.0,
        help="share of trajectories that answer with a plan and call nothing (noisy teacher data)",
    )
    tasks.add_argument("--output", required=True)
    tasks.set_defaults(run=_tasks)

    from cacherl_jax.agent.cache_cli import register_cli as register_cache_cli

    register_cache_cli(commands)
    from cacherl_jax.eval.run import register_cli as register_eval_cli

    register_eval_cli(commands)
    from cacherl_jax.serve.server import register_cli as register_serve_cli

    register_serve_cli(commands)
    return parser


def _parse_config_flags(command: str, argv: Sequence[str], define_extra) -> Any:
    """ml-collections config flags (absl), the convention of big_vision and friends:
    `--config=FILE[:ARG]` plus `--config.FIELD=VALUE` overrides."""
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    full_argv = [f"cacherl {command}", *argv]
    # sys_argv tells ml-collections which `--config.X` overrides to define (default: sys.argv).
    config_flags.DEFINE_config_file(
        "config",
        None,
        "an ml-collections config file[:arg]",
        flag_values=flag_values,
        sys_argv=full_argv,
    )
    define_extra(flags, flag_values)
    try:
        flag_values(full_argv)
    except flags.Error as err:
        raise CommandLineError(str(err)) from err
    if flag_values.config is None:
        raise CommandLineError("--config=FILE[:ARG] is required")
    return flag_values


class CommandLineError(ValueError):
    pass


def _workdir_flags(flags, flag_values):
    flags.DEFINE_string(
        "workdir", None, "run directory (checkpoints, metrics, exports)", flag_values=flag_values
    )
    flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=flag_values)


def _train_command(command: str, argv: Sequence[str]) -> None:
    """`cacherl sft|grpo|rft --config=configs/CMD.py:VARIANT [--config.FIELD=VALUE ...] --workdir=DIR`."""
    flag_values = _parse_config_flags(command, argv, _workdir_flags)
    if not flag_values.workdir:
        raise CommandLineError("--workdir=DIR is required")
    if command == "sft":
        from cacherl_jax.train.sft import train
    elif command == "rft":
        from cacherl_jax.train.rft import run as train
    else:
        from cacherl_jax.train.grpo import train

    summary = train(flag_values.config, flag_values.workdir, progress=flag_values.progress)
    print(json.dumps(summary))


def _plan(argv: Sequence[str]) -> None:
    """`cacherl plan --config=configs/sft.py:qwen3_4b --cpu-devices=8 --device-memory-gb=80`."""

    def extra(flags, flag_values):
        flags.DEFINE_integer(
            "cpu_devices",
            8,
            "simulated CPU devices standing in for the mesh",
            flag_values=flag_values,
        )
        flags.DEFINE_float(
            "device_memory_gb",
            0.0,
            "memory of one real device, to say whether it fits",
            flag_values=flag_values,
        )

    flag_values = _parse_config_flags("plan", argv, extra)
    import jax

    jax.config.update("jax_num_cpu_devices", flag_values.cpu_devices)
    from cacherl_jax.train import plan

    result = plan.plan(flag_values.config, devices=jax.devices("cpu"))
    print(plan.format_plan(result, flag_values.device_memory_gb or None))
    print(json.dumps(result | {"model": result["model"]["hidden_size"]}))


def _augment(argv: Sequence[str]) -> None:
    from cacherl_jax.data.thinking import augment_main

    augment_main(argv)  # prints its own errors and exits 2 (130 after Ctrl-C)


CONFIG_COMMANDS = {
    "augment": _augment,
    "sft": lambda argv: _train_command("sft", argv),
    "grpo": lambda argv: _train_command("grpo", argv),
    "rft": lambda argv: _train_command("rft", argv),
    "plan": _plan,
}


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] in XLA_COMMANDS:
        restart_with_huge_pages()  # only as the process's entry point: this replaces the process
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in CONFIG_COMMANDS:
        command, run = argv[0], lambda: CONFIG_COMMANDS[argv[0]](argv[1:])
    else:
        args = build_parser().parse_args(argv)
        command, run = args.command, lambda: args.run(args)
    full_float32_matmuls()
    try:
        run()
    except (
        CommandLineError,
        CheckpointError,
        ShardingError,
        TokenizerError,
        TrajectoryError,
        TrainingError,
        ToolCacheError,
        EvalError,
        BfclError,
    ) as err:
        print(f"cacherl {command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
