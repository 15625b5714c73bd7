"""GRPO objective and advantages against an independent float64 numpy implementation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cacherl_jax.rl import group_advantages, grpo_loss

B, T = 5, 9


def numpy_grpo(logp, old, ref, adv, mask, eps_low, eps_high, beta, kl, aggregation):
    """Loss sum, count and d loss_sum / d logp, with the gradient written out by hand."""
    logp, old, ref, adv, mask = (np.asarray(x, np.float64) for x in (logp, old, ref, adv, mask))
    ratio = np.exp(logp - old)
    a = adv[:, None]
    unclipped, clipped = ratio * a, np.clip(ratio, 1 - eps_low, 1 + eps_high) * a
    policy = -np.minimum(unclipped, clipped)
    # The unclipped term is the min unless the ratio left [1-eps_low, 1+eps_high] in the
    # advantage's direction; then the clipped (constant) term wins and the gradient is 0.
    d_policy = np.where(clipped < unclipped, 0.0, -ratio * a)
    if kl == "k1":
        pen, d_pen = logp - ref, np.ones_like(logp)
    elif kl == "k2":
        pen, d_pen = 0.5 * (logp - ref) ** 2, logp - ref
    elif kl == "k3":
        pen, d_pen = np.exp(ref - logp) - (ref - logp) - 1, 1 - np.exp(ref - logp)
    else:
        pen, d_pen = np.zeros_like(logp), np.zeros_like(logp)
    per_token, d_per_token = policy + beta * pen, d_policy + beta * d_pen
    n_b = mask.sum(axis=1)
    if aggregation == "token-mean":
        return (per_token * mask).sum(), mask.sum(), d_per_token * mask
    scale = mask / np.maximum(n_b, 1)[:, None]
    return (per_token * scale).sum(), float((n_b > 0).sum()), d_per_token * scale


def _inputs(seed):
    rng = np.random.default_rng(seed)
    old = -rng.exponential(1.5, (B, T))
    logp = old + rng.normal(0, 0.3, (B, T))  # ratios spread well beyond 0.8..1.2
    ref = old + rng.normal(0, 0.3, (B, T))
    adv = rng.normal(size=B)
    mask = rng.random((B, T)) < 0.7
    mask[-1] = False  # a sample with no generated tokens (e.g. it failed to parse)
    return [x.astype(np.float32) for x in (logp, old, ref, adv)] + [mask.astype(np.int32)]


OPTIONS = list(
    itertools.product(
        [(0.2, 0.2), (0.2, 0.28)],
        [0.0, 0.15],
        ["k1", "k2", "k3", "none"],
        ["token-mean", "seq-mean-token-mean"],
    )
)


@pytest.mark.parametrize("eps,beta,kl,aggregation", OPTIONS)
def test_loss_and_gradient_match_numpy(eps, beta, kl, aggregation):
    if beta and kl == "none":
        with pytest.raises(ValueError, match="beta > 0"):
            grpo_loss(*_inputs(0), beta=beta, kl_estimator=kl)
        return
    logp, old, ref, adv, mask = _inputs(1)
    kwargs = dict(eps_low=eps[0], eps_high=eps[1], beta=beta, kl_estimator=kl,
                  aggregation=aggregation)  # fmt: skip

    def loss_sum(logp):
        loss, count, _ = grpo_loss(logp, old, ref, adv, mask, **kwargs)
        return loss, count

    (loss, count), grad = jax.value_and_grad(loss_sum, has_aux=True)(jnp.asarray(logp))
    expected_loss, expected_count, expected_grad = numpy_grpo(
        logp, old, ref, adv, mask, eps[0], eps[1], beta, kl, aggregation
    )
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5, atol=1e-6)
    assert float(count) == expected_count
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-7)


def test_some_tokens_are_clipped_on_both_sides():
    """The inputs above exercise both clip bounds, so the gradient test covers the clipped case."""
    logp, old, ref, adv, mask = _inputs(1)
    ratio = np.exp(logp - old)[mask > 0]
    assert (ratio < 0.8).any() and (ratio > 1.28).any()
    _, _, metrics = grpo_loss(logp, old, ref, adv, mask)
    assert 0.05 < float(metrics["clip_fraction"]) < 0.95


def test_zero_advantages_without_kl_give_zero_gradient():
    logp, old, ref, _, mask = _inputs(2)
    grad = jax.grad(lambda lp: grpo_loss(lp, old, ref, np.zeros(B), mask, beta=0.0)[0])(logp)
    assert np.all(np.asarray(grad) == 0.0)


def test_masked_tokens_get_no_gradient_and_do_not_matter():
    logp, old, ref, adv, mask = _inputs(3)

    def loss(lp, old):
        return grpo_loss(lp, old, ref, adv, mask, beta=0.15, aggregation="seq-mean-token-mean")[0]

    grad = np.asarray(jax.grad(loss)(logp, old))
    assert np.all(grad[mask == 0] == 0.0) and np.all(grad[mask == 1] != 0.0)
    # Anything at masked positions, even inf/nan log-probs, leaves the loss unchanged.
    for junk_value in (-1e9, -np.inf, np.nan):
        junk = np.where(mask == 1, old, np.float32(junk_value))
        assert float(loss(logp, junk)) == pytest.approx(float(loss(logp, old)), rel=1e-6)
    junk_logp = np.where(mask == 1, logp, np.float32(np.nan))
    assert float(loss(junk_logp, old)) == pytest.approx(float(loss(logp, old)), rel=1e-6)


def test_token_mean_and_sequence_mean_differ_as_the_formulas_say():
    logp, old, ref, adv, mask = _inputs(4)
    per_token, _, _ = grpo_loss(logp, old, ref, adv, mask, aggregation="token-mean")
    per_seq, n_seq, _ = grpo_loss(logp, old, ref, adv, mask, aggregation="seq-mean-token-mean")
    # Rebuild both from per-sample sums: token-mean weighs samples by length, seq-mean equally.
    sums = np.array(
        [float(grpo_loss(logp[i : i + 1], old[i : i + 1], ref[i : i + 1], adv[i : i + 1],
                         mask[i : i + 1])[0]) for i in range(B)]
    )  # fmt: skip
    n_b = mask.sum(axis=1)
    assert float(per_token) == pytest.approx(sums.sum(), rel=1e-5)
    assert float(per_seq) == pytest.approx((sums[n_b > 0] / n_b[n_b > 0]).sum(), rel=1e-5)
    assert float(n_seq) == (n_b > 0).sum() == B - 1
    assert float(per_token) / n_b.sum() != pytest.approx(float(per_seq) / float(n_seq))


def test_loss_sums_add_up_over_microbatches():
    logp, old, ref, adv, mask = _inputs(5)
    for aggregation in ("token-mean", "seq-mean-token-mean"):
        whole = grpo_loss(logp, old, ref, adv, mask, beta=0.1, aggregation=aggregation)
        halves = [
            grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], beta=0.1, aggregation=aggregation)
            for s in (slice(0, 2), slice(2, B))
        ]
        # Equal up to float32 summation order (XLA may reduce the halves in another order).
        assert float(whole[0]) == pytest.approx(sum(float(h[0]) for h in halves), rel=1e-5)
        assert float(whole[1]) == sum(float(h[1]) for h in halves)


def test_metrics():
    logp, old, ref, adv, mask = _inputs(6)
    entropy = np.random.default_rng(0).random((B, T)).astype(np.float32)
    _, _, m = grpo_loss(logp, old, ref, adv, mask, beta=0.1, kl_estimator="k3",
                        entropy_BxT=entropy)  # fmt: skip
    sel = mask > 0
    d = np.float64(ref) - logp
    assert float(m["kl_ref"]) == pytest.approx((np.exp(d) - d - 1)[sel].mean(), rel=1e-5)
    assert float(m["entropy"]) == pytest.approx(entropy[sel].mean(), rel=1e-5)
    assert float(m["ratio_mean"]) == pytest.approx(
        np.exp(logp - np.float64(old))[sel].mean(), rel=1e-5
    )
    # At the old policy itself, KL to it is 0 and nothing is clipped.
    _, _, m0 = grpo_loss(old, old, ref, adv, mask)
    assert float(m0["kl_old"]) == 0.0 and float(m0["clip_fraction"]) == 0.0


def test_bad_options_are_named():
    args = _inputs(0)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(*args, aggregation="sum")
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo_loss(*args, kl_estimator="k4")


def test_group_advantages_against_numpy():
    rewards = np.random.default_rng(7).random((4, 6)).astype(np.float32)
    rewards[2] = 0.5  # all equal: no signal, zero advantage
    mean, std = rewards.mean(axis=1, keepdims=True), rewards.std(axis=1, keepdims=True)
    np.testing.assert_allclose(
        group_advantages(rewards), (rewards - mean) / (std + 1e-6), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        group_advantages(rewards, normalize_std=False), rewards - mean, atol=1e-6
    )
    assert np.all(np.asarray(group_advantages(rewards))[2] == 0.0)
