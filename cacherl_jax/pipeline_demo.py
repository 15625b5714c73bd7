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

`run()` reads as its steps: `prepare_data` (or `reuse_sft`), `train_sft`, `configure_grpo`,
`evaluate_base_and_sft`, `train_grpo`, `write_report` (the report side: `cacherl_jax.demo_report`).
Its keyword options also run the CPU smoke ablation of `experiments/reproduce_paper.py`: without
the teacher's reasoning, without thinking, with GRPO config overrides (exact-only cache,
fixed-weight reward, no KL), SFT only, and an SFT stage reused from another run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections

from cacherl_jax import config_flags
from cacherl_jax.agent.loop import LoopConfig
from cacherl_jax.agent.procedural import generate_tasks, write_trajectories
from cacherl_jax.chat import load_tokenizer
from cacherl_jax.data.thinking import augment
from cacherl_jax.demo_report import DemoData, log, plot_grpo, write_report
from cacherl_jax.eval.suite import evaluate_checkpoint
from cacherl_jax.eval.taxonomy import write_validation_records
from cacherl_jax.model import Qwen3Config, init_params, presets, save_hf_checkpoint
from cacherl_jax.train import grpo, sft
from cacherl_jax.train.metrics import read_metrics

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# The demo's settings over the tiny configs, set before a caller's overrides. The longest
# procedural trajectories (3-4 calls with the teacher's reasoning) render to ~700 tokens, so
# 512-token rows and rollouts would cut 4 of the 16 task kinds before their answer. Small batches
# and a high peak learning rate after a warmup: optimizer steps, not tokens, decide when the tiny
# model starts copying values (docs/demo.md has the measurements).
SFT_SETTINGS: dict[str, Any] = {
    "data.seq_len": 768,
    "data.batch_size": 4,
    "train.lr": 8e-3,
    "train.warmup_steps": 100,
}
LOOP_SHAPE: dict[str, Any] = {"loop.max_len": 768, "loop.cache_len": 2304}
# GRPO's tasks (and the cache built from their reference trajectories) are training tasks SFT did
# not see: the tiny model memorises its SFT tasks in a few epochs, and GRPO on those would find
# every group solved alike (no signal).
GRPO_DATA = "grpo.raw.jsonl"


def load_config(name: str, arg: str):
    """`configs/<name>.py:<arg>` of this checkout, as `--config=` would load it."""
    if not (CONFIG_DIR / f"{name}.py").exists():
        raise FileNotFoundError(f"{CONFIG_DIR / name}.py not found (run from a clone of the repo)")
    return config_flags.load_config(f"{CONFIG_DIR / name}.py:{arg}")


def _eval_stage(
    checkpoint: Path, tasks, seed: int, loop_config: LoopConfig | None, records: Path
) -> dict[str, float]:
    """The stage's metrics; its per-task results go to `records` (one JSON line per task)."""
    metrics, results = evaluate_checkpoint(
        str(checkpoint), tasks, seed=seed, loop_config=loop_config
    )
    write_validation_records(records, tasks, results)
    return {f"eval/{k}": v for k, v in metrics.items()}


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any] | None, *, name: str = "config"
) -> ml_collections.ConfigDict:
    """Sets dotted `overrides` ({"grpo.beta": 0.0, "reward.tier_aware": False}) on an
    ml-collections config in place, as `--config.FIELD=VALUE` would. Every field must already exist
    (a typo is a KeyError, not a new field) and keeps its type (a wrong type is a TypeError)."""
    for dotted, value in (overrides or {}).items():
        *sections, field = dotted.split(".")
        node = config
        for section in sections:
            child = node.get(section) if isinstance(node, ml_collections.ConfigDict) else None
            if not isinstance(child, ml_collections.ConfigDict):
                raise KeyError(f"{name} override {dotted!r}: there is no section {section!r}")
            node = child
        if field not in node:
            raise KeyError(
                f"{name} override {dotted!r}: there is no field {field!r} "
                f"(fields there: {', '.join(sorted(node.keys()))})"
            )
        node[field] = value
    return config


