"""TPU slices by name, for compiling on a CPU machine: `v5p-16` -> `get_topology_desc` arguments.

Names follow Cloud TPU's accelerator types: for v4 and v5p the number counts TensorCores (two per
chip, one "megacore" device each), for v5e and v6e it counts chips. A raw topology such as
`v5p:2x2x2` is taken as it is. Every slice here has 4 chips per host (MaxText's
`accelerator_to_spec_map.py` and xpk list the same shapes).

Compiling for a topology needs `libtpu` (the `tpu-plan` extra) and, on a machine without TPUs,
`TPU_SKIP_MDS_QUERY=1` and `JAX_PLATFORMS=cpu` set before JAX starts.
"""

from __future__ import annotations

import dataclasses
import math

from cacherl_jax.errors import UserError

# HBM per chip, GiB.
CHIP_MEMORY_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
# Chips -> topology (chips along each ICI dimension).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}
_SHAPES_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
CHIPS_PER_HOST = 4
INSTALL_HINT = "pip install -e '.[tpu-plan]' (or make tpu-plan-env)"


class TopologyError(UserError, ValueError):
    """A topology name this module cannot map, or libtpu missing."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user wrote it
    generation: str  # "v5p", "v5e", ...
    topology_name: str  # get_topology_desc's, e.g. "v5p:2x2x2"
    chips: int

    @property
    def chip_memory_gib(self) -> float:
        return CHIP_MEMORY_GIB[self.generation]

    @property
    def chip_config_name(self) -> str:
        return "megacore" if _CORES_PER_CHIP[self.generation] == 2 else "default"

    @property
    def hosts(self) -> int:
        return max(1, self.chips // CHIPS_PER_HOST)


def parse(name: str) -> Topology:
    """`v5p-16`, `v5e-16`, `v5p-64`, ... or a raw `v5p:2x2x2`."""
    if ":" in name:
        generation, shape = name.split(":", 1)
        _check_generation(generation, name)
        try:
            chips = math.prod(int(d) for d in shape.split("x"))
        except ValueError:
            raise TopologyError(f"topology {name!r}: expected e.g. v5p:2x2x2") from None
        return Topology(name, generation, name, chips)
    generation, _, count = name.partition("-")
    _check_generation(generation, name)
    if not count.isdigit():
        raise TopologyError(f"topology {name!r}: expected e.g. v5p-16 or v5p:2x2x2")
    chips = int(count) // _CORES_PER_CHIP[generation]
    shapes = _SHAPES_2D if _CORES_PER_CHIP[generation] == 1 else _SHAPES_3D
    if chips not in shapes:
        sizes = sorted(c * _CORES_PER_CHIP[generation] for c in shapes)
        raise TopologyError(f"no slice {name!r}; {generation} sizes here: {sizes}")
    return Topology(name, generation, f"{generation}:{shapes[chips]}", chips)


def _check_generation(generation: str, name: str) -> None:
    if generation not in CHIP_MEMORY_GIB:
        raise TopologyError(
            f"topology {name!r}: unknown TPU generation {generation!r}; one of "
            f"{sorted(CHIP_MEMORY_GIB)}"
        )


def devices(topology: Topology) -> list:
    """The slice's devices, compile-only (they report platform "tpu" on any machine)."""
    try:
        from jax.experimental import topologies
    except ImportError as error:  # pragma: no cover - jax itself is a dependency
        raise TopologyError(str(error)) from error
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TopologyError(f"compiling for a TPU topology needs libtpu: {INSTALL_HINT}") from None
    bounds = (2, 2, 1) if topology.chips >= CHIPS_PER_HOST else None
    kwargs = {"chip_config_name": topology.chip_config_name}
    if bounds is not None:
        kwargs["chips_per_host_bounds"] = bounds
    description = topologies.get_topology_desc(
        topology_name=topology.topology_name, platform="tpu", **kwargs
    )
    return list(description.devices)
