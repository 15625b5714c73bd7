"""GRPO's device side: rollouts as padded rows, per-token log-probs, and the jitted update.

A rollout is its token ids (prompt, generated turns, tool results), a loss mask that is 1 only on
tokens the model generated, and the sampler's log-prob of each of those tokens. Row r of a batch
holds one rollout; inputs are its tokens [:-1] and targets its tokens [1:], so every per-target
array (loss mask, old and reference log-probs) is the rollout's array shifted by one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cacherl_jax.model import Qwen3Config, qwen3
from cacherl_jax.model import lora as lora_lib
from cacherl_jax.rl.grpo import grpo_loss
from cacherl_jax.train.loss import token_logprobs
from cacherl_jax.train.step import make_update_step

BATCH_KEYS = (
    "tokens_BxT",
    "targets_BxT",
    "positions_BxT",
    "segment_ids_BxT",
    "loss_mask_BxT",
    "old_logp_BxT",
    "ref_logp_BxT",
    "adv_B",
)


@dataclasses.dataclass(frozen=True)
class GrpoStepConfig:
    model: Qwen3Config
    lora: lora_lib.LoraConfig | None = None
    grad_accum: int = 1
    loss_chunk_size: int = 2048
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    kl_estimator: str = "k3"
    aggregation: str = "token-mean"
    entropy: bool = True  # per-token entropy of the full distribution, for the metrics
    # The policy optimised is the one the rollouts were sampled from: softmax(logits / T) at the
    # loop's temperature T (before top-k / top-p filtering); `policy_temperature`.
    temperature: float = 1.0

    @classmethod
    def from_config(
        cls, config: Any, model: Qwen3Config, lora: lora_lib.LoraConfig | None
    ) -> GrpoStepConfig:
        """The step's settings from a GRPO config's `train` and `grpo` blocks."""
        grpo = config.grpo
        return cls(
            model=model,
            lora=lora,
            grad_accum=config.train.grad_accum,
            loss_chunk_size=grpo.loss_chunk_size,
            eps_low=grpo.eps_low,
            eps_high=grpo.eps_high,
            beta=grpo.beta,
            kl_estimator=grpo.kl_estimator,
            aggregation=grpo.aggregation,
            entropy=grpo.entropy,
            temperature=policy_temperature(config),
        )


def policy_temperature(config: Any) -> float:
    """The temperature T of the policy GRPO optimises, softmax(logits / T): the rollouts' own
    (`loop.temperature`), or 1 for greedy rollouts, whose point mass has no gradient (greedy GRPO
    runs, e.g. the multi-host equality tests, train the model's own distribution)."""
    temperature = float(config.loop.temperature)
    return temperature if temperature > 0 else 1.0


def rollouts_to_batch(
    token_ids: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[int]],
    sampler_logps: Sequence[Sequence[float]],
    advantages: Sequence[float],
    seq_len: int,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Padded numpy rows (no `ref_logp_BxT` yet: the reference model fills it in).

    Each rollout must fit: `len(tokens) <= seq_len + 1` (the last token is only a target).
    Sampled tokens are used exactly as generated: nothing is decoded or re-tokenised here.
    """
    n = len(token_ids)
    if not (len(loss_masks) == len(sampler_logps) == len(advantages) == n):
        raise ValueError("token_ids, loss_masks, sampler_logps and advantages differ in length")
    batch = {
        "tokens_BxT": np.full((n, seq_len), pad_id, np.int32),
        "targets_BxT": np.full((n, seq_len), pad_id, np.int32),
        "positions_BxT": np.zeros((n, seq_len), np.int32),
        "segment_ids_BxT": np.zeros((n, seq_len), np.int32),
        "loss_mask_BxT": np.zeros((n, seq_len), np.int32),
        "old_logp_BxT": np.zeros((n, seq_len), np.float32),
        "adv_B": np.asarray(advantages, np.float32),
    }
    for row, (ids, mask, logp) in enumerate(zip(token_ids, loss_masks, sampler_logps, strict=True)):
        ids, mask, logp = np.asarray(ids), np.asarray(mask), np.asarray(logp, np.float32)
        if not (len(ids) == len(mask) == len(logp)):
            raise ValueError(
                f"rollout {row}: {len(ids)} tokens, {len(mask)} mask entries, {len(logp)} log-probs"
            )
        if len(ids) > seq_len + 1:
            raise ValueError(f"rollout {row} has {len(ids)} tokens; rows hold {seq_len + 1}")
        if mask[0]:
            raise ValueError(
                f"rollout {row}: its first token cannot be trained (nothing before it)"
            )
        m = len(ids) - 1
        batch["tokens_BxT"][row, :m] = ids[:-1]
        batch["targets_BxT"][row, :m] = ids[1:]
        batch["positions_BxT"][row, :m] = np.arange(m)
        batch["segment_ids_BxT"][row, :m] = 1
        batch["loss_mask_BxT"][row, :m] = mask[1:]
        batch["old_logp_BxT"][row, :m] = np.where(mask[1:] > 0, logp[1:], 0.0)
    return batch


def target_logprobs(
    params,
    model: Qwen3Config,
    batch,
    *,
    chunk_size: int = 2048,
    return_entropy: bool = False,
    temperature: float = 1.0,
):
    """log p(target) per position, [B, T] float32 (and the entropy), projected in chunks, under
    softmax(logits / temperature)."""
    x_BxTxE = qwen3.embed(params, model, batch["tokens_BxT"])
    h_BxTxE = qwen3.hidden_states(
        params,
        model,
        x_BxTxE,
        positions_BxT=batch["positions_BxT"],
        segment_ids_BxT=batch["segment_ids_BxT"],
    )
    return token_logprobs(
        h_BxTxE,
        qwen3.unembedding(params),
        batch["targets_BxT"],
        chunk_size=chunk_size,
        return_entropy=return_entropy,
        temperature=temperature,
    )


def make_grpo_step(
    config: GrpoStepConfig, tx: optax.GradientTransformation, schedule: optax.Schedule
):
    """`(state, base, batch) -> (state, metrics)` for one GRPO minibatch update."""

    def loss_fn(trainable, base, batch):
        params = (
            trainable
            if config.lora is None
            else lora_lib.merge_lora(jax.lax.stop_gradient(base), trainable, config.lora)
        )
        out = target_logprobs(
            params,
            config.model,
            batch,
            chunk_size=config.loss_chunk_size,
            return_entropy=config.entropy,
            temperature=config.temperature,
        )
        logp_BxT, entropy_BxT = out if config.entropy else (out, None)
        loss_sum, _, metrics = grpo_loss(
            logp_BxT,
            batch["old_logp_BxT"],
            batch["ref_logp_BxT"] if config.beta else None,
            batch["adv_B"],
            batch["loss_mask_BxT"],
            eps_low=config.eps_low,
            eps_high=config.eps_high,
            beta=config.beta,
            kl_estimator=config.kl_estimator,
            aggregation=config.aggregation,
            entropy_BxT=None if entropy_BxT is None else jax.lax.stop_gradient(entropy_BxT),
        )
        # How far the trainer's log-probs are from the sampler's (same weights: numerics only,
        # on the first update of a step; afterwards also the update itself).
        valid_BxT = batch["loss_mask_BxT"] > 0
        gap_BxT = jnp.where(valid_BxT, jnp.abs(logp_BxT - batch["old_logp_BxT"]), 0.0)
        metrics["logp_gap_max"] = jax.lax.stop_gradient(jnp.max(gap_BxT))
        return loss_sum, metrics

    def count_fn(batch):
        mask_BxT = batch["loss_mask_BxT"] > 0
        if config.aggregation == "token-mean":
            return jnp.sum(mask_BxT)
        return jnp.sum(jnp.any(mask_BxT, axis=1))

    return make_update_step(loss_fn, count_fn, tx, schedule, config.grad_accum)