def _checkpoint_digest(checkpoint: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(checkpoint.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def evaluate_stage(
    checkpoint: str | Path,
    tasks,
    seed: int,
    loop_config: LoopConfig | None = None,
    *,
    records: str | Path,
    memo: bool = False,
) -> dict[str, float]:
    """`eval/`-prefixed metrics of an HF checkpoint on `tasks` (greedy, live tools, the default
    reward); every task's result, call by call, goes to `records` (JSONL,
    `cacherl_jax.eval.taxonomy.validation_record`). `loop_config` None: `evaluate_checkpoint`'s
    own loop settings.

    memo: the result is remembered in `stage_eval.json` beside the checkpoint directory (the
    records beside it too), keyed by the checkpoint's files, the tasks, the seed and the loop
    settings, so a later run evaluating the same model the same way (an ablation reusing an SFT
    stage) reads it instead of recomputing it."""
    checkpoint, records = Path(checkpoint), Path(records)
    if not memo:
        return _eval_stage(checkpoint, tasks, seed, loop_config, records)
    identity = {
        "checkpoint": _checkpoint_digest(checkpoint),
        "tasks": [task.to_dict() for task in tasks],
        "seed": seed,
        "loop": None if loop_config is None else dataclasses.asdict(loop_config),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    memo_path = checkpoint.parent / "stage_eval.json"
    memo_records = checkpoint.parent / f"stage_eval.{key[:16]}.jsonl"
    memos = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    if key in memos and memo_records.exists():
        log(f"{checkpoint}: evaluated before with the same settings ({memo_path})")
        records.parent.mkdir(parents=True, exist_ok=True)
        records.write_bytes(memo_records.read_bytes())
        return memos[key]
    metrics = _eval_stage(checkpoint, tasks, seed, loop_config, memo_records)
    records.write_bytes(memo_records.read_bytes())
    memos[key] = metrics
    partial = memo_path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(memos, indent=2))
    partial.replace(memo_path)
    return metrics


def _with_last_logged(run_dir: Path, summary: dict[str, Any], key: str) -> dict[str, Any]:
    """A training summary completed with the last logged record holding `key`: a rerun of a
    finished run only re-exports it and returns no final metrics."""
    if key in summary:
        return summary
    records = [r for r in read_metrics(run_dir) if key in r]
    return {**(records[-1] if records else {}), **summary}


def _final_grpo_eval(run_dir: Path, summary: dict[str, Any]) -> dict[str, float]:
    """The validation after the last GRPO step: from the summary, or -- for a run that had already
    finished, which `grpo.train` only re-exports -- from its metrics log."""
    if "eval_after" in summary:
        return summary["eval_after"]
    records = [r for r in read_metrics(run_dir) if "eval/reward/total" in r]
    if not records:
        raise RuntimeError(f"{run_dir}: the GRPO run logged no validation")
    return {k: v for k, v in records[-1].items() if k.startswith("eval/")}


EVAL_LOOPS = ("default", "grpo")


class _Stopwatch:
    """Seconds per phase; a phase runs from the end of the one before it."""

    def __init__(self) -> None:
        self.started = self._last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = now - self._last
        self._last = now

    def stop(self) -> dict[str, float]:
        self.timings["total_s"] = time.perf_counter() - self.started
        return self.timings


def run(
    workdir: str | Path,
    *,
    train_tasks: int = 3000,
    grpo_tasks: int = 1000,
    val_tasks: int = 96,
    sft_steps: int = 1000,
    grpo_steps: int = 20,
    seed: int = 0,
    teacher: str = "template",
    reasoning: bool = True,
    thinking: bool = True,
    sft_overrides: Mapping[str, Any] | None = None,
    grpo_overrides: Mapping[str, Any] | None = None,
    run_grpo: bool = True,
    sft_dir_reuse: str | Path | None = None,
    eval_base: bool = True,
    eval_loop: str = "grpo",
    eval_memo: bool = False,
) -> dict[str, Any]:
    """The pipeline (defaults: what `cacherl demo` runs), or one variant of it.

    reasoning: False trains SFT on the reference trajectories as generated (no reasoning), without
        the teacher's augmentation.
    thinking: False drops every thinking block: the SFT data carries no reasoning (the augmentation
        keeps all records without thinking, `rules.no_thinking_share=1`) and is rendered, sampled
        and evaluated with `enable_thinking=False` (`data.enable_thinking` of the SFT config,
        `loop.enable_thinking` of the GRPO config).
    sft_overrides, grpo_overrides: dotted config fields set last (`apply_overrides`), e.g.
        {"reward.tier_aware": False, "grpo.beta": 0.0, "cache.fuzzy_threshold": 100.0}.
    run_grpo: False stops after SFT (no GRPO stage).
    sft_dir_reuse: an SFT run directory (`<workdir>/sft` of an earlier run with the same seed and
        thinking setting) used instead of training one; its training data is the GRPO stage's task
        set and cache source. Nothing is generated, augmented or trained before the evaluations
        (`reasoning`, `teacher`, `train_tasks`, `sft_steps` and `sft_overrides` do not apply).
    eval_base: False skips the base (random) model's stage.
    eval_loop: "grpo" (default) evaluates every stage alike, through `evaluate_stage` with the
        GRPO config's evaluation loop (`grpo.loop_config(config, evaluation=True)`: its turn,
        token and length limits), the GRPO run's own validation switched off (`eval_tasks.n=0`);
        "default" evaluates base and SFT with `evaluate_checkpoint`'s loop settings and takes the
        GRPO stage from the GRPO run's own validation (so the stages are not compared alike).
    eval_memo: remember each stage's evaluation beside its checkpoint (`evaluate_stage(memo=)`).
    """
    if eval_loop not in EVAL_LOOPS:
        raise ValueError(f"eval_loop must be one of {EVAL_LOOPS}, got {eval_loop!r}")
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    clock = _Stopwatch()

    if sft_dir_reuse is None:
        data = prepare_data(
            workdir / "data",
            train_tasks,
            grpo_tasks,
            val_tasks,
            seed,
            teacher=teacher,
            reasoning=reasoning,
            thinking=thinking,
            clock=clock,
        )
        sft_dir = workdir / "sft"
        sft_summary = train_sft(
            sft_dir, data.train_path, sft_steps, seed, thinking=thinking, overrides=sft_overrides
        )
        clock.lap("sft_s")
    else:
        sft_dir = Path(sft_dir_reuse).absolute()
        data, sft_summary = reuse_sft(sft_dir, val_tasks, seed, thinking=thinking)
        clock.lap("data_s")

    grpo_config, stage_loop = configure_grpo(
        sft_dir / "hf",
        data,
        val_tasks,
        grpo_steps,
        seed,
        thinking=thinking,
        overrides=grpo_overrides,
        eval_loop=eval_loop,
    )
    model = base_model(sft_dir / "hf")
    stages = evaluate_base_and_sft(
        workdir,
        model,
        sft_dir / "hf",
        data.validation,
        seed,
        stage_loop,
        eval_base=eval_base,
        memo=eval_memo,
    )
    clock.lap("eval_s")

    grpo_summary: dict[str, Any] = {}
    plots: list[Path] = []
    if run_grpo:
        grpo_summary, stages["grpo"] = train_grpo(
            workdir / "grpo",
            grpo_config,
            data.validation,
            seed,
            stage_loop,
            eval_loop=eval_loop,
            memo=eval_memo,
            clock=clock,
        )
        plots = plot_grpo(workdir / "grpo", workdir)
    timings = clock.stop()

    options = {
        "reasoning": reasoning,
        "thinking": thinking,
        "teacher": teacher,
        "run_grpo": run_grpo,
        "sft_dir": str(sft_dir),
        "sft_overrides": dict(sft_overrides or {}),
        "grpo_overrides": dict(grpo_overrides or {}),
        "eval_loop": eval_loop,
    }
    report = write_report(
        workdir, model, data, stages, timings, sft_summary, grpo_summary, plots, options
    )
    return {
        "stages": stages,
        "timings": timings,
        "report": str(report),
        "options": options,
        "train_data": str(data.train_path),
        "sft_summary": sft_summary,
        "grpo_summary": grpo_summary,
    }


# --- the steps of `run` ------------------------------------------------------------------------


def prepare_data(
    data_dir: Path,
    train_tasks: int,
    grpo_tasks: int,
    val_tasks: int,
    seed: int,
    *,
    teacher: str,
    reasoning: bool,
    thinking: bool,
    clock: _Stopwatch,
) -> DemoData:
    """Reference trajectories of `train_tasks` procedural tasks (SFT's), of `grpo_tasks` more
    (GRPO's tasks and cache) and the validation tasks; with
    `reasoning`, the teacher adds reasoning to every step (without `thinking` every record is kept
    without it). Laps `data_s`, then `augment_s` when the teacher ran."""
    data_dir.mkdir(exist_ok=True)
    raw_path, train_path = data_dir / "train.raw.jsonl", data_dir / "train.jsonl"
    grpo_path = data_dir / GRPO_DATA
    tasks = generate_tasks("train", train_tasks + grpo_tasks, seed)
    write_trajectories(raw_path, tasks[:train_tasks], reasoning=False)
    write_trajectories(grpo_path, tasks[train_tasks:], reasoning=False)
    validation = generate_tasks("validation", val_tasks, seed)
    log(
        f"{train_tasks} reference trajectories for SFT -> {raw_path}, {grpo_tasks} for GRPO and "
        f"its cache -> {grpo_path}; {len(validation)} validation tasks"
    )
    clock.lap("data_s")
    if not reasoning:
        log(f"no teacher reasoning: SFT on the reference trajectories as generated ({raw_path})")
        return DemoData(raw_path, validation, grpo_path=grpo_path)

    # Knowledge transfer: reasoning for every step (the offline template teacher by default).
    augment_config = load_config("augment", teacher)
    augment_config.input.spec = str(raw_path)
    augment_config.output = str(train_path)
    if not thinking:
        augment_config.rules.no_thinking_share = 1.0
    augment_summary = augment(augment_config, progress=False)
    log(f"reasoning added ({teacher} teacher) -> {train_path}")
    clock.lap("augment_s")
    return DemoData(train_path, validation, augment_summary, grpo_path)


def train_sft(
    sft_dir: Path,
    train_path: Path,
    sft_steps: int,
    seed: int,
    *,
    thinking: bool,
    overrides: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Masked SFT of the tiny model on `train_path` (`sft.train` trains the tokenizer on the data
    first, and resumes a run it finds in `sft_dir`); returns its summary with the last loss."""
    config = load_config("sft", "tiny")
    config.seed = seed
    config.data.train = str(train_path)
    config.train.steps = sft_steps
    config.train.checkpoint_every = max(sft_steps // 2, 1)
    if not thinking:
        config.data.enable_thinking = False
    apply_overrides(config, {**SFT_SETTINGS, **(overrides or {})}, name="SFT config")
    steps, batch_size, seq_len = config.train.steps, config.data.batch_size, config.data.seq_len
    log(f"SFT: {steps} steps of {batch_size} x {seq_len} tokens")
    return _with_last_logged(sft_dir, sft.train(config, sft_dir, progress=True), "loss")


def reuse_sft(
    sft_dir: Path, val_tasks: int, seed: int, *, thinking: bool
) -> tuple[DemoData, dict[str, Any]]:
    """The data and summary of a finished SFT run of the same seed and thinking setting, and this
    seed's validation tasks."""
    if not (sft_dir / "config.json").exists() or not (sft_dir / "hf" / "config.json").exists():
        raise FileNotFoundError(
            f"{sft_dir}: not a finished SFT run (needs config.json and hf/config.json)"
        )
    reused = json.loads((sft_dir / "config.json").read_text())
    if reused.get("seed") != seed:
        raise ValueError(f"{sft_dir}: SFT run of seed {reused.get('seed')}, not {seed}")
    if (reused["data"].get("enable_thinking") is False) == thinking:
        raise ValueError(
            f"{sft_dir}: trained with data.enable_thinking="
            f"{reused['data'].get('enable_thinking')}, which does not fit thinking={thinking}"
        )
    train_path = Path(reused["data"]["train"])
    grpo_path = train_path.parent / GRPO_DATA
    summary = _with_last_logged(sft_dir, {"reused": str(sft_dir)}, "loss")
    validation = generate_tasks("validation", val_tasks, seed)
    log(f"SFT stage reused from {sft_dir} (data {train_path}); {len(validation)} validation tasks")
    return DemoData(
        train_path, validation, grpo_path=grpo_path if grpo_path.exists() else None
    ), summary


def configure_grpo(
    sft_hf: Path,
    data: DemoData,
    val_tasks: int,
    grpo_steps: int,
    seed: int,
    *,
    thinking: bool,
    overrides: Mapping[str, Any] | None,
    eval_loop: str,
) -> tuple[ml_collections.ConfigDict, LoopConfig | None]:
    """The GRPO run's config (from the SFT checkpoint, its tasks and tool cache built from the
    training trajectories) and the loop every stage is evaluated with (None: the default one)."""
    config = load_config("grpo", "tiny")
    config.seed = seed
    config.model.checkpoint = str(sft_hf)
    config.cache.build_from = str(data.rl_path)
    config.tasks.source = "jsonl"
    config.tasks.path = str(data.rl_path)
    config.tasks.n = 0
    config.eval_tasks.n = val_tasks
    config.eval_tasks.seed = seed
    config.train.steps = grpo_steps
    config.train.eval_every = 0
    if not thinking:
        config.loop.enable_thinking = False
    apply_overrides(config, {**LOOP_SHAPE, **(overrides or {})}, name="GRPO config")
    if eval_loop == "grpo":
        stage_loop = grpo.loop_config(config, evaluation=True)
        config.eval_tasks.n = 0  # every stage is evaluated by `run`, the same way
        return config, stage_loop
    if thinking:
        return config, None
    return config, LoopConfig(group_size=1, mode="live", temperature=0.0, enable_thinking=False)


def base_model(sft_hf: Path) -> Qwen3Config:
    """The base model: the SFT model's architecture and tokenizer (random weights at init)."""
    tokenizer = load_tokenizer(sft_hf)
    return presets.preset("tiny").replace(vocab_size=tokenizer.vocab_size)


def evaluate_base_and_sft(
    workdir: Path,
    model: Qwen3Config,
    sft_hf: Path,
    validation: list,
    seed: int,
    stage_loop: LoopConfig | None,
    *,
    eval_base: bool,
    memo: bool,
) -> dict[str, dict[str, float]]:
    """The stages before GRPO: the base model (randomly initialised from `seed`, saved once under
    `workdir/base/hf`) unless `eval_base` is False, and the SFT model."""
    stages: dict[str, dict[str, float]] = {}
    if eval_base:
        base_hf = workdir / "base" / "hf"
        if not (base_hf / "config.json").exists():
            save_hf_checkpoint(model, init_params(model, jax.random.key(seed)), base_hf)
            (base_hf / "tokenizer.json").write_bytes((sft_hf / "tokenizer.json").read_bytes())
        log("evaluating the base and SFT models (greedy, live tools)")
        stages["base"] = evaluate_stage(
            base_hf, validation, seed, stage_loop, records=workdir / "validation_base.jsonl",
            memo=memo,
        )  # fmt: skip
    else:
        log("evaluating the SFT model (greedy, live tools)")
    stages["sft"] = evaluate_stage(
        sft_hf, validation, seed, stage_loop, records=workdir / "validation_sft.jsonl", memo=memo
    )
    return stages


def train_grpo(
    grpo_dir: Path,
    config: ml_collections.ConfigDict,
    validation: list,
    seed: int,
    stage_loop: LoopConfig | None,
    *,
    eval_loop: str,
    memo: bool,
    clock: _Stopwatch,
) -> tuple[dict[str, Any], dict[str, float]]:
    """GRPO from the SFT checkpoint, every tool call answered by the cache `grpo.train` builds from
    the trajectories; returns its summary and the GRPO stage: evaluated like the others (eval_loop
    "grpo", laps `grpo_s` and `grpo_eval_s`) or the run's own last validation (laps `grpo_s`)."""
    log(
        f"GRPO: {config.train.steps} steps x {config.grpo.tasks_per_step} tasks "
        f"x G={config.loop.group_size}"
    )
    summary = _with_last_logged(
        grpo_dir, grpo.train(config, grpo_dir, progress=True), "reward/total"
    )
    if eval_loop != "grpo":
        stage = _final_grpo_eval(grpo_dir, summary)
        clock.lap("grpo_s")
        return summary, stage
    clock.lap("grpo_s")
    records = grpo_dir.parent / "validation_grpo.jsonl"
    stage = evaluate_stage(
        grpo_dir / "hf", validation, seed, stage_loop, records=records, memo=memo
    )
    clock.lap("grpo_eval_s")
    return summary, stage
