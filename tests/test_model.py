"""Qwen3 forward pass against transformers' float32 reference, plus causality and remat."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PARITY_CONFIGS

from cacherl_jax import reference
from cacherl_jax.model import (
    attention,
    forward,
    hidden_states,
    init_params,
    load_hf_checkpoint,
    qwen3,
)

SEQ_LEN = 520  # long inputs catch RoPE mistakes that short ones hide
TOLERANCE = 1e-4  # max abs error relative to the largest reference logit (float32)
# bfloat16 compute (float32 params, norms, softmax, RoPE) against the float32 reference. Measured
# 3e-3 to 8e-3 on these configs; bf16 keeps 8 mantissa bits (relative step 2**-8 = 3.9e-3).
BF16_TOLERANCE = 2e-2


@functools.cache
def _jitted_forward(config):
    return jax.jit(
        lambda params, tokens, positions, segments: forward(
            params, config, tokens, positions_BxT=positions, segment_ids_BxT=segments
        )
    )


def run(params, config, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
    return np.asarray(_jitted_forward(config)(params, tokens_BxT, positions_BxT, segment_ids_BxT))


@pytest.fixture(params=sorted(PARITY_CONFIGS))
def loaded(request, hf_checkpoint_dir):
    """(config, params, reference model) for one parity config, loaded from a real checkpoint."""
    path = hf_checkpoint_dir(request.param, PARITY_CONFIGS[request.param])
    config, params = load_hf_checkpoint(path)
    return config, params, reference.load_hf_model(path)


def test_logits_match_transformers(loaded, rng):
    config, params, hf_model = loaded
    tokens_BxT = rng.integers(0, config.vocab_size, (2, SEQ_LEN))
    expected = reference.hf_logits(hf_model, tokens_BxT)
    ours = run(params, config, tokens_BxT)
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    assert reference.relative_error(ours, expected) <= TOLERANCE


@pytest.mark.parametrize("name", ["tied-theta1e6-gqa2", "untied-theta5e6-headdim24-gqa3"])
def test_gradients_match_transformers(name, hf_checkpoint_dir, tmp_path, rng):
    """Every parameter's gradient of a next-token loss, against torch autograd through
    transformers (float32). Ours go through the same exporter as checkpoints, so each lands on
    its Hugging Face name and layout; this also covers the hand-written MLP backward pass."""
    import safetensors.numpy
    import torch

    from cacherl_jax.model import save_hf_checkpoint

    path = hf_checkpoint_dir(name, PARITY_CONFIGS[name])
    config, params = load_hf_checkpoint(path)
    tokens_BxT = rng.integers(0, config.vocab_size, (2, 130))

    def loss(params):
        logits_BxTxV = forward(params, config, jnp.asarray(tokens_BxT[:, :-1]))
        logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
        targets_BxT = jnp.asarray(tokens_BxT[:, 1:])
        return -jnp.mean(jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1))

    grads = jax.jit(jax.grad(loss))(params)
    save_hf_checkpoint(config, grads, tmp_path)
    ours = safetensors.numpy.load_file(tmp_path / "model.safetensors")

    hf_model = reference.load_hf_model(path)
    tokens = torch.as_tensor(tokens_BxT, dtype=torch.long)
    logits = hf_model(tokens[:, :-1]).logits
    torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
    ).backward()
    expected = {n: p.grad.numpy() for n, p in hf_model.named_parameters()}
    assert sorted(ours) == sorted(expected)
    errors = {n: reference.relative_error(ours[n], expected[n]) for n in expected}
    assert max(errors.values()) <= 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_parity_is_sensitive_to_rope_theta(hf_checkpoint_dir, rng):
    """The checks above would notice a wrong rope_theta: here one is forced on purpose."""
    name = "untied-theta5e6-headdim24-gqa3"
    path = hf_checkpoint_dir(name, PARITY_CONFIGS[name])
    config, params = load_hf_checkpoint(path, rope_theta=1e6)
    tokens_BxT = rng.integers(0, config.vocab_size, (1, SEQ_LEN))
    expected = reference.hf_logits(reference.load_hf_model(path), tokens_BxT)
    assert reference.relative_error(run(params, config, tokens_BxT), expected) > 10 * TOLERANCE


def test_padded_batch_matches_each_row_alone(loaded, rng):
    """Right padding (segment id 0): real tokens must not attend to pad keys."""
    config, params, hf_model = loaded
    lengths = [SEQ_LEN, 300, 17]
    tokens_BxT = rng.integers(0, config.vocab_size, (len(lengths), SEQ_LEN))
    segments_BxT = (np.arange(SEQ_LEN)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    ours = run(params, config, tokens_BxT, segment_ids_BxT=segments_BxT)
    for row, length in enumerate(lengths):
        expected = reference.hf_logits(hf_model, tokens_BxT[row : row + 1, :length])[0]
        assert reference.relative_error(ours[row, :length], expected) <= TOLERANCE
    assert np.isfinite(ours).all(), "pad positions must not produce NaN"


def test_left_padding_with_explicit_positions(loaded, rng):
    config, params, hf_model = loaded
    pad, _length = 40, SEQ_LEN - 40
    tokens_1xT = rng.integers(0, config.vocab_size, (1, SEQ_LEN))
    segments_1xT = (np.arange(SEQ_LEN) >= pad).astype(np.int32)[None]
    positions_1xT = np.maximum(np.arange(SEQ_LEN) - pad, 0)[None]
    ours = run(params, config, tokens_1xT, positions_1xT, segments_1xT)
    expected = reference.hf_logits(hf_model, tokens_1xT[:, pad:])[0]
    assert reference.relative_error(ours[0, pad:], expected) <= TOLERANCE


def test_packed_examples_match_each_example_alone(loaded, rng):
    """Three examples packed into one row (then padding) never attend to each other."""
    config, params, hf_model = loaded
    lengths = [230, 190, 80]
    tokens_1xT = rng.integers(0, config.vocab_size, (1, SEQ_LEN))
    segments_T = np.zeros(SEQ_LEN, np.int32)
    starts = np.cumsum([0, *lengths])
    for k, (start, stop) in enumerate(itertools.pairwise(starts)):
        segments_T[start:stop] = k + 1
    ours = run(params, config, tokens_1xT, segment_ids_BxT=segments_T[None])  # positions implied
    for start, stop in itertools.pairwise(starts):
        expected = reference.hf_logits(hf_model, tokens_1xT[:, start:stop])[0]
        assert reference.relative_error(ours[0, start:stop], expected) <= TOLERANCE


def test_bfloat16_compute_close_to_float32_reference(loaded, rng):
    config, params, hf_model = loaded
    tokens_BxT = rng.integers(0, config.vocab_size, (2, SEQ_LEN))
    expected = reference.hf_logits(hf_model, tokens_BxT)
    bf16_config = config.replace(compute_dtype="bfloat16")
    ours = run(params, bf16_config, tokens_BxT)
    assert ours.dtype == np.float32
    error = reference.relative_error(ours, expected)
    assert TOLERANCE < error <= BF16_TOLERANCE, (
        f"bf16 error {error:.2e} (must differ from f32, stay close)"
    )


def test_positions_restart_at_each_segment():
    segments = jnp.array([[1, 1, 1, 2, 2, 0, 0], [0, 0, 3, 3, 3, 3, 3]])
    expected = np.array([[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(qwen3.positions_from_segments(segments), expected)


def test_attention_mask_token_by_token():
    segments = jnp.array([[1, 1, 2, 2, 0]])
    index = jnp.arange(5)[None]
    mask = np.asarray(qwen3.attention_mask(segments, segments, index, index))[0]
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1],  # a pad query sees only pad keys, itself at least
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(mask, expected)


def test_causality_gradient_of_future_tokens_is_zero():
    config = PARITY_CONFIGS["tied-theta1e6-gqa2"]
    params = init_params(config, jax.random.key(0))
    x_1xTxE = jax.random.normal(jax.random.key(1), (1, 24, config.hidden_size))
    t = 11

    def logits_at_t(x_1xTxE):
        h = hidden_states(params, config, x_1xTxE)
        return jnp.sum(qwen3.logits_from_hidden(h, qwen3.unembedding(params))[0, t] ** 2)

    grad_per_position_T = np.abs(np.asarray(jax.grad(logits_at_t)(x_1xTxE)[0])).sum(-1)
    assert np.all(grad_per_position_T[t + 1 :] == 0.0)
    assert np.all(grad_per_position_T[: t + 1] > 0.0), "earlier positions must influence position t"


def test_remat_gives_identical_logits_and_gradients(rng):
    config = PARITY_CONFIGS["untied-theta5e6-headdim24-gqa3"]
    params = init_params(config, jax.random.key(0))
    tokens_BxT = jnp.asarray(rng.integers(0, config.vocab_size, (2, 64)))

    def loss(params, config):
        return jnp.mean(forward(params, config, tokens_BxT) ** 2)

    plain_loss, plain_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, config)
    remat_config = config.replace(remat=True)
    remat_loss, remat_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(
        params, remat_config
    )
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_attention_is_chosen_by_platform_or_config():
    config = PARITY_CONFIGS["tied-theta1e6-gqa2"]
    platform_choice = {"cpu": "cpu_blocked", "tpu": "splash", "gpu": "cudnn"}
    assert attention.implementation(config) == platform_choice.get(jax.default_backend(), "xla")
    for impl in ("xla", "cpu_blocked", "splash", "cudnn"):
        assert attention.implementation(config.replace(attention_impl=impl)) == impl
    with pytest.raises(ValueError, match="attention_impl"):
        config.replace(attention_impl="flash")


def test_attention_implementations_agree(rng):
    """`jax.nn.dot_product_attention` ("xla", what GPUs and TPUs run) and the CPU form give the
    same logits and gradients, packed examples and padding included."""
    config = PARITY_CONFIGS["untied-theta5e6-headdim24-gqa3"].replace(attention_block=48)
    params = init_params(config, jax.random.key(3))
    tokens_BxT = jnp.asarray(rng.integers(0, config.vocab_size, (2, 130)))
    segments_BxT = jnp.asarray([[1] * 60 + [2] * 60 + [0] * 10, [3] * 130])

    def loss(params, config):
        logits = forward(params, config, tokens_BxT, segment_ids_BxT=segments_BxT)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    results = {}
    for impl in ("xla", "cpu_blocked"):
        grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
        results[impl] = grad(params, config.replace(attention_impl=impl))
    (xla_grads, xla_logits), (cpu_grads, cpu_logits) = results["xla"], results["cpu_blocked"]
    assert reference.relative_error(np.asarray(cpu_logits), np.asarray(xla_logits)) <= 1e-5
    for a, b in zip(jax.tree.leaves(cpu_grads), jax.tree.leaves(xla_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("block", [None, 64, 100])
def test_causal_block_skipping_is_exact(block, rng):
    """Skipping fully-masked key blocks changes nothing, for blocks that do or don't divide T."""
    config = PARITY_CONFIGS["tied-theta5e6-headdim32-gqa4"]
    params = init_params(config, jax.random.key(2))
    tokens_BxT = rng.integers(0, config.vocab_size, (2, 300))
    segments_BxT = np.repeat(np.array([[1] * 120 + [2] * 130 + [0] * 50]), 2, axis=0)
    one_call = run(
        params, config.replace(attention_block=None), tokens_BxT, segment_ids_BxT=segments_BxT
    )
    blocked = run(
        params, config.replace(attention_block=block), tokens_BxT, segment_ids_BxT=segments_BxT
    )
    np.testing.assert_allclose(blocked, one_call, rtol=1e-6, atol=1e-6)


