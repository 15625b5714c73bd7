"""Preemption: SIGTERM saves a checkpoint at the current step, exits 0, and the rerun resumes."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sft_data import addition_trajectories
from test_sft import REPO, _sft_command

from cacherl_jax.chat.trajectory import write_jsonl
from cacherl_jax.train.metrics import read_metrics
from cacherl_jax.train.preemption import Preemption

STEPS = 24  # the SIGTERM lands a step or two after the first, long before the last
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def test_sigterm_only_sets_the_flag_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with Preemption() as preemption:
        assert not preemption.requested()
        signal.raise_signal(signal.SIGTERM)  # the process lives on: the handler only records it
        assert preemption.requested()
        assert preemption.requested()  # stays requested
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is not caught


def test_outside_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGTERM)
    results = []

    def open_and_ask():
        with Preemption() as preemption:
            results.append((signal.getsignal(signal.SIGTERM), preemption.requested()))

    thread = threading.Thread(target=open_and_ask)
    thread.start()
    thread.join()
    assert results == [(before, False)]


# Process 0 alone is signalled, before its 5th question; both must stop after that same step.
AGREE = """
import signal, sys
import jax
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from cacherl_jax.train.preemption import Preemption
with Preemption() as preemption:
    for step in range(1, 100):
        if jax.process_index() == 0 and step == 5:
            signal.raise_signal(signal.SIGTERM)
        if preemption.requested():
            print("stopped after", step)
            break
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_every_process_stops_after_the_step_any_was_signalled_at(processes):
    address = f"127.0.0.1:{_free_port()}"
    env = ENV | {"JAX_NUM_CPU_DEVICES": "2"}
    for index in range(2):
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", AGREE, address, str(index)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [process.communicate(timeout=60) for process in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
    assert [out.splitlines()[-1] for out, _ in outputs] == ["stopped after 5"] * 2  # gloo logs too


def _overrides(data_file: Path) -> list[str]:
    return [
        f"--config.data.train={data_file}",
        "--config.data.seq_len=256",
        "--config.data.batch_size=4",
        "--config.tokenizer.train_vocab_size=512",
        f"--config.train.steps={STEPS}",
        "--config.train.log_every=1",  # a loss for every step to compare
        "--config.train.checkpoint_every=10",
        "--config.train.warmup_steps=2",
        "--config.model.unroll_layers=false",
        "--config.mesh.fsdp=1",
    ]


def _start(data_file: Path, workdir: Path, compile_cache: Path) -> subprocess.Popen:
    # Compilation takes most of a run's time: the first run fills a cache that the others read.
    env = ENV | {
        "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    return subprocess.Popen(
        _sft_command(_overrides(data_file), workdir),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _losses(workdir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(workdir)}


@pytest.fixture
def processes():
    """Subprocesses a test starts; any still running when it ends (a failed assert) are killed."""
    started = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.slow
def test_sigterm_mid_run_saves_exits_0_and_the_rerun_matches_an_uninterrupted_run(
    tmp_path, processes
):
    data_file = tmp_path / "train.jsonl"
    write_jsonl(data_file, addition_trajectories(48))
    straight_dir, preempted_dir = tmp_path / "straight", tmp_path / "preempted"
    compile_cache = tmp_path / "compile_cache"
    preempted = _start(data_file, preempted_dir, compile_cache)
    processes.append(preempted)
    deadline = time.time() + 120
    while not read_metrics(preempted_dir) and preempted.poll() is None:
        assert time.time() < deadline, "no metrics line within 120 s"
        time.sleep(0.05)
    preempted.send_signal(signal.SIGTERM)
    out, err = preempted.communicate(timeout=120)
    assert preempted.returncode == 0, err
    stopped = json.loads(out.splitlines()[-1])["preempted_at"]
    assert 1 <= stopped < STEPS, "SIGTERM came too late: the run had finished"
    assert f"preempted: saved step {stopped}, exiting; rerun the same command to resume" in err
    assert (preempted_dir / "checkpoints" / str(stopped)).is_dir()
    assert not (preempted_dir / "hf").exists()  # an interrupted run exports nothing
    assert max(_losses(preempted_dir)) == stopped  # metrics were written up to the saved step

    # The rerun, and the uninterrupted reference beside it.
    rerun = _start(data_file, preempted_dir, compile_cache)
    straight = _start(data_file, straight_dir, compile_cache)
    processes.extend([rerun, straight])
    outputs = [process.communicate(timeout=180) for process in (rerun, straight)]
    for process, (_, err) in zip((rerun, straight), outputs, strict=True):
        assert process.returncode == 0, err
    assert json.loads(outputs[0][0].splitlines()[-1])["resumed_from"] == stopped
    reference, resumed = _losses(straight_dir), _losses(preempted_dir)
    assert sorted(reference) == sorted(resumed) == list(range(1, STEPS + 1))
    later = list(range(stopped + 1, STEPS + 1))
    np.testing.assert_allclose(
        [resumed[s] for s in later], [reference[s] for s in later], rtol=0, atol=1e-5
    )
    assert (preempted_dir / "hf").is_dir()
