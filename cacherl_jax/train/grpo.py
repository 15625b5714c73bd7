"""GRPO with cache-backed rollouts: `cacherl grpo --config=configs/grpo.py:tiny --workdir=runs/g`.

Each step: pick `tasks_per_step` training tasks (a deterministic function of the seed and the
step, so a resumed run picks the same ones), sample G rollouts per task with the CacheAgentLoop
(tool calls answered by the tool cache), score them with the tier-aware reward, turn rewards into
group advantages, and run `minibatches` jitted, sharded updates of the GRPO objective. The
reference policy for the KL term is the starting checkpoint (frozen), or the LoRA base.

Metrics per step (metrics.jsonl + TensorBoard): reward and its components overall and by tier,
tier hit counts, KL, clip fraction, entropy, sampler/trainer log-prob gap, response length, tool
calls per rollout, and seconds per phase (weight move, sampling, tools, reward, reference,
update). With `train.tier_fidelity`, each cache tier's live-tool agreement too
(`cacherl_jax.agent.fidelity`: the step's calls replayed on fresh live environments), and the
summary `train` returns has the run's totals per tier (`run_tiers`).

Many processes. Each process samples on its own devices (`parallel.local_mesh`), with no
cross-host collective while decoding, and owns a contiguous block of the step's tasks with all G
rollouts of each, so group advantages need nothing from other hosts. The update assembles the
global batch from every process's rows (`jax.make_array_from_process_local_data`: each process
holds the rows of its devices' batch shards, and rows are padded to `loop.max_len`, so shapes
agree). Scores and loop counts are gathered so every process logs the same metrics; only
process 0 writes files. The task order is the same for any number of processes, so N processes
train what one does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cacherl_jax import fs, parallel
from cacherl_jax.agent.environment import Task
from cacherl_jax.agent.fidelity import add_counts, fidelity_metrics, replay_rollouts
from cacherl_jax.agent.loop import CacheAgentLoop, Rollout
from cacherl_jax.agent.outcome import TIERS
from cacherl_jax.agent.tool_cache import ToolCache
from cacherl_jax.chat import Tokenizer
from cacherl_jax.chat.template_check import copy_chat_template, load_checked_tokenizer
from cacherl_jax.model import Qwen3Config, load_hf_checkpoint, save_hf_checkpoint
from cacherl_jax.model import lora as lora_lib
from cacherl_jax.rl.grpo import group_advantages
from cacherl_jax.rl.rewards import RewardConfig, summarize
from cacherl_jax.rl.scoring import TaskResult, evaluate, score_rollouts
from cacherl_jax.sampling import Sampler
from cacherl_jax.train import checkpoint as checkpoint_lib
from cacherl_jax.train.errors import TrainingError
from cacherl_jax.train.grpo_step import (
    BATCH_KEYS,
    GrpoStepConfig,
    make_grpo_step,
    policy_temperature,
    rollouts_to_batch,
    target_logprobs,
)
from cacherl_jax.train.metrics import MetricsWriter
from cacherl_jax.train.optimizer import make_optimizer
from cacherl_jax.train.preemption import Preemption
from cacherl_jax.train.rollout_setup import (
    CacheSync,
    load_tasks,
    loop_config,
    open_cache,
    training_env,
)
from cacherl_jax.train.step import batch_shards, init_train_state

log = logging.getLogger(__name__)


# --- inputs ------------------------------------------------------------------------------------------


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {
        "model_checkpoint": config.model.checkpoint,
        "lora": config.lora.to_dict() if config.lora.rank else None,
        "tasks": config.tasks.to_dict(),
        "grpo": {k: config.grpo[k] for k in ("tasks_per_step", "minibatches")},
        "group_size": config.loop.group_size,
        "max_len": config.loop.max_len,
        "seed": config.seed,
    }


# --- one step's host side ------------------------------------------------------------------------


def step_tasks(tasks: list[Task], step: int, count: int, seed: int) -> list[Task]:
    """The tasks of a step: a fixed function of (seed, step), so a resumed run repeats them."""
    rng = np.random.default_rng([seed, step])
    return [tasks[i] for i in rng.choice(len(tasks), size=min(count, len(tasks)), replace=False)]


def advantages_for(
    rewards_NxG: np.ndarray, *, normalize_std: bool, skip_equal: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(advantages [N, G], keep [N, G]): groups whose rewards are all equal carry no signal and
    are dropped when `skip_equal`."""
    adv_NxG = np.asarray(group_advantages(rewards_NxG, normalize_std=normalize_std))
    equal_N = np.ptp(rewards_NxG, axis=1) == 0
    keep_NxG = np.broadcast_to(~equal_N[:, None] if skip_equal else True, rewards_NxG.shape)
    return adv_NxG, np.array(keep_NxG)


