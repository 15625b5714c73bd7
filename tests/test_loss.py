"""Chunked cross-entropy and token log-probs against a float64 numpy full-logits reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cacherl_jax import parallel
from cacherl_jax.model.qwen3 import logits_from_hidden
from cacherl_jax.train.loss import chunked_cross_entropy, sft_weights, token_logprobs

B, T, E, V = 3, 37, 16, 50  # B*T = 111 = 3 * 37: chunk sizes below divide it or not
CHUNK_SIZES = [111, 37, 3, 16, 7, 1, 4096]


def _log_softmax(logits_NxV: np.ndarray) -> np.ndarray:
    shifted = logits_NxV - logits_NxV.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def reference(h_BxTxE, w_VxE, targets_BxT, weights_BxT):
    """float64 loss sum, d/dh and d/dw from full [B*T, V] logits, gradient written by hand."""
    h_NxE = np.asarray(h_BxTxE, np.float64).reshape(-1, h_BxTxE.shape[-1])
    w_VxE = np.asarray(w_VxE, np.float64)
    t_N = np.asarray(targets_BxT).reshape(-1)
    wt_N = np.asarray(weights_BxT, np.float64).reshape(-1)
    logp_NxV = _log_softmax(h_NxE @ w_VxE.T)
    loss = -(wt_N * logp_NxV[np.arange(len(t_N)), t_N]).sum()
    # d(-log p_t)/d logits = softmax - onehot(t), scaled by the token's weight.
    dlogits_NxV = np.exp(logp_NxV)
    dlogits_NxV[np.arange(len(t_N)), t_N] -= 1.0
    dlogits_NxV *= wt_N[:, None]
    return loss, (dlogits_NxV @ w_VxE).reshape(h_BxTxE.shape), dlogits_NxV.T @ h_NxE


def _inputs(rng, b=B, t=T, e=E, v=V):
    h = rng.normal(size=(b, t, e)).astype(np.float32)
    w = (0.5 * rng.normal(size=(v, e))).astype(np.float32)
    targets = rng.integers(0, v, (b, t))
    return h, w, targets


def _masks(rng, b=B, t=T):
    loss_mask = rng.random((b, t)) < 0.6
    thinking_mask = loss_mask & (rng.random((b, t)) < 0.5)
    return loss_mask, thinking_mask


def _loss_and_grads(h, w, targets, weights, chunk_size):
    def loss_fn(h, w):
        return chunked_cross_entropy(h, w, targets, weights, chunk_size=chunk_size)

    (loss, count), (dh, dw) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
        h, w
    )
    return loss, count, dh, dw


def _assert_close(ours, expected, rtol=2e-5):
    ours, expected = np.asarray(ours, np.float64), np.asarray(expected, np.float64)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("thinking_weight", [1.0, 0.25])
def test_loss_and_gradients_match_full_logits(rng, chunk_size, thinking_weight):
    h, w, targets = _inputs(rng)
    loss_mask, thinking_mask = _masks(rng)
    weights = sft_weights(loss_mask, thinking_mask, thinking_weight)
    loss, count, dh, dw = _loss_and_grads(h, w, targets, weights, chunk_size)
    ref_loss, ref_dh, ref_dw = reference(h, w, targets, np.asarray(weights))
    assert loss.dtype == count.dtype == jnp.float32 and loss.shape == count.shape == ()
    assert count == loss_mask.sum()
    _assert_close(loss, ref_loss)
    _assert_close(dh, ref_dh)
    _assert_close(dw, ref_dw)


def test_loss_matches_the_model_logits_function(rng):
    """Same numbers as projecting with `logits_from_hidden` and a jnp log_softmax in one go."""
    h, w, targets = _inputs(rng)
    weights = rng.random((B, T)).astype(np.float32)
    logp = jax.nn.log_softmax(logits_from_hidden(jnp.asarray(h), jnp.asarray(w)), axis=-1)
    expected = -jnp.sum(weights * jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0])
    loss, count = chunked_cross_entropy(h, w, targets, weights, chunk_size=16)
    _assert_close(loss, expected, rtol=1e-6)
    assert count == (weights > 0).sum()


def test_sft_weights():
    loss_mask = np.array([[1, 1, 1, 0, 0]])
    thinking_mask = np.array([[1, 0, 0, 1, 0]], bool)
    weights = sft_weights(loss_mask, thinking_mask, 0.5)
    assert weights.dtype == jnp.float32
    np.testing.assert_array_equal(weights, [[0.5, 1.0, 1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(sft_weights(loss_mask, thinking_mask), loss_mask)


def test_zero_weight_tokens_do_not_matter(rng):
    h, w, targets = _inputs(rng)
    loss_mask, _ = _masks(rng)
    weights = loss_mask.astype(np.float32)
    loss, count, dh, dw = _loss_and_grads(h, w, targets, weights, chunk_size=16)
    assert np.all(np.asarray(dh)[~loss_mask] == 0.0)
    # Other targets at masked positions, including an out-of-range "ignore" id, change nothing.
    other = np.where(loss_mask, targets, rng.integers(0, V, (B, T)))
    other[~loss_mask & (rng.random((B, T)) < 0.5)] = -100
    loss2, count2, dh2, dw2 = _loss_and_grads(h, w, other, weights, chunk_size=16)
    assert loss2 == loss and count2 == count
    np.testing.assert_array_equal(dh2, dh)
    np.testing.assert_array_equal(dw2, dw)
    assert np.isfinite(loss2)


def test_bfloat16_hidden_states(rng):
    """bf16 h (the model's bf16 compute): the loss is still float32 and exact for those inputs."""
    h, w, targets = _inputs(rng)
    weights = _masks(rng)[0].astype(np.float32)
    h16 = jnp.asarray(h, jnp.bfloat16)
    loss, _, dh, dw = _loss_and_grads(h16, w, targets, weights, chunk_size=7)
    assert loss.dtype == jnp.float32 and dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    # The logits see w rounded to bf16 as well (as in qwen3.logits_from_hidden).
    w16 = np.asarray(jnp.asarray(w, jnp.bfloat16).astype(jnp.float32))
    ref_loss, ref_dh, _ = reference(np.asarray(h16.astype(jnp.float32)), w16, targets, weights)
    _assert_close(loss, ref_loss)
    _assert_close(dh, ref_dh, rtol=1e-2)  # the gradient itself is rounded to bf16


@pytest.mark.parametrize("chunk_size", [111, 16, 7])
def test_token_logprobs_and_entropy(rng, chunk_size):
    h, w, targets = _inputs(rng)
    logp_NxV = _log_softmax(h.reshape(-1, E).astype(np.float64) @ w.T.astype(np.float64))
    expected_logp = logp_NxV[np.arange(B * T), targets.reshape(-1)].reshape(B, T)
    expected_entropy = -(np.exp(logp_NxV) * logp_NxV).sum(-1).reshape(B, T)

    logp = token_logprobs(h, w, targets, chunk_size=chunk_size)
    assert logp.dtype == jnp.float32 and logp.shape == (B, T)
    _assert_close(logp, expected_logp)
    logp2, entropy = token_logprobs(h, w, targets, chunk_size=chunk_size, return_entropy=True)
    assert entropy.dtype == jnp.float32 and entropy.shape == (B, T)
    np.testing.assert_array_equal(logp2, logp)
    _assert_close(entropy, expected_entropy)


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_token_logprobs_at_a_temperature(rng, temperature):
    """GRPO at a sampling temperature T optimises softmax(logits / T): log-probs, entropy and the
    log-prob's gradient match that formula in numpy (float64) and full-logits autodiff."""
    h, w, targets = _inputs(rng)
    logits_NxV = h.reshape(-1, E).astype(np.float64) @ w.T.astype(np.float64)
    logp_NxV = _log_softmax(logits_NxV / temperature)
    expected_logp = logp_NxV[np.arange(B * T), targets.reshape(-1)].reshape(B, T)
    expected_entropy = -(np.exp(logp_NxV) * logp_NxV).sum(-1).reshape(B, T)

    logp, entropy = token_logprobs(
        h, w, targets, chunk_size=7, return_entropy=True, temperature=temperature
    )
    _assert_close(logp, expected_logp)
    _assert_close(entropy, expected_entropy)
    assert not np.allclose(logp, token_logprobs(h, w, targets, chunk_size=7), atol=1e-3)

    def chunked(h):
        return token_logprobs(h, w, targets, chunk_size=7, temperature=temperature).sum()

    def full(h):
        logits = jnp.einsum("bte,ve->btv", h, w) / temperature
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logp, targets[..., None], axis=-1).sum()

    _assert_close(jax.grad(chunked)(h), jax.grad(full)(h), rtol=1e-4)


