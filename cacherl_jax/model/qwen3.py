"""A pure-functional Qwen3 dense decoder: one layer code for training and for cached decoding.

Matches `transformers.Qwen3ForCausalLM`: pre-norm blocks, grouped-query attention with per-head
RMSNorm on queries and keys (before RoPE), rotate-half RoPE, SwiGLU MLP, no biases.

The blocks run as a `lax.scan` over the stacked layer parameters (`config.unroll_layers` unrolls
it), in one of two modes of the same code (`layers`):

- a whole sequence (`forward`, `hidden_states`: training and scoring). Padding and packing are
  both expressed with segment ids (0 = padding): a query attends to keys at or before its own
  index that carry the same segment id. Real tokens therefore never see pad keys or other packed
  examples; a pad query sees only pad keys (at least itself), so no softmax row is empty.
- a chunk of T new tokens against a KV cache (`KVSlots`; the sampler's `kv_cache.extend`): each
  block writes the chunk's keys and values into its layer's slots of the stacked cache, which is
  carried through the scan so that a decode loop updates it in place, and attends over the
  cache's slots under a mask the caller builds.

Attention itself is `model/attention.py`'s, which picks the implementation for the platform;
nothing here depends on the backend. Norms, softmax and RoPE run in float32 whatever the compute
dtype; logits are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from cacherl_jax.model import attention as attention_impl
from cacherl_jax.model.config import Qwen3Config
from cacherl_jax.model.params import Params


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis in float32, cast back before the scale as transformers does."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def dense(x: jax.Array, w: jax.Array, n_contract: int = 1, **dot_kwargs) -> jax.Array:
    """Contracts the last `n_contract` axes of `x` with the first ones of `w`, as one 2-D matmul.

    Same result as the equivalent einsum; XLA's CPU backend runs the 2-D form (and above all its
    weight gradient, a contraction over batch and sequence) markedly faster.
    """
    lead, contract, out = x.shape[: x.ndim - n_contract], w.shape[:n_contract], w.shape[n_contract:]
    x_NxI = x.reshape(math.prod(lead), math.prod(contract))
    y_NxO = jnp.matmul(x_NxI, w.reshape(math.prod(contract), math.prod(out)), **dot_kwargs)
    return y_NxO.reshape(*lead, *out)


def rope_tables(
    positions_BxT: jax.Array, head_dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables, [B, T, head_dim] in float32, for rotate-half RoPE."""
    exponents_D2 = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq_D2 = 1.0 / (jnp.float32(theta) ** exponents_D2)
    angles_BxTxD2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_D2
    angles_BxTxD = jnp.concatenate([angles_BxTxD2, angles_BxTxD2], axis=-1)
    return jnp.cos(angles_BxTxD), jnp.sin(angles_BxTxD)


def apply_rope(x_BxTxHxD: jax.Array, cos_BxTxD: jax.Array, sin_BxTxD: jax.Array) -> jax.Array:
    x32 = x_BxTxHxD.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos_BxTxD[:, :, None, :] + rotated * sin_BxTxD[:, :, None, :]
    return out.astype(x_BxTxHxD.dtype)


def positions_from_segments(segment_ids_BxT: jax.Array) -> jax.Array:
    """Positions that restart at 0 wherever the segment id changes (packed rows)."""
    T = segment_ids_BxT.shape[1]
    index_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids_BxT.shape)
    starts_BxT = jnp.concatenate(
        [
            jnp.ones_like(segment_ids_BxT[:, :1], dtype=bool),
            segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1],
        ],
        axis=1,
    )
    segment_start_BxT = lax.cummax(jnp.where(starts_BxT, index_BxT, 0), axis=1)
    return index_BxT - segment_start_BxT


