"""What `cacherl demo` writes about a run: the stage table, plots of the GRPO run, `report.md`
and `stages.json`.

`write_report(workdir, ...)` writes `report.md` (the stage table: one row per stage, the
`STAGE_COLUMNS` evaluation metrics; seconds per phase; the SFT/GRPO training summary; the plots)
and `stages.json` (stages, timings, the teacher's augmentation summary, the run's options) in
`workdir`, and prints the table. `plot_grpo` draws a GRPO run's `metrics.jsonl` as PNGs
(matplotlib, imported on first use). `DemoData` is what the stages train and are evaluated on,
shared with `cacherl_jax.pipeline_demo`, which produces it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cacherl_jax.agent.outcome import TIERS
from cacherl_jax.eval.taxonomy import (
    BUCKETS,
    read_validation_records,
    success_by_domain,
    taxonomy_table,
)
from cacherl_jax.model import Qwen3Config
from cacherl_jax.train.metrics import read_metrics

STAGE_COLUMNS = (
    ("eval/reward/total", "val. reward"),
    ("eval/process_accuracy", "process acc."),
    ("eval/success_rate", "success"),
    ("eval/reward/format", "format"),
    ("eval/calls_per_task", "calls/task"),
)


@dataclasses.dataclass(frozen=True)
class DemoData:
    """What the stages train and are evaluated on."""

    train_path: Path  # trajectories: the SFT data
    validation: list  # the validation tasks every stage is evaluated on
    augment_summary: dict[str, Any] | None = None  # the teacher's run, when it added reasoning
    # The GRPO task set and the tool cache's source: reference trajectories of training tasks SFT
    # did not see (None: the SFT data, for a reused SFT run from before they were kept apart).
    grpo_path: Path | None = None

    @property
    def rl_path(self) -> Path:
        return self.grpo_path or self.train_path


def log(message: str) -> None:
    """Prints a timestamped progress line of the demo."""
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


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


def taxonomy_section(workdir: Path, stages: Iterable[str]) -> list[str]:
    """A table of each stage's validation failures by bucket (`cacherl_jax.eval.taxonomy`), from
    the `validation_<stage>.jsonl` records the evaluations wrote; [] without records."""
    rows = []
    for stage in stages:
        path = workdir / f"validation_{stage}.jsonl"
        if path.exists():
            records = read_validation_records(path)
            counts = taxonomy_table(records)
            successes = sum(bool(r["success"]) for r in records)
            cells = [str(len(records)), str(successes), *map(str, counts.values())]
            rows.append(f"| {stage} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    header = "| stage | tasks | succeeded | " + " | ".join(BUCKETS) + " |"
    rule = "|---" * (len(BUCKETS) + 3) + "|"
    return ["Validation failures by kind (first rule that applies):", "", header, rule, *rows, ""]


def domain_section(workdir: Path, stages: Iterable[str]) -> list[str]:
    """A table of each stage's validation successes per domain ("succeeded/tasks"), from the
    `validation_<stage>.jsonl` records; [] without records."""
    tables = {
        stage: success_by_domain(read_validation_records(path))
        for stage in stages
        if (path := workdir / f"validation_{stage}.jsonl").exists()
    }
    if not tables:
        return []
    domains = sorted({domain for table in tables.values() for domain in table})
    rows = [
        f"| {stage} | "
        + " | ".join("{}/{}".format(*table.get(domain, (0, 0))) for domain in domains)
        + " |"
        for stage, table in tables.items()
    ]
    header = "| stage | " + " | ".join(domains) + " |"
    rule = "|---" * (len(domains) + 1) + "|"
    return ["Validation successes by domain:", "", header, rule, *rows, ""]


def tier_section(run_dir: Path) -> list[str]:
    """The GRPO run's rollouts by worst cache tier and the live agreement of each tier's cached
    calls, summed over its steps (`train.tier_fidelity`); [] without a GRPO run."""
    records = [r for r in read_metrics(run_dir) if "loop/rollouts" in r]
    if not records:
        return []
    rollouts = sum(r["loop/rollouts"] for r in records)
    rows = [
        "| tier | rollouts (by worst tier) | cached calls | live agreement |",
        "|---|---|---|---|",
    ]
    for tier in TIERS:
        share = sum(r[f"tier/{tier}_fraction"] * r["loop/rollouts"] for r in records) / rollouts
        calls = sum(r.get(f"loop/calls_{tier}", 0) for r in records)
        replayed = sum(r.get(f"fidelity/{tier}_calls", 0) for r in records)
        agreed = sum(
            r.get(f"fidelity/{tier}_agreement", 0) * r.get(f"fidelity/{tier}_calls", 0)
            for r in records
        )
        agreement = f"{agreed / replayed:.2f}" if replayed else "n/a"
        rows.append(f"| {tier} | {share:.2f} | {calls:.0f} | {agreement} |")
    return ["GRPO rollouts by cache tier, over all steps:", "", *rows, ""]


def _summary_line(sft_summary: dict[str, Any], grpo_summary: dict[str, Any], ran_grpo: bool) -> str:
    line = f"SFT final loss {sft_summary.get('loss', float('nan')):.4f}"
    if ran_grpo:
        line += (
            f"; GRPO final reward {grpo_summary.get('reward/total', float('nan')):.3f} (training "
            f"rollouts, cache tiers: exact {grpo_summary.get('tier/exact_fraction', 0):.2f}, fuzzy "
            f"{grpo_summary.get('tier/fuzzy_fraction', 0):.2f}, best-effort "
            f"{grpo_summary.get('tier/best_effort_fraction', 0):.2f})"
        )
    return line


def write_report(
    workdir: Path,
    model: Qwen3Config,
    data: DemoData,
    stages: dict[str, dict[str, float]],
    timings: dict[str, float],
    sft_summary: dict[str, Any],
    grpo_summary: dict[str, Any],
    plots: list[Path],
    options: dict[str, Any],
) -> Path:
    """`report.md` (the stage table, seconds per phase, the training summary, the plots) and
    `stages.json` in `workdir`; prints the table. Returns the report's path."""
    table = stage_table(stages)
    report = [
        "# CacheRL in miniature",
        "",
        f"Procedural suite, tiny Qwen3 ({model.num_layers} layers, hidden {model.hidden_size}), "
        f"{len(data.validation)} validation tasks evaluated greedily with live tools.",
        "",
        table,
        "",
        "Seconds per phase: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        "",
        _summary_line(sft_summary, grpo_summary, options["run_grpo"]) + ".",
        "",
        *taxonomy_section(workdir, stages),
        *domain_section(workdir, stages),
        *tier_section(workdir / "grpo"),
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
    ]
    report_path = workdir / "report.md"
    report_path.write_text("\n".join(report))
    (workdir / "stages.json").write_text(
        json.dumps(
            {
                "stages": stages,
                "timings": timings,
                "augment": data.augment_summary,
                "options": options,
            },
            indent=2,
            default=str,
        )
    )
    print("\n" + table + "\n")
    log(f"report: {report_path} ({timings['total_s'] / 60:.1f} min)")
    return report_path
