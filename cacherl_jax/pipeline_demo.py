"""`cacherl demo` (what `make demo` runs): the CacheRL pipeline in miniature on CPU.

Stages, each evaluated greedily on the same validation tasks with live tools:

  base   a randomly initialised tiny Qwen3 (what the pipeline starts from)
  sft    masked SFT on reference trajectories of the procedural suite, with reasoning
  grpo   GRPO from the SFT checkpoint, every tool call answered by the three-tier cache,
         rewarded with the cache-tier-aware reward

The run directory gets the data, the tokenizer, each stage's metrics and checkpoints, the tool
cache, `report.md` (the stage table) with `stages.json`, and plots of the GRPO run (reward by
tier, tier hit rates, KL, response length). Sized for ~15 minutes on 2 CPU cores; every size is
a flag.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import jax

from cacherl_jax.agent.procedural import generate_tasks, write_trajectories
from cacherl_jax.chat import load_tokenizer
from cacherl_jax.data.thinking import augment
from cacherl_jax.eval.suite import evaluate_checkpoint
from cacherl_jax.model import init_params, presets, save_hf_checkpoint
from cacherl_jax.train import grpo, sft
from cacherl_jax.train.metrics import read_metrics

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

STAGE_COLUMNS = (
    ("eval/reward/total", "val. reward"),
    ("eval/process_accuracy", "process acc."),
    ("eval/success_rate", "success"),
    ("eval/reward/format", "format"),
    ("eval/calls_per_task", "calls/task"),
)


def load_config(name: str, arg: str):
    """`configs/<name>.py:<arg>` of this checkout, as `--config=` would load it."""
    spec = importlib.util.spec_from_file_location(
        f"cacherl_configs_{name}", CONFIG_DIR / f"{name}.py"
    )
    if spec is None or not (CONFIG_DIR / f"{name}.py").exists():
        raise FileNotFoundError(f"{CONFIG_DIR / name}.py not found (run from a clone of the repo)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _eval_stage(checkpoint: Path, tasks, seed: int) -> dict[str, float]:
    metrics, _ = evaluate_checkpoint(str(checkpoint), tasks, seed=seed)
    return {f"eval/{k}": v for k, v in metrics.items()}


def stage_table(stages: dict[str, dict[str, float]]) -> str:
    header = "| stage | " + " | ".join(title for _, title in STAGE_COLUMNS) + " |"
    rule = "|---" * (len(STAGE_COLUMNS) + 1) + "|"
    rows = [
        f"| {name} | "
        + " | ".join(f"{metrics.get(key, float('nan')):.3f}" for key, _ in STAGE_COLUMNS)
        + " |"
        for name, metrics in stages.items()
    ]
    return "\n".join([header, rule, *rows])


def plot_grpo(run_dir: Path, out_dir: Path) -> list[Path]:
    """PNG plots of a GRPO run's metrics.jsonl; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run_dir) if "reward/total" in r]
    if not records:
        return []
    steps = [r["step"] for r in records]

    def series(key):
        return [r.get(key, float("nan")) for r in records]

    panels = {
        "reward_by_tier.png": (
            "reward by worst cache tier",
            [
                "reward/total",
                "reward/total_exact",
                "reward/total_fuzzy",
                "reward/total_best_effort",
            ],
        ),
        "tier_hit_rates.png": (
            "rollouts by worst tier (fraction)",
            ["tier/exact_fraction", "tier/fuzzy_fraction", "tier/best_effort_fraction"],
        ),
        "kl_and_clipping.png": (
            "KL to the old policy and clip fraction",
            ["kl_old", "clip_fraction"],
        ),
        "response_length.png": ("generated tokens per rollout", ["response_tokens"]),
    }
    written = []
    for name, (title, keys) in panels.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in keys:
            ax.plot(steps, series(key), label=key)
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def run(
    workdir: str | Path,
    *,
    train_tasks: int = 3000,
    val_tasks: int = 48,
    sft_steps: int = 400,
    grpo_steps: int = 16,
    seed: int = 0,
    teacher: str = "template",
) -> dict[str, Any]:
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name, since):
        timings[name] = time.perf_counter() - since
        return time.perf_counter()

    t = time.perf_counter()
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    raw_path, train_path = data / "train.raw.jsonl", data / "train.jsonl"
    tasks = generate_tasks("train", train_tasks, seed)
    write_trajectories(raw_path, tasks, reasoning=False)
    validation = generate_tasks("validation", val_tasks, seed)
    _log(f"{len(tasks)} reference trajectories -> {raw_path}; {len(validation)} validation tasks")
    t = lap("data_s", t)

    # Knowledge transfer: reasoning for every step (the offline template teacher by default).
    augment_config = load_config("augment", teacher)
    augment_config.input.spec = str(raw_path)
    augment_config.output = str(train_path)
    augment_summary = augment(augment_config, progress=False)
    _log(f"reasoning added ({teacher} teacher) -> {train_path}")
    t = lap("augment_s", t)

    # SFT (trains the tokenizer on the data first).
    config = load_config("sft", "tiny")
    config.seed = seed
    config.data.train = str(train_path)
    config.train.steps = sft_steps
    config.train.checkpoint_every = max(sft_steps // 2, 1)
    _log(f"SFT: {sft_steps} steps of {config.data.batch_size} x {config.data.seq_len} tokens")
    sft_summary = sft.train(config, workdir / "sft", progress=True)
    sft_hf = workdir / "sft" / "hf"
    t = lap("sft_s", t)

    # The base model: the same architecture and tokenizer, random weights.
    tokenizer = load_tokenizer(sft_hf)
    model = presets.preset("tiny").replace(vocab_size=tokenizer.vocab_size)
    base_hf = workdir / "base" / "hf"
    if not (base_hf / "config.json").exists():
        save_hf_checkpoint(model, init_params(model, jax.random.key(seed)), base_hf)
        (base_hf / "tokenizer.json").write_bytes((sft_hf / "tokenizer.json").read_bytes())

    stages: dict[str, dict[str, float]] = {}
    _log("evaluating the base and SFT models (greedy, live tools)")
    stages["base"] = _eval_stage(base_hf, validation, seed)
    stages["sft"] = _eval_stage(sft_hf, validation, seed)
    t = lap("eval_s", t)

    # GRPO from the SFT checkpoint, tool calls answered by the cache built from the trajectories.
    config = load_config("grpo", "tiny")
    config.seed = seed
    config.model.checkpoint = str(sft_hf)
    config.cache.build_from = str(train_path)
    config.tasks.source = "jsonl"
    config.tasks.path = str(train_path)
    config.tasks.n = 0
    config.eval_tasks.n = val_tasks
    config.eval_tasks.seed = seed
    config.train.steps = grpo_steps
    config.train.eval_every = 0
    _log(
        f"GRPO: {grpo_steps} steps x {config.grpo.tasks_per_step} tasks x G={config.loop.group_size}"
    )
    grpo_summary = grpo.train(config, workdir / "grpo", progress=True)
    stages["grpo"] = grpo_summary["eval_after"]
    t = lap("grpo_s", t)

    plots = plot_grpo(workdir / "grpo", workdir)
    timings["total_s"] = time.perf_counter() - started
    table = stage_table(stages)
    report = [
        "# CacheRL in miniature",
        "",
        f"Procedural suite, tiny Qwen3 ({model.num_layers} layers, hidden {model.hidden_size}), "
        f"{len(validation)} validation tasks evaluated greedily with live tools.",
        "",
        table,
        "",
        "Seconds per phase: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        "",
        f"SFT final loss {sft_summary.get('loss', float('nan')):.4f}; GRPO final reward "
        f"{grpo_summary.get('reward/total', float('nan')):.3f} (training rollouts, cache tiers: "
        f"exact {grpo_summary.get('tier/exact_fraction', 0):.2f}, fuzzy "
        f"{grpo_summary.get('tier/fuzzy_fraction', 0):.2f}, best-effort "
        f"{grpo_summary.get('tier/best_effort_fraction', 0):.2f}).",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
    ]
    (workdir / "report.md").write_text("\n".join(report))
    (workdir / "stages.json").write_text(
        json.dumps(
            {"stages": stages, "timings": timings, "augment": augment_summary},
            indent=2,
            default=str,
        )
    )
    print("\n" + table + "\n")
    _log(f"report: {workdir / 'report.md'} ({timings['total_s'] / 60:.1f} min)")
    return {"stages": stages, "timings": timings, "report": str(workdir / "report.md")}
