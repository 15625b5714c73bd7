"""GRPO with cache-backed rollouts: `cacherl grpo --config=configs/grpo.py:tiny --workdir=runs/g`.

Each step: pick `tasks_per_step` training tasks (a deterministic function of the seed and the
step, so a resumed run picks the same ones), sample G rollouts per task with the CacheAgentLoop
(tool calls answered by the tool cache), score them with the tier-aware reward, turn rewards into
group advantages, and run `minibatches` jitted, sharded updates of the GRPO objective. The
reference policy for the KL term is the starting checkpoint (frozen), or the LoRA base.

Metrics per step (metrics.jsonl + TensorBoard): reward and its components overall and by tier,
tier hit counts, KL, clip fraction, entropy, sampler/trainer log-prob gap, response length, tool
calls per rollout, and seconds per phase (sampling, tools, reward, reference, update).
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cacherl_jax import parallel
from cacherl_jax.agent import bfcl
from cacherl_jax.agent.environment import Task
from cacherl_jax.agent.loop import CacheAgentLoop, LoopConfig, Rollout
from cacherl_jax.agent.procedural import generate_tasks
from cacherl_jax.agent.tool_cache import ToolCache, ToolCacheConfig, build_from_trajectories
from cacherl_jax.chat import load_tokenizer
from cacherl_jax.chat.trajectory import load_jsonl
from cacherl_jax.eval.suite import evaluate, score_rollouts
from cacherl_jax.model import load_hf_checkpoint, save_hf_checkpoint
from cacherl_jax.model import lora as lora_lib
from cacherl_jax.rl.grpo import group_advantages
from cacherl_jax.rl.rewards import RewardConfig, summarize
from cacherl_jax.sampling import Sampler
from cacherl_jax.train import checkpoint as checkpoint_lib
from cacherl_jax.train.errors import TrainingError
from cacherl_jax.train.grpo_step import (
    BATCH_KEYS,
    GrpoStepConfig,
    make_grpo_step,
    rollouts_to_batch,
    target_logprobs,
)
from cacherl_jax.train.metrics import MetricsWriter
from cacherl_jax.train.optimizer import make_optimizer
from cacherl_jax.train.step import batch_shards, init_train_state

log = logging.getLogger(__name__)


# --- inputs ------------------------------------------------------------------------------------------


def load_tasks(spec: ml_collections.ConfigDict, split: str) -> list[Task]:
    """Tasks from the procedural suite, a trajectories JSONL (`metadata.task`) or BFCL."""
    if spec.source == "procedural":
        return generate_tasks(
            split,
            spec.n,
            spec.seed,
            domains=list(spec.domains) or None,
            kinds=list(spec.kinds) or None,
        )
    if spec.source == "jsonl":
        trajectories, _ = load_jsonl(spec.path)
        tasks = []
        for trajectory in trajectories:
            if "task" not in trajectory.metadata:
                raise TrainingError(
                    f"{spec.path}: trajectory {trajectory.id!r} has no metadata.task "
                    "(write tasks with `cacherl tasks`)"
                )
            tasks.append(Task.from_dict(trajectory.metadata["task"]))
        return tasks[: spec.n] if spec.n else tasks
    if spec.source == "bfcl":
        return bfcl.load_tasks(spec.path or "multi_turn_base", limit=spec.n or None)
    raise TrainingError(f"tasks.source must be procedural, jsonl or bfcl, got {spec.source!r}")


def open_cache(config: ml_collections.ConfigDict, workdir: Path) -> ToolCache:
    """The run's tool cache; `cache.build_from` trajectories are recorded into a new one."""
    path = config.cache.path or str(workdir / "tool_cache.sqlite")
    is_new = not Path(path).exists()
    cache = ToolCache(
        ToolCacheConfig(
            path,
            fuzzy_threshold=config.cache.fuzzy_threshold,
            scope_mode=config.cache.scope_mode,
            exact_only=config.cache.get("exact_only", False),
        )
    )
    if is_new and config.cache.build_from:
        sources = [p.strip() for p in config.cache.build_from.split(",") if p.strip()]
        report = build_from_trajectories(cache, sources, scope_per_trajectory=True)
        log.info("tool cache %s built from %s: %s", path, sources, report)
    return cache


def loop_config(config: ml_collections.ConfigDict, *, evaluation: bool = False) -> LoopConfig:
    values = config.loop.to_dict()
    if evaluation:
        values.update(
            group_size=config.eval.samples,
            temperature=config.eval.temperature,
            mode=config.eval.mode,
        )
    return LoopConfig(**values)


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


