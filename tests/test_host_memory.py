"""release_freed_memory hands freed heap pages back to the OS."""

import ctypes

import pytest

from cacherl_jax.train import host_memory


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
    assert host_memory.release_freed_memory()
    assert before - _resident_bytes() > 100 * 2**20  # of the ~200 MiB freed


def test_without_malloc_trim_it_says_so(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(host_memory, "_malloc_trim", lambda: None)
    assert host_memory.release_freed_memory() is False
