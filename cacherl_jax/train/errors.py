"""Errors a training command reports in one line (kept import-light for the CLI)."""


class TrainingError(RuntimeError):
    """Training cannot go on (bad data, diverged loss, bad batch shape): said in one line."""


class CheckpointMismatchError(TrainingError):
    """The workdir holds checkpoints of a different run, or none that can be read."""
