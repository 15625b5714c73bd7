"""Statistics and markdown tables of `reproduce_paper.py`: mean +- std over seeds, paired
per-seed differences, and the checks the CPU miniature is held to.

Every comparison is paired by seed (the same SFT start, tasks and validation set): the
difference of two variants is computed per seed, then its mean and sample standard deviation
(n - 1). A difference is "separated" when |mean| > 2 std, and "within noise" otherwise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from cacherl_jax import demo_report

STAGE_COLUMNS = demo_report.STAGE_COLUMNS
ABLATION_COLUMNS = STAGE_COLUMNS[:3]
REWARD, SUCCESS = "eval/reward/total", "eval/success_rate"
TIERS = ("exact", "fuzzy", "best_effort")
TRAIN_KEYS = (
    "reward/total",
    "tier/exact_fraction",
    "tier/fuzzy_fraction",
    "tier/best_effort_fraction",
    "kl_ref",
)
# Means over a GRPO run's steps kept besides TRAIN_KEYS: reward by the rollout's worst tier, the
# live agreement of each tier's cached calls, and the step's phases.
STEP_KEYS = (
    *(f"reward/total_{tier}" for tier in TIERS),
    *(f"fidelity/{tier}_agreement" for tier in TIERS),
    *(f"fidelity/{tier}_calls" for tier in TIERS),
    "time/sampling_s",
    "time/tools_s",
    "time/update_s",
)
# Derived per run (not logged per step): the best-effort share of the first and last quarter.
QUARTER_KEYS = ("best_effort_first_quarter", "best_effort_last_quarter")
# The reward rules the reward study compares (variant name, rule), when they ran.
REWARD_RULES = (
    ("full", "paper: a(worst tier of every call)"),
    ("matched_reward", "matched: a(worst tier of the calls matching a reference call)"),
    ("fixed_weight", "fixed: a = 0.60 whatever the tier"),
    ("trusted_reward", "trusted: matched, and an answer a wrong call may have been handed x0.05"),
)


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1; None for a single value) of the finite values."""
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def fmt(stat: dict[str, Any], signed: bool = False) -> str:
    if stat["mean"] is None:
        return "n/a"
    mean = f"{stat['mean']:+.3f}" if signed else f"{stat['mean']:.3f}"
    return mean if stat["std"] is None else f"{mean} ± {stat['std']:.3f}"


def separated(stat: dict[str, Any]) -> bool | None:
    """|mean| > 2 std of a paired difference; None without a std (one seed)."""
    if stat["mean"] is None or stat["std"] is None:
        return None
    return abs(stat["mean"]) > 2 * stat["std"]


def _difference(a: dict, b: dict, key: str) -> float | None:
    if a.get(key) is None or b.get(key) is None:
        return None
    return a[key] - b[key]


def aggregate(per_seed: dict[str, dict[int, dict]], seeds: list[int]) -> dict[str, Any]:
    """Mean +- std over seeds: the full run's stages and its GRPO - SFT difference, each variant's
    final metrics and per-seed difference to the full run, and the GRPO runs' training rollouts."""
    full = per_seed["full"]
    keys = [key for key, _ in STAGE_COLUMNS]
    stages = {
        stage: {key: mean_std([full[s]["stages"][stage].get(key) for s in seeds]) for key in keys}
        for stage in ("base", "sft", "grpo")
    }
    grpo_minus_sft = {
        key: mean_std([_difference(full[s]["stages"]["grpo"], full[s]["stages"]["sft"], key)
                       for s in seeds])
        for key in keys
    }  # fmt: skip
    variants, deltas, training = {}, {}, {}
    for name, runs in per_seed.items():
        variants[name] = {key: mean_std([runs[s]["final"].get(key) for s in seeds]) for key in keys}
        deltas[name] = {
            key: mean_std([_difference(runs[s]["final"], full[s]["final"], key) for s in seeds])
            for key in keys
        }
        if runs[seeds[0]]["grpo_train"] is not None:
            training[name] = {
                key: mean_std([runs[s]["grpo_train"].get(key) for s in seeds])
                for key in (*TRAIN_KEYS, *STEP_KEYS, *QUARTER_KEYS)
            }
    return {
        "stages": stages,
        "grpo_minus_sft": grpo_minus_sft,
        "variants": variants,
        "deltas": deltas,
        "grpo_train": training,
    }


# --- tables ----------------------------------------------------------------------------------


def stage_table(summary: dict[str, Any]) -> str:
    header = "| stage | " + " | ".join(title for _, title in STAGE_COLUMNS) + " |"
    rule = "|---" * (len(STAGE_COLUMNS) + 1) + "|"
    rows = [
        f"| {label} | "
        + " | ".join(fmt(summary["stages"][stage][key]) for key, _ in STAGE_COLUMNS)
        + " |"
        for stage, label in (("base", "base"), ("sft", "SFT"), ("grpo", "GRPO"))
    ]
    diff = summary["grpo_minus_sft"]
    rows.append(
        "| GRPO - SFT (paired) | "
        + " | ".join(fmt(diff[key], signed=True) for key, _ in STAGE_COLUMNS)
        + " |"
    )
    return "\n".join([header, rule, *rows])


