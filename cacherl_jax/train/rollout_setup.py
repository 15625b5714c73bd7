"""What both RL trainers (GRPO, rejection-sampled SFT) set up before they sample: the tasks, the
tool cache and the agent loop's settings, each read from the same config blocks."""

from __future__ import annotations

import logging
from pathlib import Path

import ml_collections

from cacherl_jax.agent import bfcl
from cacherl_jax.agent.environment import Task
from cacherl_jax.agent.loop import LoopConfig
from cacherl_jax.agent.procedural import generate_tasks
from cacherl_jax.agent.tool_cache import ToolCache, ToolCacheConfig, build_from_trajectories
from cacherl_jax.chat.trajectory import load_jsonl
from cacherl_jax.train.errors import TrainingError

log = logging.getLogger(__name__)


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
        return _tasks_from_jsonl(spec.path, spec.n)
    if spec.source == "bfcl":
        return bfcl.load_tasks(spec.path or "multi_turn_base", limit=spec.n or None)
    raise TrainingError(f"tasks.source must be procedural, jsonl or bfcl, got {spec.source!r}")


def _tasks_from_jsonl(path: str, n: int) -> list[Task]:
    trajectories, _ = load_jsonl(path)
    tasks = []
    for trajectory in trajectories:
        if "task" not in trajectory.metadata:
            raise TrainingError(
                f"{path}: trajectory {trajectory.id!r} has no metadata.task "
                "(write tasks with `cacherl tasks`)"
            )
        tasks.append(Task.from_dict(trajectory.metadata["task"]))
    return tasks[:n] if n else tasks


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
    """The agent loop's settings (`config.loop`); for evaluation with `config.eval`'s samples,
    temperature and tool mode."""
    values = config.loop.to_dict()
    if evaluation:
        values.update(
            group_size=config.eval.samples,
            temperature=config.eval.temperature,
            mode=config.eval.mode,
        )
    return LoopConfig(**values)
