"""Preemption: a SIGTERM asks a run to save a checkpoint after its current step and exit cleanly.

Schedulers and spot VMs (Kubernetes, SLURM's `scancel`, a VM's shutdown) send SIGTERM to every
process of a job and SIGKILL a grace period later. The handler only sets a flag; the training
loop asks `requested()` after each step, saves, and returns, so the process exits 0 and rerunning
the same command resumes from that step.

Only SIGTERM is caught by default. SIGINT (Ctrl-C) keeps raising `KeyboardInterrupt`: someone at
a terminal who interrupts a run wants it to stop now, and the last periodic checkpoint is there
to resume from. Pass `signals=` to catch others (e.g. SIGUSR1 from `sbatch --signal`).

With several processes, each host may be signalled at a different step, or only some of them.
`requested()` agrees the flag with one tiny all-gather, so every host stops after the same step
and writes its part of the same checkpoint; every process must therefore call it equally often.
The gather waits for the step before it on the devices: one host-device sync per step.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class Preemption:
    """Context manager: while open, the `signals` only set a flag (their previous handlers are
    restored on exit). Opened outside the main thread, where Python cannot install handlers, it
    installs none but still agrees other processes' requests."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self._signalled = False
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        else:
            log.warning("not in the main thread: %s will not stop the run cleanly", self.signals)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self._signalled = True

    def requested(self) -> bool:
        """True on every process once any process was signalled: with several processes the flag
        is agreed with one tiny all-gather (`multihost_utils.process_allgather`) per call, so
        every host stops after the same step and saves the same checkpoint."""
        if jax.process_count() == 1:
            return self._signalled
        flags_P = multihost_utils.process_allgather(np.array(self._signalled, np.int32))
        return bool(np.any(flags_P))
