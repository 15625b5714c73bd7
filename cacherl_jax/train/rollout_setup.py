"""What both RL trainers (GRPO, rejection-sampled SFT) set up before they sample: the tasks, the
tool cache, the agent loop's settings and its live environments, each read from the same config
blocks."""

from __future__ import annotations

import atexit
import functools
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
from jax.experimental import multihost_utils

from cacherl_jax import parallel
from cacherl_jax.agent import bfcl, tool_cache
from cacherl_jax.agent.environment import Environment, Task
from cacherl_jax.agent.factory import make_environment
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
    """The run's tool cache; `cache.build_from` trajectories are recorded into a new one.

    With several processes (or `cache.local_dir` set) each process opens its own copy on local
    disk (SQLite must not sit on a network filesystem): process 0 builds the run's cache first
    if it is new, then every process snapshots it (`CacheSync` keeps the copies in step).
    """
    path = config.cache.path or str(workdir / "tool_cache.sqlite")
    local_dir = config.cache.get("local_dir", "")
    private = jax.process_count() > 1 or bool(local_dir)
    if jax.process_index() == 0 or not private:
        cache = _open(config, path)
        if private:
            cache.close()
    if private:
        multihost_utils.sync_global_devices("tool cache built")
        if not local_dir:  # a temporary copy, removed when the process exits
            local_dir = tempfile.mkdtemp(prefix="cacherl-tool-cache-")
            atexit.register(shutil.rmtree, local_dir, ignore_errors=True)
        cache = _open(config, str(tool_cache.snapshot(path, local_dir)))
        log.info("tool cache: a local copy of %s in %s", path, local_dir)
    return cache


def _open(config: ml_collections.ConfigDict, path: str) -> ToolCache:
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


class CacheSync:
    """Hybrid mode on many processes: after each step every process's new entries are exchanged
    and applied in (step, process, row) order, so every copy holds what one process recording
    all rows would keep (the first result for a key wins); at a checkpoint process 0 publishes
    its copy as the run's cache. Nothing to do in the other modes or with a single cache file."""

    def __init__(self, config: ml_collections.ConfigDict, cache: ToolCache, workdir: Path):
        self.cache = cache
        self.master = config.cache.path or str(workdir / "tool_cache.sqlite")
        self.active = config.loop.mode == "hybrid" and Path(cache.config.path) != Path(self.master)
        self.mark = cache.mark() if self.active else 0

    def after_step(self, step: int) -> None:
        if not self.active:
            return
        own = tool_cache.take_delta(self.cache, self.mark, step=step, process=jax.process_index())
        payloads = parallel.allgather_objects(json.dumps(tool_cache.delta_to_json(own)))
        deltas = [tool_cache.delta_from_json(json.loads(p)) for p in payloads]
        tool_cache.sync(self.cache, self.mark, deltas)
        self.mark = self.cache.mark()

    def publish(self) -> None:
        """Process 0 replaces the run's cache by its (merged) copy."""
        if not self.active or jax.process_index() != 0:
            return
        staged = tool_cache.snapshot(self.cache.config.path, Path(self.master).parent / ".staging")
        staged.replace(self.master)


def loop_config(config: ml_collections.ConfigDict, *, evaluation: bool = False) -> LoopConfig:
    """The agent loop's settings (`config.loop`); for evaluation with `config.eval`'s samples,
    temperature and tool mode."""
    values = config.loop.to_dict()
    values.pop("tool_latency_s", None)  # the environments' option (`training_env`), not the loop's
    if evaluation:
        values.update(
            group_size=config.eval.samples,
            temperature=config.eval.temperature,
            mode=config.eval.mode,
        )
    return LoopConfig(**values)


def training_env(config: ml_collections.ConfigDict) -> Callable[[Task], Environment]:
    """The `make_env` of a training loop (`CacheAgentLoop(..., make_env=training_env(config))`):
    every live call sleeps `loop.tool_latency_s` seconds, a real API's latency, so a run measures
    what the cache saves. Evaluation loops keep the plain `make_environment`: the latency is a
    training-cost simulation, not part of what is scored."""
    latency_s = config.loop.get("tool_latency_s", 0.0)
    if not latency_s >= 0:
        raise TrainingError(f"loop.tool_latency_s must be >= 0 seconds, got {latency_s!r}")
    return functools.partial(make_environment, latency_s=latency_s)
