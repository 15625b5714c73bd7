"""Batched generation with a KV cache (`Sampler`), for rollouts, evaluation and serving."""

from cacherl_jax.sampling.kv_cache import KVCache, extend, init_cache
from cacherl_jax.sampling.sampler import (
    STOP_REASONS,
    DecodeState,
    Generation,
    Sampler,
    SamplingParams,
    bucket,
)

__all__ = [
    "STOP_REASONS",
    "DecodeState",
    "Generation",
    "KVCache",
    "Sampler",
    "SamplingParams",
    "bucket",
    "extend",
    "init_cache",
]
