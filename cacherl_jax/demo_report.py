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
from pathlib import Path
from typing import Any

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

    train_path: Path  # trajectories: the SFT data, the GRPO task set and the cache's source
    validation: list  # the validation tasks every stage is evaluated on
    augment_summary: dict[str, Any] | None = None  # the teacher's run, when it added reasoning


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
