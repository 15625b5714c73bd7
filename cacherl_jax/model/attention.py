"""Every attention implementation of the model, and the one place that picks between them.

Two entry points, both grouped-query (H query heads share K key/value heads, H a multiple of K),
scaled by `head_dim ** -0.5`, with a boolean mask (True: the query may attend to the key) in
which every query row keeps at least one key:

- `self_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, mask_BxTxT, config)`: the training forward.
  Keys are the queries' own sequence and the mask is causal by index (segments may cut it
  further), so query blocks may skip the keys after their end.
- `cached_attention(q_BxTxHxD, k_cache, v_BxKxSxD, mask_BxTxS, config)`: T new queries against
  the S slots of a KV cache: values stored [batch, kv heads, slots, head dim], keys the same or,
  where `keys_transposed(config)`, [batch, kv heads, head dim, slots].

Both return [B, T, H, D] in the queries' dtype; softmax runs in float32.

`implementation(config)` is the only place that chooses: `config.attention_impl` when it names
one, else by the platform of the devices the program is traced for: the mesh set with
`jax.set_mesh` (a TPU topology's devices say "tpu" even on a CPU machine), else JAX's default
backend.

- "xla": `jax.nn.dot_product_attention` with its default (XLA) implementation, queries in
  blocks of `config.attention_block`.
- "cpu_blocked" (CPU): the same mathematics written for XLA's CPU backend: the G query heads of a
  kv head stacked as the rows of one matmul per (batch, kv head), query blocks that skip the keys
  after their end, and (on one device) a hand-written backward pass that goes pair by pair. Its
  cache keeps keys transposed, [D, S] per (batch, kv head), so that a decode step's scores are
  [G*T, D] x [D, S] and its output [G*T, S] x [S, D], both on contiguous row-major operands.
- "splash" (TPU): the Pallas splash-attention kernel
  (`jax.experimental.pallas.ops.tpu.splash_attention`) with a causal mask and `SegmentIds`
  (recovered from the mask by a min-reduce), so no [T, S] logits reach HBM; under a mesh it
  runs per device (`shard_map`, batch and heads split as the arrays are). Rows whose length no
  tile divides, and cached attention (prefill over a cache, decode), take "xla"'s form.
- "cudnn" (GPU): cuDNN's fused kernel through
  `jax.nn.dot_product_attention(implementation="cudnn")` where its constraints hold (bfloat16
  or float16, head_dim a multiple of 8 and at most 128, even lengths), else "xla". The mask
  reaches cuDNN as a [B, 1, T, S] bias: no [B, H, T, S] logits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from cacherl_jax.model.config import Qwen3Config


def implementation(config: Qwen3Config) -> str:
    """The implementation to run: `config.attention_impl`, or for "auto" the platform's."""
    if config.attention_impl != "auto":
        return config.attention_impl
    return _PLATFORM_CHOICE.get(platform(), "xla")


def platform() -> str:
    """The platform the program is traced for: the current mesh's devices (`jax.set_mesh`),
    else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def self_attention(
    q_BxTxHxD: jax.Array,
    k_BxTxKxD: jax.Array,
    v_BxTxKxD: jax.Array,
    mask_BxTxT: jax.Array,
    config: Qwen3Config,
) -> jax.Array:
    """Attention of a sequence over itself, the mask causal by index (module docstring)."""
    impl = _IMPLEMENTATIONS[implementation(config)]
    return impl.self_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, mask_BxTxT, config)


def keys_transposed(config: Qwen3Config) -> bool:
    """Whether the implementation's KV cache stores keys [B, K, D, S] rather than [B, K, S, D]."""
    return _IMPLEMENTATIONS[implementation(config)].keys_transposed


def cached_attention(
    q_BxTxHxD: jax.Array,
    k_cache: jax.Array,
    v_BxKxSxD: jax.Array,
    mask_BxTxS: jax.Array,
    config: Qwen3Config,
) -> jax.Array:
    """Attention of T queries over the S slots of a cache, keys laid out as `keys_transposed`
    says (module docstring)."""
    impl = _IMPLEMENTATIONS[implementation(config)]
    return impl.cached_attention(q_BxTxHxD, k_cache, v_BxKxSxD, mask_BxTxS, config)


# --- "xla": jax.nn.dot_product_attention ---------------------------------------------------------


