"""Runs a `cacherl` command as N processes x D simulated CPU devices, the way a pod runs one
process per host: `jax.distributed` with the coordinator on 127.0.0.1 and gloo collectives."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHERL = [sys.executable, "-m", "cacherl_jax.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_flags(port: int, process: int, processes: int) -> list[str]:
    """The distributed block of a config command (`sft`, `grpo`, `rft`)."""
    prefix = "--config.distributed."
    return [
        f"{prefix}enabled=True",
        f"{prefix}coordinator_address=127.0.0.1:{port}",
        f"{prefix}num_processes={processes}",
        f"{prefix}process_id={process}",
    ]


def eval_flags(port: int, process: int, processes: int) -> list[str]:
    return [
        "--distributed",
        f"--coordinator-address=127.0.0.1:{port}",
        f"--num-processes={processes}",
        f"--process-id={process}",
    ]


@dataclasses.dataclass
class Result:
    returncodes: list[int]
    outputs: list[str]  # stdout + stderr of each process

    def check(self) -> Result:
        for p, (code, out) in enumerate(zip(self.returncodes, self.outputs, strict=True)):
            assert code == 0, f"process {p} exited {code}:\n{out[-4000:]}"
        return self

    def last_json_lines(self) -> list[str]:
        """Each process's last stdout line starting with `{` (the commands' summaries)."""
        return [[ln for ln in out.splitlines() if ln.startswith("{")][-1] for out in self.outputs]


class Launch:
    """Started processes; `wait` collects them, `kill` stops them all (SIGKILL)."""

    def __init__(self, procs: list[subprocess.Popen], logs: list[Path]):
        self.procs, self.logs = procs, logs

    def wait(self, timeout: float = 600) -> Result:
        deadline = time.monotonic() + timeout
        try:
            for proc in self.procs:
                proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"timed out after {timeout} s (deadlock?):\n{self._tails()}"
            ) from None
        return Result([p.returncode for p in self.procs], [log.read_text() for log in self.logs])

    def kill(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()

    def _tails(self) -> str:
        return "\n".join(
            f"--- process {i}\n{log.read_text()[-2000:]}" for i, log in enumerate(self.logs)
        )


def launch(
    args: Sequence[str],
    *,
    processes: int,
    devices: int,
    logs: Path,
    flags: Callable[[int, int, int], list[str]] = config_flags,
    compilation_cache: Path | None = None,
) -> Launch:
    """Starts `cacherl ARGS` as `processes` processes of `devices` CPU devices each (one process:
    no distributed flags). Output goes to `logs`/process_<i>.log. `compilation_cache`: a
    persistent XLA cache shared by the runs of a test module (the same programs compile once;
    a cached executable computes what a fresh one does)."""
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu")
    if compilation_cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(compilation_cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    env.pop("XLA_FLAGS", None)
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, paths = [], []
    for process in range(processes):
        extra = flags(port, process, processes) if processes > 1 else []
        path = logs / f"process_{process}.log"
        with path.open("w") as out:
            procs.append(
                subprocess.Popen(
                    [*CACHERL, *args, *extra],
                    cwd=REPO,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        paths.append(path)
    return Launch(procs, paths)


def run(
    args: Sequence[str], *, processes: int, devices: int, logs: Path, timeout: float = 600, **kw
) -> Result:
    return launch(args, processes=processes, devices=devices, logs=logs, **kw).wait(timeout).check()
