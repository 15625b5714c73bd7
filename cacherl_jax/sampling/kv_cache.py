"""The KV cache and the cached forward pass: extend a cache by a chunk of tokens (prefill), or by
one token per row (a decode step).

The cached forward is the model's own layer code (`qwen3.layers` with a `qwen3.KVSlots`): the
same blocks, attention seam and parameter tree as training, so a model change is written once.

Layout. Keys and values of every layer in one array each, [L, B, K, S, D] (layers, batch, kv
heads, slots, head dim), in the config's compute dtype; keys [L, B, K, D, S] where the attention
implementation wants them transposed (`attention.keys_transposed`: XLA's CPU backend, whose
decode-step attention then multiplies contiguous row-major operands). The layer scan carries them and each
block writes only its chunk's slots, so a decode loop updates the cache in place. The kv-head
axis stays separate, so the cache can shard over heads like `wk` and `wv`.

Slots. All rows write to the same slots (`length` is shared), so a decode step writes one slot
with a single `dynamic_update_slice` per layer. Rows differ through `valid_BxS`: prompts are
left-padded into their first chunk, a continuation chunk is left-padded again, and a row that
stopped early writes invalid slots from then on. Invalid slots are never attended to, so the
cache of a row is exactly its real tokens in order, with holes that change nothing. A padding
query attends to its own slot alone, so its (unused) outputs stay finite. RoPE positions are
counted per row (`next_position_B`) over the valid tokens only, so they are those of the unpadded
sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from cacherl_jax.model import attention, qwen3
from cacherl_jax.model.config import Qwen3Config
from cacherl_jax.model.params import Params


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer plus which slots hold real tokens.

    `k`, `v`: [L, B, K, S, D] (keys [L, B, K, D, S] where `attention.keys_transposed`), or
    per-layer tuples (`unstack_layers`); `valid_BxS`: slot holds a real token of the row;
    `length`: slots written so far (shared by all rows); `next_position_B`: RoPE position of each row's next
    token (its count of real tokens).
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
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
    L, B, K, S, D = config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim
    k_shape = (L, B, K, D, S) if attention.keys_transposed(config) else (L, B, K, S, D)
    dtype = qwen3.compute_dtype(config)
    return KVCache(
        k=jnp.zeros(k_shape, dtype),
        v=jnp.zeros((L, B, K, S, D), dtype),
        valid_BxS=jnp.zeros((batch_size, max_len), bool),
        length=jnp.zeros((), jnp.int32),
        next_position_B=jnp.zeros((batch_size,), jnp.int32),
    )


def unstack_layers(cache: KVCache) -> KVCache:
    """The cache with `k` and `v` as tuples of per-layer arrays, which `extend`
    also takes (see `qwen3.KVSlots`); `stack_layers` undoes it."""
    return dataclasses.replace(cache, k=tuple(cache.k), v=tuple(cache.v))


def stack_layers(cache: KVCache) -> KVCache:
    return dataclasses.replace(cache, k=jnp.stack(cache.k), v=jnp.stack(cache.v))


def chunk_positions(cache: KVCache, valid_BxT: jax.Array) -> jax.Array:
    """RoPE positions of a chunk's tokens: each row counts on from its own real tokens."""
    valid = valid_BxT.astype(jnp.int32)
    return cache.next_position_B[:, None] + jnp.cumsum(valid, axis=1) - valid


def _cache_mask(valid_BxT: jax.Array, valid_BxS: jax.Array, start: jax.Array) -> jax.Array:
    """[B, T, S]: a real query sees the real slots up to its own; a padding query only itself."""
    B, T = valid_BxT.shape
    S = valid_BxS.shape[1]
    q_slot_BxT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    kv_slot_BxS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    own_slot_BxTxS = kv_slot_BxS[:, None, :] == q_slot_BxT[:, :, None]
    return own_slot_BxTxS | qwen3.attention_mask(
        valid_BxT.astype(jnp.int32), valid_BxS.astype(jnp.int32), q_slot_BxT, kv_slot_BxS
    )


def extend(
    params: Params,
    config: Qwen3Config,
    cache: KVCache,
    tokens_BxT: jax.Array,
    valid_BxT: jax.Array,
    rope: tuple[jax.Array, jax.Array] | None = None,
    window: int | None = None,
) -> tuple[KVCache, jax.Array]:
    """Appends T slots (a prefill chunk, or T=1 for a decode step) and returns the cache and the
    float32 logits [B, V] of the chunk's last slot.

    `params`: the model's parameter tree (cast to the compute dtype beforehand to avoid a cast
    per call). `valid_BxT` marks real tokens; left-pad each row so that its last token is real
    wherever its logits are used. The caller checks that `length + T` fits in the cache: a
    write past the end would be clamped by `dynamic_update_slice` onto earlier slots. `rope`:
    the (cos, sin) tables of the chunk's positions, when the caller has them precomputed
    (`qwen3.rope_tables` of `chunk_positions`). `window`: attention reads only slots
    [0, window), for a caller that knows no later slot holds a token (a fresh cache's prefill);
    shapes are static, so without it the attention reads every slot of the cache.
    """
    start = cache.length
    if rope is None:
        positions_BxT = chunk_positions(cache, valid_BxT)
        rope = qwen3.rope_tables(positions_BxT, config.head_dim, config.rope_theta)
    cos_BxTxD, sin_BxTxD = rope
    valid_BxS = lax.dynamic_update_slice(cache.valid_BxS, valid_BxT, (0, start))
    mask_BxTxS = _cache_mask(valid_BxT, valid_BxS, start)

    x_BxTxE = qwen3.embed(params, config, tokens_BxT)
    slots = qwen3.KVSlots(cache.k, cache.v, start, window, attention.keys_transposed(config))
    x_BxTxE, slots = qwen3.layers(params, config, x_BxTxE, cos_BxTxD, sin_BxTxD, mask_BxTxS, slots)
    # Only the last slot's logits are needed: the output projection runs on B rows, not B * T.
    h_Bx1xE = qwen3.final_norm(params, config, x_BxTxE[:, -1:])
    logits_BxV = qwen3.logits_from_hidden(h_Bx1xE, qwen3.unembedding(params))[:, 0]
    cache = KVCache(
        k=slots.k_LxBxKxSxD,
        v=slots.v_LxBxKxSxD,
        valid_BxS=valid_BxS,
        length=start + tokens_BxT.shape[1],
        next_position_B=cache.next_position_B + valid_BxT.sum(axis=1, dtype=jnp.int32),
    )
    return cache, logits_BxV
