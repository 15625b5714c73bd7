"""AdamW with warmup, a cosine or linear decay, and global-norm clipping."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax


def learning_rate_schedule(train: Mapping[str, Any]) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine or linear decay to `lr * end_lr_ratio` at `steps`."""
    peak, steps, warmup = train["lr"], train["steps"], min(train["warmup_steps"], train["steps"])
    end = peak * train["end_lr_ratio"]
    if train["schedule"] == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), end)
    if train["schedule"] == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, peak, warmup),
                optax.linear_schedule(peak, end, max(steps - warmup, 1)),
            ],
            [warmup],
        )
    raise ValueError(f"train.schedule must be 'cosine' or 'linear', got {train['schedule']!r}")


def _decay_mask(params: Any) -> Any:
    """Weight decay on projections and embeddings, not on norm scales (`attn_norm`, `q_norm`, ...)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not str(path[-1].key).endswith("norm"), params
    )


def make_optimizer(train: Mapping[str, Any]) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(train)
    tx = optax.chain(
        optax.clip_by_global_norm(train["max_grad_norm"]),
        optax.adamw(
            schedule,
            b1=train["b1"],
            b2=train["b2"],
            eps=train["eps"],
            weight_decay=train["weight_decay"],
            mask=_decay_mask,
        ),
    )
    return tx, schedule


def optimizer_state_shardings(
    tx: optax.GradientTransformation, params: Any, mesh: jax.sharding.Mesh
) -> Any:
    """Shardings for `tx.init(params)`: moments sharded like their parameters, counts replicated.

    Left to itself, `jax.jit(tx.init)` may replicate the zero-initialised moments on every
    device, which for FSDP would cost the full optimizer state per device.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda x: x.sharding, params)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, params),
        shardings,
        transform_non_params=lambda _: replicated,
    )


def init_optimizer_state(
    tx: optax.GradientTransformation, params: Any, mesh: jax.sharding.Mesh
) -> Any:
    return jax.jit(tx.init, out_shardings=optimizer_state_shardings(tx, params, mesh))(params)
