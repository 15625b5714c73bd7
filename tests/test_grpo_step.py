"""GRPO's device side: rollout rows token by token, log-probs vs the forward, exact updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cacherl_jax.model import init_params, qwen3
from cacherl_jax.rl import grpo_loss
from cacherl_jax.train.grpo_step import (
    GrpoStepConfig,
    make_grpo_step,
    rollouts_to_batch,
    target_logprobs,
)
from tests.conftest import PARITY_CONFIGS

MODEL = PARITY_CONFIGS["tied-theta1e6-gqa2"]
SEQ_LEN = 24


def _rollouts(rng, n=4):
    """Rollouts shaped like the agent loop's: prompt (0), generated (1), tool result (0), ..."""
    ids, masks, logps = [], [], []
    for i in range(n):
        spans = [(6 + i, 0), (5, 1), (4, 0), (3 + i, 1)]
        mask = np.concatenate([np.full(length, m) for length, m in spans]).astype(np.int8)
        ids.append(rng.integers(1, MODEL.vocab_size, len(mask)))
        masks.append(mask)
        logps.append(np.where(mask > 0, -rng.exponential(2.0, len(mask)), 0.0))
    return ids, masks, logps


def test_rollouts_become_shifted_rows_token_by_token(rng):
    ids, masks, logps = _rollouts(rng)
    batch = rollouts_to_batch(ids, masks, logps, [0.5, -1.0, 0.0, 2.0], SEQ_LEN, pad_id=0)
    for r in range(4):
        m = len(ids[r]) - 1
        np.testing.assert_array_equal(batch["tokens_BxT"][r, :m], ids[r][:-1])
        np.testing.assert_array_equal(batch["targets_BxT"][r, :m], ids[r][1:])
        np.testing.assert_array_equal(batch["loss_mask_BxT"][r, :m], masks[r][1:])
        np.testing.assert_array_equal(batch["old_logp_BxT"][r, :m], np.float32(logps[r][1:]))
        np.testing.assert_array_equal(batch["segment_ids_BxT"][r], np.arange(SEQ_LEN) < m)
        np.testing.assert_array_equal(batch["positions_BxT"][r, :m], np.arange(m))
        assert not batch["loss_mask_BxT"][r, m:].any() and not batch["tokens_BxT"][r, m:].any()
    np.testing.assert_array_equal(batch["adv_B"], np.float32([0.5, -1.0, 0.0, 2.0]))


def test_rollouts_that_do_not_fit_are_refused(rng):
    ids, masks, logps = _rollouts(rng, 1)
    with pytest.raises(ValueError, match="rollout 0 has"):
        rollouts_to_batch(ids, masks, logps, [0.0], seq_len=len(ids[0]) - 2)
    with pytest.raises(ValueError, match="3 log-probs"):
        rollouts_to_batch(ids, masks, [np.zeros(3)], [0.0], SEQ_LEN)


def _batch(rng, params):
    ids, masks, logps = _rollouts(rng)
    batch = rollouts_to_batch(ids, masks, logps, [0.5, -1.0, 0.25, 2.0], SEQ_LEN)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    # Old log-probs near the current policy (ratios around 1, some clipped), a nearby reference.
    current = target_logprobs(params, MODEL, batch)
    noise = jax.random.normal(jax.random.key(1), current.shape)
    batch["old_logp_BxT"] = jnp.where(batch["loss_mask_BxT"] > 0, current + 0.3 * noise, 0.0)
    batch["ref_logp_BxT"] = current - 0.2 * jnp.abs(noise)
    return batch


def test_target_logprobs_match_the_full_forward(rng):
    params = init_params(MODEL, jax.random.key(0))
    batch = _batch(rng, params)
    logits = qwen3.forward(
        params,
        MODEL,
        batch["tokens_BxT"],
        positions_BxT=batch["positions_BxT"],
        segment_ids_BxT=batch["segment_ids_BxT"],
    )
    expected = jnp.take_along_axis(
        jax.nn.log_softmax(logits, axis=-1), batch["targets_BxT"][..., None], axis=-1
    )[..., 0]
    ours = target_logprobs(params, MODEL, batch, chunk_size=7)
    np.testing.assert_allclose(ours, expected, atol=2e-5)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_update_equals_naive_gradient_and_accumulates_exactly(rng, aggregation):
    """With SGD(lr=1) the update is the gradient; it matches full-logits autodiff, and splitting
    the batch into two micro-batches changes nothing."""
    params = init_params(MODEL, jax.random.key(0))
    batch = _batch(rng, params)
    options = dict(eps_low=0.2, eps_high=0.28, beta=0.1, kl_estimator="k3", aggregation=aggregation)

    def naive_loss(p):
        logits = qwen3.forward(
            p, MODEL, batch["tokens_BxT"], segment_ids_BxT=batch["segment_ids_BxT"]
        )
        logp = jnp.take_along_axis(
            jax.nn.log_softmax(logits, axis=-1), batch["targets_BxT"][..., None], axis=-1
        )[..., 0]
        loss_sum, count, _ = grpo_loss(
            logp, batch["old_logp_BxT"], batch["ref_logp_BxT"], batch["adv_B"],
            batch["loss_mask_BxT"], **options,
        )  # fmt: skip
        return loss_sum / count

    expected_grads = jax.grad(naive_loss)(params)
    tx = optax.sgd(1.0)
    results = []
    for accum in (1, 2):
        config = GrpoStepConfig(MODEL, grad_accum=accum, loss_chunk_size=16, **options)
        step = jax.jit(make_grpo_step(config, tx, optax.constant_schedule(1.0)))
        state = {"step": jnp.int32(0), "trainable": params, "opt_state": tx.init(params)}
        new_state, metrics = step(state, None, batch)
        grads = jax.tree.map(jnp.subtract, params, new_state["trainable"])
        jax.tree.map(
            lambda g, e: np.testing.assert_allclose(g, e, rtol=2e-4, atol=2e-6),
            grads,
            expected_grads,
        )
        results.append((new_state, metrics))
        assert float(metrics["loss"]) == pytest.approx(float(naive_loss(params)), rel=1e-5)
        assert 0.0 < float(metrics["clip_fraction"]) < 1.0
        assert float(metrics["logp_gap_max"]) > 0.1  # the old log-probs were perturbed on purpose
    assert float(results[0][1]["count"]) == float(results[1][1]["count"])


def test_tool_result_tokens_get_no_gradient_signal(rng):
    """Old/reference log-probs at masked positions (prompt, tool results) change nothing."""
    params = init_params(MODEL, jax.random.key(0))
    batch = _batch(rng, params)
    config = GrpoStepConfig(MODEL, beta=0.1)
    tx = optax.sgd(1.0)
    step = jax.jit(make_grpo_step(config, tx, optax.constant_schedule(1.0)))
    state = {"step": jnp.int32(0), "trainable": params, "opt_state": tx.init(params)}
    masked = batch["loss_mask_BxT"] == 0
    junk = dict(batch)
    junk["old_logp_BxT"] = jnp.where(masked, -50.0, batch["old_logp_BxT"])
    junk["ref_logp_BxT"] = jnp.where(masked, 7.0, batch["ref_logp_BxT"])
    a, _ = step(state, None, batch)
    b, _ = step(state, None, junk)
    jax.tree.map(np.testing.assert_array_equal, a["trainable"], b["trainable"])
