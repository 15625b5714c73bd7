"""Token losses that project onto the vocabulary in chunks.

Qwen3's vocabulary has 151,669 entries: float32 logits for a 16k-token batch alone are ~10 GB,
and autodiff would keep them (and their softmax) for the backward pass. Here the final hidden
states are projected one chunk of positions at a time inside a `lax.scan` whose body is
`jax.checkpoint`ed, so at most one chunk of [tokens, V] logits is alive in the forward pass and
the backward pass recomputes each chunk's logits instead of storing them.

Chunks run along the sequence axis and keep the batch axis whole, so a batch-sharded `h` stays
batch-sharded inside every chunk and all devices work on every chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from cacherl_jax.model.qwen3 import dense


def _chunk_stats(
    h_BxCxE: jax.Array,
    w_VxE: jax.Array,
    targets_BxC: jax.Array,
    with_entropy: bool,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array | None]:
    """float32 log p(target) (and entropy) for one chunk, under softmax(logits / temperature);
    its [B, C, V] logits die here."""
    # Same numerics as qwen3.logits_from_hidden (w cast to h's dtype, float32 accumulation), as a
    # 2-D matmul: XLA's CPU backend runs that form's weight gradient about twice as fast.
    logits_BxCxV = dense(h_BxCxE, w_VxE.astype(h_BxCxE.dtype).T, preferred_element_type=jnp.float32)
    if temperature != 1.0:  # divided in float32, as the sampler does
        logits_BxCxV = logits_BxCxV / jnp.float32(temperature)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    logp_BxC = target_BxC - lse_BxC
    if not with_entropy:
        return logp_BxC, None
    # H = -sum p log p = lse - sum p * logits (no log of a zero probability anywhere).
    p_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None])
    entropy_BxC = lse_BxC - jnp.sum(p_BxCxV * logits_BxCxV, axis=-1)
    return logp_BxC, entropy_BxC


def _validate(h_BxTxE: jax.Array, targets_BxT: jax.Array, chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if targets_BxT.shape != h_BxTxE.shape[:2]:
        raise ValueError(f"targets {targets_BxT.shape} do not match hidden states {h_BxTxE.shape}")


def _chunk_layout(h_BxTxE, targets_BxT, weights_BxT, V: int, chunk_size: int):
    """Pads T to whole chunks of C positions (C = chunk_size // B, at least 1) and puts the
    chunk axis first: h [N, B, C, E], targets and weights [N, B, C]. Padded positions weigh 0."""
    B, T, E = h_BxTxE.shape
    C = max(1, min(T, chunk_size // B))
    n = -(-T // C)
    pad = n * C - T
    # Any id is allowed where the caller ignores the result (e.g. -100 at masked positions);
    # clipping keeps the gather in range so those positions stay finite.
    targets_BxT = jnp.clip(targets_BxT, 0, V - 1).astype(jnp.int32)
    if pad:
        h_BxTxE = jnp.pad(h_BxTxE, ((0, 0), (0, pad), (0, 0)))
        targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
        weights_BxT = jnp.pad(weights_BxT, ((0, 0), (0, pad)))
    return (
        h_BxTxE.reshape(B, n, C, E).swapaxes(0, 1),
        targets_BxT.reshape(B, n, C).swapaxes(0, 1),
        weights_BxT.reshape(B, n, C).swapaxes(0, 1),
    )


def _unchunk(x_NxBxC: jax.Array, T: int) -> jax.Array:
    """[N, B, C, ...] -> [B, T, ...], dropping the padding."""
    N, B, C = x_NxBxC.shape[:3]
    return x_NxBxC.swapaxes(0, 1).reshape(B, N * C, *x_NxBxC.shape[3:])[:, :T]


def _chunked_stats(
    h_BxTxE: jax.Array,
    w_VxE: jax.Array,
    targets_BxT: jax.Array,
    chunk_size: int,
    with_entropy: bool,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array | None]:
    """Runs `_chunk_stats` over chunks of about `chunk_size` tokens (B rows x C positions)."""
    _validate(h_BxTxE, targets_BxT, chunk_size)
    T = h_BxTxE.shape[1]
    h_NxBxCxE, targets_NxBxC, _ = _chunk_layout(
        h_BxTxE, targets_BxT, jnp.zeros(targets_BxT.shape), w_VxE.shape[0], chunk_size
    )

    # Saves only the chunk's inputs: the backward pass recomputes the logits.
    chunk_fn = jax.checkpoint(
        lambda h, t: _chunk_stats(h, w_VxE, t, with_entropy, temperature), prevent_cse=False
    )

    def step(carry, xs):
        return carry, chunk_fn(*xs)

    _, (logp_NxBxC, entropy_NxBxC) = lax.scan(step, None, (h_NxBxCxE, targets_NxBxC))
    return _unchunk(logp_NxBxC, T), None if entropy_NxBxC is None else _unchunk(entropy_NxBxC, T)


def _chunk_loss_and_grads(h_BxCxE, w_VxE, targets_BxC, weights_BxC):
    """One chunk's weighted loss, d loss/d h, d loss/d w and log p(target); logits die here.

    d(-w_t log p_t)/d logits = w_t (softmax - onehot(target)), so both gradients are two more
    matmuls of the chunk's logits, computed while they are still alive.
    """
    logits_BxCxV = dense(h_BxCxE, w_VxE.astype(h_BxCxE.dtype).T, preferred_element_type=jnp.float32)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    logp_BxC = target_BxC - lse_BxC
    V = w_VxE.shape[0]
    onehot_BxCxV = targets_BxC[..., None] == jnp.arange(V, dtype=targets_BxC.dtype)
    dlogits_BxCxV = weights_BxC[..., None] * (
        jnp.exp(logits_BxCxV - lse_BxC[..., None]) - onehot_BxCxV
    )
    dlogits_BxCxV = dlogits_BxCxV.astype(h_BxCxE.dtype)
    dh_BxCxE = dense(dlogits_BxCxV, w_VxE.astype(h_BxCxE.dtype), preferred_element_type=jnp.float32)
    E = h_BxCxE.shape[-1]
    dw_VxE = jnp.matmul(
        dlogits_BxCxV.reshape(-1, V).T, h_BxCxE.reshape(-1, E), preferred_element_type=jnp.float32
    )
    return -jnp.sum(weights_BxC * logp_BxC), dh_BxCxE.astype(h_BxCxE.dtype), dw_VxE, logp_BxC


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_loss_sum(h_BxTxE, w_VxE, targets_BxT, weights_BxT, chunk_size):
    """sum(-weights * log p(target)); under autodiff the gradients come out of the forward scan."""
    logp_BxT, _ = _chunked_stats(h_BxTxE, w_VxE, targets_BxT, chunk_size, with_entropy=False)
    return -jnp.sum(weights_BxT * logp_BxT)


def _fused_loss_sum_fwd(h_BxTxE, w_VxE, targets_BxT, weights_BxT, chunk_size):
    T = h_BxTxE.shape[1]
    h_NxBxCxE, targets_NxBxC, weights_NxBxC = _chunk_layout(
        h_BxTxE, targets_BxT, weights_BxT, w_VxE.shape[0], chunk_size
    )

    def step(carry, xs):
        loss, dw_VxE = carry
        h_BxCxE, targets_BxC, weights_BxC = xs
        chunk_loss, dh_BxCxE, chunk_dw_VxE, logp_BxC = _chunk_loss_and_grads(
            h_BxCxE, w_VxE, targets_BxC, weights_BxC
        )
        return (loss + chunk_loss, dw_VxE + chunk_dw_VxE), (dh_BxCxE, logp_BxC)

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w_VxE.shape, jnp.float32))
    (loss, dw_VxE), (dh_NxBxCxE, logp_NxBxC) = lax.scan(
        step, init, (h_NxBxCxE, targets_NxBxC, weights_NxBxC)
    )
    residuals = (
        _unchunk(dh_NxBxCxE, T),
        dw_VxE.astype(w_VxE.dtype),
        _unchunk(logp_NxBxC, T),
    )
    return loss, residuals


def _fused_loss_sum_bwd(chunk_size, residuals, g):
    dh_BxTxE, dw_VxE, logp_BxT = residuals
    # d loss/d weights = -log p(target): exact, though the SFT step never differentiates masks.
    return (
        (g * dh_BxTxE).astype(dh_BxTxE.dtype),
        (g * dw_VxE).astype(dw_VxE.dtype),
        None,
        -g * logp_BxT,
    )


_fused_loss_sum.defvjp(_fused_loss_sum_fwd, _fused_loss_sum_bwd)


def chunked_cross_entropy(
    h_BxTxE: jax.Array,
    w_VxE: jax.Array,
    targets_BxT: jax.Array,
    weights_BxT: jax.Array,
    *,
    chunk_size: int = 2048,
) -> tuple[jax.Array, jax.Array]:
    """(loss_sum, count), both float32 scalars, without materialising [B, T, V] logits.

    loss_sum = sum over tokens of weights * (logsumexp(logits) - logits[target]), with
    logits = h @ w.T accumulated in float32; count = number of tokens with weight > 0.
    loss_sum / count is the mean; returning both keeps gradient accumulation over micro-batches
    exact (sum the sums and the counts, divide once). Chunks hold about `chunk_size` tokens
    (`chunk_size // B` positions of every row; T need not divide evenly). Targets where the
    weight is 0 may be anything, e.g. -100.

    Under autodiff the gradients with respect to `h` and `w` are computed in the forward pass,
    while each chunk's logits are alive (a custom VJP): three matmuls per chunk instead of the
    four a rematerialising backward pass needs, and no [B, T, V] array at any time.
    """
    _validate(h_BxTxE, targets_BxT, chunk_size)
    weights_BxT = weights_BxT.astype(jnp.float32)
    loss_sum = _fused_loss_sum(h_BxTxE, w_VxE, targets_BxT, weights_BxT, chunk_size)
    count = jnp.sum(weights_BxT > 0).astype(jnp.float32)
    return loss_sum, count


def token_logprobs(
    h_BxTxE: jax.Array,
    w_VxE: jax.Array,
    targets_BxT: jax.Array,
    *,
    chunk_size: int = 2048,
    return_entropy: bool = False,
    temperature: float = 1.0,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """float32 log p(target) per token, [B, T]; with `return_entropy`, also the entropy of the
    full next-token distribution per token, [B, T]. Same chunking as `chunked_cross_entropy`
    (GRPO's ratios and entropy bonus need per-token values, not a sum). `temperature`: of the
    distribution softmax(logits / temperature), the policy a sampler at that temperature draws
    from (before any top-k or top-p filtering); a Python float, fixed at trace time."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp_BxT, entropy_BxT = _chunked_stats(
        h_BxTxE, w_VxE, targets_BxT, chunk_size, with_entropy=return_entropy,
        temperature=temperature,
    )  # fmt: skip
    return (logp_BxT, entropy_BxT) if return_entropy else logp_BxT


def sft_weights(
    loss_mask_BxT: jax.Array, thinking_mask_BxT: jax.Array, thinking_weight: float = 1.0
) -> jax.Array:
    """Per-token loss weights: the loss mask, with thinking tokens scaled by `thinking_weight`
    (so teacher-written reasoning can count more or less than the answer it leads to)."""
    scale_BxT = jnp.where(thinking_mask_BxT.astype(bool), jnp.float32(thinking_weight), 1.0)
    return loss_mask_BxT.astype(jnp.float32) * scale_BxT