def test_token_logprobs_refuse_a_temperature_that_is_not_positive(rng):
    h, w, targets = _inputs(rng)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(h, w, targets, temperature=0.0)


def test_entropy_gradient_matches_full_logits(rng):
    """GRPO may put an entropy bonus in its loss: the chunked gradient must be right too."""
    h, w, targets = _inputs(rng)

    def chunked(h, w):
        return token_logprobs(h, w, targets, chunk_size=7, return_entropy=True)[1].sum()

    def full(h, w):
        logp = jax.nn.log_softmax(jnp.einsum("bte,ve->btv", h, w), axis=-1)
        return -(jnp.exp(logp) * logp).sum()

    grads, ref_grads = (jax.jit(jax.grad(f, argnums=(0, 1)))(h, w) for f in (chunked, full))
    for ours, expected in zip(grads, ref_grads, strict=True):
        _assert_close(ours, expected, rtol=1e-4)


def test_sharded_inputs_match_one_device(rng):
    """h batch-sharded, w sharded over vocab and embed (the model's rules) on 8 devices."""
    b, t, e, v = 4, 24, 16, 64
    h, w, targets = _inputs(rng, b, t, e, v)
    weights = _masks(rng, b, t)[0].astype(np.float32)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    batch = parallel.batch_sharding(mesh, ndim=2)
    sharded = (
        jax.device_put(h, parallel.batch_sharding(mesh, ndim=3)),
        jax.device_put(w, parallel.named_sharding(mesh, ("vocab", "embed"), w.shape)),
        jax.device_put(targets, batch),
        jax.device_put(weights, batch),
    )
    ours = _loss_and_grads(*sharded, chunk_size=20)
    expected = _loss_and_grads(h, w, targets, weights, chunk_size=20)
    assert ours[2].sharding.is_equivalent_to(sharded[0].sharding, 3)
    for a, b_ in zip(ours, expected, strict=True):
        _assert_close(a, b_, rtol=1e-6)