def attention_mask(
    q_segment_BxT: jax.Array,
    kv_segment_BxS: jax.Array,
    q_index_BxT: jax.Array,
    kv_index_BxS: jax.Array,
) -> jax.Array:
    """Boolean [B, T, S]: causal by index, and only within the same segment.

    Indices are slots in the (possibly cached) sequence, not RoPE positions, so the same mask
    serves a full forward pass and a decode step against a KV cache.
    """
    causal_BxTxS = kv_index_BxS[:, None, :] <= q_index_BxT[:, :, None]
    same_segment_BxTxS = kv_segment_BxS[:, None, :] == q_segment_BxT[:, :, None]
    return causal_BxTxS & same_segment_BxTxS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVSlots:
    """A KV cache as the blocks see it: where a chunk of T new tokens goes and what it reads.

    `k_LxBxKxSxD`, `v_LxBxKxSxD`: every layer's keys (normed, rotated) and values, by row, kv
    head and slot; a kv-head axis of its own, so the cache shards over heads as `wk`/`wv` do.
    With `keys_transposed` (static; the attention implementation's choice,
    `attention.keys_transposed`) the keys are stored [L, B, K, D, S] instead. Either stacked
    arrays, or tuples of per-layer [B, K, S, D] arrays for `layers`' Python loop (so that a loop
    around it reads each layer's buffer in place rather than a copy sliced out of the stack).
    `start`: the first of the T slots the chunk writes (the same for every row; the caller keeps
    `start + T` within S, since a write past the end is clamped onto earlier slots). `window`
    (static): attention reads slots [0, window) only (None: all S), for a caller that knows no
    later slot holds a token.
    """

    k_LxBxKxSxD: jax.Array | tuple[jax.Array, ...]
    v_LxBxKxSxD: jax.Array | tuple[jax.Array, ...]
    start: jax.Array
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    keys_transposed: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def write_and_read(
        self, layer_index: jax.Array | int, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array
    ) -> tuple[KVSlots, jax.Array, jax.Array]:
        """Writes one layer's new keys and values at slots `start`..; returns the cache and that
        layer's keys ([B, K, W, D], or [B, K, D, W] transposed) and values [B, K, W, D] over the
        window."""
        # Only the chunk's slots are written: in place when the cache is donated or carried by
        # a loop (a whole-layer write would copy the layer every step).
        if self.keys_transposed:
            k_all, k_read = self._write_and_read(
                self.k_LxBxKxSxD, layer_index, k_BxTxKxD.transpose(0, 2, 3, 1), slot_axis=3
            )
        else:
            k_all, k_read = self._write_and_read(
                self.k_LxBxKxSxD, layer_index, k_BxTxKxD.transpose(0, 2, 1, 3), slot_axis=2
            )
        v_all, v_BxKxWxD = self._write_and_read(
            self.v_LxBxKxSxD, layer_index, v_BxTxKxD.transpose(0, 2, 1, 3), slot_axis=2
        )
        return dataclasses.replace(self, k_LxBxKxSxD=k_all, v_LxBxKxSxD=v_all), k_read, v_BxKxWxD

    def _write_and_read(self, buffers, layer_index, chunk, slot_axis):
        """`chunk` (one layer's, [B, K, ...]) written at `start` along `slot_axis` of a layer's
        buffer; returns the buffers and the layer's buffer cut to the window."""
        at = [0] * 4
        at[slot_axis] = self.start
        if isinstance(buffers, tuple):  # per layer, `layer_index` a Python int
            buffer = lax.dynamic_update_slice(buffers[layer_index], chunk, at)
            buffers = (*buffers[:layer_index], buffer, *buffers[layer_index + 1 :])
            return buffers, lax.slice_in_dim(buffer, 0, self.window, axis=slot_axis)
        buffers = lax.dynamic_update_slice(buffers, chunk[None], (layer_index, *at))
        size = list(buffers.shape[1:])
        size[slot_axis] = self.window or size[slot_axis]
        return buffers, lax.dynamic_slice(buffers, (layer_index, 0, 0, 0, 0), (1, *size))[0]


def attention(
    layer: Params,
    config: Qwen3Config,
    h_BxTxE: jax.Array,
    cos_BxTxD: jax.Array,
    sin_BxTxD: jax.Array,
    mask_BxTxS: jax.Array,
    cache: KVSlots | None = None,
    layer_index: jax.Array | None = None,
) -> tuple[jax.Array, KVSlots | None]:
    """Self-attention of one block: over the chunk itself, or (with `cache`) over the cache's
    slots after writing the chunk's keys and values into layer `layer_index`'s."""
    eps = config.rms_norm_eps
    q_BxTxHxD = dense(h_BxTxE, layer["wq"])
    k_BxTxKxD = dense(h_BxTxE, layer["wk"])
    v_BxTxKxD = dense(h_BxTxE, layer["wv"])
    q_BxTxHxD = apply_rope(rms_norm(q_BxTxHxD, layer["q_norm"], eps), cos_BxTxD, sin_BxTxD)
    k_BxTxKxD = apply_rope(rms_norm(k_BxTxKxD, layer["k_norm"], eps), cos_BxTxD, sin_BxTxD)
    if cache is None:
        out_BxTxHxD = attention_impl.self_attention(
            q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, mask_BxTxS, config
        )
    else:
        cache, k_window, v_BxKxWxD = cache.write_and_read(layer_index, k_BxTxKxD, v_BxTxKxD)
        W = v_BxKxWxD.shape[2]
        out_BxTxHxD = attention_impl.cached_attention(
            q_BxTxHxD, k_window, v_BxKxWxD, mask_BxTxS[..., :W], config
        )
    return dense(out_BxTxHxD, layer["wo"], n_contract=2), cache


