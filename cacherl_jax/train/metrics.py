"""Training metrics: JSON lines next to the config, TensorBoard event files, parameter norms."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from cacherl_jax import fs


def global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


class MetricsWriter:
    """Appends one JSON object per logged step to `metrics.jsonl` and mirrors scalars to TensorBoard.

    On resume, lines from steps after the restored checkpoint (logged by a run that was killed
    before saving them) are dropped, so the file reads as one clean run.
    """

    def __init__(
        self, workdir: str | os.PathLike[str], *, resume_step: int = 0, enabled: bool = True
    ):
        self.path = fs.workdir_path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._tensorboard = None
        if not enabled:
            return
        if self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(
                str(fs.workdir_path(workdir) / "tensorboard"), purge_step=resume_step + 1
            )
        except ImportError:  # TensorBoard is optional; the JSON lines are the record
            self._tensorboard = None

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {
            "step": step,
            **{k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()},
        }
        fs.append_text(self.path, json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # unreadable (e.g. cut off by a kill): drop it


def read_metrics(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = fs.workdir_path(workdir) / "metrics.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if path.exists()
        else []
    )
