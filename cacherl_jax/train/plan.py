"""`cacherl plan`: will this SFT config fit? Compile the train step ahead of time, on abstract
inputs, for the config's model and mesh, and read XLA's memory analysis per device.

Nothing is allocated: parameters, optimizer state and batch are `ShapeDtypeStruct`s with their
shardings. Simulated CPU devices stand in for the real ones, so the layout (what each device
holds) is exact, while the activation figure is the CPU compiler's plan: GPU/TPU compilers fuse
and schedule differently, so treat it as an estimate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cacherl_jax import parallel
from cacherl_jax.model import lora as lora_lib
from cacherl_jax.model import param_shapes, param_shardings
from cacherl_jax.train.optimizer import make_optimizer, optimizer_state_shardings
from cacherl_jax.train.sft import BATCH_KEYS, StepConfig, make_train_step, model_config

GIB = 1024**3


def _per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard_shape = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard_shape)) * jnp.dtype(x.dtype).itemsize
    return total


def _abstract(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def plan(config: ml_collections.ConfigDict, devices: Any = None) -> dict[str, Any]:
    mesh = parallel.make_mesh(dict(config.mesh), devices=devices)
    model = model_config(config)
    param_dtype = jnp.dtype(config.model.param_dtype)
    params = _abstract(param_shapes(model, param_dtype), param_shardings(model, mesh))

    lora = None
    base = None
    trainable = params
    if config.lora.rank:
        lora = lora_lib.LoraConfig(
            rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets)
        )
        specs = lora_lib.abstract_lora(model, lora)
        lora_shapes = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype),
            specs,
            is_leaf=lambda x: hasattr(x, "logical_axes"),
        )
        trainable = _abstract(lora_shapes, lora_lib.lora_shardings(model, lora, mesh))
        base = params

    tx, schedule = make_optimizer(config.train)
    opt_state = _abstract(
        jax.eval_shape(tx.init, trainable), optimizer_state_shardings(tx, trainable, mesh)
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        "trainable": trainable,
        "opt_state": opt_state,
    }
    batch_sharding = parallel.batch_sharding(mesh)
    B, T = config.data.batch_size, config.data.seq_len
    batch = {
        key: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=batch_sharding) for key in BATCH_KEYS
    }
    step_config = StepConfig.from_config(config, model, lora)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(
        make_train_step(step_config, tx, schedule),
        in_shardings=(
            state_shardings,
            None if base is None else jax.tree.map(lambda x: x.sharding, base),
            None,
        ),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    compiled = step.lower(state, base, batch).compile()
    memory = compiled.memory_analysis()
    params_bytes = _per_device_bytes(params)
    trainable_bytes = 0 if base is None else _per_device_bytes(trainable)
    optimizer_bytes = _per_device_bytes(opt_state)
    temp_bytes = int(getattr(memory, "temp_size_in_bytes", 0)) if memory is not None else 0
    return {
        "model": dataclasses.asdict(model),
        "mesh": dict(mesh.shape),
        "devices": mesh.devices.size,
        "batch": [B, T],
        "lora_rank": config.lora.rank,
        "params_gib_per_device": params_bytes / GIB,
        "lora_gib_per_device": trainable_bytes / GIB,
        "optimizer_gib_per_device": optimizer_bytes / GIB,
        "activations_gib_per_device": temp_bytes / GIB,
        "total_gib_per_device": (params_bytes + trainable_bytes + optimizer_bytes + temp_bytes)
        / GIB,
    }


def format_plan(result: dict[str, Any], device_memory_gib: float | None) -> str:
    model = result["model"]
    lines = [
        f"Qwen3 (hidden {model['hidden_size']}, {model['num_layers']} layers, vocab {model['vocab_size']}), "
        f"{model['compute_dtype']} compute, remat={model['remat']}, LoRA rank {result['lora_rank'] or 'off'}",
        f"mesh {' '.join(f'{k}={v}' for k, v in result['mesh'].items())}, batch {result['batch'][0]} x {result['batch'][1]}",
        "",
        f"{'per device':<28} {'GiB':>10}",
    ]
    for key, label in (
        ("params_gib_per_device", "parameters"),
        ("lora_gib_per_device", "LoRA adapters"),
        ("optimizer_gib_per_device", "optimizer state"),
        ("activations_gib_per_device", "activations + temporaries"),
        ("total_gib_per_device", "total"),
    ):
        lines.append(f"{label:<28} {result[key]:>10.3f}")
    if device_memory_gib:
        fits = result["total_gib_per_device"] <= device_memory_gib
        lines.append(
            f"{'device memory':<28} {device_memory_gib:>10.3f}  -> {'fits' if fits else 'DOES NOT FIT'}"
        )
    return "\n".join(lines)
