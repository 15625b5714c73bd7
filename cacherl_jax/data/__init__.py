"""Training data: agent trajectories and the JSONL files that hold them."""

from cacherl_jax.data.trajectory import (
    ReadReport,
    Trajectory,
    TrajectoryError,
    load_jsonl,
    read_jsonl,
    write_jsonl,
)

__all__ = [
    "ReadReport",
    "Trajectory",
    "TrajectoryError",
    "load_jsonl",
    "read_jsonl",
    "write_jsonl",
]
