"""Device meshes and the logical-axis rules that map model axes onto them.

Model code names the axes of every array logically (`embed`, `q_heads`, `vocab`, ...). A rules
table maps each logical axis to zero, one or several mesh axes (`data`, `fsdp`, `tensor`). The
mesh shape and the rules both come from the config, so the same model runs on one CPU or a pod.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
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


def make_mesh(axes: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with the named axes, e.g. `{"data": 2, "fsdp": -1, "tensor": 2}`.

    Axes are `Auto` so that XLA propagates shardings from the inputs and parameters.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(axes or DEFAULT_MESH_AXES, len(devices))
    names = tuple(shape)
    return jax.make_mesh(
        tuple(shape.values()),
        names,
        axis_types=(AxisType.Auto,) * len(names),
        devices=devices,
    )


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
    if not config or not config.get("enabled", False):
        return
    unset = {"coordinator_address": ("",), "num_processes": (0,), "process_id": ()}
    kwargs = {}
    for key, empty in unset.items():
        value = config.get(key)
        if value is None or value in empty or (isinstance(value, int) and value < 0):
            continue
        kwargs[key] = value
    jax.distributed.initialize(**kwargs)


def describe(mesh: Mesh) -> str:
    """`data=2 fsdp=2 tensor=2 (8 cpu devices)`: for logs and progress lines."""
    axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    platform = np.asarray(mesh.devices).flat[0].platform
    return f"{axes} ({mesh.devices.size} {platform} devices)"
