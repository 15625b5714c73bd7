"""`cacherl plan`: will this config fit? Compile every program a run compiles, ahead of time, on
abstract inputs, for the config's model and mesh, and read XLA's memory and cost analyses.

Programs: the SFT step for an SFT config; for a GRPO config the GRPO update
(`grpo_step.make_grpo_step`), the old/reference log-prob pass (`grpo_step.target_logprobs`) and
the sampler's prefill-and-decode program (`sampler.lower_generate`) at the configured batch and
cache length. Training programs compile over all chips (the config's mesh); the sampler compiles
over one host's chips as a `("data", "tensor")` mesh, since each host samples its own rows with
no cross-host collective while decoding.

Nothing is allocated: parameters, optimizer state, cache and batches are `ShapeDtypeStruct`s with
their shardings. The devices are simulated CPU devices (the layout is exact; the temporaries are
the CPU compiler's plan, an estimate for an accelerator) or a TPU topology's compile-only devices
(`topology.py`: the TPU compiler's own figures). Programs are traced under `jax.set_mesh`, so the
attention implementation is the target's (splash on TPU), not this machine's.

The peak per chip adds what is live at once: the train state (trainable parameters, optimizer
state, a LoRA base), the reference parameters (beta > 0 without LoRA: a frozen copy), the
rollout weights (compute dtype, rollout layout), the KV cache, and the largest program's
temporaries.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cacherl_jax import parallel
from cacherl_jax.model import Qwen3Config, param_shapes, param_shardings, presets, qwen3
from cacherl_jax.model import lora as lora_lib
from cacherl_jax.sampling import sampler as sampler_lib
from cacherl_jax.train import grpo_step
from cacherl_jax.train.optimizer import make_optimizer, optimizer_state_shardings
from cacherl_jax.train.sft import BATCH_KEYS, StepConfig, make_train_step, model_config

GIB = 1024**3
# The sampler program's prompt chunk: a first turn (system prompt, tools, query).
PROMPT_LEN = 1024


def plan(
    config: ml_collections.ConfigDict,
    devices: Any = None,
    *,
    attention: str | None = None,
) -> dict[str, Any]:
    """Per-chip memory and FLOPs of the config's programs on `devices` (default: JAX's).

    `attention` overrides the model's `attention_impl` (e.g. "xla" to compare with the platform's
    fused kernel)."""
    devices = list(devices if devices is not None else jax.devices())
    mesh = parallel.make_mesh(dict(config.mesh), devices=devices)
    model = _model(config)
    if attention:
        model = model.replace(attention_impl=attention)
    train = _train_state(config, model, mesh)
    with jax.set_mesh(mesh):  # attention picks the target's kernel (attention.platform)
        if _is_grpo(config):
            programs = _grpo_programs(config, train, mesh)
        else:
            programs = {"sft step": _compile_sft(config, train, mesh)}
    result = {
        "kind": "grpo" if _is_grpo(config) else "sft",
        "model": dataclasses.asdict(model),
        "parameters": _count(train.params),
        "platform": devices[0].platform,
        "mesh": dict(mesh.shape),
        "devices": len(devices),
        "hosts": len({d.process_index for d in devices}),
        "lora_rank": config.lora.rank,
        "remat": model.remat,
        "state_gib_per_device": _state_bytes(train) / GIB,
        "reference_gib_per_device": _reference_bytes(config, train) / GIB,
    }
    if _is_grpo(config):
        result["batch"] = [_grpo_rows(config), config.loop.max_len]
        result |= _rollout(config, model, train, devices, programs)
    else:
        result["batch"] = [config.data.batch_size, config.data.seq_len]
        result |= {"rollout_gib_per_device": 0.0, "kv_cache_gib_per_device": 0.0}
    result["programs"] = {name: p for name, p in programs.items()}
    # The usual cross-check of XLA's count: 6 x parameters x tokens of one update, per chip.
    rows, T = result["batch"]
    if _is_grpo(config):
        rows //= config.grpo.minibatches
    result["model_flops_per_chip"] = 6 * result["parameters"] * rows * T / len(devices)
    result |= _peak(result)
    # The SFT fields `cacherl plan` printed before GRPO was planned, kept for scripts.
    result["params_gib_per_device"] = _per_device_bytes(train.params) / GIB
    result["optimizer_gib_per_device"] = _per_device_bytes(train.opt_state) / GIB
    result["activations_gib_per_device"] = result["temporaries_gib_per_device"]
    return result


# --- the model and its train state ----------------------------------------------------------------


@dataclasses.dataclass
class _Train:
    model: Qwen3Config
    lora: lora_lib.LoraConfig | None
    params: Any  # abstract, training layout
    trainable: Any
    base: Any  # the frozen LoRA base, or None
    opt_state: Any
    state: dict[str, Any]
    tx: Any
    schedule: Any


def _is_grpo(config: ml_collections.ConfigDict) -> bool:
    return "grpo" in config


def _model(config: ml_collections.ConfigDict) -> Qwen3Config:
    """The config's model: its checkpoint's shape, else the preset (GRPO configs name none: their
    variant is the preset)."""
    if config.model.checkpoint or "preset" in config.model:
        return model_config(config)
    return presets.preset(
        config.variant,
        compute_dtype=config.model.compute_dtype,
        remat=config.model.remat,
        unroll_layers=config.model.unroll_layers,
    )


def _train_state(config: ml_collections.ConfigDict, model: Qwen3Config, mesh: Mesh) -> _Train:
    param_dtype = jnp.dtype(config.model.param_dtype)
    params = _abstract(param_shapes(model, param_dtype), param_shardings(model, mesh))
    lora, base, trainable = None, None, params
    if config.lora.rank:
        lora = lora_lib.LoraConfig(
            rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets)
        )
        lora_shapes = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype),
            lora_lib.abstract_lora(model, lora),
            is_leaf=lambda x: hasattr(x, "logical_axes"),
        )
        trainable = _abstract(lora_shapes, lora_lib.lora_shardings(model, lora, mesh))
        base = params
    tx, schedule = make_optimizer(config.train)
    opt_state = _abstract(
        jax.eval_shape(tx.init, trainable), optimizer_state_shardings(tx, trainable, mesh)
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        "trainable": trainable,
        "opt_state": opt_state,
    }
    return _Train(model, lora, params, trainable, base, opt_state, state, tx, schedule)


# --- the programs ---------------------------------------------------------------------------------


def _compile_sft(config: ml_collections.ConfigDict, train: _Train, mesh: Mesh) -> dict[str, Any]:
    B, T = config.data.batch_size, config.data.seq_len
    sharding = parallel.batch_sharding(mesh)
    batch = {key: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sharding) for key in BATCH_KEYS}
    step_config = StepConfig.from_config(config, train.model, train.lora)
    step = make_train_step(step_config, train.tx, train.schedule)
    return _compile_update(step, train, batch)


def _grpo_programs(
    config: ml_collections.ConfigDict, train: _Train, mesh: Mesh
) -> dict[str, dict[str, Any]]:
    rows, T = _grpo_rows(config), config.loop.max_len
    step_config = grpo_step.GrpoStepConfig.from_config(config, train.model, train.lora)
    step = grpo_step.make_grpo_step(step_config, train.tx, train.schedule)
    update = _compile_update(step, train, _grpo_batch(rows // config.grpo.minibatches, T, mesh))
    # The old (grpo.old_logp="recompute") and reference log-probs: a forward over one
    # minibatch of rows at a time with full parameters (merged with the adapters under LoRA).
    logprobs = jax.jit(
        functools.partial(
            grpo_step.target_logprobs,
            model=train.model,
            chunk_size=config.grpo.loss_chunk_size,
            temperature=grpo_step.policy_temperature(config),
        )
    )
    batch = _grpo_batch(rows // config.grpo.minibatches, T, mesh)  # grpo.py: a minibatch at a time
    forward_keys = ("tokens_BxT", "targets_BxT", "positions_BxT", "segment_ids_BxT")
    lowered = logprobs.lower(train.params, batch={k: batch[k] for k in forward_keys})
    return {"grpo update": update, "log-probs": _analysis(lowered)}


def _grpo_rows(config: ml_collections.ConfigDict) -> int:
    return config.grpo.tasks_per_step * config.loop.group_size


def _grpo_batch(rows: int, T: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    sharding = parallel.batch_sharding(mesh)
    batch = {}
    for key in grpo_step.BATCH_KEYS:
        dtype = jnp.float32 if "logp" in key or key == "adv_B" else jnp.int32
        batch[key] = jax.ShapeDtypeStruct((rows, T), dtype, sharding=sharding)
    batch["adv_B"] = jax.ShapeDtypeStruct(
        (rows,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(sharding.spec[0]))
    )
    return batch


def _compile_update(step, train: _Train, batch: dict[str, Any]) -> dict[str, Any]:
    state_shardings = jax.tree.map(lambda x: x.sharding, train.state)
    base_shardings = None if train.base is None else jax.tree.map(lambda x: x.sharding, train.base)
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, base_shardings, None),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    return _analysis(jitted.lower(train.state, train.base, batch))


def _analysis(lowered: jax.stages.Lowered) -> dict[str, Any]:
    """Per-chip bytes (arguments, outputs, temporaries) and XLA's FLOP count of one program.

    A TPU compile refuses a program whose temporaries exceed the chip's HBM; its error states
    how much they need, which is what the plan reports (`over_hbm`, no FLOP count)."""
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        needed = re.search(r"HLO temporaries \(([\d.]+)G\)", str(error))
        if "RESOURCE_EXHAUSTED" not in str(error) or needed is None:
            raise
        temp = float(needed.group(1)) * GIB
        return {
            "arguments_gib": 0.0,
            "outputs_gib": 0.0,
            "temporaries_gib": temp / GIB,
            "total_gib": temp / GIB,
            "flops": 0.0,
            "over_hbm": True,
        }
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older JAX: one entry per computation
        cost = cost[0] if cost else {}
    figures = {
        key: int(getattr(memory, f"{key}_size_in_bytes", 0)) if memory is not None else 0
        for key in ("argument", "output", "temp", "alias")
    }
    return {
        "arguments_gib": figures["argument"] / GIB,
        "outputs_gib": figures["output"] / GIB,
        "temporaries_gib": figures["temp"] / GIB,
        # Donated buffers are counted once.
        "total_gib": (figures["argument"] + figures["output"] - figures["alias"] + figures["temp"])
        / GIB,
        "flops": float((cost or {}).get("flops", 0.0)),
    }


# --- rollouts: the sampler on one host, the weight move ------------------------------------------


def rollout_mesh(devices: list, model: Qwen3Config, tensor: int | None = None) -> Mesh:
    """Host 0's chips as `("data", "tensor")`: `tensor` (default: the most chips that divide the
    model's heads) hold one copy of the weights, the rows split over `data`."""
    local = sorted((d for d in devices if d.process_index == 0), key=lambda d: d.id)
    if not tensor:
        tensor = max(t for t in range(1, len(local) + 1) if _divides(t, len(local), model))
    grid = np.array(local, dtype=object).reshape(len(local) // tensor, tensor)
    return Mesh(grid, ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)


def _divides(t: int, chips: int, model: Qwen3Config) -> bool:
    sizes = (chips, model.num_kv_heads, model.num_heads, model.intermediate_size, model.vocab_size)
    return all(size % t == 0 for size in sizes)


def _rollout(
    config: ml_collections.ConfigDict,
    model: Qwen3Config,
    train: _Train,
    devices: list,
    programs: dict[str, Any],
) -> dict[str, Any]:
    """Compiles the sampler over host 0's chips (into `programs`); the rollout weights, KV cache
    and weight move figures."""
    tensor = config.rollout.tensor if "rollout" in config and "tensor" in config.rollout else None
    mesh = rollout_mesh(devices, model, tensor)
    hosts = len({d.process_index for d in devices})
    batch = _grpo_rows(config) // hosts
    cache_len = config.loop.cache_len or 2 * config.loop.max_len
    with jax.set_mesh(mesh):
        piece = prefill_piece(model, mesh, batch, min(PROMPT_LEN, cache_len), cache_len)
        num_out = sampler_lib.bucket(config.loop.max_new_tokens)
        lowered = sampler_lib.lower_generate(
            model, mesh, batch=batch, max_len=cache_len, prompt_len=piece, num_out=num_out
        )
        programs["sampler"] = _analysis(lowered)
    dtype = qwen3.compute_dtype(model)
    rollout_params = _abstract(
        param_shapes(model, dtype),
        jax.tree.map(lambda spec: NamedSharding(mesh, spec), sampler_lib.param_specs(model, mesh)),
    )
    L, K, D = model.num_layers, model.num_kv_heads, model.head_dim
    kv_bytes = 2 * L * batch * K * cache_len * D * jnp.dtype(dtype).itemsize
    moved, in_place = weight_move_bytes(train.params, rollout_params, devices, mesh)
    return {
        "rollout_mesh": dict(mesh.shape),
        "rollout_batch_per_host": batch,
        "cache_len": cache_len,
        "prefill_piece": piece,
        "rollout_gib_per_device": _per_device_bytes(rollout_params) / GIB,
        "kv_cache_gib_per_device": kv_bytes / mesh.devices.size / GIB,
        "weight_move_gib": moved / GIB,
        "weight_move_in_place_gib": in_place / GIB,
        "rollout_params_gib": _count(rollout_params) * jnp.dtype(dtype).itemsize / GIB,
    }


def prefill_piece(model: Qwen3Config, mesh: Mesh, batch: int, chunk: int, slots: int) -> int:
    """The prompt piece the sampler prefills at once (its `_prefill_piece` rule): halved from
    `chunk` while one piece's attention logits per chip exceed 64M float32 numbers."""
    per_row = batch // mesh.shape["data"] * model.num_heads * slots
    piece = chunk
    while piece > 16 and piece % 2 == 0 and piece * per_row > 64 * 1024 * 1024:
        piece //= 2
    return piece


def weight_move_bytes(
    train_params: Any, rollout_params: Any, devices: list, host0_mesh: Mesh
) -> tuple[int, int]:
    """(bytes sent between chips, bytes already in place) for the trainer -> rollout move.

    Every host gets the rollout layout of `host0_mesh` on its own chips (host h's chips in the
    same grid). Each chip needs its rollout shard; what its training shard already holds of it
    stays put: sent = sum over chips of (rollout shard - its overlap with the training shard),
    in the rollout dtype, i.e. about hosts x data x params_bytes minus what already sits right.
    """
    grid_shape = host0_mesh.devices.shape
    sent = in_place = 0
    for process in sorted({d.process_index for d in devices}):
        local = sorted((d for d in devices if d.process_index == process), key=lambda d: d.id)
        mesh = Mesh(np.array(local, dtype=object).reshape(grid_shape), host0_mesh.axis_names)
        for train_leaf, rollout_leaf in zip(
            jax.tree.leaves(train_params), jax.tree.leaves(rollout_params), strict=True
        ):
            itemsize = jnp.dtype(rollout_leaf.dtype).itemsize
            rollout = NamedSharding(mesh, rollout_leaf.sharding.spec)
            shape = rollout_leaf.shape
            train_boxes = train_leaf.sharding.devices_indices_map(shape)
            for device, box in rollout.devices_indices_map(shape).items():
                need = _volume(box, shape)
                here = _volume(_intersect(box, train_boxes[device], shape), shape)
                sent += (need - here) * itemsize
                in_place += here * itemsize
    return sent, in_place


def _bounds(box, shape) -> list[tuple[int, int]]:
    return [s.indices(n)[:2] for s, n in zip(box, shape, strict=True)]


def _intersect(a, b, shape) -> tuple[slice, ...]:
    return tuple(
        slice(max(lo_a, lo_b), max(max(lo_a, lo_b), min(hi_a, hi_b)))
        for (lo_a, hi_a), (lo_b, hi_b) in zip(_bounds(a, shape), _bounds(b, shape), strict=True)
    )


def _volume(box, shape) -> int:
    return int(np.prod([hi - lo for lo, hi in _bounds(box, shape)]))


# --- the peak and the verdict ---------------------------------------------------------------------


def _state_bytes(train: _Train) -> int:
    base = 0 if train.base is None else _per_device_bytes(train.base)
    return _per_device_bytes(train.trainable) + _per_device_bytes(train.opt_state) + base


def _reference_bytes(config: ml_collections.ConfigDict, train: _Train) -> int:
    # With LoRA the frozen base is the reference, already counted in the state.
    needs_copy = _is_grpo(config) and config.grpo.beta and train.lora is None
    return _per_device_bytes(train.params) if needs_copy else 0


def _peak(result: dict[str, Any]) -> dict[str, Any]:
    temporaries = max(p["temporaries_gib"] for p in result["programs"].values())
    parts = {
        "train state": result["state_gib_per_device"],
        "reference": result["reference_gib_per_device"],
        "rollout weights": result["rollout_gib_per_device"],
        "KV cache": result["kv_cache_gib_per_device"],
        "largest temporaries": temporaries,
    }
    return {
        "temporaries_gib_per_device": temporaries,
        "peak_parts_gib": parts,
        "total_gib_per_device": sum(parts.values()),
    }


def verdict(result: dict[str, Any], chip_memory_gib: float) -> str:
    """ "fits", or by how much it does not and the levers that shrink the largest parts."""
    over = result["total_gib_per_device"] - chip_memory_gib
    if over <= 0:
        return f"fits ({-over:.1f} GiB to spare per chip)"
    return f"does not fit: {over:.1f} GiB over; try {'; '.join(_levers(result))}"


def _levers(result: dict[str, Any]) -> list[str]:
    parts = result["peak_parts_gib"]
    grpo = result["kind"] == "grpo"
    levers = []
    if parts["train state"] + parts["reference"] >= parts["largest temporaries"]:
        levers.append(f"more fsdp (a slice larger than {result['devices']} chips)")
        if not result["lora_rank"]:
            levers.append("LoRA (--config.lora.rank=128)")
    if not result["remat"]:
        levers.append("remat (--config.model.remat=True)")
    if grpo:
        levers.append("more --config.grpo.minibatches or --config.train.grad_accum")
        levers.append("a smaller --config.loop.max_len or --config.grpo.tasks_per_step")
        if parts["rollout weights"] + parts["KV cache"] > 0.25 * result["total_gib_per_device"]:
            levers.append("a larger --config.rollout.tensor or a smaller --config.loop.cache_len")
    else:
        levers.append("more --config.train.grad_accum or a smaller --config.data.batch_size")
    return levers


# --- the report -----------------------------------------------------------------------------------


def format_plan(result: dict[str, Any], device_memory_gib: float | None) -> str:
    model = result["model"]
    lines = [
        f"Qwen3 {result['parameters'] / 1e9:.2f}B (hidden {model['hidden_size']}, "
        f"{model['num_layers']} layers, vocab {model['vocab_size']}), {model['compute_dtype']} "
        f"compute, remat={model['remat']}, attention {model['attention_impl']}, "
        f"LoRA rank {result['lora_rank'] or 'off'}",
        f"{result['devices']} {result['platform']} chips on {result['hosts']} host(s), train mesh "
        f"{_axes(result['mesh'])}, batch {result['batch'][0]} x {result['batch'][1]}",
    ]
    if result["kind"] == "grpo":
        lines.append(
            f"rollouts per host: mesh {_axes(result['rollout_mesh'])}, "
            f"{result['rollout_batch_per_host']} rows x {result['cache_len']} cache slots, "
            f"prefill pieces of {result['prefill_piece']} tokens"
        )
    lines += [
        "",
        f"{'program (per chip, GiB)':<24} {'args':>8} {'temps':>8} {'total':>8} {'FLOPs':>10}",
    ]
    for name, p in result["programs"].items():
        flops = "over HBM" if p.get("over_hbm") else f"{p['flops']:.3g}"
        lines.append(
            f"{name:<24} {p['arguments_gib']:>8.2f} {p['temporaries_gib']:>8.2f} "
            f"{p['total_gib']:>8.2f} {flops:>10}"
        )
    lines += ["", f"{'live at once (per chip)':<28} {'GiB':>8}"]
    for label, gib in result["peak_parts_gib"].items():
        lines.append(f"{label:<28} {gib:>8.2f}")
    lines.append(f"{'peak':<28} {result['total_gib_per_device']:>8.2f}")
    lines.append(
        f"(train state: parameters {result['params_gib_per_device']:.2f}, optimizer state "
        f"{result['optimizer_gib_per_device']:.2f} GiB{', LoRA adapters and their base' if result['lora_rank'] else ''})"
    )
    if device_memory_gib:
        lines.append(
            f"{'chip memory':<28} {device_memory_gib:>8.2f}  -> {verdict(result, device_memory_gib)}"
        )
    if result["kind"] == "grpo":
        lines += [
            "",
            f"weight move trainer -> rollout: {result['weight_move_gib']:.2f} GiB sent between "
            f"chips ({result['weight_move_in_place_gib']:.2f} GiB already in place); "
            f"= sum over chips of (rollout shard - its overlap with the training shard) "
            f"~ hosts x data x {result['rollout_params_gib']:.2f} GiB of rollout weights",
        ]
    if any(p.get("over_hbm") for p in result["programs"].values()):
        lines.append("over HBM: the TPU compiler refused the program; its temporaries as it said")
    lines.append(
        f"FLOPs: XLA's cost analysis of one chip's program (a loop's body may count once); "
        f"6 x parameters x tokens of one update per chip: {result['model_flops_per_chip']:.3g}"
    )
    return "\n".join(lines)


def _axes(mesh: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in mesh.items())


# --- helpers --------------------------------------------------------------------------------------


def _per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard_shape = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard_shape)) * jnp.dtype(x.dtype).itemsize
    return total


def _count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