# --- the run -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Policy:
    """The model being trained: LoRA adapters over a frozen base, or all of its parameters."""

    model: Qwen3Config
    lora: lora_lib.LoraConfig | None
    base: Any  # the frozen base under the adapters (LoRA only)
    reference: Any  # a frozen copy for the KL term (full fine-tuning with beta only)


@dataclasses.dataclass
class _Run:
    """What a GRPO run holds from step to step; `state` is replaced by every update."""

    config: ml_collections.ConfigDict
    workdir: Path
    mesh: jax.sharding.Mesh  # the training mesh (the sampler has its own, per process)
    tokenizer: Tokenizer
    policy: _Policy
    train_tasks: list[Task]
    eval_tasks: list[Task]
    rows: int  # rollouts per step: tasks_per_step x group_size
    cache: ToolCache
    cache_sync: CacheSync
    reward_config: RewardConfig
    state: Any
    checkpoints: checkpoint_lib.Checkpoints
    start_step: int
    update: Callable
    logprobs_fn: Callable
    merge: Callable  # (trainable, base) -> the full parameters
    batch_shardings: dict[str, Any]
    select_rows: Callable  # (batch, row indices) -> a minibatch, sharded as the batch
    concat_rows: Callable  # [B_i, T] arrays -> their rows in order, sharded as the batch
    sampler: Sampler
    train_loop: CacheAgentLoop
    eval_loop: CacheAgentLoop
    writer: MetricsWriter

    def params(self) -> Any:
        return self.merge(self.state["trainable"], self.policy.base)

    def refresh_sampler(self) -> None:
        self.sampler.set_params(self.params())

    def close(self) -> None:
        self.checkpoints.wait()
        self.writer.close()
        self.cache.close()


