"""The KV cache and the cached forward pass: extend a cache by a chunk of tokens (prefill), or by
one token per row (a decode step).

Layout. One key and one value buffer per layer: keys [B, K, D, S] and values [B, K, S, D]
(batch, kv heads, head dim, slots). The G query heads that share a kv head are stacked as rows,
so for one (row, kv head) the scores are a [G, D] x [D, S] and the output a [G, S] x [S, D]
matmul, both over contiguous row-major operands; storing keys transposed made a decode step's
attention ~3x faster on XLA's CPU backend than [S, D] keys (bench_29m, batch 32). Buffers are per
layer (a tuple, not one [L, ...] array) so a decode loop updates each in place without slicing a
stacked array (which XLA may copy).

Slots. All rows write to the same slots (`length` is shared), so a decode step writes one slot
with a single `dynamic_update_slice`. Rows differ through `valid_BxS`: prompts are left-padded
into their first chunk, a continuation chunk is left-padded again, and a row that stopped early
writes invalid slots from then on. Invalid slots are never attended to, so the cache of a row is
exactly its real tokens in order, with holes that change nothing. RoPE positions are counted per
row (`next_position_B`) over the valid tokens only, so they are those of the unpadded sequence.

Weights are first put into a sampling layout (`sampling_weights`): per-layer arrays instead of a
stacked layer axis, q/k/v and gate/up projections fused into one matmul each, and every weight
stored output-major ([out, in], as PyTorch stores them). Fewer, larger 2-D matmuls per step is
what XLA's CPU backend runs fastest, and decoding runs one matmul per weight per token.

Activations are feature-major inside `extend`: the hidden state is [E, N] (N = batch x chunk
tokens), so every weight matmul is `W_OxI @ x_IxN` with the weight as the left operand, the form
XLA:CPU's matmul library streams fastest when N is small (a decode step). Measured on bench_29m,
both layouts compiled in one process and timed alternately: batch 8 552 -> 631 tokens/s (best of
6), batch 32 902 -> 1005 (best of 4); a long prefill chunk is 2-4% slower.

On one CPU device the sampler lays the weights out for the CPU kernels instead
(`sampling_weights(packed=True)`, cpu_kernels.py): every matmul runs as a custom call on a packed
weight, and the rest of a decode step's attention block (the heads' norms and RoPE, the cache
write, the attention) as one call that reads only the slots written so far; where all four
matmuls of a layer are packed, a decode step runs each layer as one call (`decode_layer`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from cacherl_jax.model import qwen3
from cacherl_jax.model.config import Qwen3Config
from cacherl_jax.model.params import Params
from cacherl_jax.sampling import cpu_kernels

Weights = dict[str, Any]
CPU_KERNELS = "cpu_kernels"  # present in sampling weights laid out for cpu_kernels.py


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer plus which slots hold real tokens.

    `k`: per layer [B, K, D, S]; `v`: per layer [B, K, S, D]; `valid_BxS`: slot holds a real token of the row;
    `length`: slots written so far (shared by all rows); `next_position_B`: RoPE position of each
    row's next token (its count of real tokens).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid_BxS: jax.Array
    length: jax.Array
    next_position_B: jax.Array

    @property
    def batch_size(self) -> int:
        return self.valid_BxS.shape[0]

    @property
    def max_len(self) -> int:
        return self.valid_BxS.shape[1]


def init_cache(config: Qwen3Config, batch_size: int, max_len: int) -> KVCache:
    """An empty cache of `max_len` slots per row, in the config's compute dtype."""
    dtype = qwen3.compute_dtype(config)
    B, K, D, L = batch_size, config.num_kv_heads, config.head_dim, config.num_layers
    return KVCache(
        k=tuple(jnp.zeros((B, K, D, max_len), dtype) for _ in range(L)),
        v=tuple(jnp.zeros((B, K, max_len, D), dtype) for _ in range(L)),
        valid_BxS=jnp.zeros((batch_size, max_len), bool),
        length=jnp.zeros((), jnp.int32),
        next_position_B=jnp.zeros((batch_size,), jnp.int32),
    )


