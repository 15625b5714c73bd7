"""Device meshes and the logical-axis rules that map model axes onto them.

Model code names the axes of every array logically (`embed`, `q_heads`, `vocab`, ...). A rules
table maps each logical axis to zero, one or several mesh axes (`data`, `fsdp`, `tensor`). The
mesh shape and the rules both come from the config, so the same model runs on one CPU or a pod.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cacherl_jax.errors import UserError

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# Batch over data and fsdp; weights split along `embed` over fsdp (ZeRO-3 style: gathered per
# layer) and along heads/mlp/vocab over tensor (Megatron style).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)

DEFAULT_MESH_AXES: Mapping[str, int] = {"data": 1, "fsdp": -1, "tensor": 1}


class ShardingError(UserError, ValueError):
    """A mesh or rules table that cannot shard the arrays it is asked to."""


def resolve_mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Replaces the single `-1` in `axes` by whatever makes the product equal `num_devices`."""
    axes = {str(name): int(size) for name, size in axes.items()}
    free = [name for name, size in axes.items() if size == -1]
    if len(free) > 1:
        raise ShardingError(f"at most one mesh axis may be -1, got {free}")
    bad = [name for name, size in axes.items() if size == 0 or size < -1]
    if bad:
        raise ShardingError(f"mesh axis sizes must be positive or -1, got {axes}")
    fixed = math.prod(size for size in axes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ShardingError(
                f"{num_devices} devices cannot be split as {axes}: {fixed} does not divide {num_devices}"
            )
        axes[free[0]] = num_devices // fixed
    if math.prod(axes.values()) != num_devices:
        raise ShardingError(
            f"mesh {axes} needs {math.prod(axes.values())} devices, {num_devices} are available"
        )
    return axes


def parse_mesh_axes(text: str) -> dict[str, int]:
    """`"data=2,fsdp=-1"` -> `{"data": 2, "fsdp": -1}` (for command-line flags)."""
    axes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, size = part.partition("=")
        if not sep or not name.strip():
            raise ShardingError(f"mesh axes are written name=size[,name=size...], got {text!r}")
        try:
            axes[name.strip()] = int(size)
        except ValueError:
            raise ShardingError(
                f"mesh axis {name.strip()!r}: size {size!r} is not an integer"
            ) from None
    return axes


def make_mesh(
    axes: Mapping[str, int] | None = None,
    devices: Sequence[Any] | None = None,
    dcn_axes: Mapping[str, int] | None = None,
) -> Mesh:
    """A mesh with the named axes, e.g. `{"data": 2, "fsdp": -1, "tensor": 2}`.

    `dcn_axes` (same names, sizes >= 1) split axes across slices or nodes, whose links are slow:
    with a product above 1 each mesh axis becomes `axes[name] * dcn_axes[name]` devices, laid out
    by `mesh_utils.create_hybrid_device_mesh` so that only the DCN part of an axis crosses slices
    (`axes` then describes one slice; its `-1` fills the slice). Devices without a slice index
    (GPU nodes, CPU processes) count one process as one slice.

    Axes are `Auto` so that XLA propagates shardings from the inputs and parameters.
    """
    devices = list(devices if devices is not None else jax.devices())
    dcn = {name: int(size) for name, size in (dcn_axes or {}).items()}
    if math.prod(dcn.values() or [1]) > 1:
        return _hybrid_mesh(axes or DEFAULT_MESH_AXES, dcn, devices)
    shape = resolve_mesh_shape(axes or DEFAULT_MESH_AXES, len(devices))
    names = tuple(shape)
    return jax.make_mesh(
        tuple(shape.values()),
        names,
        axis_types=(AxisType.Auto,) * len(names),
        devices=devices,
    )


def _hybrid_mesh(axes: Mapping[str, int], dcn: dict[str, int], devices: list[Any]) -> Mesh:
    unknown = sorted(set(dcn) - set(axes))
    if unknown or any(size < 1 for size in dcn.values()):
        raise ShardingError(
            f"dcn mesh axes must be among the mesh's {sorted(axes)} with sizes >= 1, got {dcn}"
        )
    slices = math.prod(dcn.values())
    if len(devices) % slices:
        raise ShardingError(f"{len(devices)} devices do not split into {slices} slices ({dcn})")
    ici = resolve_mesh_shape(axes, len(devices) // slices)
    names = tuple(ici)
    by_process = not hasattr(devices[0], "slice_index")
    device_array = mesh_utils.create_hybrid_device_mesh(
        [ici[name] for name in names],
        [dcn.get(name, 1) for name in names],
        devices,
        process_is_granule=by_process,
    )
    return Mesh(device_array, names, axis_types=(AxisType.Auto,) * len(names))


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    return tuple(mesh_axes)


def logical_to_spec(
    logical_axes: Iterable[str | None], rules: Rules = DEFAULT_RULES, mesh: Mesh | None = None
) -> PartitionSpec:
    """The PartitionSpec for an array whose dimensions carry these logical names.

    Mesh axes that the mesh does not have are dropped, so one rules table serves meshes with and
    without, say, a `tensor` axis. Two logical axes of one array on the same mesh axis is an error.
    """
    table = dict(rules)
    spec: list[MeshAxes] = []
    owner: dict[str, str] = {}
    for logical in logical_axes:
        if logical is None:
            spec.append(None)
            continue
        if logical not in table:
            raise ShardingError(f"logical axis {logical!r} has no rule; known: {sorted(table)}")
        mesh_axes = [a for a in _as_tuple(table[logical]) if mesh is None or a in mesh.shape]
        for axis in mesh_axes:
            if axis in owner:
                raise ShardingError(
                    f"logical axes {owner[axis]!r} and {logical!r} both map to mesh axis {axis!r} "
                    f"in {tuple(logical_axes)}"
                )
            owner[axis] = logical
        spec.append(
            None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes)
        )
    return PartitionSpec(*spec)


def named_sharding(
    mesh: Mesh,
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    rules: Rules = DEFAULT_RULES,
    name: str = "array",
) -> NamedSharding:
    """A NamedSharding for one array; with `shape`, checks every sharded dimension divides evenly."""
    spec = logical_to_spec(logical_axes, rules, mesh)
    if shape is not None:
        if len(shape) != len(spec):
            raise ShardingError(
                f"{name}: shape {tuple(shape)} has {len(shape)} dims, axes {tuple(logical_axes)}"
            )
        for dim, logical, mesh_axes in zip(shape, logical_axes, spec, strict=True):
            parts = math.prod(mesh.shape[a] for a in _as_tuple(mesh_axes))
            if dim % parts:
                raise ShardingError(
                    f"{name}: dimension {logical!r} of size {dim} cannot be split over mesh axes "
                    f"{_as_tuple(mesh_axes)} ({parts} parts); change the mesh or the rules"
                )
    return NamedSharding(mesh, spec)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Leading axis over the batch mesh axes, the rest replicated (token and mask arrays)."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def initialize_distributed(config: Mapping[str, Any] | None) -> None:
    """Calls `jax.distributed.initialize` for multi-host runs when the config asks for it.

    `config` is the `distributed` block: `enabled`, and optionally `coordinator_address`,
    `num_processes`, `process_id`. Left unset (None, "", 0 processes, a negative id), JAX detects
    them itself on TPU pods, SLURM and similar clusters.
    """
    if not config or not config.get("enabled", False) or jax.distributed.is_initialized():
        return  # (a command that runs another, as rft runs sft, joins once)
    unset = {"coordinator_address": ("",), "num_processes": (0,), "process_id": ()}
    kwargs = {}
    for key, empty in unset.items():
        value = config.get(key)
        if value is None or value in empty or (isinstance(value, int) and value < 0):
            continue
        kwargs[key] = value
    jax.distributed.initialize(**kwargs)
    _tag_log_lines(f"[process {jax.process_index()}/{jax.process_count()}] ")


def start(config: Mapping[str, Any], devices: Sequence[Any] | None = None) -> Mesh:
    """What every command that runs the model does first, from its config: joins the other
    processes (`distributed`), turns on the persistent compilation cache (`runtime`), and
    returns the mesh (`mesh` within a slice, `dcn_mesh` across slices)."""
    initialize_distributed(config.get("distributed"))
    cache_dir = (config.get("runtime") or {}).get("compilation_cache_dir", "")
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    return make_mesh(dict(config["mesh"]), devices=devices, dcn_axes=config.get("dcn_mesh"))


def _tag_log_lines(tag: str) -> None:
    """Prefixes every log line of this process with `tag`, so merged logs say who wrote what."""
    for handler in logging.getLogger().handlers:
        fmt = handler.formatter._fmt if handler.formatter else "%(levelname)s %(name)s: %(message)s"
        if not fmt.startswith(tag):
            handler.setFormatter(logging.Formatter(tag + fmt))


# --- many processes ---------------------------------------------------------------------------------


def process_share(items: Sequence[Any], what: str = "items", *, even: bool = True) -> Sequence[Any]:
    """This process's contiguous block of `items`, so that the blocks in process order are
    `items` again. `even`: every block the same size (else a clear error); otherwise the first
    `len % P` blocks have one item more."""
    count, index = jax.process_count(), jax.process_index()
    if even and len(items) % count:
        raise ShardingError(
            f"{len(items)} {what} do not split evenly over {count} processes; "
            f"use a multiple of {count}"
        )
    size, extra = divmod(len(items), count)
    start = index * size + min(index, extra)
    return items[start : start + size + (index < extra)]


def allgather_objects(value: Any) -> list[Any]:
    """Every process's `value`, in process order (one element without other processes).

    For host-side results (rollout scores, metrics, cache deltas) that the processes exchange
    between steps: pickled, padded to the longest, all-gathered as bytes. Only ever unpickles
    what this run's own processes sent.
    """
    if jax.process_count() == 1:
        return [value]
    payload = np.frombuffer(pickle.dumps(value), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([payload.size], np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: payload.size] = payload
    gathered = multihost_utils.process_allgather(padded)
    return [
        pickle.loads(gathered[p, : int(sizes[p, 0])].tobytes()) for p in range(jax.process_count())
    ]


def local_mesh(tensor: int = 1, process: int | None = None) -> Mesh:
    """One process's own devices as a `("data", "tensor")` mesh: where it samples its rollouts.

    Deterministic in the process index, so every process can build every other one's (the
    weight move below needs them all). `tensor` devices hold one copy of the weights, split
    over heads and MLP columns; the batch is split over `data`.
    """
    process = jax.process_index() if process is None else process
    devices = sorted((d for d in jax.devices() if d.process_index == process), key=lambda d: d.id)
    if tensor < 1 or len(devices) % tensor:
        raise ShardingError(
            f"rollout tensor={tensor} must divide the {len(devices)} devices of a process"
        )
    grid = np.array(devices, dtype=object).reshape(len(devices) // tensor, tensor)
    return Mesh(grid, ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)


def local_copy_fn(specs: Any, mesh: Mesh, transform=None):
    """A function from a tree of arrays (sharded any way over all processes' devices) to the same
    tree on this process's `mesh` (from `local_mesh`) with PartitionSpecs `specs`: every process
    gets its own copy.

    `transform` (e.g. a dtype cast) runs first, in the source layout (a bfloat16 copy moves half
    the bytes); then one device-to-device reshard onto a mesh that stacks every process's local
    mesh on a `hosts` axis (the copy is replicated over it); then each process wraps the shards
    it holds as local arrays (no copy). Nothing passes through host memory.
    """
    tensor = mesh.shape.get("tensor", 1)
    if mesh != local_mesh(tensor):
        raise ShardingError(
            f"arrays that span several processes move to a mesh from parallel.local_mesh, "
            f"got {describe(mesh)}"
        )
    stacked = np.stack(
        [np.asarray(local_mesh(tensor, p).devices) for p in range(jax.process_count())]
    )
    hosts_mesh = Mesh(stacked, ("hosts", *mesh.axis_names), axis_types=(AxisType.Auto,) * 3)
    out_shardings = jax.tree.map(lambda spec: NamedSharding(hosts_mesh, spec), specs)
    transform = jax.jit(transform or (lambda x: x))

    def local(x: jax.Array, spec: PartitionSpec) -> jax.Array:
        shards = [shard.data for shard in x.addressable_shards]
        return jax.make_array_from_single_device_arrays(x.shape, NamedSharding(mesh, spec), shards)

    return lambda tree: jax.tree.map(local, jax.device_put(transform(tree), out_shardings), specs)


def describe(mesh: Mesh) -> str:
    """`data=2 fsdp=2 tensor=2 (8 cpu devices)`: for logs and progress lines."""
    axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    platform = np.asarray(mesh.devices).flat[0].platform
    return f"{axes} ({mesh.devices.size} {platform} devices)"