def _xla_self_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, mask_BxTxT, config):
    """Queries in blocks of `config.attention_block`, each against the keys up to its end: the
    blocks above the diagonal are all masked, so skipping them is exact and halves the work."""
    T = q_BxTxHxD.shape[1]
    outs = []
    for start, stop in _query_blocks(T, config.attention_block or T):
        outs.append(
            _dot_product_attention(
                q_BxTxHxD[:, start:stop],
                k_BxTxKxD[:, :stop],
                v_BxTxKxD[:, :stop],
                mask_BxTxT[:, start:stop, :stop],
                config,
            )
        )
    return jnp.concatenate(outs, axis=1)


def _xla_cached_attention(q_BxTxHxD, k_BxKxSxD, v_BxKxSxD, mask_BxTxS, config):
    # The transposes fold into the attention's matmuls (XLA's transpose folding).
    k_BxSxKxD = k_BxKxSxD.transpose(0, 2, 1, 3)
    v_BxSxKxD = v_BxKxSxD.transpose(0, 2, 1, 3)
    return _dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS, config)


def _dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS, config) -> jax.Array:
    # Grouped-query attention is native: H query heads share K key/value heads.
    return jax.nn.dot_product_attention(
        q_BxTxHxD,
        k_BxSxKxD,
        v_BxSxKxD,
        mask=mask_BxTxS[:, None, :, :],
        scale=config.head_dim**-0.5,
    )


# --- "cpu_blocked": grouped rows, blocked causal pairs ---------------------------------------------


def _cpu_self_attention(
    q_BxTxHxD: jax.Array,
    k_BxTxKxD: jax.Array,
    v_BxTxKxD: jax.Array,
    mask_BxTxT: jax.Array,
    config: Qwen3Config,
    one_pair_at_a_time: bool | None = None,
) -> jax.Array:
    """Blocked causal attention for XLA's CPU backend.

    The G query heads that share a key/value head are stacked as rows, so each (batch, kv head)
    pair attends with [G*Q, D] x [D, S] matmuls on contiguous operands (the transposes fuse into
    RoPE), and the scale goes on q (T*D multiplies, not T*S). Queries go in blocks of
    `config.attention_block`, each against the keys up to its own end.

    `one_pair_at_a_time` (default: when this process sees one device) runs the pairs in turn with
    a hand-written backward pass (`_pair_attention`: faster on one CPU, less memory). Across
    devices the loop would gather the batch onto every device (XLA partitions a loop over a
    sharded axis by replicating it), so there the pairs go through the batched form below.
    """
    B, T, H, D = q_BxTxHxD.shape
    K = k_BxTxKxD.shape[2]
    G = H // K
    block = min(config.attention_block or T, T)
    scale = jnp.asarray(config.head_dim**-0.5, q_BxTxHxD.dtype)
    q_BxKxGxTxD = (q_BxTxHxD * scale).reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)
    k_BxKxTxD = k_BxTxKxD.transpose(0, 2, 1, 3)
    v_BxKxTxD = v_BxTxKxD.transpose(0, 2, 1, 3)
    if one_pair_at_a_time is None:
        one_pair_at_a_time = jax.device_count() == 1
    if one_pair_at_a_time:  # N = B * K (batch, kv head) pairs
        out_NxGxTxD = _pair_attention(
            q_BxKxGxTxD.reshape(B * K, G, T, D),
            k_BxKxTxD.reshape(B * K, T, D),
            v_BxKxTxD.reshape(B * K, T, D),
            mask_BxTxT,
            block,
        )
        out_BxKxGxTxD = out_NxGxTxD.reshape(B, K, G, T, D)
    else:
        out_BxKxGxTxD = _batched_attention(q_BxKxGxTxD, k_BxKxTxD, v_BxKxTxD, mask_BxTxT, block)
    return out_BxKxGxTxD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def _cpu_cached_attention(q_BxTxHxD, k_BxKxDxS, v_BxKxSxD, mask_BxTxS, config):
    """T queries over every cache slot (keys transposed), the group's heads stacked as rows of
    one matmul per (batch, kv head); no query blocks, since the cache's slots are not the
    queries' sequence."""
    B, T, H, D = q_BxTxHxD.shape
    K = k_BxKxDxS.shape[1]
    scale = jnp.asarray(config.head_dim**-0.5, q_BxTxHxD.dtype)
    q_BxKxGxTxD = (q_BxTxHxD * scale).reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)
    out_BxKxGxTxD = _grouped_softmax_attention(
        q_BxKxGxTxD, k_BxKxDxS, v_BxKxSxD, mask_BxTxS, keys_transposed=True
    )
    return out_BxKxGxTxD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def _grouped_softmax_attention(q_BxKxGxQxD, k, v_BxKxSxD, mask_BxQxS, keys_transposed=False):
    """Scaled queries of every (batch, kv head) pair over its keys (`k` [B, K, S, D], or
    [B, K, D, S] if `keys_transposed`), the G heads stacked as rows (R = G * Q); normalised after
    the value matmul (a [Q, D] divide, not [Q, S])."""
    B, K, G, Q, D = q_BxKxGxQxD.shape
    S = v_BxKxSxD.shape[2]
    logits_BxKxRxS = jnp.einsum(
        "bkrd,bkds->bkrs" if keys_transposed else "bkrd,bksd->bkrs",
        q_BxKxGxQxD.reshape(B, K, G * Q, D),
        k,
        preferred_element_type=jnp.float32,
    )
    logits_BxKxGxQxS = jnp.where(
        mask_BxQxS[:, None, None], logits_BxKxRxS.reshape(B, K, G, Q, S), -jnp.inf
    )
    # Every row keeps at least one key, so the max is finite.
    max_BxKxGxQx1 = lax.stop_gradient(jnp.max(logits_BxKxGxQxS, axis=-1, keepdims=True))
    exp_BxKxGxQxS = jnp.exp(logits_BxKxGxQxS - max_BxKxGxQx1)
    sum_BxKxGxQx1 = jnp.sum(exp_BxKxGxQxS, axis=-1, keepdims=True)
    out_BxKxRxD = jnp.einsum(
        "bkrs,bksd->bkrd",
        exp_BxKxGxQxS.reshape(B, K, G * Q, S).astype(v_BxKxSxD.dtype),
        v_BxKxSxD,
        preferred_element_type=jnp.float32,
    )
    out_BxKxGxQxD = out_BxKxRxD.reshape(B, K, G, Q, D) / sum_BxKxGxQx1
    return out_BxKxGxQxD.astype(q_BxKxGxQxD.dtype)