def sampling_weights(params: Params, config: Qwen3Config, packed: bool = False) -> Weights:
    """The parameters rearranged for decoding (see the module docstring); jit it once. `packed`:
    for the CPU kernels (cpu_kernels.py): every weight they can multiply is stored packed
    (`cpu_kernels.pack`) and decode steps run their attention."""
    dtype = qwen3.compute_dtype(config)
    L, E = config.num_layers, config.hidden_size
    stacked = params["layers"]

    def out_major(w):  # [E, ...] -> [out, E]
        return w.reshape(E, -1).T.astype(dtype)

    def for_matmul(w_OxI):
        return cpu_kernels.pack(w_OxI) if packed and cpu_kernels.packable(w_OxI) else w_OxI

    layers = []
    for i in range(L):
        w = {name: stacked[name][i] for name in stacked}
        layers.append(
            {
                "attn_norm": w["attn_norm"],
                "mlp_norm": w["mlp_norm"],
                "q_norm": w["q_norm"],
                "k_norm": w["k_norm"],
                "w_qkv": for_matmul(
                    jnp.concatenate(
                        [out_major(w["wq"]), out_major(w["wk"]), out_major(w["wv"])], axis=0
                    )
                ),
                "wo": for_matmul(w["wo"].reshape(-1, E).T.astype(dtype)),
                "w_gate_up": for_matmul(
                    jnp.concatenate([out_major(w["w_gate"]), out_major(w["w_up"])], axis=0)
                ),
                "w_down": for_matmul(w["w_down"].T.astype(dtype)),
            }
        )
    weights = {
        "embed": params["embed"],
        "final_norm": params["final_norm"],
        "unembed_VxE": for_matmul(qwen3.unembedding(params).astype(dtype)),
        "layers": tuple(layers),
    }
    if packed:
        # A key without leaves: part of the pytree's structure, so a static flag under jit.
        weights[CPU_KERNELS] = None
    return weights


def _linear(w_OxI: jax.Array, x_IxN: jax.Array) -> jax.Array:
    """w @ x with an out-major [out, in] weight (or one packed for the CPU kernel) and
    feature-major activations, accumulated in float32 and cast back to the activations' dtype."""
    if w_OxI.ndim == 3:
        return cpu_kernels.packed_matmul(w_OxI, x_IxN).astype(x_IxN.dtype)
    return lax.dot_general(
        w_OxI, x_IxN, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    ).astype(x_IxN.dtype)


def _norm_and_rope_heads(
    x_HxDxN: jax.Array, weight_D: jax.Array, cos_DxN: jax.Array, sin_DxN: jax.Array, eps: float
) -> jax.Array:
    """Per-head RMSNorm then rotate-half RoPE over the head dim (axis 1) of [heads, D, N]: the
    same operations as `qwen3.rms_norm` then `qwen3.apply_rope` on [..., heads, D]."""
    x32 = qwen3.rms_norm(x_HxDxN, weight_D, eps, axis=1).astype(jnp.float32)
    half = x32.shape[1] // 2
    rotated = jnp.concatenate([-x32[:, half:], x32[:, :half]], axis=1)
    return (x32 * cos_DxN + rotated * sin_DxN).astype(x_HxDxN.dtype)


def _chunk_positions(cache: KVCache, valid_BxT: jax.Array) -> jax.Array:
    """RoPE positions of a chunk's tokens: each row counts on from its own real tokens."""
    valid = valid_BxT.astype(jnp.int32)
    return cache.next_position_B[:, None] + jnp.cumsum(valid, axis=1) - valid


def _attention(
    q_BxTxHxD: jax.Array,
    k_BxKxDxS: jax.Array,
    v_BxKxSxD: jax.Array,
    mask_BxTxS: jax.Array,
    config: Qwen3Config,
) -> jax.Array:
    """Grouped-query attention of T new queries over all S cache slots."""
    B, T, H, D = q_BxTxHxD.shape
    K, S, G = config.num_kv_heads, k_BxKxDxS.shape[3], config.num_groups
    scale = jnp.asarray(config.head_dim**-0.5, q_BxTxHxD.dtype)
    # Rows r = (g, t): the group's query heads stacked over the chunk.
    q_BxKxRxD = (q_BxTxHxD * scale).reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)
    q_BxKxRxD = q_BxKxRxD.reshape(B, K, G * T, D)
    logits_BxKxRxS = jnp.einsum(
        "bkrd,bkds->bkrs", q_BxKxRxD, k_BxKxDxS, preferred_element_type=jnp.float32
    )
    logits_BxKxGxTxS = logits_BxKxRxS.reshape(B, K, G, T, S)
    logits_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxKxGxTxS, -jnp.inf)
    # Every query sees at least its own slot, so the max is finite.
    max_BxKxGxTx1 = jnp.max(logits_BxKxGxTxS, axis=-1, keepdims=True)
    exp_BxKxGxTxS = jnp.exp(logits_BxKxGxTxS - max_BxKxGxTx1)
    sum_BxKxGxTx1 = jnp.sum(exp_BxKxGxTxS, axis=-1, keepdims=True)
    out_BxKxRxD = jnp.einsum(
        "bkrs,bksd->bkrd",
        exp_BxKxGxTxS.reshape(B, K, G * T, S).astype(v_BxKxSxD.dtype),
        v_BxKxSxD,
        preferred_element_type=jnp.float32,
    )
    # Normalising after the value matmul divides [T, D] numbers instead of [T, S].
    out_BxKxGxTxD = out_BxKxRxD.reshape(B, K, G, T, D) / sum_BxKxGxTx1
    out_BxTxHxD = out_BxKxGxTxD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)
    return out_BxTxHxD.astype(q_BxTxHxD.dtype)


