"""Errors a training command reports in one line (kept import-light for the CLI)."""

from cacherl_jax.errors import UserError


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (bad data, diverged loss, bad batch shape): said in one line."""


class CheckpointMismatchError(TrainingError):
    """The workdir holds checkpoints of a different run, or none that can be read."""