def _batched_attention(q_BxKxGxTxD, k_BxKxTxD, v_BxKxTxD, mask_BxTxT, block):
    """All pairs at once, differentiated by autodiff, each query block against the keys up to
    its end."""
    outs = []
    for start, stop in _query_blocks(q_BxKxGxTxD.shape[3], block):
        outs.append(
            _grouped_softmax_attention(
                q_BxKxGxTxD[:, :, :, start:stop],
                k_BxKxTxD[:, :, :stop],
                v_BxKxTxD[:, :, :stop],
                mask_BxTxT[:, start:stop, :stop],
            )
        )
    return jnp.concatenate(outs, axis=3)


def _query_blocks(T: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, T)) for start in range(0, T, block)]


def _pair_logits(q_GxQxD: jax.Array, k_SxD: jax.Array, mask_QxS: jax.Array) -> jax.Array:
    """Masked float32 logits [G, Q, S] of one query block against the keys before its end."""
    G, Q, D = q_GxQxD.shape
    logits_RxS = jnp.matmul(
        q_GxQxD.reshape(G * Q, D), k_SxD.T, preferred_element_type=jnp.float32
    )  # R = G * Q rows: the group's heads stacked
    return jnp.where(mask_QxS, logits_RxS.reshape(G, Q, -1), -jnp.inf)


def _pair_forward(q_GxTxD, k_TxD, v_TxD, mask_TxT, block):
    """One (batch, kv head) pair: (out [G, T, D], row max [G, T, 1], 1 / row sum [G, T, 1])."""
    G, T, D = q_GxTxD.shape
    outs, maxes, inverse_sums = [], [], []
    for start, stop in _query_blocks(T, block):
        Q = stop - start
        logits_GxQxS = _pair_logits(
            q_GxTxD[:, start:stop], k_TxD[:stop], mask_TxT[start:stop, :stop]
        )
        # Every row keeps at least its own key, so the max is finite.
        max_GxQx1 = jnp.max(logits_GxQxS, axis=-1, keepdims=True)
        exp_GxQxS = jnp.exp(logits_GxQxS - max_GxQx1)
        inverse_sum_GxQx1 = 1.0 / jnp.sum(exp_GxQxS, axis=-1, keepdims=True)
        # Normalised after the value matmul: a [Q, D] multiply, not [Q, S].
        out_RxD = jnp.matmul(
            exp_GxQxS.reshape(G * Q, stop).astype(v_TxD.dtype),
            v_TxD[:stop],
            preferred_element_type=jnp.float32,
        )
        outs.append((out_RxD.reshape(G, Q, D) * inverse_sum_GxQx1).astype(q_GxTxD.dtype))
        maxes.append(max_GxQx1)
        inverse_sums.append(inverse_sum_GxQx1)
    return (
        jnp.concatenate(outs, axis=1),
        jnp.concatenate(maxes, axis=1),
        jnp.concatenate(inverse_sums, axis=1),
    )


