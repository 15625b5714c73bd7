"""Iterative rejection-sampled SFT: `cacherl rft --config=configs/rft.py:tiny --workdir=runs/rft`.

Each round K (`rft.rounds`) in `WORKDIR/round_K/`:

1. load the current model (round 0: `model.checkpoint`, an HF directory such as an SFT run's
   `hf/`; later rounds: the previous round's `round_{K-1}/sft/hf`);
2. sample `rft.samples_per_task` rollouts of every task (`tasks`, the same spec as GRPO's) with
   the CacheAgentLoop (cache mode, temperature 1 by default), `rft.batch_tasks` tasks per sampler
   batch so memory stays bounded;
3. score them with the tier-aware reward and keep those that finished with an answer and reached
   `rft.reward_threshold` (and succeeded, with `rft.require_success`), identical token sequences
   once, at most `rft.max_per_task` per task (best reward first);
4. write the kept ones as trajectories (`accepted.jsonl`, metadata: task, reward, tier,
   source="rft", round), merge them with `rft.base_data` (and, with `rft.accumulate`, earlier
   rounds' accepted records) into `train.jsonl`;
5. fine-tune the current model on it with `sft.train` (`config.sft`, an embedded SFT config) in
   `sft/`, which exports `sft/hf/`;
6. evaluate the new checkpoint on `eval_tasks` (greedy, live tools) and write `metrics.json`.

Why records must round-trip. GRPO trains on the sampled token ids themselves; they are never
decoded and re-tokenised. RFT cannot do that: its output is SFT data, i.e. messages that the SFT
pipeline renders again with the chat template and tokenises. That re-rendering can differ from
what the model sampled: the model may emit a non-canonical tokenisation of the same text, JSON
with other spacing or key order than the template writes, text the parser drops or moves (markup
after a tool call, calls inside the reasoning), an empty think block the template leaves out, or
a multi-turn conversation whose earlier reasoning the template drops. SFT on such a record would
teach tokens the policy never produced. So every candidate's messages are rendered with
`cacherl_jax.chat.render` and compared with the rollout: the same token ids (the rendering may
only add the template's closing `\\n`) and the loss mask on exactly the sampled tokens. Only
records that round-trip exactly are kept (`rft.keep_nonroundtrip=True` keeps the others too);
the counts are in every round's metrics and in `summary.json`.

Resume: re-running the same command skips rounds whose `metrics.json` exists, reuses an
`accepted.jsonl` whose `sampling.json` (written after it) exists and was made with the same
settings, and lets `sft.train` resume its own checkpoints.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cacherl_jax import fs, parallel
from cacherl_jax.agent.environment import Task
from cacherl_jax.agent.loop import CacheAgentLoop, LoopConfig, PromptTooLongError, Rollout
from cacherl_jax.agent.tool_cache import ToolCache
from cacherl_jax.chat import Tokenizer
from cacherl_jax.chat.template_check import load_checked_tokenizer
from cacherl_jax.chat.trajectory import Trajectory, write_jsonl
from cacherl_jax.model import load_hf_checkpoint
from cacherl_jax.rl.rewards import RewardConfig
from cacherl_jax.rl.scoring import TaskResult, evaluate, score_rollouts
from cacherl_jax.sampling import Sampler
from cacherl_jax.train import sft
from cacherl_jax.train.errors import TrainingError
from cacherl_jax.train.metrics import MetricsWriter
from cacherl_jax.train.rft_data import (
    FilterConfig,
    merge_data,
    rollout_messages,
    rollout_record,
    rollout_tools,
    roundtrip_mismatch,
    select,
)
from cacherl_jax.train.rollout_setup import load_tasks, loop_config, open_cache, training_env

log = logging.getLogger(__name__)


# --- the current model ------------------------------------------------------------------------


@dataclasses.dataclass
class _Policy:
    checkpoint: str
    tokenizer: Tokenizer
    sampler: Sampler


class _Models:
    """Holds the one model loaded for sampling and evaluation; released before SFT trains."""

    def __init__(self, config: ml_collections.ConfigDict):
        # Each process samples on its own devices (see grpo.py, "Many processes").
        self.config, self.mesh = config, parallel.local_mesh(config.rollout.tensor)
        self.policy: _Policy | None = None

    def get(self, checkpoint: str) -> _Policy:
        if self.policy is None or self.policy.checkpoint != checkpoint:
            self.release()
            config = self.config
            tokenizer = load_checked_tokenizer(config.tokenizer.spec, checkpoint)
            model, params = load_hf_checkpoint(
                checkpoint,
                mesh=self.mesh,
                dtype=jnp.dtype(config.model.param_dtype),
                compute_dtype=config.model.compute_dtype,
                remat=config.model.remat,
                unroll_layers=config.model.unroll_layers,
            )
            self.policy = _Policy(checkpoint, tokenizer, Sampler(params, model, mesh=self.mesh))
        return self.policy

    def release(self) -> None:
        self.policy = None
        gc.collect()


def _check_checkpoint(checkpoint: str, tokenizer_spec: str, what: str) -> None:
    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise TrainingError(
            f"{what} {checkpoint!r} is not an HF checkpoint directory (no config.json); give e.g. "
            "an SFT run's hf/ (--config.model.checkpoint=DIR)"
        )
    if tokenizer_spec == checkpoint and not (path / "tokenizer.json").is_file():
        raise TrainingError(
            f"{what} {checkpoint!r} has no tokenizer.json; give one with --config.tokenizer.spec "
            "(a tokenizer directory or 'qwen3')"
        )


def _loop_config(config: ml_collections.ConfigDict, *, evaluation: bool = False) -> LoopConfig:
    """GRPO's loop settings, with `rft.samples_per_task` rollouts per task when sampling."""
    loop = loop_config(config, evaluation=evaluation)
    return loop if evaluation else dataclasses.replace(loop, group_size=config.rft.samples_per_task)