def _open_workdir(
    config: ml_collections.ConfigDict, workdir: Path, devices: list[jax.Device] | None
) -> jax.sharding.Mesh:
    """Checks the config, joins the other processes and writes `config.json`; returns the mesh."""
    if not config.model.checkpoint:
        raise TrainingError(
            "config.model.checkpoint is empty: give an HF checkpoint directory (e.g. an SFT run's hf/)"
        )
    _check_sampling(config)
    mesh = parallel.start(config, devices)
    if config.grpo.tasks_per_step % jax.process_count():
        raise TrainingError(
            f"grpo.tasks_per_step={config.grpo.tasks_per_step} does not split over "
            f"{jax.process_count()} processes (each samples whole groups of its own tasks); "
            f"use a multiple of {jax.process_count()}"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    return mesh


def _check_sampling(config: ml_collections.ConfigDict) -> None:
    """The trainer optimises softmax(logits / T) (`policy_temperature`); with
    grpo.old_logp="sampler" the sampler must have recorded that policy's log-probs, which it does
    unless top-k or top-p also filtered the draw at T != 1."""
    loop = config.loop
    filtered = loop.top_k > 0 or loop.top_p < 1.0
    if policy_temperature(config) != 1.0 and filtered and config.grpo.old_logp == "sampler":
        raise TrainingError(
            f"loop.temperature={loop.temperature} with top_k={loop.top_k}, top_p={loop.top_p}: "
            "the sampler records the filtered distribution's log-probs, not those of "
            "softmax(logits / temperature) that the trainer optimises; set "
            'grpo.old_logp="recompute"'
        )


def _sampler_logprobs(rollout: Rollout, temperature: float) -> np.ndarray:
    """The sampler's log-probs of the policy the trainer optimises (at `policy_temperature`): at
    temperature 1 the raw (unfiltered) ones, otherwise the tempered ones it drew from
    (`_check_sampling` has ruled out filtering there)."""
    return rollout.raw_logprobs if temperature == 1.0 else rollout.logprobs


def _load_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    return load_hf_checkpoint(
        config.model.checkpoint,
        mesh=mesh,
        dtype=jnp.dtype(config.model.param_dtype),
        compute_dtype=config.model.compute_dtype,
        remat=config.model.remat,
        unroll_layers=config.model.unroll_layers,
    )


def _load_task_splits(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> tuple[list[Task], list[Task], int]:
    """(training tasks, validation tasks, rollouts per step), the step's rollouts checked to
    split into minibatches, micro-batches and batch shards."""
    train_tasks = load_tasks(config.tasks, "train")
    eval_tasks = load_tasks(config.eval_tasks, "validation")
    if not train_tasks:
        raise TrainingError("no training tasks (config.tasks)")
    rows = min(config.grpo.tasks_per_step, len(train_tasks)) * config.loop.group_size
    minibatches, grad_accum = config.grpo.minibatches, config.train.grad_accum
    if rows % (minibatches * grad_accum * batch_shards(mesh)):
        raise TrainingError(
            f"tasks_per_step x group_size = {rows} rollouts must split into {minibatches} "
            f"minibatches x grad_accum {grad_accum} over {batch_shards(mesh)} batch shards"
        )
    return train_tasks, eval_tasks, rows


def _policy(
    config: ml_collections.ConfigDict, model: Qwen3Config, params: Any, mesh: jax.sharding.Mesh
) -> tuple[_Policy, Any]:
    """(the policy, the parameters the optimizer starts from: all of them, or new adapters)."""
    if not config.lora.rank:
        # A frozen copy of the starting point for the KL term (not needed without it).
        reference = jax.tree.map(jnp.copy, params) if config.grpo.beta else None
        return _Policy(model, None, base=None, reference=reference), params
    lora = lora_lib.LoraConfig(
        rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets)
    )
    trainable = lora_lib.init_lora(model, lora, jax.random.key(config.seed), mesh=mesh)
    # The LoRA base is the reference.
    return _Policy(model, lora, base=params, reference=None), trainable


def _merge_fn(lora: lora_lib.LoraConfig | None) -> Callable:
    def full_params(trainable, base):
        return trainable if lora is None else lora_lib.merge_lora(base, trainable, lora)

    return jax.jit(full_params)


def _compile_update(
    config: ml_collections.ConfigDict,
    policy: _Policy,
    tx,
    schedule,
    state_shardings: Any,
    mesh: jax.sharding.Mesh,
) -> Callable:
    """The jitted, sharded GRPO update `(state, base, batch) -> (state, metrics)`."""
    step_config = GrpoStepConfig.from_config(config, policy.model, policy.lora)
    batch_shardings = _batch_shardings(mesh)
    base_shardings = (
        None if policy.base is None else jax.tree.map(lambda x: x.sharding, policy.base)
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        make_grpo_step(step_config, tx, schedule),
        in_shardings=(state_shardings, base_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated),  # metrics: readable on every process
        donate_argnums=0,
    )


def _row_selector(shardings: dict[str, Any]) -> Callable:
    """`(batch, row indices) -> those rows`, each array keeping its sharding (any subset of the
    batch's keys: the log-prob pass runs before the reference's are in)."""
    takes = {
        key: jax.jit(lambda x_B, rows: x_B[rows], out_shardings=sharding)
        for key, sharding in shardings.items()
    }
    return lambda batch, rows: {key: takes[key](value, rows) for key, value in batch.items()}


def _batch_shardings(mesh: jax.sharding.Mesh) -> dict[str, jax.sharding.NamedSharding]:
    """Rows over the batch axes; token arrays [B, T], advantages [B]."""
    rows = parallel.batch_sharding(mesh)
    shardings = {k: rows for k in BATCH_KEYS}
    shardings["adv_B"] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(rows.spec[0]))
    return shardings