def _pair_backward(
    q_GxTxD, k_TxD, v_TxD, out_GxTxD, max_GxTx1, inverse_sum_GxTx1, d_out_GxTxD, mask_TxT, block
):
    """Gradients (dq, dk, dv) of one pair, the softmax recomputed from the saved row stats.

    dk and dv are accumulated transposed, [D, T], as `q^T @ d logits` and `d out^T @ p`: XLA's
    CPU backend runs a matmul contracting both operands' first axes (`d logits^T @ q`) on a
    slower path than the plain form with a small [D, R] operand transposed first."""
    G, T, D = q_GxTxD.shape
    f32 = jnp.float32
    dq_blocks = []
    d_k_transposed_DxT = jnp.zeros((D, T), f32)
    d_v_transposed_DxT = jnp.zeros((D, T), f32)
    for start, stop in _query_blocks(T, block):
        Q = stop - start
        R = G * Q
        q_GxQxD = q_GxTxD[:, start:stop]
        logits_GxQxS = _pair_logits(q_GxQxD, k_TxD[:stop], mask_TxT[start:stop, :stop])
        p_GxQxS = (
            jnp.exp(logits_GxQxS - max_GxTx1[:, start:stop]) * inverse_sum_GxTx1[:, start:stop]
        )
        d_out_GxQxD = d_out_GxTxD[:, start:stop]
        # Softmax backward: d logits = p * (d p - rowsum(d out * out)).
        delta_GxQx1 = jnp.sum(
            d_out_GxQxD.astype(f32) * out_GxTxD[:, start:stop].astype(f32), axis=-1, keepdims=True
        )
        d_out_RxD = d_out_GxQxD.reshape(R, D).astype(v_TxD.dtype)
        d_p_RxS = jnp.matmul(d_out_RxD, v_TxD[:stop].T, preferred_element_type=f32)
        d_logits_GxQxS = p_GxQxS * (d_p_RxS.reshape(G, Q, stop) - delta_GxQx1)
        d_logits_RxS = d_logits_GxQxS.reshape(R, stop).astype(q_GxTxD.dtype)
        p_RxS = p_GxQxS.reshape(R, stop).astype(v_TxD.dtype)
        d_v_transposed_DxT = d_v_transposed_DxT.at[:, :stop].add(
            jnp.matmul(d_out_RxD.T, p_RxS, preferred_element_type=f32)
        )
        dq_RxD = jnp.matmul(d_logits_RxS, k_TxD[:stop], preferred_element_type=f32)
        dq_blocks.append(dq_RxD.reshape(G, Q, D))
        d_k_transposed_DxT = d_k_transposed_DxT.at[:, :stop].add(
            jnp.matmul(q_GxQxD.reshape(R, D).T, d_logits_RxS, preferred_element_type=f32)
        )
    dq_GxTxD = jnp.concatenate(dq_blocks, axis=1)
    return (
        dq_GxTxD.astype(q_GxTxD.dtype),
        d_k_transposed_DxT.T.astype(k_TxD.dtype),
        d_v_transposed_DxT.T.astype(v_TxD.dtype),
    )


