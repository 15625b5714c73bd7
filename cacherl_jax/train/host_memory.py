"""Giving memory the process has freed back to the operating system."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> bool:
    """Returns freed heap pages to the OS; False where the C library cannot (not glibc).

    Compiling a train step leaves XLA's compiler memory freed but still resident in glibc's
    arenas (0.42 GiB for the 29M benchmark model), and the step's own buffers then come on top:
    trimming between compilation and the first step lowered the SFT step's peak resident memory
    from 3.50 to 3.08 GiB there.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
