"""CPU smoke ablation of a 1.1M-parameter model on the procedural suite (not the paper's result).

The paper's stage table and ablation table, in shape only: the same stages and variants, run with
the tiny Qwen3 of `configs/sft.py:tiny` (4 layers, hidden 128; 1.1M parameters with a 1024-token
vocabulary) at the size of `cacherl demo` on the procedural task suite, over seeds, with mean +-
std and paired differences, sized for 2 CPU cores. Its numbers are not the paper's result and say
nothing about models at the paper's scale. Every table it writes says so in its title.

    .venv/bin/python experiments/reproduce_paper.py                  # seeds 0 1 2 (see PRESETS)
    .venv/bin/python experiments/reproduce_paper.py --seeds 2        # one more seed, later
    .venv/bin/python experiments/reproduce_paper.py --preset quick   # a few minutes, for tests
    .venv/bin/python experiments/reproduce_paper.py --grpo loop.temperature=0.6 --val-tasks 288

For every seed it runs the pipeline of `cacherl demo` (`cacherl_jax.pipeline_demo.run`) and its
ablations (`--variants`, default all but no_kl, trusted_reward and answer_rejections):

  full            teacher reasoning (template teacher), thinking, SFT, GRPO with a KL term
                  (beta = --beta, 0.04 by default), the three-tier cache, the paper's tier-aware
                  reward
  no_reasoning    SFT on the reference trajectories without the teacher's reasoning
  no_thinking     no thinking blocks anywhere: SFT data without reasoning, rendered, sampled and
                  evaluated with enable_thinking=False
  exact_only      GRPO with an exact-only cache (cache.exact_only=True: every non-exact call
                  gets the "no recorded result" response)
  fixed_weight    GRPO with the fixed-weight reward (reward.tier_aware=False: a=0.60 every tier)
  matched_reward  GRPO with reward.tier_rule=matched (only calls matching a reference call set
                  the tier's weight: a wrong call that misses the cache is not paid more)
  trusted_reward  GRPO with reward.tier_rule=trusted (as matched, and an answer reached through
                  a wrong call that the cache answered approximately, and so may have been shown
                  the right call's result, counts only its expectation on live tools)
  answer_rejections
                  GRPO whose cache-mode loop answers a call the task's tools refuse (an unknown
                  tool, bad arguments) with the environment's own error, as live tools do,
                  instead of a cache lookup (loop.answer_rejections=True)
  live_tools      GRPO whose rollouts call the live tools (loop.mode=live): the paper's claim
                  that cache-answered rollouts train as well
  no_kl           GRPO without the KL term (grpo.beta=0)
  sft_only        no GRPO: the full pipeline's SFT model

Variants that differ only in the GRPO stage reuse the full run's SFT stage of the same seed. Every
stage is evaluated the same way: greedy, live tools, the default reward, with the GRPO config's
evaluation loop settings, on the seed's validation tasks; an evaluation of the same checkpoint is
computed once and remembered.

Resumable: each (seed, variant) writes `WORKDIR/seed<S>/<variant>/result.json` when done, and
copies it with the run's per-step metrics and per-task validation records to
`OUT/runs/seed<S>/<variant>/`; a rerun skips what either holds (so a later session whose workdir
is gone continues from the committed results; run whole seeds at a time, since the ablations of
a seed reuse its full run's SFT checkpoint). Checkpoints and data stay under --workdir; --out gets
only small files: stage_table.md, ablation_table.md, claims.md (cache vs live tools, the reward
rules, the tiers and their live agreement), results.json (every per-seed number, sizes, timings,
git commit, the exact command), README.md and runs/ (the notebook's input). Prints progress, the
tables and, last, one JSON line with the headline figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python experiments/reproduce_paper.py` from anywhere
    sys.path.insert(0, str(REPO))

from cacherl_jax import pipeline_demo  # noqa: E402
from cacherl_jax.cli import field_override  # noqa: E402
from cacherl_jax.model import count_params, init_params, read_config  # noqa: E402
from cacherl_jax.train.metrics import read_metrics  # noqa: E402
from experiments import paper_tables as tables_lib  # noqa: E402

# Sizes per preset; every one is also a flag. `quick` is sized for a test of a few minutes.
PRESETS: dict[str, dict[str, int]] = {
    # The size of `cacherl demo` (pipeline_demo.run's defaults): ~2.5 hours for three seeds on 2
    # quiet CPU cores with the default variants (see `estimate_seconds`).
    "default": dict(
        train_tasks=3000,
        grpo_tasks=1000,
        val_tasks=96,
        sft_steps=1000,
        grpo_steps=20,
        tasks_per_step=8,
        group_size=4,
    ),
    # Twice the GRPO steps, half again the SFT steps: ~3.5 hours for three seeds.
    "long": dict(
        train_tasks=3000,
        grpo_tasks=1000,
        val_tasks=96,
        sft_steps=1500,
        grpo_steps=40,
        tasks_per_step=8,
        group_size=4,
    ),
    "quick": dict(
        train_tasks=120,
        grpo_tasks=40,
        val_tasks=8,
        sft_steps=8,
        grpo_steps=2,
        tasks_per_step=4,
        group_size=2,
    ),
}
# Config fields a preset sets besides the sizes. The quick preset's tokenizer size is one that
# every variant's data reaches (a byte-level BPE trained on the trajectories without reasoning
# stops below 1024 tokens), so every run has the same shapes and compiles once; its rollouts (and
# evaluations) are cut to 3 turns of 32 new tokens.
PRESET_SFT_OVERRIDES: dict[str, dict[str, Any]] = {
    "default": {},
    "long": {},
    # The quick preset keeps 512-token rows and rollouts (its tasks are cut anyway): small shapes.
    "quick": {"tokenizer.train_vocab_size": 512, "data.seq_len": 512, "data.batch_size": 8},
}
PRESET_GRPO_OVERRIDES: dict[str, dict[str, Any]] = {
    "default": {},
    "long": {},
    "quick": {
        "loop.max_new_tokens": 32,
        "loop.max_turns": 3,
        "loop.max_len": 512,
        "loop.cache_len": 1536,
    },
}
SIZE_FLAGS = tuple(PRESETS["default"])
DEFAULT_BETA = 0.04  # the full pipeline's KL coefficient (configs/grpo.py:tiny has 0.0)

EXACT_ONLY_NOTE = (
    "The exact-only variant sets `cache.exact_only=True`: exact hits are answered from the "
    "cache and every other call gets the schema-shaped 'no recorded result' response, tier "
    "best-effort (answer weight 0.10 in the tier-aware reward), as for a tool never seen."
)

# Small files of every (seed, variant) copied under OUT/runs/seed<S>/<variant>/ (the notebook's
# input): (file under the run directory, name under OUT).
RUN_FILES = (
    ("result.json", "result.json"),
    ("sft/metrics.jsonl", "sft_metrics.jsonl"),
    ("grpo/metrics.jsonl", "grpo_metrics.jsonl"),
    *(
        (f"validation_{stage}.jsonl", f"validation_{stage}.jsonl")
        for stage in ("base", "sft", "grpo")
    ),
)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    title: str
    changes: str  # what differs from the full pipeline
    reasoning: bool = True
    thinking: bool = True
    reuse_sft: bool = False  # the full run's SFT stage of the same seed
    run_grpo: bool = True
    grpo: dict[str, Any] = dataclasses.field(default_factory=dict)  # GRPO config fields it sets


VARIANTS = (
    Variant("full", "full pipeline", "-"),
    Variant(
        "no_reasoning",
        "no teacher reasoning",
        "SFT data: the reference trajectories without the teacher's reasoning",
        reasoning=False,
    ),
    Variant(
        "no_thinking",
        "no thinking",
        "no thinking blocks: SFT data without reasoning; data.enable_thinking and "
        "loop.enable_thinking False",
        thinking=False,
    ),
    Variant(
        "exact_only",
        "exact-only cache",
        "GRPO cache answers exact hits only: cache.exact_only=True",
        reuse_sft=True,
        grpo={"cache.exact_only": True},
    ),
    Variant(
        "fixed_weight",
        "fixed-weight reward",
        "reward.tier_aware=False (answer weight 0.60 for every tier)",
        reuse_sft=True,
        grpo={"reward.tier_aware": False},
    ),
    Variant(
        "matched_reward",
        "matched-tier reward",
        "reward.tier_rule=matched (only calls that match a reference call set the tier's weight)",
        reuse_sft=True,
        grpo={"reward.tier_rule": "matched"},
    ),
    Variant(
        "trusted_reward",
        "trusted-answer reward",
        "reward.tier_rule=trusted (as matched, and an answer reached through a wrong call the "
        "cache answered approximately counts x0.05)",
        reuse_sft=True,
        grpo={"reward.tier_rule": "trusted"},
    ),
    Variant(
        "answer_rejections",
        "rejections answered",
        "loop.answer_rejections=True (a call the task's tools refuse, an unknown tool or bad "
        "arguments, gets the environment's error instead of a cache lookup)",
        reuse_sft=True,
        grpo={"loop.answer_rejections": True},
    ),
    Variant(
        "live_tools",
        "live tools",
        "GRPO rollouts call the live tools instead of the cache: loop.mode=live",
        reuse_sft=True,
        grpo={"loop.mode": "live"},
    ),
    Variant("no_kl", "no KL", "grpo.beta=0", reuse_sft=True, grpo={"grpo.beta": 0.0}),
    Variant("sft_only", "SFT only", "no GRPO stage", reuse_sft=True, run_grpo=False),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
# Run only when named: probes of single changes, measured on one seed so far (docs/demo.md).
NOT_DEFAULT = ("no_kl", "trusted_reward", "answer_rejections")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every run of one invocation shares."""

    preset: str
    sizes: dict[str, int]
    seeds: tuple[int, ...]
    beta: float
    teacher: str
    workdir: Path
    # `--grpo FIELD=VALUE`: set in every variant's GRPO config, before the variant's own fields.
    grpo_fields: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def sft_overrides(self) -> dict[str, Any]:
        return dict(PRESET_SFT_OVERRIDES[self.preset])

    def grpo_overrides(self, variant: Variant) -> dict[str, Any]:
        """The GRPO config fields the variant's run sets: the sizes, the full run's beta, the
        preset's fields, `--grpo`'s, then the variant's own. Without a GRPO stage they still give
        the loop every stage is evaluated with (`grpo.loop_config(config, evaluation=True)`)."""
        return {
            "grpo.beta": self.beta,
            "grpo.tasks_per_step": self.sizes["tasks_per_step"],
            "loop.group_size": self.sizes["group_size"],
            **PRESET_GRPO_OVERRIDES[self.preset],
            **self.grpo_fields,
            **variant.grpo,
        }

    def settings(self, variant: Variant) -> dict[str, Any]:
        """Everything a finished (seed, variant) result depends on: a rerun skips a result only
        if these are equal."""
        return {
            "sizes": dict(self.sizes),
            "beta": self.beta,
            "teacher": self.teacher,
            "reasoning": variant.reasoning,
            "thinking": variant.thinking,
            "reuse_sft": variant.reuse_sft,
            "run_grpo": variant.run_grpo,
            "sft_overrides": self.sft_overrides,
            "grpo_overrides": self.grpo_overrides(variant),
        }

    def run_dir(self, seed: int, name: str) -> Path:
        return self.workdir / f"seed{seed}" / name