def _temp_bytes(fn, *shapes) -> int:
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_loss_uses_far_less_memory_than_full_logits():
    """Compiled loss + gradient at B*T = 4096, V = 32768: naive keeps [4096, V] float32 arrays
    (512 MiB each) for the backward pass; chunks of 512 tokens keep at most a few [512, V]."""
    b, t, e, v = 4, 1024, 64, 32768
    shapes = (
        jax.ShapeDtypeStruct((b, t, e), jnp.float32),
        jax.ShapeDtypeStruct((v, e), jnp.float32),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
        jax.ShapeDtypeStruct((b, t), jnp.float32),
    )

    def naive(h, w, targets, weights):
        logp = jax.nn.log_softmax(logits_from_hidden(h, w), axis=-1)
        return -jnp.sum(weights * jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0])

    def chunked(h, w, targets, weights):
        return chunked_cross_entropy(h, w, targets, weights, chunk_size=512)[0]

    naive_bytes, chunked_bytes = _temp_bytes(naive, *shapes), _temp_bytes(chunked, *shapes)
    logits_bytes = b * t * v * 4
    print(
        f"temp bytes: naive {naive_bytes / 2**20:.0f} MiB, chunked {chunked_bytes / 2**20:.0f} MiB"
    )
    assert naive_bytes >= logits_bytes  # the reference really does hold the full logits
    assert chunked_bytes < naive_bytes / 4
    assert chunked_bytes < logits_bytes / 2  # never more than a couple of chunks' logits
