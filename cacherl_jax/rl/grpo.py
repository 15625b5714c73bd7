"""The GRPO objective and group advantages, as pure functions of per-token log-probabilities.

Per generated token t of sample b (only where `mask_BxT` is 1: never prompts, tool results or
padding):

    ratio   = exp(logp - old_logp)
    policy  = -min(ratio * A_b, clip(ratio, 1 - eps_low, 1 + eps_high) * A_b)
    kl      = k1: logp - ref_logp
              k2: (logp - ref_logp)^2 / 2
              k3: exp(ref_logp - logp) - (ref_logp - logp) - 1      (unbiased, always >= 0)
    loss_t  = policy + beta * kl

Aggregation, returned as (loss_sum, count) so that micro-batches add up exactly:
  "token-mean":           loss_sum = sum over all masked tokens of loss_t;  count = their number.
  "seq-mean-token-mean":  loss_sum = sum over samples of (mean of loss_t over the sample's
                          masked tokens);  count = samples with at least one masked token.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

KlEstimator = Literal["k1", "k2", "k3", "none"]
Aggregation = Literal["token-mean", "seq-mean-token-mean"]
KL_ESTIMATORS = ("k1", "k2", "k3", "none")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean")


def kl_penalty(logp_BxT: jax.Array, ref_logp_BxT: jax.Array, estimator: KlEstimator) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3)."""
    log_ratio_BxT = ref_logp_BxT - logp_BxT
    if estimator == "k1":
        return -log_ratio_BxT
    if estimator == "k2":
        return 0.5 * jnp.square(log_ratio_BxT)
    if estimator == "k3":
        return jnp.exp(log_ratio_BxT) - log_ratio_BxT - 1.0
    if estimator == "none":
        return jnp.zeros_like(logp_BxT)
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def grpo_loss(
    logp_BxT: jax.Array,
    old_logp_BxT: jax.Array,
    ref_logp_BxT: jax.Array | None,
    adv_B: jax.Array,
    mask_BxT: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: KlEstimator = "k3",
    aggregation: Aggregation = "token-mean",
    entropy_BxT: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(loss_sum, count, metrics); minimise loss_sum / count. Gradients flow through `logp_BxT`
    only: old and reference log-probs are constants of the step.

    Metrics are means over this call's masked tokens: `clip_fraction` (tokens whose clipped term
    won, so they get no policy gradient), `kl_ref` (the chosen estimator; 0 with "none"),
    `kl_old` (k3 estimate of KL(pi || pi_old), how far the update has moved), `ratio_mean`, and
    `entropy` when per-token entropies are given.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if beta != 0.0 and (kl_estimator == "none" or ref_logp_BxT is None):
        raise ValueError("beta > 0 needs reference log-probs and a kl_estimator other than 'none'")
    # Masked positions are zeroed before any arithmetic, so whatever they hold (a sampler's 0, a
    # -inf from padding) can neither leak into the loss nor turn it into nan via 0 * inf.
    valid_BxT = mask_BxT.astype(bool)
    mask_BxT = valid_BxT.astype(jnp.float32)
    logp_BxT = jnp.where(valid_BxT, logp_BxT.astype(jnp.float32), 0.0)
    old_logp_BxT = jax.lax.stop_gradient(
        jnp.where(valid_BxT, old_logp_BxT, 0.0).astype(jnp.float32)
    )
    adv_Bx1 = jax.lax.stop_gradient(adv_B.astype(jnp.float32))[:, None]

    ratio_BxT = jnp.exp(logp_BxT - old_logp_BxT)
    clipped_BxT = jnp.clip(ratio_BxT, 1.0 - eps_low, 1.0 + eps_high)
    unclipped_obj_BxT = ratio_BxT * adv_Bx1
    clipped_obj_BxT = clipped_BxT * adv_Bx1
    per_token_BxT = -jnp.minimum(unclipped_obj_BxT, clipped_obj_BxT)
    if ref_logp_BxT is not None and kl_estimator != "none":
        ref_logp_BxT = jnp.where(valid_BxT, ref_logp_BxT, 0.0).astype(jnp.float32)
        ref_logp_BxT = jax.lax.stop_gradient(ref_logp_BxT)
        kl_BxT = kl_penalty(logp_BxT, ref_logp_BxT, kl_estimator)
    else:
        kl_BxT = jnp.zeros_like(logp_BxT)
    if beta != 0.0:
        per_token_BxT = per_token_BxT + beta * kl_BxT

    tokens_B = jnp.sum(mask_BxT, axis=1)
    if aggregation == "token-mean":
        loss_sum = jnp.sum(per_token_BxT * mask_BxT)
        count = jnp.sum(tokens_B)
    else:
        per_sample_B = jnp.sum(per_token_BxT * mask_BxT, axis=1) / jnp.maximum(tokens_B, 1.0)
        loss_sum = jnp.sum(per_sample_B)
        count = jnp.sum(tokens_B > 0).astype(jnp.float32)

    n_tokens = jnp.maximum(jnp.sum(tokens_B), 1.0)

    def token_mean(x_BxT):
        return jnp.sum(jax.lax.stop_gradient(x_BxT) * mask_BxT) / n_tokens

    # The clipped term wins (strictly) exactly when the ratio left the trust region in the
    # direction the advantage pushes it.
    clipped_won_BxT = clipped_obj_BxT < unclipped_obj_BxT
    log_ratio_old_BxT = old_logp_BxT - logp_BxT
    metrics = {
        "clip_fraction": token_mean(clipped_won_BxT.astype(jnp.float32)),
        "kl_ref": token_mean(kl_BxT),
        "kl_old": token_mean(jnp.exp(log_ratio_old_BxT) - log_ratio_old_BxT - 1.0),
        "ratio_mean": token_mean(ratio_BxT),
    }
    if entropy_BxT is not None:
        metrics["entropy"] = token_mean(jnp.where(valid_BxT, entropy_BxT, 0.0))
    return loss_sum, count, metrics


def group_advantages(
    rewards_NxG: jax.Array, *, normalize_std: bool = True, eps: float = 1e-6
) -> jax.Array:
    """Advantages for N groups of G samples of the same prompt, [N, G].

    GRPO: (r - mean) / (std + eps) within each group; Dr.GRPO (`normalize_std=False`): r - mean.
    The std is the population std (ddof 0). A group whose rewards are all equal gets zeros.
    """
    rewards_NxG = jnp.asarray(rewards_NxG, jnp.float32)
    centred_NxG = rewards_NxG - jnp.mean(rewards_NxG, axis=1, keepdims=True)
    if not normalize_std:
        return centred_NxG
    return centred_NxG / (jnp.std(rewards_NxG, axis=1, keepdims=True) + eps)