def _run_loop(loop: CacheAgentLoop, tasks: Sequence[Task], seed: int) -> list[Rollout]:
    try:
        return loop.run(tasks, seed=seed)
    except PromptTooLongError as err:
        raise TrainingError(f"{err} (raise --config.loop.max_len)") from err


def _evaluate(
    policy: _Policy, cache, tasks: Sequence[Task], config: ml_collections.ConfigDict
) -> dict[str, float]:
    if not tasks:
        return {}
    loop = CacheAgentLoop(
        policy.sampler, policy.tokenizer, cache, _loop_config(config, evaluation=True)
    )
    start = time.perf_counter()
    try:
        metrics, _ = evaluate(
            loop, tasks, RewardConfig.from_config(config.reward), seed=config.seed
        )
    except PromptTooLongError as err:
        raise TrainingError(f"evaluation: {err} (raise --config.loop.max_len)") from err
    out = {f"eval/{k}": v for k, v in metrics.items()}
    out["eval/seconds"] = time.perf_counter() - start
    return out


# --- one round ------------------------------------------------------------------------------------


def sampling_fingerprint(config: ml_collections.ConfigDict, checkpoint: str) -> dict[str, Any]:
    """What an `accepted.jsonl` depends on; a reused one must have been made with the same."""
    return json.loads(
        json.dumps(
            {
                "checkpoint": checkpoint,
                "tasks": config.tasks.to_dict(),
                # Latency changes what sampling costs, not what it samples.
                "loop": {k: v for k, v in config.loop.to_dict().items() if k != "tool_latency_s"},
                "reward": config.reward.to_dict(),
                "filter": dataclasses.asdict(FilterConfig.from_config(config.rft)),
                "samples_per_task": config.rft.samples_per_task,
                "seed": config.seed,
            }
        )
    )