def _start(config: ml_collections.ConfigDict, workdir: Path, mesh: jax.sharding.Mesh) -> _Run:
    """Loads the model, tasks and cache, restores the latest checkpoint, compiles the update."""
    tokenizer = load_checked_tokenizer(config.tokenizer.spec, config.model.checkpoint)
    model, params = _load_model(config, mesh)
    train_tasks, eval_tasks, rows = _load_task_splits(config, mesh)
    cache = open_cache(config, workdir)
    policy, trainable = _policy(config, model, params, mesh)

    tx, schedule = make_optimizer(config.train)
    state, state_shardings = init_train_state(tx, trainable, mesh)
    checkpoints = checkpoint_lib.Checkpoints(
        workdir / "checkpoints",
        fingerprint(config),
        keep=config.train.keep_checkpoints,
        async_save=config.train.async_checkpoints,
    )
    start_step = 0
    restored = checkpoints.restore_latest(state)
    if restored is not None:
        state, _, start_step = restored
        log.info("resumed from step %d", start_step)

    merge = _merge_fn(policy.lora)
    rollout_mesh = parallel.local_mesh(config.rollout.tensor)
    sampler = Sampler(merge(state["trainable"], policy.base), model, mesh=rollout_mesh)
    batch_shardings = _batch_shardings(mesh)
    return _Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        tokenizer=tokenizer,
        policy=policy,
        train_tasks=train_tasks,
        eval_tasks=eval_tasks,
        rows=rows,
        cache=cache,
        cache_sync=CacheSync(config, cache, workdir),
        reward_config=RewardConfig.from_config(config.reward),
        state=state,
        checkpoints=checkpoints,
        start_step=start_step,
        update=_compile_update(config, policy, tx, schedule, state_shardings, mesh),
        logprobs_fn=jax.jit(
            functools.partial(
                target_logprobs,
                model=model,
                chunk_size=config.grpo.loss_chunk_size,
                temperature=policy_temperature(config),
            )
        ),
        merge=merge,
        batch_shardings=batch_shardings,
        select_rows=_row_selector(batch_shardings),
        concat_rows=jax.jit(
            lambda parts: jnp.concatenate(parts), out_shardings=batch_shardings["tokens_BxT"]
        ),
        sampler=sampler,
        train_loop=CacheAgentLoop(
            sampler, tokenizer, cache, loop_config(config), make_env=training_env(config)
        ),
        eval_loop=CacheAgentLoop(sampler, tokenizer, cache, loop_config(config, evaluation=True)),
        writer=MetricsWriter(workdir, resume_step=start_step, enabled=jax.process_index() == 0),
    )


# --- one step ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _timed(timing: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timing[key] = time.perf_counter() - start


def _train_step(run: _Run, step: int) -> dict[str, float]:
    """Samples the step's rollouts, scores them, and updates on them; returns the step's metrics
    (the same on every process)."""
    config = run.config
    timing: dict[str, float] = {}
    with _timed(timing, "time/weight_move_s"):
        run.refresh_sampler()
    step_tasks_all = step_tasks(run.train_tasks, step, config.grpo.tasks_per_step, config.seed)
    tasks = parallel.process_share(step_tasks_all, "tasks of a step")
    rollouts = run.train_loop.run(tasks, seed=config.seed * 1_000_003 + step)
    run.cache_sync.after_step(step)
    timing.update({f"time/{k}": v for k, v in run.train_loop.metrics.items() if k.endswith("_s")})
    with _timed(timing, "time/reward_s"):
        results = score_rollouts(tasks, rollouts, run.reward_config)
        adv_NxG, keep_NxG = _advantages(config, results, len(tasks))
    batch = _batch(rollouts, adv_NxG.reshape(-1), keep_NxG.reshape(-1), config, run.tokenizer)
    with _timed(timing, "time/reference_s"):
        device_batch = _with_reference_logprobs(run, _global_batch(run, batch))
    with _timed(timing, "time/update_s"):
        fetched = _minibatch_updates(run, device_batch, step)
    metrics = _update_metrics(run, fetched, step)
    # Rollout records (every token as a list) only when they are saved: not on every step.
    records = _rollout_records(rollouts, results) if config.train.save_rollouts else []
    fidelity = None
    if config.train.tier_fidelity:
        with _timed(timing, "time/fidelity_s"):
            fidelity = replay_rollouts(tasks, rollouts)  # this process's rollouts
    everyone = parallel.allgather_objects(
        (results, run.train_loop.metrics, keep_NxG[:, 0], records, fidelity)
    )
    if config.train.save_rollouts and jax.process_index() == 0:
        _save_rollouts(run.workdir, step + 1, [rec for part in everyone for rec in part[3]])
    all_results = [r for part in everyone for r in part[0]]
    metrics.update(_rollout_metrics(all_results, [part[1] for part in everyone]))
    if config.train.tier_fidelity:
        metrics.update(fidelity_metrics(add_counts(part[4] for part in everyone)))
    metrics.update(timing)
    metrics["groups_kept"] = float(sum(part[2].sum() for part in everyone))
    metrics["response_tokens"] = float(np.mean([r.generated_tokens for r in all_results]))
    metrics["success_rate"] = float(np.mean([r.success for r in all_results]))
    return metrics