def _attention_block(
    qkv_QxN: jax.Array,
    layer: Weights,
    k_cache: jax.Array,
    v_cache: jax.Array,
    cos_DxN: jax.Array,
    sin_DxN: jax.Array,
    mask_BxTxS: jax.Array,
    start: jax.Array,
    config: Qwen3Config,
    window: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """XLA's attention block after the fused q/k/v projection: per-head norms and RoPE, the new
    keys and values written at slot `start`, attention (over the first `window` slots if
    given). Returns (keys, values, out [H D, N])."""
    H, K, D, eps = config.num_heads, config.num_kv_heads, config.head_dim, config.rms_norm_eps
    B, N = k_cache.shape[0], qkv_QxN.shape[1]
    T = N // B
    q_HxDxN = _norm_and_rope_heads(
        qkv_QxN[: H * D].reshape(H, D, N), layer["q_norm"], cos_DxN, sin_DxN, eps
    )
    k_KxDxN = _norm_and_rope_heads(
        qkv_QxN[H * D : (H + K) * D].reshape(K, D, N), layer["k_norm"], cos_DxN, sin_DxN, eps
    )
    v_KxDxN = qkv_QxN[(H + K) * D :].reshape(K, D, N)
    # Written in place when the cache buffers are donated or carried by a loop.
    k_cache = lax.dynamic_update_slice(
        k_cache, k_KxDxN.reshape(K, D, B, T).transpose(2, 0, 1, 3), (0, 0, 0, start)
    )
    v_cache = lax.dynamic_update_slice(
        v_cache, v_KxDxN.reshape(K, D, B, T).transpose(2, 0, 3, 1), (0, 0, start, 0)
    )
    q_BxTxHxD = q_HxDxN.reshape(H, D, B, T).transpose(2, 3, 0, 1)
    S = k_cache.shape[3] if window is None else window
    out_BxTxHxD = _attention(
        q_BxTxHxD, k_cache[..., :S], v_cache[:, :, :S], mask_BxTxS[..., :S], config
    )
    return k_cache, v_cache, out_BxTxHxD.reshape(N, H * D).T


def extend(
    weights: Weights,
    config: Qwen3Config,
    cache: KVCache,
    tokens_BxT: jax.Array,
    valid_BxT: jax.Array,
    rope: tuple[jax.Array, jax.Array] | None = None,
    window: int | None = None,
) -> tuple[KVCache, jax.Array]:
    """Appends T slots (a prefill chunk, or T=1 for a decode step) and returns the cache and the
    float32 logits [B, V] of the chunk's last slot.

    `valid_BxT` marks real tokens; left-pad each row so that its last token is real wherever its
    logits are used. The caller checks that `length + T` fits in the cache: a write past the end
    would be clamped by `dynamic_update_slice` onto earlier slots. `rope`: the (cos, sin) tables
    of the chunk's positions, when the caller has them precomputed (see `rope_tables`).
    `window`: XLA's attention reads only slots [0, window), for a caller that knows no later
    slot holds a token (a fresh cache's prefill); its shapes are static, so without it the
    attention reads every slot of the cache.
    """
    B, T = tokens_BxT.shape
    S = cache.max_len
    eps = config.rms_norm_eps
    H, D = config.num_heads, config.head_dim
    dtype = qwen3.compute_dtype(config)
    start = cache.length

    if rope is None:
        rope = qwen3.rope_tables(_chunk_positions(cache, valid_BxT), D, config.rope_theta)
    cos_BxTxD, sin_BxTxD = rope
    valid_BxS = lax.dynamic_update_slice(cache.valid_BxS, valid_BxT, (0, start))
    q_slot_BxT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    kv_slot_BxS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    # A padding query attends to itself alone, so its (unused) row stays finite.
    mask_BxTxS = qwen3.attention_mask(
        valid_BxT.astype(jnp.int32), valid_BxS.astype(jnp.int32), q_slot_BxT, kv_slot_BxS
    ) | (kv_slot_BxS[:, None, :] == q_slot_BxT[:, :, None])

    N = B * T
    cos_DxN = cos_BxTxD.reshape(N, D).T
    sin_DxN = sin_BxTxD.reshape(N, D).T

    # Weights laid out for the CPU kernels (sampling_weights(packed=True)): they run the step.
    kernels = CPU_KERNELS in weights
    x_ExN = jnp.take(weights["embed"], tokens_BxT.reshape(N), axis=0).astype(dtype).T

    def layer_in_ops(layer, x_ExN, k_cache, v_cache):
        """One layer as XLA ops and per-op custom calls; returns (x, keys, values)."""
        h_ExN = qwen3.rms_norm(x_ExN, layer["attn_norm"], eps, axis=0)
        qkv_QxN = _linear(layer["w_qkv"], h_ExN)
        if T == 1 and kernels:  # a decode step: the rest of the block is one custom call
            out_HDxN, k_cache, v_cache = cpu_kernels.decode_attention(
                qkv_QxN,
                layer["q_norm"],
                layer["k_norm"],
                cos_DxN,
                sin_DxN,
                k_cache,
                v_cache,
                valid_BxS,
                start,
                num_heads=H,
                eps=eps,
            )
        else:
            k_cache, v_cache, out_HDxN = _attention_block(
                qkv_QxN, layer, k_cache, v_cache, cos_DxN, sin_DxN, mask_BxTxS, start, config,
                window,
            )  # fmt: skip
        x_ExN = x_ExN + _linear(layer["wo"], out_HDxN)
        h_ExN = qwen3.rms_norm(x_ExN, layer["mlp_norm"], eps, axis=0)
        gate_up_2FxN = _linear(layer["w_gate_up"], h_ExN)
        gate_FxN, up_FxN = jnp.split(gate_up_2FxN, 2, axis=0)
        x_ExN = x_ExN + _linear(layer["w_down"], jax.nn.silu(gate_FxN) * up_FxN)
        return x_ExN, k_cache, v_cache

    k_layers, v_layers = [], []
    for layer, k_cache, v_cache in zip(weights["layers"], cache.k, cache.v, strict=True):
        if T == 1 and kernels and cpu_kernels.layer_fusable(layer):  # the layer in one call
            x_ExN, k_cache, v_cache = cpu_kernels.decode_layer(
                x_ExN, layer, cos_DxN, sin_DxN, k_cache, v_cache, valid_BxS, start,
                num_heads=H, eps=eps,
            )  # fmt: skip
        else:
            x_ExN, k_cache, v_cache = layer_in_ops(layer, x_ExN, k_cache, v_cache)
        k_layers.append(k_cache)
        v_layers.append(v_cache)

    # Only the last slot's logits are needed: the output projection runs on B rows, not B * T.
    x_ExB = x_ExN.reshape(-1, B, T)[:, :, -1]
    if weights["unembed_VxE"].ndim == 3:  # packed
        h_ExB = qwen3.rms_norm(x_ExB, weights["final_norm"], eps, axis=0)
        logits_BxV = cpu_kernels.packed_matmul(weights["unembed_VxE"], h_ExB).T
    else:
        logits_BxV = _row_major_logits(x_ExB, weights, eps)
    cache = KVCache(
        k=tuple(k_layers),
        v=tuple(v_layers),
        valid_BxS=valid_BxS,
        length=start + T,
        next_position_B=cache.next_position_B + valid_BxT.sum(axis=1, dtype=jnp.int32),
    )
    return cache, logits_BxV


def _row_major_logits(x_ExB: jax.Array, weights: Weights, eps: float) -> jax.Array:
    """The final norm and output projection through XLA's dot: [B, V] float32 logits."""
    # Row-major here, x @ W.T: with [V, E] x [E, B] XLA:CPU lowers this matmul to a slower
    # kernel (~4x at batch 8). The barrier keeps XLA from folding the transpose into the norm
    # and the matmul, which would bring that form back.
    x_BxE = lax.optimization_barrier(x_ExB.T)
    h_BxE = qwen3.rms_norm(x_BxE, weights["final_norm"], eps)
    return lax.dot_general(
        h_BxE, weights["unembed_VxE"], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
