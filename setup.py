"""The one thing pyproject.toml does not say: the C and C++ extensions (setuptools' own table for
them there is still experimental). Both are optional: where one cannot be built the install goes
on and the code it speeds up runs in Python / XLA instead.

`cacherl_jax.agent._fuzzy_kernels` holds the tool cache's fuzzy-search inner loops, written
against Python's C API alone (`tool_cache.COMPILED` says whether it was built).

`cacherl_jax.sampling._cpu_kernels` holds XLA FFI custom calls: the CPU matmuls, attention and
whole decoder layers that decoding runs (`cpu_kernels.AVAILABLE` says whether they were built). It compiles against the FFI headers that
jaxlib ships, which is why jaxlib is a build requirement in pyproject.toml.
"""

import os
import warnings

from setuptools import Extension, setup


def _jaxlib_include() -> str | None:
    try:
        import jaxlib
    except ImportError:
        return None
    include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
    return include if os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")) else None


extensions = [
    Extension(
        "cacherl_jax.agent._fuzzy_kernels",
        sources=["cacherl_jax/agent/_fuzzy_kernels.c"],
        extra_compile_args=["-O2"],
        optional=True,
    )
]
jaxlib_include = _jaxlib_include()
if jaxlib_include is None:
    warnings.warn(
        "jaxlib's FFI headers not found: the CPU decode kernels are not built", stacklevel=1
    )
else:
    extensions.append(
        Extension(
            "cacherl_jax.sampling._cpu_kernels",
            sources=["cacherl_jax/sampling/_cpu_kernels.cc"],
            include_dirs=[jaxlib_include],
            language="c++",
            # -O3: the kernel's loops must be unrolled for its accumulators to live in registers.
            # -Wno-psabi: 64-byte vectors passed between always-inlined helpers, never across an ABI.
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-Wno-psabi"],
            optional=True,
        )
    )

setup(ext_modules=extensions)