def _log(message: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- what this is ----------------------------------------------------------------------------


def trained_model(checkpoint: Path) -> dict[str, Any]:
    """The model a run trained (its SFT export): its parameter count and shape."""
    import jax

    config = read_config(checkpoint)
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return {
        "params": count_params(params),
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
    }


def title(table: str, model: dict[str, Any]) -> str:
    """A results file's title line: what was run, at what size, and that it is not the paper's."""
    what = f"a {model['params'] / 1e6:.1f}M-parameter model on the procedural suite"
    return f"CPU smoke ablation{', ' + table if table else ''}: {what} (not the paper's result)"


def smoke_note(plan: Plan, model: dict[str, Any]) -> str:
    """The paragraph under every title: why these numbers must not be quoted as the paper's."""
    return (
        "A CPU-scale smoke test of the paper's stage and ablation tables: the same stages and "
        f"variants, run with a tiny Qwen3 ({model['num_layers']} layers, hidden "
        f"{model['hidden_size']}, {model['params']:,} parameters with a "
        f"{model['vocab_size']}-token vocabulary) for {plan.sizes['sft_steps']} SFT steps and "
        f"{plan.sizes['grpo_steps']} "
        "GRPO steps on the procedural task suite. It checks that the pipeline and every ablation "
        "run end to end and are evaluated alike; these numbers are not the paper's result and say "
        "nothing about a model at the paper's scale."
    )


# --- running ---------------------------------------------------------------------------------


def train_summary(grpo_dir: Path) -> dict[str, Any]:
    """Means over the GRPO run's steps of the training rollouts' reward, tier shares, KL to the
    reference (0 without a KL term), reward by tier, tier fidelity and phase times; and the
    best-effort share of the first and the last quarter of the steps (does GRPO learn to miss?)."""
    records = [r for r in read_metrics(grpo_dir) if "reward/total" in r]
    out: dict[str, Any] = {"steps": len(records)}
    for key in (*tables_lib.TRAIN_KEYS, *tables_lib.STEP_KEYS):
        # Phase times leave out the first step, which compiles (unless others follow it).
        timed = records[1:] if key.startswith("time/") and len(records) > 1 else records
        values = [r[key] for r in timed if r.get(key) is not None]
        out[key] = statistics.fmean(values) if values else None
    quarter = max(len(records) // 4, 1)
    for name, part in (("first", records[:quarter]), ("last", records[-quarter:])):
        shares = [r["tier/best_effort_fraction"] for r in part if "tier/best_effort_fraction" in r]
        out[f"best_effort_{name}_quarter"] = statistics.fmean(shares) if shares else None
    return out


def run_variant(plan: Plan, variant: Variant, seed: int) -> dict[str, Any]:
    """Runs one (seed, variant) through `pipeline_demo.run`; returns its result record."""
    run_dir = plan.run_dir(seed, variant.name)
    started = time.perf_counter()
    out = pipeline_demo.run(
        run_dir,
        train_tasks=plan.sizes["train_tasks"],
        grpo_tasks=plan.sizes["grpo_tasks"],
        val_tasks=plan.sizes["val_tasks"],
        sft_steps=plan.sizes["sft_steps"],
        grpo_steps=plan.sizes["grpo_steps"],
        seed=seed,
        teacher=plan.teacher,
        reasoning=variant.reasoning,
        thinking=variant.thinking,
        sft_overrides=plan.sft_overrides,
        grpo_overrides=plan.grpo_overrides(variant),
        run_grpo=variant.run_grpo,
        sft_dir_reuse=plan.run_dir(seed, "full") / "sft" if variant.reuse_sft else None,
        eval_base=variant.name == "full",
        eval_loop="grpo",
        eval_memo=True,
    )
    stages = out["stages"]
    return {
        "variant": variant.name,
        "seed": seed,
        "settings": plan.settings(variant),
        "stages": stages,
        "final": stages["grpo" if "grpo" in stages else "sft"],
        "grpo_train": train_summary(run_dir / "grpo") if variant.run_grpo else None,
        "model": trained_model(Path(out["options"]["sft_dir"]) / "hf"),
        "options": out["options"],
        "timings": {**out["timings"], "wall_s": time.perf_counter() - started},
        "run_dir": str(run_dir),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def out_run_dir(out_dir: Path, seed: int, variant: Variant) -> Path:
    return out_dir / "runs" / f"seed{seed}" / variant.name


def finished_result(plan: Plan, variant: Variant, seed: int, out_dir: Path) -> dict | None:
    """The result of a (seed, variant) finished earlier with the same settings: from the workdir,
    or from the results folder (a later session, whose workdir is gone, skips what an earlier one
    committed). A result with other settings stops the run."""
    for path in (
        plan.run_dir(seed, variant.name) / "result.json",
        out_run_dir(out_dir, seed, variant) / "result.json",
    ):
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        if result["settings"] != plan.settings(variant):
            raise SystemExit(
                f"{path}: finished with other settings ({result['settings']}, now "
                f"{plan.settings(variant)}); use another --workdir / --out or delete it"
            )
        return result
    return None


def export_run_files(run_dir: Path, target: Path) -> None:
    """Copies a finished run's small files (result, per-step metrics, per-task validation
    records) into the results folder."""
    target.mkdir(parents=True, exist_ok=True)
    for source, name in RUN_FILES:
        if (run_dir / source).exists():
            (target / name).write_bytes((run_dir / source).read_bytes())


def estimate_seconds(sizes: dict[str, int], seeds: int, variants: list[Variant]) -> float:
    """Rough wall time on 2 quiet CPU cores, from per-unit costs measured on this code: SFT 0.35 s
    per step of the demo's 4 x 768 tokens, GRPO ~0.28 s per rollout (~9 s per step of 8 tasks x
    G=4), evaluation ~0.45 s per validation task (the GRPO evaluation loop), ~3 s to generate and
    augment 4000 trajectories; compilation is paid about once with the persistent compilation
    cache, plus once per seed for the variants without reasoning (their tokenizer, trained on less
    varied text, can stop below 1024 tokens, so their shapes differ from the full run's). Per
    seed: an SFT run per variant that trains one, a GRPO run and an evaluation per variant with
    GRPO, and the base and SFT evaluations."""
    data = 0.00075 * (sizes["train_tasks"] + sizes["grpo_tasks"])
    sft = 0.35 * sizes["sft_steps"] + 15.0  # + tokenizer, rendering, checkpoints, export
    rollouts = sizes["tasks_per_step"] * sizes["group_size"]
    grpo = 0.28 * rollouts * sizes["grpo_steps"] + 8.0  # + loading, cache, export
    evaluation = 0.45 * sizes["val_tasks"] + 2.0
    sft_runs = sum(not v.reuse_sft for v in variants)
    grpo_runs = sum(v.run_grpo for v in variants)
    per_seed = sft_runs * (data + sft) + grpo_runs * grpo + (1 + sft_runs + grpo_runs) * evaluation
    compile_once, compile_per_seed = 90.0, 45.0
    return compile_once + seeds * (compile_per_seed + per_seed)


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    for flag in SIZE_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None,
                            help=f"default: the preset's ({PRESETS['default'][flag]} in default)")  # fmt: skip
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANT_NAMES,
        default=[name for name in VARIANT_NAMES if name not in NOT_DEFAULT],
        help="the variants to run (full always runs: the others are compared with it)",
    )
    parser.add_argument("--beta", type=float, default=DEFAULT_BETA, help="the full run's KL term")
    parser.add_argument(
        "--grpo",
        type=field_override,
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="set a field of every variant's GRPO config (configs/grpo.py:tiny), repeatable, e.g. "
        "--grpo loop.temperature=0.6; a variant's own fields (loop.mode=live) still win",
    )
    parser.add_argument("--teacher", default="template", help="configs/augment.py variant")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "reproduce"))
    parser.add_argument("--out", default=str(REPO / "experiments" / "results"))
    parser.add_argument(
        "--compile-cache",
        default=None,
        help="JAX's persistent compilation cache, shared by every run (default WORKDIR/xla_cache; "
        "'' for none): runs of the same shapes compile once",
    )
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds must be distinct")
    if args.beta <= 0:
        parser.error("--beta must be > 0, or the full run and no_kl would be the same")
    try:  # a typo fails now, not when the first GRPO run starts
        pipeline_demo.apply_overrides(
            pipeline_demo.load_config("grpo", "tiny"), dict(args.grpo), name="--grpo"
        )
    except (KeyError, TypeError) as error:
        parser.error(str(error).strip("'\""))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sizes = dict(PRESETS[args.preset])
    for flag in SIZE_FLAGS:
        if getattr(args, flag) is not None:
            sizes[flag] = getattr(args, flag)
    plan = Plan(
        preset=args.preset,
        sizes=sizes,
        seeds=tuple(args.seeds),
        beta=args.beta,
        teacher=args.teacher,
        workdir=Path(args.workdir).absolute(),
        grpo_fields=dict(args.grpo),
    )
    out_dir = Path(args.out).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    compile_cache = plan.workdir / "xla_cache" if args.compile_cache is None else args.compile_cache
    if compile_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", str(compile_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    arguments = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(sys.orig_argv if argv is None else [sys.executable, __file__, *arguments])
    variants = [v for v in VARIANTS if v.name == "full" or v.name in args.variants]
    estimate = estimate_seconds(sizes, len(plan.seeds), variants)
    _log(
        f"CPU smoke ablation (not the paper's result): seeds {list(plan.seeds)}, sizes {sizes}, "
        f"beta {plan.beta}: {len(variants)} variants per seed (estimate ~{estimate / 60:.0f} min "
        "on 2 quiet CPU cores); runs under "
        f"{plan.workdir}"
    )

    git = git_state()  # the code this invocation imported, not what the tree holds when it ends
    started = time.perf_counter()
    per_seed: dict[str, dict[int, dict]] = {v.name: {} for v in variants}
    ran, skipped = [], []
    for index, seed in enumerate(plan.seeds):
        for variant in variants:
            label = f"seed {seed} ({index + 1}/{len(plan.seeds)}) {variant.name}"
            result = finished_result(plan, variant, seed, out_dir)
            if result is not None:
                skipped.append(f"seed{seed}/{variant.name}")
                _log(f"{label}: done earlier, skipped")
            else:
                _log(f"{label}: running ({variant.changes})")
                result = run_variant(plan, variant, seed)
                path = plan.run_dir(seed, variant.name) / "result.json"
                partial = path.with_suffix(".json.tmp")
                partial.write_text(json.dumps(result, indent=2, default=str))
                partial.replace(path)
                export_run_files(
                    plan.run_dir(seed, variant.name), out_run_dir(out_dir, seed, variant)
                )
                ran.append(f"seed{seed}/{variant.name}")
                _log(
                    f"{label}: done in {result['timings']['wall_s']:.0f} s, validation reward "
                    f"{result['final'].get('eval/reward/total', float('nan')):.3f}"
                )
            per_seed[variant.name][seed] = result
    total_s = time.perf_counter() - started

    seeds = list(plan.seeds)
    summary = tables_lib.aggregate(per_seed, seeds)
    model = per_seed["full"][seeds[0]]["model"]
    tables = {
        "stage": tables_lib.stage_table(summary),
        "grpo_claim": tables_lib.grpo_claim(summary),
        "ablation": tables_lib.ablation_table(summary, variants),
        "training": tables_lib.training_table(summary, variants),
        "fidelity": tables_lib.fidelity_table(summary),
        "cache_vs_live": tables_lib.cache_vs_live_table(summary),
        "reward_study": tables_lib.reward_study_table(summary),
    }
    run_info = {
        "command": command,
        "arguments": arguments,
        "cwd": os.getcwd(),
        "wall_s_this_invocation": total_s,
        "ran_this_invocation": ran,
        "estimate_s": estimate,
        "git": git,
    }
    write_outputs(out_dir, plan, variants, model, per_seed, summary, tables, run_info)
    print(f"\n{title('', model)}\n", flush=True)
    print(tables["stage"] + "\n\n" + tables["grpo_claim"] + "\n", flush=True)
    print(tables["ablation"] + "\n", flush=True)

    headline: dict[str, Any] = {"preset": plan.preset, "seeds": seeds, "beta": plan.beta, **sizes}
    headline["model_params"] = model["params"]
    for stage in ("base", "sft", "grpo"):
        stat = summary["stages"][stage]["eval/reward/total"]
        headline[f"{stage}_reward_mean"] = stat["mean"]
        headline[f"{stage}_reward_std"] = stat["std"]
    headline["grpo_success_mean"] = summary["stages"]["grpo"]["eval/success_rate"]["mean"]
    for key in ("mean", "std"):
        headline[f"grpo_minus_sft_reward_{key}"] = summary["grpo_minus_sft"][tables_lib.REWARD][key]
    for name in list(per_seed)[1:]:
        headline[f"delta_reward_{name}"] = summary["deltas"][name]["eval/reward/total"]["mean"]
    headline.update(
        ran=len(ran),
        skipped=len(skipped),
        total_s=round(total_s, 1),
        estimate_s=round(estimate, 1),
        out=str(out_dir),
    )
    print(json.dumps(headline), flush=True)
    return headline