def mlp(layer: Params, h_BxTxE: jax.Array) -> jax.Array:
    gate_BxTxF = dense(h_BxTxE, layer["w_gate"])
    up_BxTxF = dense(h_BxTxE, layer["w_up"])
    return swiglu_down(gate_BxTxF, up_BxTxF, layer["w_down"])


@jax.custom_vjp
def swiglu_down(gate_BxTxF: jax.Array, up_BxTxF: jax.Array, w_down_FxE: jax.Array) -> jax.Array:
    """`(silu(gate) * up) @ w_down`, whose backward pass keeps only `gate` and `up`.

    Autodiff would also keep sigmoid(gate), silu(gate) and the product for the backward pass:
    five [tokens, intermediate] arrays per layer where two suffice, since the other three are
    cheap elementwise functions of these two.
    """
    return dense(jax.nn.silu(gate_BxTxF) * up_BxTxF, w_down_FxE)


def _swiglu_down_fwd(gate_BxTxF, up_BxTxF, w_down_FxE):
    return swiglu_down(gate_BxTxF, up_BxTxF, w_down_FxE), (gate_BxTxF, up_BxTxF, w_down_FxE)


def _swiglu_down_bwd(residuals, d_out_BxTxE):
    # The barrier keeps XLA from merging this recomputation with the forward pass's, which would
    # keep the forward's sigmoid alive until here.
    gate_BxTxF, up_BxTxF, w_down_FxE = lax.optimization_barrier(residuals)
    sigmoid_BxTxF = jax.nn.sigmoid(gate_BxTxF)
    silu_BxTxF = gate_BxTxF * sigmoid_BxTxF
    product_BxTxF = silu_BxTxF * up_BxTxF
    # d silu(g) / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    d_product_BxTxF = dense(d_out_BxTxE, w_down_FxE.T)
    d_gate_BxTxF = (
        d_product_BxTxF * up_BxTxF * (sigmoid_BxTxF * (1 + gate_BxTxF * (1 - sigmoid_BxTxF)))
    )
    d_up_BxTxF = d_product_BxTxF * silu_BxTxF
    F, E = w_down_FxE.shape
    d_w_down_FxE = jnp.matmul(
        product_BxTxF.reshape(-1, F).T, d_out_BxTxE.reshape(-1, E).astype(product_BxTxF.dtype)
    )
    return d_gate_BxTxF, d_up_BxTxF, d_w_down_FxE.astype(w_down_FxE.dtype)


swiglu_down.defvjp(_swiglu_down_fwd, _swiglu_down_bwd)


def block(
    layer: Params,
    config: Qwen3Config,
    x_BxTxE: jax.Array,
    cos_BxTxD: jax.Array,
    sin_BxTxD: jax.Array,
    mask_BxTxS: jax.Array,
    cache: KVSlots | None = None,
    layer_index: jax.Array | None = None,
) -> tuple[jax.Array, KVSlots | None]:
    eps = config.rms_norm_eps
    h_BxTxE = rms_norm(x_BxTxE, layer["attn_norm"], eps)
    attended_BxTxE, cache = attention(
        layer, config, h_BxTxE, cos_BxTxD, sin_BxTxD, mask_BxTxS, cache, layer_index
    )
    x_BxTxE = x_BxTxE + attended_BxTxE
    h_BxTxE = rms_norm(x_BxTxE, layer["mlp_norm"], eps)
    return x_BxTxE + mlp(layer, h_BxTxE), cache


