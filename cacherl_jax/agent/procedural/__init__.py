"""The procedural task suite: four small tool domains (currency, calendar, files, shop) with
dependent multi-call tasks, a reference solver and held-out splits, sized for CPU-scale runs."""

from cacherl_jax.agent.procedural.environment import DOMAINS, ProceduralEnvironment
from cacherl_jax.agent.procedural.solver import (
    plan_only_trajectory,
    reference_trajectory,
    write_trajectories,
)
from cacherl_jax.agent.procedural.suite import SPLITS, SYSTEM_PROMPT, all_kinds, generate_tasks

__all__ = [
    "DOMAINS",
    "SPLITS",
    "SYSTEM_PROMPT",
    "ProceduralEnvironment",
    "all_kinds",
    "generate_tasks",
    "plan_only_trajectory",
    "reference_trajectory",
    "write_trajectories",
]