def grpo_claim(summary: dict[str, Any]) -> str:
    """One sentence: does GRPO beat SFT by more than twice the std of the paired difference?"""
    diff = summary["grpo_minus_sft"][REWARD]
    verdict = {
        True: "separated: |mean| > 2 std",
        False: "within noise: |mean| <= 2 std",
        None: "one seed: no std, no verdict",
    }[separated(diff)]
    return f"GRPO - SFT in validation reward, paired by seed: {fmt(diff, signed=True)} ({verdict})."


def ablation_table(summary: dict[str, Any], variants: Sequence[Any]) -> str:
    titles = []
    for _, title in ABLATION_COLUMNS:
        titles += [title, f"Δ {title}"]
    header = "| variant | changes | " + " | ".join(titles) + " | separated |"
    rule = "|---" * (len(titles) + 3) + "|"
    rows = []
    for variant in variants:
        cells, full = [], variant.name == "full"
        for key, _ in ABLATION_COLUMNS:
            cells.append(fmt(summary["variants"][variant.name][key]))
            cells.append("-" if full else fmt(summary["deltas"][variant.name][key], True))
        verdict = separated(summary["deltas"][variant.name][REWARD])
        cells.append("-" if full else {True: "yes", False: "no", None: "n/a"}[verdict])
        rows.append(f"| {variant.title} | {variant.changes} | " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *rows])


def training_table(summary: dict[str, Any], variants: Sequence[Any]) -> str:
    rows = ["| variant | train reward | exact | fuzzy | best-effort |", "|---|---|---|---|---|"]
    for variant in variants:
        stats = summary["grpo_train"].get(variant.name)
        if stats is not None:
            cells = [fmt(stats[key]) for key in TRAIN_KEYS[:4]]
            rows.append(f"| {variant.title} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def fidelity_table(summary: dict[str, Any]) -> str:
    """The full run's GRPO rollouts by cache tier: share of rollouts (by worst tier), reward, and
    how often the tier's cached results equal the live tools' (the paper: ~50/17/33 %)."""
    stats = summary["grpo_train"].get("full")
    if stats is None:
        return "(no GRPO run)"
    rows = [
        "| tier | share of rollouts | train reward | cached calls / step | live agreement |",
        "|---|---|---|---|---|",
    ]
    for tier in TIERS:
        cells = (
            stats[f"tier/{tier}_fraction"],
            stats[f"reward/total_{tier}"],
            stats[f"fidelity/{tier}_calls"],
            stats[f"fidelity/{tier}_agreement"],
        )
        rows.append(f"| {tier} | " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(rows)


def cache_vs_live_table(summary: dict[str, Any]) -> str:
    """GRPO with cache-answered rollouts (full) against live tools (live_tools): validation
    reward and success, the paired difference, and the step's phases."""
    if "live_tools" not in summary["variants"]:
        return "(live_tools did not run)"
    rows = [
        "| rollouts | val. reward | success | sampling s | tools s | update s |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in (("full", "cache"), ("live_tools", "live tools")):
        final, train = summary["variants"][name], summary["grpo_train"][name]
        cells = [fmt(final[REWARD]), fmt(final[SUCCESS])]
        cells += [fmt(train[f"time/{phase}_s"]) for phase in ("sampling", "tools", "update")]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    delta = summary["deltas"]["live_tools"]
    rows.append(
        f"| live - cache (paired) | {fmt(delta[REWARD], True)} | {fmt(delta[SUCCESS], True)} "
        "| | | |"
    )
    verdict = separated(delta[REWARD])
    claim = {
        True: "the difference is larger than twice its std: the claim does not hold here",
        False: "the difference is within twice its std: cache-answered rollouts train as well",
        None: "one seed: no std",
    }[verdict]
    return "\n".join(rows) + f"\n\nValidation reward, live - cache: {claim}."


def reward_study_table(summary: dict[str, Any]) -> str:
    """Does GRPO learn to miss the cache? Per reward rule: best-effort share of the rollouts in
    the first and last quarter of the steps, train reward by worst tier, validation reward."""
    rows = [
        "| reward rule | best-effort share, first -> last quarter | reward exact | reward fuzzy "
        "| reward best-effort | val. reward | val. success |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in REWARD_RULES:
        stats = summary["grpo_train"].get(name)
        if stats is None:
            continue
        final = summary["variants"][name]
        share = (
            f"{fmt(stats['best_effort_first_quarter'])} -> {fmt(stats['best_effort_last_quarter'])}"
        )
        by_tier = [fmt(stats[f"reward/total_{tier}"]) for tier in TIERS]
        rows.append(
            f"| {label} | {share} | " + " | ".join(by_tier)
            + f" | {fmt(final[REWARD])} | {fmt(final[SUCCESS])} |"
        )  # fmt: skip
    return "\n".join(rows)