def _rollout_records(rollouts: list[Rollout], results: list[TaskResult]) -> list[dict]:
    return [
        {
            "task_id": rollout.task_id,
            "sample": rollout.sample,
            "token_ids": rollout.token_ids.tolist(),
            "loss_mask": rollout.loss_mask.tolist(),
            "tiers": [call.tier for call in rollout.calls],
            "stop_reason": rollout.stop_reason,
            "reward": result.reward.to_dict(),
        }
        for rollout, result in zip(rollouts, results, strict=True)
    ]


def _save_rollouts(workdir: Path, step: int, records: list[dict]) -> None:
    directory = workdir / "rollouts"
    directory.mkdir(exist_ok=True)
    lines = "".join(json.dumps(record) + "\n" for record in records)
    (directory / f"step_{step}.jsonl").write_text(lines)


def _global_batch(run: _Run, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows as its part of the step's global batch (one process: all rows)."""
    return {
        key: jax.make_array_from_process_local_data(run.batch_shardings[key], value)
        for key, value in batch.items()
    }


def _advantages(
    config: ml_collections.ConfigDict, results: list[TaskResult], num_tasks: int
) -> tuple[np.ndarray, np.ndarray]:
    rewards_NxG = np.array([r.reward.total for r in results]).reshape(
        num_tasks, config.loop.group_size
    )
    return advantages_for(
        rewards_NxG,
        normalize_std=config.grpo.normalize_std,
        skip_equal=config.grpo.equal_reward_groups == "skip",
    )


def _with_reference_logprobs(run: _Run, device_batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The batch with the old policy's log-probs recomputed (`grpo.old_logp`) and the
    reference's for the KL term (zeros without one)."""
    config = run.config
    device_batch = dict(device_batch)
    if config.grpo.old_logp == "recompute":
        device_batch["old_logp_BxT"] = jnp.where(
            device_batch["loss_mask_BxT"] > 0,
            _logprobs_in_parts(run, run.params(), device_batch),
            0.0,
        )
    if config.grpo.beta:
        policy = run.policy
        ref_params = policy.reference if policy.reference is not None else policy.base
        device_batch["ref_logp_BxT"] = _logprobs_in_parts(run, ref_params, device_batch)
    else:
        device_batch["ref_logp_BxT"] = jnp.zeros_like(device_batch["old_logp_BxT"])
    return device_batch


def _logprobs_in_parts(run: _Run, params: Any, device_batch: dict[str, jax.Array]) -> jax.Array:
    """Log-probs of the batch's targets, `grpo.minibatches` contiguous slices of rows at a time
    (the update's row count), so this pass never holds more activations than an update."""
    parts = np.array_split(np.arange(run.rows), run.config.grpo.minibatches)
    with jax.set_mesh(run.mesh):
        logp = [run.logprobs_fn(params, batch=run.select_rows(device_batch, p)) for p in parts]
        return logp[0] if len(logp) == 1 else run.concat_rows(logp)


def _minibatch_updates(
    run: _Run, device_batch: dict[str, jax.Array], step: int
) -> list[dict[str, Any]]:
    """`grpo.minibatches` updates over a shuffle of the step's rollouts; their metrics, fetched."""
    order = np.random.default_rng([run.config.seed, step, 1]).permutation(run.rows)
    update_metrics = []
    for part in np.array_split(order, run.config.grpo.minibatches):
        mini = run.select_rows(device_batch, part)
        with jax.set_mesh(run.mesh):  # see sft.py: the attention's platform and kernel
            run.state, metrics = run.update(run.state, run.policy.base, mini)
        update_metrics.append(metrics)
    return jax.device_get(update_metrics)


def _update_metrics(run: _Run, fetched: list[dict[str, Any]], step: int) -> dict[str, float]:
    """Means over the minibatch updates (the log-prob gap's maximum); a non-finite loss stops."""
    metrics = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    metrics["logp_gap_max"] = float(max(m["logp_gap_max"] for m in fetched))
    if not np.isfinite(metrics["loss"]):
        raise TrainingError(
            f"step {step + 1}: loss is {metrics['loss']}; stopping without saving "
            f"(last good checkpoint: step {run.checkpoints.latest_step()})"
        )
    return metrics


def _rollout_metrics(
    results: list[TaskResult], loop_metrics: list[dict[str, float]]
) -> dict[str, float]:
    """The reward and its parts (overall and by tier) over every process's rollouts, and the
    loops' counts: summed, except rounds (the most any process took) and per-rollout means."""
    metrics = summarize([r.reward for r in results])
    counts = [{k: v for k, v in m.items() if not k.endswith("_s")} for m in loop_metrics]
    total = {k: float(sum(m[k] for m in counts)) for k in counts[0]}
    total["rounds"] = max(m["rounds"] for m in counts)
    total["calls_per_rollout"] = float(np.mean([r.calls for r in results]))
    metrics.update({f"loop/{k}": v for k, v in total.items()})
    return metrics


def _evaluate(run: _Run, step: int) -> dict[str, float]:
    """Validation with the current parameters (`eval_tasks`, `eval` loop settings), logged."""
    run.refresh_sampler()
    start = time.perf_counter()
    metrics, _ = evaluate(run.eval_loop, run.eval_tasks, run.reward_config, seed=run.config.seed)
    metrics = {f"eval/{k}": v for k, v in metrics.items()}
    metrics["eval/seconds"] = time.perf_counter() - start
    run.writer.write(step, metrics)
    return metrics


# --- the loop --------------------------------------------------------------------------------------


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    progress: bool = True,
    devices: list[jax.Device] | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) GRPO in `workdir`; returns a summary with eval before/after."""
    workdir = fs.workdir_path(workdir)
    mesh = _open_workdir(config, workdir, devices)
    run = _start(config, workdir, mesh)
    summary: dict[str, Any] = {"resumed_from": run.start_step}
    try:
        if run.start_step == 0:
            summary["eval_before"] = _evaluate(run, 0)
        with Preemption() as preemption:
            last = _train_steps(run, summary, progress, preemption)
    finally:
        run.close()
    summary.update(steps=config.train.steps, **last)
    if summary.get("preempted_at"):
        return summary
    if config.train.export_hf:
        summary["export"] = _export(run, workdir)
    return summary


def _train_steps(
    run: _Run, summary: dict[str, Any], progress: bool, preemption: Preemption
) -> dict[str, float]:
    """Steps from the resumed one to `train.steps`, logging, checkpointing and evaluating on the
    way (the latest evaluation lands in `summary["eval_after"]`); the last step's metrics. On a
    SIGTERM (any process's) it saves the step reached and stops (`summary["preempted_at"]`)."""
    config, steps = run.config, run.config.train.steps
    bar = tqdm(total=steps, initial=run.start_step, desc="grpo", unit="step",
               disable=not progress or jax.process_index())  # fmt: skip
    last: dict[str, float] = {}
    tally: Counter[str] = Counter()
    try:
        for step in range(run.start_step, steps):
            last = _train_step(run, step)
            _tally_tiers(tally, last)
            summary["run_tiers"] = _run_tiers(tally)
            done, is_last = step + 1, step + 1 == steps
            if done % config.train.log_every == 0 or is_last:
                run.writer.write(done, last)
            bar.set_postfix(reward=f"{last['reward/total']:.3f}", kl=f"{last['kl_ref']:.4f}")
            bar.update()
            preempted = preemption.requested()
            if done % config.train.checkpoint_every == 0 or is_last or preempted:
                run.checkpoints.save(done, run.state, {"step": done})
                run.cache_sync.publish()
            if preempted and not is_last:
                log.warning("preempted: saved step %d, exiting; rerun the command to resume", done)
                summary["preempted_at"] = done
                break
            every = config.train.eval_every
            if is_last or (every and done % every == 0):
                summary["eval_after"] = _evaluate(run, done)
    finally:
        bar.close()
    if tally:
        log.info("cache tiers over the run: %s", summary["run_tiers"])
    return last


def _tally_tiers(tally: Counter[str], metrics: Mapping[str, float]) -> None:
    """Adds one step's counts per cache tier: rollouts by worst tier, cached calls, and replayed
    calls with how many agreed with live tools (`tier_fidelity`)."""
    rollouts = metrics["loop/rollouts"]
    tally["rollouts"] += rollouts
    for tier in TIERS:
        tally[f"rollouts_{tier}"] += metrics[f"tier/{tier}_fraction"] * rollouts
        tally[f"calls_{tier}"] += metrics[f"loop/calls_{tier}"]
        replayed = metrics.get(f"fidelity/{tier}_calls", 0.0)
        tally[f"replayed_{tier}"] += replayed
        tally[f"agree_{tier}"] += metrics.get(f"fidelity/{tier}_agreement", 0.0) * replayed


def _run_tiers(tally: Counter[str]) -> dict[str, float | None]:
    """The run's share of rollouts (by worst tier) and of cached calls in each tier, and each
    tier's live-tool agreement (None where no call of it was replayed), over the steps this call
    ran (after a resume: since the resume)."""
    cached = sum(tally[f"calls_{tier}"] for tier in TIERS)
    out: dict[str, float | None] = {"rollouts": tally["rollouts"], "cached_calls": cached}
    for tier in TIERS:
        out[f"tier/{tier}_fraction"] = tally[f"rollouts_{tier}"] / tally["rollouts"]
        out[f"calls/{tier}_fraction"] = tally[f"calls_{tier}"] / cached if cached else None
        replayed = tally[f"replayed_{tier}"]
        out[f"fidelity/{tier}_calls"] = replayed
        out[f"fidelity/{tier}_agreement"] = tally[f"agree_{tier}"] / replayed if replayed else None
    return out


def _export(run: _Run, workdir: Path) -> str:
    """The trained model (adapters merged) as an HF checkpoint in `workdir/hf`, with the
    tokenizer when there is a tokenizer.json to copy."""
    config = run.config
    with fs.local_directory(workdir / "hf") as export_dir:
        if export_dir.exists() and jax.process_index() == 0:
            shutil.rmtree(export_dir)
        save_hf_checkpoint(run.policy.model, run.params(), export_dir)
        tokenizer_file = Path(config.tokenizer.spec or config.model.checkpoint) / "tokenizer.json"
        if tokenizer_file.exists() and jax.process_index() == 0:
            shutil.copy(tokenizer_file, export_dir / "tokenizer.json")
        if jax.process_index() == 0:  # the exported checkpoint keeps its chat variant
            copy_chat_template(config.model.checkpoint, export_dir)
    return str(workdir / "hf")


def _batch(
    rollouts: list[Rollout],
    adv_R: np.ndarray,
    keep_R: np.ndarray,
    config: ml_collections.ConfigDict,
    tokenizer,
) -> dict[str, np.ndarray]:
    """Fixed-shape rows (one per rollout; dropped rollouts keep their row with mask 0), so the
    update compiles once."""
    masks = [r.loss_mask * int(keep) for r, keep in zip(rollouts, keep_R, strict=True)]
    temperature = policy_temperature(config)
    return rollouts_to_batch(
        [r.token_ids for r in rollouts],
        masks,
        [_sampler_logprobs(r, temperature) for r in rollouts],
        np.where(keep_R, adv_R, 0.0),
        seq_len=config.loop.max_len,
        pad_id=tokenizer.pad_id,
    )
