"""Decoding's matmuls and attention on CPU as XLA FFI custom calls (`_cpu_kernels.cc`).

Decoding multiplies every weight by a few activation columns (one per row of the batch), so on a
CPU it is a stream of the weights through the cores at small batches and a chain of skinny
matmuls at larger ones. XLA:CPU's matmul library re-lays out the weight on every call and
streams it at 7-15 GB/s at 8 columns. `packed_matmul` reads a weight packed once (`pack`: panels
of 16 output rows, each panel one contiguous block) with the accumulators of 8 columns x 2 panels
in registers, splitting the panels over XLA's intra-op threads: on the benchmark model's chain of
decode matmuls (experiments/bench_sampler.py's model, each matmul feeding the next) 6.7 -> 3.9 ms
at 8 columns (the weights at ~30 GB/s, this machine's read bandwidth) and 12.5 -> 10.1 ms at 32.

`decode_attention` is the rest of a decode step's attention block after the fused q/k/v
projection: the heads' RMSNorm and RoPE, the new key and value written into the cache, and the
attention over it. XLA's shapes are static, so its attention reads every slot of the cache every
step; the kernel reads the slots written so far (and a row's own slot), about two thirds of them
on average over a generation. One call instead of XLA's handful of small fusions per layer, and
keys and values read once for (up to four) query heads of a kv head, their scores and outputs in
registers: at batch 32 one call went 622 -> 493 us with the cache coming from memory, and with
the fused block a generation 22.5-23.0 -> 21.3-21.5 ms per step (old and new code alternately).

`decode_layer` runs a whole decoder layer of a decode step in one call when all four of its
matmuls are packed: the two RMSNorms, the matmuls, the attention block, silu(gate) x up and the
residual adds, its five parallel loops as phases on one set of threads (XLA's pool woken once per
layer, not once per matmul, and none of XLA's small fusions between the calls). Against the
per-op calls in one process, runs alternated (experiments/bench_sampler.py's model, batch 8,
twelve runs each, twice): best 5.72 -> 5.49 and 5.93 -> 5.82 ms per step, medians -2.5% and
+1.3%; batch 32 within noise. The step is bound by memory and arithmetic, not by the calls.

The sampler uses them where it can (`usable`): a CPU device, float32 compute, one device (the
custom calls are not partitioned over a mesh), and the extension built by the install (setup.py;
without a C++ compiler, XLA's own ops run). `CACHERL_CPU_KERNELS=0` turns them off; the
instruction set (AVX-512, AVX2 or portable C++) is picked when the extension loads and
`CACHERL_CPU_ISA=avx2|generic` caps it.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

try:
    from cacherl_jax.sampling import _cpu_kernels
except ImportError:  # built without a C++ compiler or without jaxlib's headers
    _cpu_kernels = None

AVAILABLE = _cpu_kernels is not None
PANEL = 16  # output rows per packed panel
_PREFIX = "cacherl_"


def usable(devices: list[jax.Device], compute_dtype) -> bool:
    """Whether a sampler running on `devices` in `compute_dtype` can use the kernel."""
    return (
        AVAILABLE
        and os.environ.get("CACHERL_CPU_KERNELS", "1") != "0"
        and len(devices) == 1
        and devices[0].platform == "cpu"
        and jnp.dtype(compute_dtype) == jnp.float32
    )


def packable(w_OxI: jax.Array) -> bool:
    """Float32, with whole pairs of panels (the kernel's AVX-512 block) of output rows."""
    return w_OxI.ndim == 2 and w_OxI.dtype == jnp.float32 and w_OxI.shape[0] % (2 * PANEL) == 0


def pack(w_OxI: jax.Array) -> jax.Array:
    """[O, I] -> [O / 16, I, 16]: panel p holds output rows 16p..16p+15, input-major."""
    O, I = w_OxI.shape
    return w_OxI.reshape(O // PANEL, PANEL, I).transpose(0, 2, 1)


def unpack(w_PxIx16: jax.Array) -> jax.Array:
    """The inverse of `pack`."""
    P, I, _ = w_PxIx16.shape
    return w_PxIx16.transpose(0, 2, 1).reshape(P * PANEL, I)


@functools.cache
def _registered() -> None:
    if not AVAILABLE:
        raise RuntimeError("cacherl_jax.sampling._cpu_kernels was not built (see setup.py)")
    for name, handler in _cpu_kernels.handlers().items():
        jax.ffi.register_ffi_target(_PREFIX + name, handler, platform="cpu")


def packed_matmul(w_PxIx16: jax.Array, x_IxN: jax.Array) -> jax.Array:
    """`unpack(w) @ x` in float32, [O, N], computed by the kernel (CPU only)."""
    P, I, panel = w_PxIx16.shape
    if panel != PANEL or x_IxN.shape[0] != I:
        raise ValueError(f"packed weight {w_PxIx16.shape} does not multiply x {x_IxN.shape}")
    _registered()
    out = jax.ShapeDtypeStruct((P * PANEL, x_IxN.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(_PREFIX + "packed_matmul", out)(
        w_PxIx16.astype(jnp.float32), x_IxN.astype(jnp.float32)
    )


def decode_attention(
    qkv_QxB: jax.Array,
    q_norm_D: jax.Array,
    k_norm_D: jax.Array,
    cos_DxB: jax.Array,
    sin_DxB: jax.Array,
    k_BxKxDxS: jax.Array,
    v_BxKxSxD: jax.Array,
    valid_BxS: jax.Array,
    q_slot: jax.Array,
    *,
    num_heads: int,
    eps: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A decode step's attention block, from the fused q/k/v projection to the heads' outputs,
    float32, with kv_cache.py's layouts; returns (out [H D, B], keys, values).

    `qkv_QxB` is [(H + 2K) D, B], feature-major (one new token per row). The kernel normalises
    and rotates the new queries and key (per-head RMSNorm with `q_norm_D` / `k_norm_D`, then
    RoPE with the row's `cos_DxB` / `sin_DxB` columns), writes the key and value into slot
    `q_slot` of the caches (updated in place: they are aliased to the results), and attends: each
    row's G query heads per kv head over the slots up to `q_slot` whose validity equals the query
    slot's, and its own slot (the mask of `kv_cache.extend` at T = 1). Slots after `q_slot` are
    not read, which XLA's static shapes cannot express: its attention reads the whole cache.
    """
    out = jax.ShapeDtypeStruct((num_heads * k_BxKxDxS.shape[2], k_BxKxDxS.shape[0]), jnp.float32)
    return _cache_call(
        "decode_attention",
        out,
        [qkv_QxB, q_norm_D, k_norm_D],
        cos_DxB,
        sin_DxB,
        k_BxKxDxS,
        v_BxKxSxD,
        valid_BxS,
        q_slot,
        num_heads=num_heads,
        eps=eps,
    )


def layer_fusable(layer: dict[str, jax.Array]) -> bool:
    """Whether `decode_layer` can run this sampling-layout layer: all four matmuls packed."""
    return all(layer[name].ndim == 3 for name in ("w_qkv", "wo", "w_gate_up", "w_down"))


def decode_layer(
    x_ExB: jax.Array,
    layer: dict[str, jax.Array],
    cos_DxB: jax.Array,
    sin_DxB: jax.Array,
    k_BxKxDxS: jax.Array,
    v_BxKxSxD: jax.Array,
    valid_BxS: jax.Array,
    q_slot: jax.Array,
    *,
    num_heads: int,
    eps: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A whole decoder layer for one new token per row, float32: returns (x [E, B], keys,
    values), the caches updated in place as in `decode_attention`.

    `layer` is a layer of `kv_cache.sampling_weights(packed=True)` with every matmul packed
    (`layer_fusable`). The kernel runs the attention RMSNorm, the fused q/k/v projection,
    `decode_attention`'s block, the output projection and residual, the MLP RMSNorm, gate/up,
    silu(gate) x up, the down projection and residual, in phases on one set of threads: one
    wake-up of XLA's pool per layer instead of one per matmul, and none of XLA's small fusions
    between them.
    """
    names = ["attn_norm", "w_qkv", "q_norm", "k_norm", "wo", "mlp_norm", "w_gate_up", "w_down"]
    return _cache_call(
        "decode_layer",
        jax.ShapeDtypeStruct(x_ExB.shape, jnp.float32),
        [x_ExB, *(layer[name] for name in names)],
        cos_DxB,
        sin_DxB,
        k_BxKxDxS,
        v_BxKxSxD,
        valid_BxS,
        q_slot,
        num_heads=num_heads,
        eps=eps,
    )


def _cache_call(
    name: str,
    out: jax.ShapeDtypeStruct,
    leading: list[jax.Array],
    cos_DxB: jax.Array,
    sin_DxB: jax.Array,
    k_BxKxDxS: jax.Array,
    v_BxKxSxD: jax.Array,
    valid_BxS: jax.Array,
    q_slot: jax.Array,
    *,
    num_heads: int,
    eps: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Calls a decode kernel: its own float32 inputs, then the ones both end with (RoPE tables,
    validity, the query slot, the caches aliased to results 1 and 2); returns (out, keys,
    values)."""
    _registered()
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    shapes = (
        out,
        jax.ShapeDtypeStruct(k_BxKxDxS.shape, jnp.float32),
        jax.ShapeDtypeStruct(v_BxKxSxD.shape, jnp.float32),
    )
    keys_index = len(leading) + 4
    call = jax.ffi.ffi_call(
        _PREFIX + name, shapes, input_output_aliases={keys_index: 1, keys_index + 1: 2}
    )
    return call(
        *map(f32, leading),
        f32(cos_DxB),
        f32(sin_DxB),
        jnp.asarray(valid_BxS, bool),
        jnp.asarray(q_slot, jnp.int32),
        f32(k_BxKxDxS),
        f32(v_BxKxSxD),
        num_heads=np.int64(num_heads),
        eps=np.float32(eps),
        scale=np.float32(k_BxKxDxS.shape[2] ** -0.5),
    )


def info() -> str:
    """One line for logs and benchmarks: whether the kernels were built, and for which
    instruction set."""
    if not AVAILABLE:
        return "cpu kernels: not built"
    return f"cpu kernels: {_cpu_kernels.instruction_set()}"