def layers(
    params: Params,
    config: Qwen3Config,
    x_BxTxE: jax.Array,
    cos_BxTxD: jax.Array,
    sin_BxTxD: jax.Array,
    mask_BxTxS: jax.Array,
    cache: KVSlots | None = None,
) -> tuple[jax.Array, KVSlots | None]:
    """Every block in turn, before the final norm.

    Without `cache` the chunk attends over itself (`mask_BxTxS` is [B, T, T], causal by index);
    with it, over the cache's slots (`mask_BxTxS` is [B, T, S]), and the returned cache holds the
    chunk's keys and values. `params["layers"]` stacked ([L, ...] arrays) runs as a `lax.scan`
    (unrolled with `config.unroll_layers`); as a tuple of per-layer trees (`unstack_layers`) it
    runs as a Python loop.
    """
    dtype = compute_dtype(config)
    x_BxTxE = x_BxTxE.astype(dtype)
    as_dtype = functools.partial(jax.tree.map, lambda w: w.astype(dtype))

    def step(carry, xs):
        x_BxTxE, cache = carry
        layer, layer_index = xs
        carry = block(layer, config, x_BxTxE, cos_BxTxD, sin_BxTxD, mask_BxTxS, cache, layer_index)
        return carry, None

    if config.remat and cache is None:
        # prevent_cse=False is safe (and faster) inside scan, which already blocks CSE.
        step = jax.checkpoint(step, prevent_cse=False)
    if isinstance(params["layers"], tuple):
        carry = (x_BxTxE, cache)
        for layer_index, layer in enumerate(params["layers"]):
            carry, _ = step(carry, (as_dtype(layer), layer_index))
        return carry
    indices_L = jnp.arange(config.num_layers, dtype=jnp.int32)
    (x_BxTxE, cache), _ = lax.scan(
        step, (x_BxTxE, cache), (as_dtype(params["layers"]), indices_L), unroll=config.unroll_layers
    )
    return x_BxTxE, cache


def unstack_layers(params: Params) -> Params:
    """The parameters with `layers` as a tuple of per-layer trees, for `layers`' Python loop.

    A loop that runs the model many times (the sampler's decode loop) unstacks once before it:
    XLA's CPU backend copies a layer's weights out of the stacked arrays wherever it slices them,
    which inside the loop would be on every step.
    """
    stacked = params["layers"]
    L = jax.tree.leaves(stacked)[0].shape[0]
    per_layer = tuple(jax.tree.map(lambda w, i=i: w[i], stacked) for i in range(L))
    return params | {"layers": per_layer}


def final_norm(params: Params, config: Qwen3Config, x_BxTxE: jax.Array) -> jax.Array:
    return rms_norm(x_BxTxE, params["final_norm"], config.rms_norm_eps)


def compute_dtype(config: Qwen3Config) -> jnp.dtype:
    return jnp.dtype(config.compute_dtype)


def embed(params: Params, config: Qwen3Config, tokens_BxT: jax.Array) -> jax.Array:
    return jnp.take(params["embed"], tokens_BxT, axis=0).astype(compute_dtype(config))


def hidden_states(
    params: Params,
    config: Qwen3Config,
    x_BxTxE: jax.Array,
    *,
    positions_BxT: jax.Array | None = None,
    segment_ids_BxT: jax.Array | None = None,
) -> jax.Array:
    """Runs the decoder stack on input embeddings; returns the final-normed hidden states.

    Separate from `forward` so losses can project onto the vocabulary in chunks instead of
    materialising [B, T, V] logits, and so tests can differentiate with respect to embeddings.
    """
    B, T = x_BxTxE.shape[:2]
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones((B, T), jnp.int32)
    if positions_BxT is None:
        positions_BxT = positions_from_segments(segment_ids_BxT)
    index_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask_BxTxT = attention_mask(segment_ids_BxT, segment_ids_BxT, index_BxT, index_BxT)
    cos_BxTxD, sin_BxTxD = rope_tables(positions_BxT, config.head_dim, config.rope_theta)
    x_BxTxE, _ = layers(params, config, x_BxTxE, cos_BxTxD, sin_BxTxD, mask_BxTxT)
    return final_norm(params, config, x_BxTxE)


def unembedding(params: Params) -> jax.Array:
    """The [V, E] output projection (the input embedding when they are tied)."""
    return params["lm_head"] if "lm_head" in params else params["embed"]


def logits_from_hidden(h_BxTxE: jax.Array, w_VxE: jax.Array) -> jax.Array:
    return jnp.einsum(
        "bte,ve->btv", h_BxTxE, w_VxE.astype(h_BxTxE.dtype), preferred_element_type=jnp.float32
    )


def forward(
    params: Params,
    config: Qwen3Config,
    tokens_BxT: jax.Array,
    *,
    positions_BxT: jax.Array | None = None,
    segment_ids_BxT: jax.Array | None = None,
) -> jax.Array:
    """float32 logits [B, T, V] for integer tokens [B, T].

    `segment_ids_BxT`: 0 marks padding; distinct positive ids mark packed examples (default: one
    example per row). `positions_BxT` defaults to positions restarting at every segment.
    """
    x_BxTxE = embed(params, config, tokens_BxT)
    h_BxTxE = hidden_states(
        params, config, x_BxTxE, positions_BxT=positions_BxT, segment_ids_BxT=segment_ids_BxT
    )
    return logits_from_hidden(h_BxTxE, unembedding(params))
