"""The update step every trainer shares: exact gradient accumulation, then one optax update.

A trainer supplies `loss_fn(trainable, base, micro_batch) -> (loss_sum, aux)` returning a float32
loss *sum* and a dict of scalar diagnostics, and `count_fn(batch) -> count`, the denominator of
the whole batch (trained tokens for a token mean, sequences for a sequence mean). Each
micro-batch's gradient is that of loss_sum / count for the *whole* batch's count, so the
accumulated gradient equals the one-shot gradient of the batch mean exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cacherl_jax.train.metrics import global_norm
from cacherl_jax.train.optimizer import init_optimizer_state

LossFn = Callable[[Any, Any, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]
CountFn = Callable[[Mapping[str, jax.Array]], jax.Array]


def make_update_step(
    loss_fn: LossFn,
    count_fn: CountFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int = 1,
):
    """`(state, base, batch) -> (state, metrics)`; `state` = {step, trainable, opt_state}.

    Every array in `batch` has the batch on its leading axis (split into `grad_accum` micro-
    batches). Metrics: `loss` (the batch mean), `count`, gradient / parameter / update norms,
    `lr`, and the loss function's diagnostics averaged over micro-batches.
    """

    def update_step(state, base, batch):
        count = jnp.maximum(count_fn(batch).astype(jnp.float32), 1.0)
        micro = jax.tree.map(
            lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch
        )

        def micro_step(carry, micro_batch):
            grads_acc, loss_acc, aux_acc = carry

            def scaled_loss(trainable):
                loss_sum, aux = loss_fn(trainable, base, micro_batch)
                return loss_sum / count, (loss_sum, aux)

            (_, (loss_sum, aux)), grads = jax.value_and_grad(scaled_loss, has_aux=True)(
                state["trainable"]
            )
            aux_acc = jax.tree.map(lambda a, b: a + b / grad_accum, aux_acc, aux)
            return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss_sum, aux_acc), None

        zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
        aux_shape = jax.eval_shape(
            lambda: loss_fn(state["trainable"], base, jax.tree.map(lambda x: x[0], micro))[1]
        )
        aux_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
        (grads, loss_sum, aux), _ = jax.lax.scan(
            micro_step, (zeros, jnp.float32(0.0), aux_zeros), micro
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        metrics = {
            "loss": loss_sum / count,
            "count": count,
            "grad_norm": global_norm(grads),
            "param_norm": global_norm(trainable),
            "update_norm": global_norm(updates),
            "lr": schedule(state["step"]),
            **aux,
        }
        new_state = {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}
        return new_state, metrics

    return update_step


def init_train_state(
    tx: optax.GradientTransformation, trainable: Any, mesh: jax.sharding.Mesh
) -> tuple[dict[str, Any], Any]:
    """(state, its shardings): step 0, the trainable params as placed, and the optimizer state
    sharded like them; the step counter replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
        "trainable": trainable,
        "opt_state": init_optimizer_state(tx, trainable, mesh),
    }
    return state, jax.tree.map(lambda x: x.sharding, state)


def batch_shards(mesh: jax.sharding.Mesh) -> int:
    """How many ways the mesh splits a batch (its data and fsdp axes)."""
    return int(math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape))
