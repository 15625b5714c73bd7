"""`cacherl <command>`: the command-line entry point.

Nothing of the project loads before a command is chosen: a command's module (and with it JAX) is
imported only when that command runs, so `cacherl --help` is fast and lists every command. The
config commands (`sft`, `grpo`, `rft`, `plan`, `augment`) take `--config=FILE[:VARIANT]` with
`--config.FIELD=VALUE` overrides (`cacherl_jax.config_flags`); the others are argparse commands,
and `cache`, `eval` and `serve` define theirs in their own modules (`register_cli`). An error a
user's input causes (`errors.UserError`) is printed as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

# Config commands: (the line `cacherl --help` shows, an example config for their usage line).
CONFIG_COMMANDS = {
    "sft": ("masked SFT on trajectories", "configs/sft.py:tiny"),
    "grpo": ("GRPO with cache-backed rollouts and the tier-aware reward", "configs/grpo.py:tiny"),
    "rft": ("iterative rejection-sampled SFT", "configs/rft.py:tiny"),
    "plan": (
        "per-chip memory and FLOPs of an SFT or GRPO config's programs, compiled ahead of time",
        "configs/sft.py:tiny",
    ),
    "augment": ("teacher reasoning for each step of agent trajectories", "configs/augment.py"),
}
# Commands their own modules define with `register_cli(commands)`: (module, `--help` line).
REGISTERED_COMMANDS = {
    "cache": (
        "cacherl_jax.agent.cache_cli",
        "the three-tier tool cache: build it from trajectories, inspect it, query it",
    ),
    "eval": ("cacherl_jax.eval.run", "evaluate a checkpoint: procedural suite and/or BFCL v4"),
    "serve": (
        "cacherl_jax.serve.server",
        "OpenAI-compatible chat server (/v1/chat/completions with tools)",
    ),
}


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

    options = {k: v for k, v in vars(args).items() if k not in ("command", "run", "workdir")}
    for stage in ("sft", "grpo"):
        if stage in options:
            options[f"{stage}_overrides"] = dict(options.pop(stage))
    pipeline_demo.run(args.workdir, **options)


def field_override(text: str) -> tuple[str, object]:
    """`FIELD=VALUE` of `--sft` / `--grpo`: the value as JSON (numbers, true/false), else text."""
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE (e.g. train.lr=3e-4), got {text!r}")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argparse commands, with the config and registered commands listed for `--help`;
    `command`'s module, when it is a registered command, defines its full parser."""
    parser = argparse.ArgumentParser(prog="cacherl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (line, example) in CONFIG_COMMANDS.items():  # `main` parses their flags
        commands.add_parser(name, help=f"{line}: --config={example}", add_help=False)

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
    # Sizes left out take `pipeline_demo.run`'s defaults (the 15-minute miniature).
    for flag, what in (
        ("--train-tasks", "reference trajectories SFT trains on"),
        ("--grpo-tasks", "other training tasks: GRPO's tasks and its cache's source"),
        ("--val-tasks", "held-out validation tasks every stage is evaluated on"),
        ("--sft-steps", "SFT optimizer steps"),
        ("--grpo-steps", "GRPO steps"),
        ("--seed", "seed of the data, the model and the sampling"),
    ):
        demo.add_argument(flag, type=int, default=argparse.SUPPRESS, help=what)
    for stage, example in (("sft", "train.lr=4e-3"), ("grpo", "loop.mode=live")):
        demo.add_argument(
            f"--{stage}",
            type=field_override,
            action="append",
            default=argparse.SUPPRESS,
            metavar="FIELD=VALUE",
            help=f"set a field of the {stage.upper()} config (configs/{stage}.py:tiny), repeatable: "
            f"e.g. --{stage} {example}",
        )
    demo.add_argument(
        "--teacher",
        default=argparse.SUPPRESS,
        help="configs/augment.py variant: template (default)|endpoint|local",
    )
    demo.add_argument(
        "--eval-loop",
        choices=["grpo", "default"],
        default=argparse.SUPPRESS,
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

    for name, (module, line) in REGISTERED_COMMANDS.items():
        if name == command:
            importlib.import_module(module).register_cli(commands)
        else:
            commands.add_parser(name, help=line, add_help=False)
    return parser


# --- config commands ---------------------------------------------------------------------------


def _config_flags(command: str) -> list[Any]:
    from cacherl_jax.config_flags import Flag

    progress = Flag("progress", True, "show a progress bar")
    if command == "plan":
        return [
            Flag("cpu_devices", 8, "simulated CPU devices standing in for the mesh", metavar="N"),
            Flag("device_memory_gb", 0.0, "memory of one real device, to say whether it fits"),
            Flag(
                "topology",
                "",
                "compile for a TPU slice instead (v5p-16, v5e-16, v5p-64 or v5p:2x2x2; needs the "
                "tpu-plan extra)",
                metavar="NAME",
            ),
            Flag("attention", "", "attention implementation (xla, splash, cudnn, cpu_blocked)"),
        ]
    if command == "augment":
        return [
            Flag("input", None, "FILE.jsonl, bfcl:CATEGORY or procedural:SPLIT:N[:SEED]"),
            Flag("output", None, "the augmented JSONL (appended to, resumable)", metavar="FILE"),
            progress,
        ]
    workdir = Flag(
        "workdir",
        None,
        "run directory (checkpoints, metrics, exports)",
        metavar="DIR",
        required=True,
    )
    return [workdir, progress]


def _train(command: str, parsed: Any) -> None:
    """`cacherl sft|grpo|rft --config=configs/CMD.py:VARIANT [--config.FIELD=VALUE ...] --workdir=DIR`."""
    if command == "sft":
        from cacherl_jax.train.sft import train
    elif command == "rft":
        from cacherl_jax.train.rft import run as train
    else:
        from cacherl_jax.train.grpo import train

    summary = train(parsed.config, parsed.flags["workdir"], progress=parsed.flags["progress"])
    print(json.dumps(summary))


def _plan(parsed: Any) -> None:
    """`cacherl plan --config=configs/grpo.py:qwen3_4b --topology=v5p-16` (a TPU slice, compiled on
    this machine) or `--cpu_devices=8 --device_memory_gb=80` (simulated CPU devices)."""
    import os

    topology_name = parsed.flags["topology"]
    if topology_name:
        # libtpu must not look for TPU metadata or claim the platform on a machine without TPUs.
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chips held
    import jax

    from cacherl_jax.train import plan, topology

    memory = parsed.flags["device_memory_gb"] or None
    if topology_name:
        jax.config.update("jax_platforms", "cpu")
        target = topology.parse(topology_name)
        devices = topology.devices(target)
        memory = memory or target.chip_memory_gib
    else:
        jax.config.update("jax_num_cpu_devices", parsed.flags["cpu_devices"])
        devices = jax.devices("cpu")
    result = plan.plan(parsed.config, devices=devices, attention=parsed.flags["attention"] or None)
    print(plan.format_plan(result, memory))
    print(json.dumps(result | {"model": result["model"]["hidden_size"]}))


def _augment(argv: Sequence[str]) -> None:
    from cacherl_jax.data.thinking import augment_main

    # augment_main parses the (already checked) flags again; it prints its own errors and exits
    # 2 (130 after Ctrl-C or SIGTERM, the output consistent for a rerun).
    augment_main(argv)


def _config_command(command: str, argv: Sequence[str]) -> Callable[[], None] | None:
    """Parses a config command's flags; None after printing its `--help`."""
    from cacherl_jax import config_flags

    line, example = CONFIG_COMMANDS[command]
    flags = _config_flags(command)
    parsed = config_flags.parse(command, argv, flags, summary=line, example=example)
    if parsed is None:
        return None
    if command == "plan":
        return lambda: _plan(parsed)
    if command == "augment":
        return lambda: _augment(argv)
    return lambda: _train(command, parsed)


LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

# --- entry point --------------------------------------------------------------------------------


def _prepare(argv: list[str]) -> Callable[[], None] | None:
    """The chosen command, its flags parsed, ready to run; None when only help was asked for."""
    if argv and argv[0] in CONFIG_COMMANDS:
        return _config_command(argv[0], argv[1:])
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    return lambda: args.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    from cacherl_jax.errors import UserError

    try:
        run = _prepare(argv)
        if run is None:
            return 0
        # Progress and resume lines; `parallel.start` adds the process index on multi-host runs.
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        from cacherl_jax.precision import full_float32_matmuls

        full_float32_matmuls()
        run()
    except UserError as err:
        print(f"cacherl {command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