def _naive_attention_np(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, mask_BxTxT):
    """Softmax attention in float64 numpy, one head at a time: the independent reference."""
    B, T, H, D = q_BxTxHxD.shape
    G = H // k_BxTxKxD.shape[2]
    out = np.zeros((B, T, H, D))
    for b, h in itertools.product(range(B), range(H)):
        logits_TxT = q_BxTxHxD[b, :, h] @ k_BxTxKxD[b, :, h // G].T / np.sqrt(D)
        logits_TxT = np.where(mask_BxTxT[b], logits_TxT, -np.inf)
        p_TxT = np.exp(logits_TxT - logits_TxT.max(axis=-1, keepdims=True))
        out[b, :, h] = (p_TxT / p_TxT.sum(axis=-1, keepdims=True)) @ v_BxTxKxD[b, :, h // G]
    return out


@pytest.mark.parametrize("one_pair_at_a_time", [True, False])
@pytest.mark.parametrize("block", [None, 32, 50])
def test_cpu_attention_and_its_backward_pass_match_a_float64_reference(
    block, one_pair_at_a_time, rng
):
    """Both forms of the CPU attention (one (batch, kv head) pair at a time with a hand-written
    backward pass that recomputes the softmax from saved row statistics; all pairs at once under
    autodiff), causal blocks skipped, against float64 references: a numpy loop over heads for the output, autodiff of plain softmax attention for
    the gradients; packed examples and padding included."""
    B, T, H, K, D = 2, 96, 4, 2, 16
    config = PARITY_CONFIGS["tied-theta5e6-headdim32-gqa4"].replace(
        head_dim=D, attention_block=block
    )
    q = rng.standard_normal((B, T, H, D))
    k = rng.standard_normal((B, T, K, D))
    v = rng.standard_normal((B, T, K, D))
    d_out = rng.standard_normal((B, T, H, D))
    segments_BxT = np.array([[1] * 40 + [2] * 46 + [0] * 10, [3] * 96])
    index_BxT = np.broadcast_to(np.arange(T), (B, T))
    mask_BxTxT = np.asarray(qwen3.attention_mask(segments_BxT, segments_BxT, index_BxT, index_BxT))

    def ours(q, k, v):
        mask = jnp.asarray(mask_BxTxT)
        return attention._cpu_self_attention(q, k, v, mask, config, one_pair_at_a_time)

    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    out, vjp = jax.vjp(jax.jit(ours), *f32)
    np.testing.assert_allclose(out, _naive_attention_np(q, k, v, mask_BxTxT), atol=2e-5)

    # Reference gradients: autodiff of plain softmax attention in float64.
    def plain(q, k, v):
        G = H // K
        k_BxTxHxD, v_BxTxHxD = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
        logits = jnp.einsum("bthd,bshd->bhts", q, k_BxTxHxD) / np.sqrt(D)
        logits = jnp.where(mask_BxTxT[:, None], logits, -jnp.inf)
        return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v_BxTxHxD)

    with jax.enable_x64():
        f64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v)]
        expected = jax.vjp(plain, *f64)[1](jnp.asarray(d_out, jnp.float64))
        expected = [np.asarray(g) for g in expected]
    grads = vjp(jnp.asarray(d_out, jnp.float32))
    for name, got, want in zip("qkv", grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=5e-5, err_msg=f"d{name}")
    # Under jax.checkpoint (config.remat) the same gradients, up to float32 rounding: on a GPU
    # XLA fuses the recomputed forward differently (3e-7 apart on an H200).
    remat_grads = jax.vjp(jax.jit(jax.checkpoint(ours)), *f32)[1](jnp.asarray(d_out, jnp.float32))
    for got, want in zip(remat_grads, grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Keys of another packed example and padding get no gradient from a row's queries.
    only_first_BxTxHxD = np.zeros_like(d_out)
    only_first_BxTxHxD[0, :40] = d_out[0, :40]
    _, dk, dv = vjp(jnp.asarray(only_first_BxTxHxD, jnp.float32))
    assert np.all(np.asarray(dk)[0, 40:] == 0) and np.all(np.asarray(dv)[0, 40:] == 0)
    assert np.all(np.asarray(dk)[1] == 0) and np.all(np.asarray(dv)[1] == 0)


@pytest.mark.parametrize("one_pair_at_a_time", [True, False])
def test_cpu_attention_bfloat16_close_to_float32(one_pair_at_a_time, rng):
    B, T, H, K, D = 2, 80, 4, 2, 16
    config = PARITY_CONFIGS["tied-theta5e6-headdim32-gqa4"].replace(head_dim=D, attention_block=32)
    q, k, v = (rng.standard_normal((B, T, n, D)) for n in (H, K, K))
    segments_BxT = np.ones((B, T), np.int32)
    index_BxT = np.broadcast_to(np.arange(T), (B, T))
    mask_BxTxT = qwen3.attention_mask(segments_BxT, segments_BxT, index_BxT, index_BxT)

    def loss(q, k, v):
        out = attention._cpu_self_attention(q, k, v, mask_BxTxT, config, one_pair_at_a_time)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    want = grad(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    got = grad(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(w)))
        assert float(jnp.max(jnp.abs(g.astype(jnp.float32) - w))) < 3e-2 * scale