class _RoundTripCheck:
    """`select`'s round-trip question for one sampler batch. Renders a rollout's messages and
    compares them with its tokens; keeps the messages for the record and the first mismatches
    for the log."""

    def __init__(
        self,
        rollouts: Sequence[Rollout],
        by_id: dict[str, Task],
        tokenizer: Tokenizer,
        enable_thinking: bool | None,
        mismatches: list[str],
    ):
        self.rollouts, self.by_id, self.tokenizer = rollouts, by_id, tokenizer
        self.enable_thinking = enable_thinking
        self.mismatches = mismatches
        self.messages: dict[int, list[dict[str, Any]]] = {}
        self.exact: dict[int, bool] = {}

    def __call__(self, i: int) -> bool:
        rollout = self.rollouts[i]
        task = self.by_id[rollout.task_id]
        self.messages[i] = rollout_messages(task, rollout)
        why = roundtrip_mismatch(
            rollout,
            self.messages[i],
            rollout_tools(task),
            self.tokenizer,
            enable_thinking=self.enable_thinking,
        )
        if why is not None and len(self.mismatches) < 5:
            self.mismatches.append(f"{task.id}/{rollout.sample}: {why}")
        self.exact[i] = why is None
        return self.exact[i]


class _RoundSampling:
    """One round's sampling, batch after batch: the accepted records and the statistics."""

    def __init__(
        self, policy: _Policy, cache, tasks: list[Task], config: ml_collections.ConfigDict, k: int
    ):
        self.loop = CacheAgentLoop(
            policy.sampler,
            policy.tokenizer,
            cache,
            _loop_config(config),
            make_env=training_env(config),
        )
        self.tokenizer, self.round_index = policy.tokenizer, k
        self.enable_thinking = config.sft.data.enable_thinking  # the SFT rendering's setting
        self.reward_config = RewardConfig.from_config(config.reward)
        self.filter = FilterConfig.from_config(config.rft)
        self.seed = config.seed * 1_000_003 + k
        self.num_tasks, self.by_id = len(tasks), {task.id: task for task in tasks}
        self.seen: set[str] = set()  # candidates' token sequences, shared by the batches
        self.counts: Counter = Counter()
        self.timing: Counter = Counter()  # seconds per phase, summed over batches
        self.tiers: Counter = Counter()
        self.rewards: list[float] = []
        self.successes: list[bool] = []
        self.mismatches: list[str] = []
        self.records: list[Trajectory] = []

    def sample(self, tasks: list[Task]) -> tuple[list[Rollout], list[TaskResult]]:
        """Samples and scores one batch of tasks."""
        rollouts = _run_loop(self.loop, tasks, self.seed)
        self.timing.update({k: v for k, v in self.loop.metrics.items() if k.endswith("_s")})
        start = time.perf_counter()
        results = score_rollouts(tasks, rollouts, self.reward_config)
        self.timing["select_s"] += time.perf_counter() - start
        return rollouts, results

    def gather(
        self, rollouts: list[Rollout], results: list[TaskResult]
    ) -> tuple[list[Rollout], list[TaskResult]]:
        """Every process's rollouts and results, in process (= task) order, on every process;
        the phases' seconds are the slowest process's, as the round waits for it."""
        parts = parallel.allgather_objects((rollouts, results, self.timing))
        self.timing = Counter({k: max(p[2].get(k, 0.0) for p in parts) for k in parts[0][2]})
        return [r for p in parts for r in p[0]], [r for p in parts for r in p[1]]

    def take(self, rollouts: list[Rollout], results: list[TaskResult]) -> None:
        """Counts and selects one batch's rollouts (the same batches as one process samples)."""
        start = time.perf_counter()
        self.rewards.extend(r.reward.total for r in results)
        self.successes.extend(r.success for r in results)
        self.tiers.update(r.worst_tier for r in rollouts)
        self._accept(rollouts, results)
        self.timing["select_s"] += time.perf_counter() - start

    def _accept(self, rollouts: list[Rollout], results: list[TaskResult]) -> None:
        """Keeps the records that pass `select`, round-trip checked on the way."""
        check = _RoundTripCheck(
            rollouts, self.by_id, self.tokenizer, self.enable_thinking, self.mismatches
        )
        kept, counts = select(rollouts, results, self.filter, check, self.seen)
        self.counts.update(counts)
        self.records.extend(
            rollout_record(
                self.by_id[rollouts[i].task_id],
                rollouts[i],
                results[i],
                check.messages[i],
                round_index=self.round_index,
                roundtrip=check.exact[i],
            )
            for i in kept
        )

    def stats(self) -> dict[str, float]:
        counts, sampled = self.counts, max(self.counts["sampled"], 1)
        checked = counts["roundtrip"] + counts["not_roundtrip"]
        return {
            "tasks": float(self.num_tasks),
            **{k: float(counts[k]) for k in COUNTS},
            "acceptance_rate": counts["accepted"] / sampled,
            "roundtrip_rate": counts["roundtrip"] / checked if checked else float("nan"),
            "tasks_with_accepted": float(len({r.metadata["task_id"] for r in self.records})),
            "sample_reward_mean": float(np.mean(self.rewards)),
            "sample_success_rate": float(np.mean(self.successes)),
            **{
                f"sample_tier_{t}": self.tiers[t] / sampled
                for t in ("exact", "fuzzy", "best_effort")
            },
            **{f"time/{k}": float(v) for k, v in self.timing.items()},
        }


