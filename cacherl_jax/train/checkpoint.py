"""Train-state checkpoints with orbax: state, data-iterator position, and a fingerprint of the run.

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact; saves are asynchronous (training goes on while
the arrays are written). The fingerprint (model shape, LoRA, tokenizer, data shape) is stored next
to the steps so that a workdir holding another run's checkpoints is refused instead of resumed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from cacherl_jax import fs
from cacherl_jax.train.errors import CheckpointMismatchError

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"


class Checkpoints:
    def __init__(
        self,
        directory: str | Path,
        fingerprint: dict[str, Any],
        *,
        keep: int = 2,
        async_save: bool = True,
    ):
        self.directory = fs.workdir_path(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalised: tuples -> lists
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._check_fingerprint()

    def _check_fingerprint(self) -> None:
        stored_path = self.directory / FINGERPRINT_FILE
        if not self.manager.all_steps():
            return
        if not stored_path.exists():
            raise CheckpointMismatchError(
                f"{self.directory} holds checkpoints without {FINGERPRINT_FILE}; use a new workdir"
            )
        stored = json.loads(stored_path.read_text())
        if stored != self.fingerprint:
            differences = _differences(stored, self.fingerprint)
            raise CheckpointMismatchError(
                f"{self.directory} holds checkpoints of another configuration ({'; '.join(differences)}); "
                "use a new --workdir or the original config"
            )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        if jax.process_index() == 0 and not (self.directory / FINGERPRINT_FILE).exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / FINGERPRINT_FILE).write_text(
                json.dumps(self.fingerprint, indent=2) + "\n"
            )
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        )
        self.manager.save(step, args=args)

    def restore_latest(self, template: Any) -> tuple[Any, dict[str, Any], int] | None:
        """(state, data_state, step) from the newest readable checkpoint, shaped and sharded like
        `template`; None when there is none. An unreadable step is reported and the previous one tried."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template
        )
        errors = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
                    ),
                )
            except Exception as err:  # orbax raises many types for damaged files
                log.warning(
                    "checkpoint step %d in %s is unreadable (%s); trying an older one",
                    step,
                    self.directory,
                    err,
                )
                errors.append(f"step {step}: {type(err).__name__}: {err}")
                continue
            return restored.state, restored.data, step
        if errors:
            raise CheckpointMismatchError(
                f"{self.directory}: no readable checkpoint ({' | '.join(errors)})"
            )
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()


def _differences(stored: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(stored) | set(current)):
            out += _differences(stored.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return (
        []
        if stored == current
        else [f"{prefix.rstrip('.')}: checkpoint {stored!r}, config {current!r}"]
    )