def _map_pairs(fn, mask_BxTxT: jax.Array, *pairs_N: jax.Array):
    """`fn(*pair, mask)` for each (batch, kv head) pair in turn, the mask row taken by batch."""
    N, B = pairs_N[0].shape[0], mask_BxTxT.shape[0]
    K = N // B

    def one(xs):
        n, *pair = xs
        return fn(*pair, lax.dynamic_index_in_dim(mask_BxTxT, n // K, keepdims=False))

    return lax.map(one, (jnp.arange(N), *pairs_N))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _pair_attention(q_NxGxTxD, k_NxTxD, v_NxTxD, mask_BxTxT, block):
    """Blocked causal attention of every (batch, kv head) pair, one pair at a time.

    One pair's logits block fits in a core's L2 cache at training shapes, so the masking,
    softmax and both matmuls of a block run on cached data, where over the whole batch at once
    every [R, S] pass streams from memory. The backward pass recomputes each block's softmax
    from the saved row max and sum (flash-attention style) instead of keeping every block's
    exponentials.
    """
    return _pair_attention_fwd(q_NxGxTxD, k_NxTxD, v_NxTxD, mask_BxTxT, block)[0]


def _pair_attention_fwd(q_NxGxTxD, k_NxTxD, v_NxTxD, mask_BxTxT, block):
    forward = functools.partial(_pair_forward, block=block)
    out_NxGxTxD, max_NxGxTx1, inverse_sum_NxGxTx1 = _map_pairs(
        forward, mask_BxTxT, q_NxGxTxD, k_NxTxD, v_NxTxD
    )
    pairs = (q_NxGxTxD, k_NxTxD, v_NxTxD, out_NxGxTxD, max_NxGxTx1, inverse_sum_NxGxTx1)
    return out_NxGxTxD, (mask_BxTxT, pairs)


def _pair_attention_bwd(block, residuals, d_out_NxGxTxD):
    mask_BxTxT, pairs = residuals
    backward = functools.partial(_pair_backward, block=block)
    dq, dk, dv = _map_pairs(backward, mask_BxTxT, *pairs, d_out_NxGxTxD)
    return dq, dk, dv, None


_pair_attention.defvjp(_pair_attention_fwd, _pair_attention_bwd)


# --- "splash": the TPU kernel, causal mask and segment ids -------------------------------------------

# Query/key tile sizes tried in order; the first that divides T is used.
_SPLASH_BLOCKS = (512, 256, 128)


def _splash_self_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, mask_BxTxT, config):
    """Splash attention per device: causal by index, within segments. The segment ids are
    recovered from the mask (a token's id: the first key it may see, i.e. where its segment
    starts), so they say exactly what the mask says."""
    T = q_BxTxHxD.shape[1]
    block = next((b for b in _SPLASH_BLOCKS if T % b == 0), None)
    if block is None:  # the kernel tiles T; short or odd rows take the XLA path
        return _xla_self_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, mask_BxTxT, config)
    # A plain min-reduce (not argmax's two-output one) fuses with the mask's producer, so the
    # [B, T, T] mask need not be written out.
    key_index_T = jnp.arange(T, dtype=jnp.int32)
    segment_ids_BxT = jnp.min(jnp.where(mask_BxTxT, key_index_T, T), axis=-1)
    scale = jnp.asarray(config.head_dim**-0.5, q_BxTxHxD.dtype)
    attend = functools.partial(_splash_local, block=block)
    args = (q_BxTxHxD * scale, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return attend(*args)
    # A Pallas kernel is not partitioned by XLA: run it on each device's share of the batch
    # and heads.
    batch, heads = _splash_axes(mesh, q_BxTxHxD.shape[0], q_BxTxHxD.shape[2], k_BxTxKxD.shape[2])
    qkv_spec = jax.sharding.PartitionSpec(batch, None, heads, None)
    segment_spec = jax.sharding.PartitionSpec(batch, None)
    return jax.shard_map(
        attend,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, segment_spec),
        out_specs=qkv_spec,
        check_vma=False,
    )(*args)


def _splash_axes(mesh, B: int, H: int, K: int):
    """Mesh axes of the batch (`parallel.DEFAULT_RULES`' `batch`: data, fsdp) and of the heads
    (`tensor`), each kept only where it divides the dimension."""
    batch: list[str] = []
    for axis in ("data", "fsdp"):
        size = mesh.shape.get(axis, 1)
        if size > 1 and B % (size * _prod(mesh, batch)) == 0:
            batch.append(axis)
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and H % tensor == 0 and K % tensor == 0 else None
    return (tuple(batch) or None), heads


def _prod(mesh, axes) -> int:
    size = 1
    for axis in axes:
        size *= mesh.shape[axis]
    return size


