"""The one thing pyproject.toml does not say: the C extension (setuptools' own table for it there
is still experimental).

`cacherl_jax.agent._fuzzy_kernels` holds the tool cache's fuzzy-search inner loops, written
against Python's C API alone. It is optional: where no C compiler is found the install goes on
and tool_cache.py runs the same search in Python (`tool_cache.COMPILED` says which);
tests/test_fuzzy_kernels.py checks that both give the same answers and that the install built it.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cacherl_jax.agent._fuzzy_kernels",
            sources=["cacherl_jax/agent/_fuzzy_kernels.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