def grpo_fields_note(plan: Plan) -> str:
    """A sentence naming `--grpo`'s fields, or nothing without them."""
    if not plan.grpo_fields:
        return ""
    fields = ", ".join(f"{k}={v}" for k, v in plan.grpo_fields.items())
    return f" Every GRPO run also sets {fields} (`--grpo`)."


def write_outputs(
    out_dir: Path,
    plan: Plan,
    variants: list[Variant],
    model: dict[str, Any],
    per_seed: dict[str, dict[int, dict]],
    summary: dict[str, Any],
    tables: dict[str, str],
    run_info: dict[str, Any],
) -> None:
    """stage_table.md, ablation_table.md, results.json and README.md in `out_dir`, each titled as
    the CPU smoke ablation it is (`title`, `smoke_note`)."""
    seeds = list(plan.seeds)
    note = smoke_note(plan, model)
    seed_list = ", ".join(map(str, seeds))
    how = (
        f"Mean ± sample standard deviation (n - 1) over seeds {seed_list}; "
        f"{plan.sizes['val_tasks']} validation tasks per seed (the seed's own), evaluated greedily "
        "with live tools and the default reward, every stage with the same loop settings (the "
        "GRPO config's evaluation loop)."
    )
    (out_dir / "stage_table.md").write_text(
        f"# {title('stage table', model)}\n\n"
        f"{note}\n\n"
        f"The full pipeline's stages. {how} Its GRPO stage has a KL term, beta = {plan.beta}."
        f"{grpo_fields_note(plan)}\n\n"
        f"{tables['stage']}\n\n{tables['grpo_claim']}\n"
    )
    (out_dir / "ablation_table.md").write_text(
        f"# {title('ablation table', model)}\n\n"
        f"{note}\n\n"
        f"{how} Each variant's final model (GRPO, or SFT for SFT only); Δ = variant - full "
        "pipeline per seed, mean ± std of those differences.\n\n"
        f"{tables['ablation']}\n\n"
        "GRPO training rollouts, means over steps: reward and the share of rollouts whose worst "
        "cache tier was exact / fuzzy / best-effort.\n\n"
        f"{tables['training']}\n\n"
        f"Notes. Exact-only cache: {EXACT_ONLY_NOTE}\n"
    )
    (out_dir / "claims.md").write_text(
        f"# {title('the cache, the reward and the tiers', model)}\n\n"
        f"{note}\n\n{how}\n\n"
        "## Cache-answered rollouts against live tools (same seeds, steps and SFT start)\n\n"
        f"{tables['cache_vs_live']}\n\n"
        "Phase times are seconds per GRPO step on this machine with instant tools; the cost of "
        "real tools (100 ms and 1 s a call) is measured by `experiments/bench_grpo_step.py` "
        "(`cache_vs_live_timing.md`).\n\n"
        "## Does GRPO learn to miss the cache? The reward rules\n\n"
        f"{tables['reward_study']}\n\n"
        "## Cache tiers during GRPO (full pipeline) and their live agreement\n\n"
        f"{tables['fidelity']}\n"
    )
    git = run_info["git"]
    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    compute_s = sum(r["timings"]["wall_s"] for runs in per_seed.values() for r in runs.values())
    results = {
        **run_info,
        "preset": plan.preset,
        "sizes": plan.sizes,
        "seeds": seeds,
        "beta": plan.beta,
        "grpo_fields": plan.grpo_fields,
        "teacher": plan.teacher,
        "model": model,
        "workdir": str(plan.workdir),
        "git": git,
        "machine": machine,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "compute_s": compute_s,
        "variants": {
            v.name: {"title": v.title, "changes": v.changes, "settings": plan.settings(v)}
            for v in variants
        },
        "per_seed": {name: {str(s): runs[s] for s in seeds} for name, runs in per_seed.items()},
        "summary": summary,
        "exact_only_note": EXACT_ONLY_NOTE,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    where = (
        "the repository root" if Path(run_info["cwd"]).resolve() == REPO else f"`{run_info['cwd']}`"
    )
    (out_dir / "README.md").write_text(
        f"# {title('', model)}\n\n"
        f"{note}\n\n"
        f"Produced by this command, run in {where}:\n\n"
        f"```bash\n{run_info['command']}\n```\n\n"
        f"Commit {git['commit']}{' (with uncommitted changes)' if git['dirty'] else ''}, "
        f"{results['created_at']}, {machine['platform']}, {machine['cpus']} CPUs; "
        f"{compute_s / 60:.1f} min of runs in all. Preset {plan.preset}, sizes "
        f"{json.dumps(plan.sizes)}; seeds {seed_list}; beta {plan.beta} in the full run."
        f"{grpo_fields_note(plan)}\n\n"
        "## Stage table\n\n"
        f"{how}\n\n{tables['stage']}\n\n"
        f"{tables['grpo_claim']}\n\n"
        "## Ablation table\n\n"
        f"{tables['ablation']}\n\n"
        f"{tables['training']}\n\n"
        "## Cache against live tools, the reward rules, the tiers\n\n"
        f"{tables['cache_vs_live']}\n\n{tables['reward_study']}\n\n{tables['fidelity']}\n\n"
        "Files: `stage_table.md`, `ablation_table.md`, `claims.md`, `results.json` (every per-seed "
        "number, the settings of each variant, timings, the command), and under `runs/seed<S>/"
        "<variant>/` each run's per-step metrics and per-task validation records (the notebook's "
        "input). Exact-only cache: "
        f"{EXACT_ONLY_NOTE}\n"
    )


if __name__ == "__main__":
    main()