def _sample_round(
    policy: _Policy,
    cache,
    tasks: list[Task],
    config: ml_collections.ConfigDict,
    round_index: int,
    progress: bool,
) -> tuple[list[Trajectory], dict[str, float]]:
    """Samples every task in batches of `rft.batch_tasks` tasks and keeps what passes `select`;
    returns the records and the round's sampling statistics."""
    sampling = _RoundSampling(policy, cache, tasks, config, round_index)
    # Each process samples its block of the tasks; the selection then runs on every process
    # over all of them, batch by batch as one process would (duplicates span processes).
    own = parallel.process_share(tasks, even=False)
    batch = config.rft.batch_tasks
    rollouts: list[Rollout] = []
    results: list[TaskResult] = []
    bar = tqdm(total=len(own), desc=f"rft round {round_index}: sampling", unit="task",
               disable=not progress or jax.process_index())  # fmt: skip
    try:
        for start in range(0, len(own), batch):
            chunk_rollouts, chunk_results = sampling.sample(own[start : start + batch])
            rollouts += chunk_rollouts
            results += chunk_results
            bar.update(len(own[start : start + batch]))
            bar.set_postfix(reward=f"{np.mean([r.reward.total for r in results]):.3f}")
    finally:
        bar.close()
    rollouts, results = sampling.gather(rollouts, results)
    rows = config.rft.samples_per_task * batch  # rollouts of one batch of tasks
    for start in range(0, len(rollouts), rows):
        sampling.take(rollouts[start : start + rows], results[start : start + rows])
    for example in sampling.mismatches:
        log.info("rft round %d: not round-tripping: %s", round_index, example)
    return sampling.records, sampling.stats()


COUNTS = (
    "sampled",
    "finished",
    "above_threshold",
    "candidates",
    "duplicates",
    "over_cap",
    "roundtrip",
    "not_roundtrip",
    "accepted",
    "accepted_not_roundtrip",
)


def sft_config_for_round(
    config: ml_collections.ConfigDict, checkpoint: str, tokenizer_spec: str, train_path: Path
) -> ml_collections.ConfigDict:
    """The embedded SFT config, starting from the current model with its tokenizer."""
    sft_config = config.sft.copy_and_resolve_references()
    sft_config.mesh = config.mesh.to_dict()
    sft_config.dcn_mesh = config.dcn_mesh.to_dict()
    sft_config.runtime = config.runtime.to_dict()
    sft_config.distributed = config.distributed.to_dict()
    sft_config.model.checkpoint = checkpoint
    sft_config.tokenizer.spec = tokenizer_spec
    sft_config.data.train = str(train_path)
    return sft_config