# --- the loop --------------------------------------------------------------------------------------


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    progress: bool = True,
    devices: list[jax.Device] | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) GRPO in `workdir`; returns a summary with eval before/after."""
    workdir = Path(workdir).absolute()
    if not config.model.checkpoint:
        raise TrainingError(
            "config.model.checkpoint is empty: give an HF checkpoint directory (e.g. an SFT run's hf/)"
        )
    parallel.initialize_distributed(config.distributed)
    mesh = parallel.make_mesh(dict(config.mesh), devices=devices)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    tokenizer = load_tokenizer(config.tokenizer.spec or config.model.checkpoint)
    model, params = load_hf_checkpoint(
        config.model.checkpoint,
        mesh=mesh,
        dtype=jnp.dtype(config.model.param_dtype),
        compute_dtype=config.model.compute_dtype,
        remat=config.model.remat,
        unroll_layers=config.model.unroll_layers,
    )
    train_tasks = load_tasks(config.tasks, "train")
    eval_tasks = load_tasks(config.eval_tasks, "validation")
    if not train_tasks:
        raise TrainingError("no training tasks (config.tasks)")
    cache = open_cache(config, workdir)
    reward_config = RewardConfig.from_config(config.reward)

    lora = None
    if config.lora.rank:
        lora = lora_lib.LoraConfig(
            rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets)
        )
        base = params
        trainable = lora_lib.init_lora(model, lora, jax.random.key(config.seed), mesh=mesh)
        reference = None  # the LoRA base is the reference
    else:
        base, trainable = None, params
        # A frozen copy of the starting point for the KL term (not needed without it).
        reference = jax.tree.map(jnp.copy, params) if config.grpo.beta else None

    def full_params(trainable, base):
        return trainable if lora is None else lora_lib.merge_lora(base, trainable, lora)

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

    step_config = GrpoStepConfig(
        model=model,
        lora=lora,
        grad_accum=config.train.grad_accum,
        loss_chunk_size=config.grpo.loss_chunk_size,
        eps_low=config.grpo.eps_low,
        eps_high=config.grpo.eps_high,
        beta=config.grpo.beta,
        kl_estimator=config.grpo.kl_estimator,
        aggregation=config.grpo.aggregation,
        entropy=config.grpo.entropy,
    )
    batch_sharding = parallel.batch_sharding(mesh)
    batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
    batch_shardings["adv_B"] = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(batch_sharding.spec[0])
    )
    base_shardings = None if base is None else jax.tree.map(lambda x: x.sharding, base)
    update = jax.jit(
        make_grpo_step(step_config, tx, schedule),
        in_shardings=(state_shardings, base_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    logprobs_fn = jax.jit(
        functools.partial(target_logprobs, model=model, chunk_size=config.grpo.loss_chunk_size)
    )
    merge = jax.jit(full_params)
    sampler = Sampler(merge(state["trainable"], base), model, mesh=mesh)
    train_loop = CacheAgentLoop(sampler, tokenizer, cache, loop_config(config))
    eval_loop = CacheAgentLoop(sampler, tokenizer, cache, loop_config(config, evaluation=True))

    def refresh_sampler():
        sampler.set_params(merge(state["trainable"], base))

    def run_eval(step: int) -> dict[str, float]:
        refresh_sampler()
        start = time.perf_counter()
        metrics, _ = evaluate(eval_loop, eval_tasks, reward_config, seed=config.seed)
        metrics = {f"eval/{k}": v for k, v in metrics.items()}
        metrics["eval/seconds"] = time.perf_counter() - start
        writer.write(step, metrics)
        return metrics

    writer = MetricsWriter(workdir, resume_step=start_step, enabled=jax.process_index() == 0)
    steps = config.train.steps
    G = config.loop.group_size
    rows = min(config.grpo.tasks_per_step, len(train_tasks)) * G
    minibatches = config.grpo.minibatches
    if rows % (minibatches * config.train.grad_accum * batch_shards(mesh)):
        raise TrainingError(
            f"tasks_per_step x group_size = {rows} rollouts must split into {minibatches} "
            f"minibatches x grad_accum {config.train.grad_accum} over {batch_shards(mesh)} batch shards"
        )

    summary: dict[str, Any] = {"resumed_from": start_step}
    if start_step == 0:
        summary["eval_before"] = run_eval(0)
    bar = tqdm(total=steps, initial=start_step, desc="grpo", unit="step",
               disable=not progress or jax.process_index())  # fmt: skip
    last: dict[str, float] = {}
    try:
        for step in range(start_step, steps):
            timing: dict[str, float] = {}
            refresh_sampler()
            tasks = step_tasks(train_tasks, step, config.grpo.tasks_per_step, config.seed)
            rollouts = train_loop.run(tasks, seed=config.seed * 1_000_003 + step)
            timing.update(
                {f"time/{k}": v for k, v in train_loop.metrics.items() if k.endswith("_s")}
            )

            start = time.perf_counter()
            results = score_rollouts(tasks, rollouts, reward_config)
            rewards_NxG = np.array([r.reward.total for r in results]).reshape(len(tasks), G)
            adv_NxG, keep_NxG = advantages_for(
                rewards_NxG,
                normalize_std=config.grpo.normalize_std,
                skip_equal=config.grpo.equal_reward_groups == "skip",
            )
            timing["time/reward_s"] = time.perf_counter() - start

            batch = _batch(rollouts, adv_NxG.reshape(-1), keep_NxG.reshape(-1), config, tokenizer)
            start = time.perf_counter()
            device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
            if config.grpo.old_logp == "recompute":
                params_now = merge(state["trainable"], base)
                device_batch["old_logp_BxT"] = jnp.where(
                    device_batch["loss_mask_BxT"] > 0,
                    logprobs_fn(params_now, batch=device_batch),
                    0.0,
                )
            if config.grpo.beta:
                ref_params = reference if reference is not None else base
                device_batch["ref_logp_BxT"] = logprobs_fn(ref_params, batch=device_batch)
            else:
                device_batch["ref_logp_BxT"] = jnp.zeros_like(device_batch["old_logp_BxT"])
            timing["time/reference_s"] = time.perf_counter() - start

            start = time.perf_counter()
            order = np.random.default_rng([config.seed, step, 1]).permutation(rows)
            update_metrics = []
            for part in np.array_split(order, minibatches):
                mini = {k: v[part] for k, v in device_batch.items()}
                state, metrics = update(state, base, mini)
                update_metrics.append(metrics)
            fetched = jax.device_get(update_metrics)
            timing["time/update_s"] = time.perf_counter() - start

            last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
            last["logp_gap_max"] = float(max(m["logp_gap_max"] for m in fetched))
            if not np.isfinite(last["loss"]):
                raise TrainingError(
                    f"step {step + 1}: loss is {last['loss']}; stopping without saving "
                    f"(last good checkpoint: step {checkpoints.latest_step()})"
                )
            last.update(summarize([r.reward for r in results]))
            last.update(
                {f"loop/{k}": v for k, v in train_loop.metrics.items() if not k.endswith("_s")}
            )
            last.update(timing)
            last["groups_kept"] = float(keep_NxG[:, 0].sum())
            last["response_tokens"] = float(np.mean([r.num_generated for r in rollouts]))
            last["success_rate"] = float(np.mean([r.success for r in results]))
            if (step + 1) % config.train.log_every == 0 or step + 1 == steps:
                writer.write(step + 1, last)
            bar.set_postfix(reward=f"{last['reward/total']:.3f}", kl=f"{last['kl_ref']:.4f}")
            bar.update()
            is_last = step + 1 == steps
            if (step + 1) % config.train.checkpoint_every == 0 or is_last:
                checkpoints.save(step + 1, state, {"step": step + 1})
            every = config.train.eval_every
            if is_last or (every and (step + 1) % every == 0):
                summary["eval_after"] = run_eval(step + 1)
    finally:
        bar.close()
        checkpoints.wait()
        writer.close()
        cache.close()

    summary.update(steps=steps, **last)
    if config.train.export_hf:
        export_dir = workdir / "hf"
        if export_dir.exists() and jax.process_index() == 0:
            shutil.rmtree(export_dir)
        save_hf_checkpoint(model, merge(state["trainable"], base), export_dir)
        tokenizer_file = Path(config.tokenizer.spec or config.model.checkpoint) / "tokenizer.json"
        if tokenizer_file.exists() and jax.process_index() == 0:
            shutil.copy(tokenizer_file, export_dir / "tokenizer.json")
        summary["export"] = str(export_dir)
    return summary


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
    return rollouts_to_batch(
        [r.token_ids for r in rollouts],
        masks,
        [r.raw_logprobs for r in rollouts],
        np.where(keep_R, adv_R, 0.0),
        seq_len=config.loop.max_len,
        pad_id=tokenizer.pad_id,
    )