def _splash_local(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, *, block: int):
    """The kernel over one device's arrays: per example [heads, T, D], queries pre-scaled."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    _, T, H, _ = q_BxTxHxD.shape
    kernel = _splash_kernel(H, T, block)

    def attend(q_BxHxTxD, k_BxKxTxD, v_BxKxTxD, segment_ids_BxT):
        segments = splash.SegmentIds(q=segment_ids_BxT, kv=segment_ids_BxT)
        return jax.vmap(kernel)(q_BxHxTxD, k_BxKxTxD, v_BxKxTxD, segment_ids=segments)

    half = q_BxTxHxD.dtype != jnp.float32  # float32 operands keep the configured precision
    out_BxHxTxD = (_default_precision(attend) if half else attend)(
        q_BxTxHxD.transpose(0, 2, 1, 3),
        k_BxTxKxD.transpose(0, 2, 1, 3),
        v_BxTxKxD.transpose(0, 2, 1, 3),
        segment_ids_BxT,
    )
    return out_BxHxTxD.transpose(0, 2, 1, 3).astype(q_BxTxHxD.dtype)


def _default_precision(fn):
    """`fn(q, k, v, segment_ids)` with its forward and backward kernels traced at the default
    matmul precision: Mosaic rejects "highest" (which `precision.full_float32_matmuls` sets for
    float32 parity) on bfloat16 operands, and the kernel accumulates in float32 anyway."""

    @jax.custom_vjp
    def call(q, k, v, segment_ids):
        with jax.default_matmul_precision("default"):
            return fn(q, k, v, segment_ids)

    def forward(q, k, v, segment_ids):
        with jax.default_matmul_precision("default"):
            out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids), q, k, v)
        return out, vjp

    def backward(vjp, d_out):
        with jax.default_matmul_precision("default"):
            return (*vjp(d_out), None)  # no gradient for the integer segment ids

    call.defvjp(forward, backward)
    return call


@functools.lru_cache(maxsize=16)
def _splash_kernel(H: int, T: int, block: int):
    """The kernel for H heads of T tokens (its block-sparsity tables are built once per shape)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash.CausalMask(shape=(T, T)) for _ in range(H)])
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1)


# --- "cudnn": cuDNN's fused kernel where its constraints hold ------------------------------------


def _cudnn_self_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, mask_BxTxT, config):
    """cuDNN's flash attention over the whole row (causal: it skips the blocks above the
    diagonal itself), the mask as a [B, 1, T, T] bias; "xla" where cuDNN cannot run it."""
    if not cudnn_supported(q_BxTxHxD.dtype, config.head_dim, q_BxTxHxD.shape[1]):
        return _xla_self_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, mask_BxTxT, config)
    return jax.nn.dot_product_attention(
        q_BxTxHxD,
        k_BxTxKxD,
        v_BxTxKxD,
        mask=mask_BxTxT[:, None, :, :],
        scale=config.head_dim**-0.5,
        is_causal=True,
        implementation="cudnn",
    )


def cudnn_supported(dtype, head_dim: int, T: int) -> bool:
    """cuDNN flash attention's constraints (jax's `check_is_flash_attention`): half-precision
    inputs, head_dim a multiple of 8 up to 128 (256 from Hopper on; 128 holds everywhere), and
    even lengths when a bias (our mask) is differentiated."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return half and head_dim % 8 == 0 and head_dim <= 128 and T % 2 == 0


class _Implementation(NamedTuple):
    self_attention: Callable[..., jax.Array]
    cached_attention: Callable[..., jax.Array]
    keys_transposed: bool  # the cache's keys [B, K, D, S] (else [B, K, S, D])


# Every name of config.ATTENTION_IMPLS but "auto".
_IMPLEMENTATIONS = {
    "xla": _Implementation(_xla_self_attention, _xla_cached_attention, keys_transposed=False),
    "cpu_blocked": _Implementation(
        _cpu_self_attention, _cpu_cached_attention, keys_transposed=True
    ),
    # A cache's queries are few (decode) or chunked (prefill): the XLA form serves both.
    "splash": _Implementation(_splash_self_attention, _xla_cached_attention, keys_transposed=False),
    "cudnn": _Implementation(_cudnn_self_attention, _xla_cached_attention, keys_transposed=False),
}
# "auto" by platform; any other platform runs "xla".
_PLATFORM_CHOICE = {"cpu": "cpu_blocked", "tpu": "splash", "gpu": "cudnn"}