def _write_json(path: Path, value: Any) -> None:
    """Atomically (temp file + rename): a file that exists is complete."""
    if jax.process_index():
        return
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2, default=_jsonable) + "\n")
    os.replace(temporary, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _flat(stats: dict[str, Any]) -> dict[str, float]:
    return {
        f"rft/{k}" if not k.startswith(("eval/", "time/")) else k: float(v)
        for k, v in stats.items()
        if isinstance(v, (int, float))
    }


@dataclasses.dataclass
class _RunContext:
    """What every round of a run works with."""

    config: ml_collections.ConfigDict
    workdir: Path
    base_paths: list[str]
    tasks: list[Task]
    eval_tasks: list[Task]
    cache: ToolCache
    models: _Models
    writer: MetricsWriter
    devices: list[jax.Device] | None
    progress: bool


def _sample_or_reuse(
    context: _RunContext,
    round_dir: Path,
    k: int,
    checkpoint: str,
    eval_before: dict[str, float] | None,
) -> dict[str, Any]:
    """The round's `sampling.json` (fingerprint, stats, eval before), sampling first unless a
    complete one with the same settings is there; `accepted.jsonl` is written before it."""
    config, cache = context.config, context.cache
    accepted_path, sampling_path = round_dir / "accepted.jsonl", round_dir / "sampling.json"
    fingerprint = sampling_fingerprint(config, checkpoint)
    if sampling_path.exists() and accepted_path.exists():
        sampling = json.loads(sampling_path.read_text())
        if sampling["fingerprint"] != fingerprint:
            differing = [k for k in fingerprint if sampling["fingerprint"].get(k) != fingerprint[k]]
            raise TrainingError(
                f"{accepted_path} was sampled with other settings ({', '.join(differing)}); "
                "use another workdir or delete that round"
            )
        log.info("rft round %d: reusing %s", k, accepted_path)
        return sampling
    policy = context.models.get(checkpoint)
    start = time.perf_counter()
    if eval_before is None:
        eval_before = _evaluate(policy, cache, context.eval_tasks, config)
    timing = {"time/eval_before_s": time.perf_counter() - start}
    start = time.perf_counter()
    records, stats = _sample_round(policy, cache, context.tasks, config, k, context.progress)
    timing["time/sampling_round_s"] = time.perf_counter() - start
    if jax.process_index() == 0:
        write_jsonl(accepted_path, records)
    sampling = {"fingerprint": fingerprint, "stats": stats, "eval_before": eval_before}
    sampling["timing"] = timing
    _write_json(sampling_path, sampling)
    return sampling


class _Preempted(Exception):
    """A SIGTERM stopped the round's SFT after saving a checkpoint."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


def _fine_tune(
    round_dir: Path,
    k: int,
    checkpoint: str,
    base_paths: list[str],
    config: ml_collections.ConfigDict,
    devices: list[jax.Device] | None,
    progress: bool,
) -> dict[str, Any]:
    """Merges the data and runs (or resumes) the round's SFT; returns its summary and counts."""
    accepted = [round_dir.parent / f"round_{j}" / "accepted.jsonl" for j in range(k + 1)]
    train_path = round_dir / "train.jsonl"
    merged = None
    if jax.process_index() == 0:  # one writer; the others read it after the barrier
        merged = merge_data(
            base_paths, accepted if config.rft.accumulate else accepted[-1:], train_path
        )
    merged = parallel.allgather_objects(merged)[0]
    tokenizer_spec = config.tokenizer.spec or checkpoint
    sft_config = sft_config_for_round(config, checkpoint, tokenizer_spec, train_path)
    start = time.perf_counter()
    summary = sft.train(sft_config, round_dir / "sft", progress=progress, devices=devices)
    seconds = time.perf_counter() - start
    if summary.get("preempted_at"):
        raise _Preempted(f"round {k}, SFT step {summary['preempted_at']}")
    export = summary.get("export")
    if not export:
        raise TrainingError("rft needs each round's model exported: set sft.train.export_hf=True")
    # The next round loads its tokenizer from the export, as from the starting checkpoint.
    source, target = Path(tokenizer_spec) / "tokenizer.json", Path(export) / "tokenizer.json"
    if source.is_file() and not target.exists() and jax.process_index() == 0:
        shutil.copy(source, target)
    return {
        "export": export,
        "sft_steps": summary.get("steps", 0),
        "sft_loss": summary.get("loss", float("nan")),
        "merged_base": merged["base"],
        "merged_accepted": merged["accepted"],
        "merged_duplicates": merged["duplicates"],
        "time/sft_s": seconds,
    }


# --- the loop ---------------------------------------------------------------------------------------


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    progress: bool = True,
    *,
    devices: list[jax.Device] | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) `rft.rounds` rounds in `workdir`; returns the summary (also written to
    `summary.json`)."""
    workdir = fs.workdir_path(workdir)
    checkpoint, base_paths = _check_inputs(config)
    _open_workdir(config, workdir, devices)
    tasks, eval_tasks, cache = _open_tasks_and_cache(config, workdir, base_paths)
    rounds, checkpoint = _finished_rounds(workdir, config.rft.rounds, checkpoint)
    resumed = len(rounds)
    if resumed:
        log.info("rft: %d round(s) already done, continuing from %s", resumed, checkpoint)
    context = _RunContext(
        config=config,
        workdir=workdir,
        base_paths=base_paths,
        tasks=tasks,
        eval_tasks=eval_tasks,
        cache=cache,
        models=_Models(config),
        writer=MetricsWriter(workdir, resume_step=resumed, enabled=jax.process_index() == 0),
        devices=devices,
        progress=progress,
    )
    try:
        for k in range(resumed, config.rft.rounds):
            rounds.append(_run_round(context, k, checkpoint, rounds[-1] if rounds else None))
            checkpoint = rounds[-1]["export"]
    except _Preempted as stop:  # the round's SFT saved its step; rerunning resumes it
        return {"rounds": len(rounds), "preempted_at": stop.where}
    finally:
        context.writer.close()
        cache.close()
    summary = _summary(rounds, resumed, checkpoint)
    _write_json(workdir / "summary.json", summary)
    return summary


def _check_inputs(config: ml_collections.ConfigDict) -> tuple[str, list[str]]:
    """(the starting checkpoint, the base data paths), each checked before anything loads."""
    if not config.model.checkpoint:
        raise TrainingError(
            "config.model.checkpoint is empty: give an HF checkpoint directory (e.g. an SFT run's hf/)"
        )
    if config.rft.samples_per_task < 1 or config.rft.batch_tasks < 1 or config.rft.rounds < 0:
        raise TrainingError("rft.samples_per_task and rft.batch_tasks must be >= 1, rounds >= 0")
    checkpoint = str(Path(config.model.checkpoint).absolute())
    _check_checkpoint(checkpoint, config.tokenizer.spec or checkpoint, "model.checkpoint")
    base_paths = [p.strip() for p in config.rft.base_data.split(",") if p.strip()]
    for path in base_paths:
        if not Path(path).is_file():
            raise TrainingError(f"rft.base_data: {path} does not exist (a trajectories JSONL)")
    return checkpoint, base_paths


def _open_workdir(
    config: ml_collections.ConfigDict, workdir: Path, devices: list[jax.Device] | None
) -> jax.sharding.Mesh:
    """Joins the other processes and writes `config.json`; returns the mesh."""
    mesh = parallel.start(config, devices)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    return mesh


def _open_tasks_and_cache(
    config: ml_collections.ConfigDict, workdir: Path, base_paths: list[str]
) -> tuple[list[Task], list[Task], ToolCache]:
    """The tasks to sample, the evaluation tasks (none with `eval.enabled` off) and the tool
    cache, built from the base data unless `cache.build_from` names other trajectories."""
    tasks = load_tasks(config.tasks, "train")
    if not tasks:
        raise TrainingError("no tasks to sample (config.tasks)")
    eval_tasks = load_tasks(config.eval_tasks, "validation") if config.eval.enabled else []
    cache_config = config.copy_and_resolve_references()
    if not cache_config.cache.build_from:
        cache_config.cache.build_from = ",".join(base_paths)
    return tasks, eval_tasks, open_cache(cache_config, workdir)


def _finished_rounds(
    workdir: Path, wanted: int, checkpoint: str
) -> tuple[list[dict[str, Any]], str]:
    """(the finished rounds' metrics, in order; the checkpoint the next round starts from). A
    round is finished when its `metrics.json`, written last, exists."""
    rounds: list[dict[str, Any]] = []
    while len(rounds) < wanted:
        done = workdir / f"round_{len(rounds)}" / "metrics.json"
        if not done.exists():
            break
        rounds.append(json.loads(done.read_text()))
        checkpoint = rounds[-1]["export"]
    return rounds, checkpoint


def _run_round(
    context: _RunContext, k: int, checkpoint: str, previous: dict[str, Any] | None
) -> dict[str, Any]:
    """Round `k` from `checkpoint`: sample (or reuse the samples), fine-tune on what was
    accepted, evaluate; logs and writes the round's metrics, and returns them."""
    config = context.config
    round_dir = context.workdir / f"round_{k}"
    round_dir.mkdir(exist_ok=True)
    _check_checkpoint(
        checkpoint, config.tokenizer.spec or checkpoint, f"round {k}'s starting checkpoint"
    )
    eval_before = previous["eval_after"] if previous else None
    sampling = _sample_or_reuse(context, round_dir, k, checkpoint, eval_before)
    stats, eval_before = sampling["stats"], sampling["eval_before"]
    metrics = {"round": k, "checkpoint": checkpoint, **stats, **sampling["timing"]}
    if stats["accepted"]:
        trained, eval_after = _train_and_evaluate(context, round_dir, k, checkpoint)
        metrics.update(trained)
    else:  # no new data, nothing to train: the next round samples the same model again
        log.warning("rft round %d accepted nothing; the model is unchanged", k)
        metrics["export"], eval_after = checkpoint, eval_before
    metrics.update(trained=bool(stats["accepted"]), eval_before=eval_before)
    metrics["eval_after"] = eval_after
    context.writer.write(k + 1, _flat({**metrics, **eval_after}))
    _write_json(round_dir / "metrics.json", metrics)
    log.info(
        "rft round %d: %d of %d samples accepted (%d not round-tripping), model %s",
        k,
        stats["accepted"],
        stats["sampled"],
        stats["not_roundtrip"],
        metrics["export"],
    )
    return metrics


def _train_and_evaluate(
    context: _RunContext, round_dir: Path, k: int, checkpoint: str
) -> tuple[dict[str, Any], dict[str, float]]:
    """(the fine-tuning's metrics, the evaluation of its export)."""
    context.models.release()  # the sampler's weights and KV caches, before SFT allocates
    metrics = _fine_tune(
        round_dir,
        k,
        checkpoint,
        context.base_paths,
        context.config,
        context.devices,
        context.progress,
    )
    start = time.perf_counter()
    policy = context.models.get(metrics["export"])
    eval_after = _evaluate(policy, context.cache, context.eval_tasks, context.config)
    metrics["time/eval_after_s"] = time.perf_counter() - start
    return metrics, eval_after


def _summary(rounds: list[dict[str, Any]], resumed: int, checkpoint: str) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "rounds": len(rounds),
        "resumed_rounds": resumed,
        "final_checkpoint": checkpoint,
        "eval_before": rounds[0]["eval_before"] if rounds else {},
        "eval_after": rounds[-1]["eval_after"] if rounds else {},
        "per_round": rounds,
    }
    for key in COUNTS:
        summary[key] = sum(int(r.get(key, 0)) for r in rounds)
    return summary
