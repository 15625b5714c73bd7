"""Host memory: release_freed_memory hands freed heap pages back to the OS, and the huge-pages
restart backs large blocks with 2 MiB pages (glibc; this CI runs on it)."""

import ctypes
import os
import subprocess
import sys

from cacherl_jax.train.host_memory import (
    HUGE_PAGES_SWITCH,
    HUGE_PAGES_TUNABLE,
    glibc_version,
    huge_pages_environment,
    release_freed_memory,
)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_freed_heap_memory_leaves_the_resident_set():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    # Many small blocks come from the heap (large ones would be mmapped and unmapped on free).
    blocks = [libc.malloc(4096) for _ in range(50_000)]
    for block in blocks:
        ctypes.memset(block, 1, 4096)  # touch: resident now
    for block in blocks:
        libc.free(block)
    before = _resident_bytes()
    assert release_freed_memory()
    assert before - _resident_bytes() > 100 * 2**20  # of the ~200 MiB freed


# --- transparent huge pages -----------------------------------------------------------------

GLIBC = (2, 36)


def test_huge_pages_environment_adds_the_tunable_once_and_respects_the_user():
    env = huge_pages_environment({"PATH": "/bin"}, libc=GLIBC)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}
    assert huge_pages_environment(env, libc=GLIBC) is None  # after the restart: nothing to do
    # Other tunables are kept, ours appended.
    env = huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, libc=GLIBC)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}"
    # The user's own choice of the tunable, the switch, and C libraries without it: untouched.
    assert huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, libc=GLIBC) is None
    assert huge_pages_environment({HUGE_PAGES_SWITCH: "0"}, libc=GLIBC) is None
    assert huge_pages_environment({}, libc=(2, 34)) is None


def test_glibc_version_is_read_here():
    assert glibc_version() >= (2, 35)  # this CI runs on Debian 12 (glibc 2.36)


_CHILD = """
import ctypes, os, resource
from cacherl_jax.train.host_memory import restart_with_huge_pages
print("started", flush=True)
restart_with_huge_pages()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 64 * 2**20  # above malloc's mmap threshold, as XLA's temporary buffers are
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(size), 1, size)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print("tunables", os.environ.get("GLIBC_TUNABLES"), "faults", faults)
"""


def _run_child(environ: dict[str, str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], env=environ, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_restart_with_huge_pages_reexecutes_once_and_the_faults_fall():
    environ = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    restarted = _run_child(environ)
    assert restarted[:5] == ["started", "started", "tunables", HUGE_PAGES_TUNABLE, "faults"]
    plain = _run_child({**environ, HUGE_PAGES_SWITCH: "0"})
    assert plain[:4] == ["started", "tunables", "None", "faults"]
    assert int(plain[4]) >= 64 * 2**20 // 4096  # one fault per 4 KiB page
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp_mode = f.read()
    if "[never]" not in thp_mode:  # huge pages on (`madvise` or `always`): one fault per 2 MiB
        assert int(restarted[5]) < 64 * 2**20 // 4096 // 10


def test_the_cli_restarts_only_for_commands_it_has():
    from cacherl_jax import cli

    commands = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert commands >= cli.XLA_COMMANDS
    assert {"tasks", "chat", "tokenizer"}.isdisjoint(cli.XLA_COMMANDS)
