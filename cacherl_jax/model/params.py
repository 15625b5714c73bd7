"""The Qwen3 parameter tree, described once.

`abstract_params(config)` gives, for every array, its shape, logical axis names and initializer.
`init_params`, `param_shardings` and the Hugging Face loader all derive from that one tree, so a
shape and its partition spec cannot drift apart.

Layers are stacked along a leading `layers` axis and run with `lax.scan`: one compiled block,
whatever the depth. Projection weights are stored input-major (`x @ w`) with heads split out,
e.g. `wq` is [layers, embed, q_heads, head_dim].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cacherl_jax import parallel
from cacherl_jax.model.config import Qwen3Config

Params = dict[str, Any]
Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]

INIT_STDDEV = 0.02  # transformers' `initializer_range` for Qwen3


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One array of the model: its shape, the logical name of each axis and how to initialise it."""

    shape: tuple[int, ...]
    logical_axes: tuple[str, ...]
    init: Initializer

    def __post_init__(self):
        if len(self.shape) != len(self.logical_axes):
            raise ValueError(f"shape {self.shape} and axes {self.logical_axes} differ in rank")


def _normal(key, shape, dtype):
    return INIT_STDDEV * jax.random.normal(key, shape, dtype)


def _ones(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


def abstract_params(config: Qwen3Config) -> Params:
    """The tree of `ParamSpec`s that every other view of the parameters is built from."""
    L, E, V, F = config.num_layers, config.hidden_size, config.vocab_size, config.intermediate_size
    H, K, D = config.num_heads, config.num_kv_heads, config.head_dim
    layers = {
        "attn_norm": ParamSpec((L, E), ("layers", "norm"), _ones),
        "wq": ParamSpec((L, E, H, D), ("layers", "embed", "q_heads", "head_dim"), _normal),
        "wk": ParamSpec((L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"), _normal),
        "wv": ParamSpec((L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"), _normal),
        "wo": ParamSpec((L, H, D, E), ("layers", "q_heads", "head_dim", "embed"), _normal),
        "q_norm": ParamSpec((L, D), ("layers", "norm"), _ones),
        "k_norm": ParamSpec((L, D), ("layers", "norm"), _ones),
        "mlp_norm": ParamSpec((L, E), ("layers", "norm"), _ones),
        "w_gate": ParamSpec((L, E, F), ("layers", "embed", "mlp"), _normal),
        "w_up": ParamSpec((L, E, F), ("layers", "embed", "mlp"), _normal),
        "w_down": ParamSpec((L, F, E), ("layers", "mlp", "embed"), _normal),
    }
    tree: Params = {
        "embed": ParamSpec((V, E), ("vocab", "embed"), _normal),
        "layers": layers,
        "final_norm": ParamSpec((E,), ("norm",), _ones),
    }
    if not config.tie_word_embeddings:
        tree["lm_head"] = ParamSpec((V, E), ("vocab", "embed"), _normal)
    return tree


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def map_specs(fn: Callable[..., Any], config: Qwen3Config, *, with_path: bool = False) -> Params:
    """Applies `fn(spec)` (or `fn(path, spec)` with a dotted path) to every ParamSpec."""
    specs = abstract_params(config)
    if not with_path:
        return jax.tree.map(fn, specs, is_leaf=is_spec)
    return jax.tree_util.tree_map_with_path(
        lambda p, s: fn(path_name(p), s), specs, is_leaf=is_spec
    )


def path_name(path: tuple[Any, ...]) -> str:
    """`layers.wq` for a pytree key path."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flat_specs(config: Qwen3Config) -> list[tuple[str, ParamSpec]]:
    """`(dotted path, spec)` for every parameter, in the tree's flattening order."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params(config), is_leaf=is_spec)[0]
    return [(path_name(path), spec) for path, spec in leaves]


def logical_axes(config: Qwen3Config) -> Params:
    """The logical axis names of every parameter, as a tree shaped like the parameters."""
    return map_specs(lambda s: s.logical_axes, config)


def param_shapes(config: Qwen3Config, dtype: Any = jnp.float32) -> Params:
    """`jax.ShapeDtypeStruct`s of the parameters (no memory allocated)."""
    return map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), config)


def param_shardings(
    config: Qwen3Config, mesh: Mesh, rules: parallel.Rules = parallel.DEFAULT_RULES
) -> Params:
    """A NamedSharding for every parameter; sharded dimensions are checked to divide evenly."""
    return map_specs(
        lambda name, s: parallel.named_sharding(mesh, s.logical_axes, s.shape, rules, name),
        config,
        with_path=True,
    )


def init_params(
    config: Qwen3Config,
    key: jax.Array,
    *,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    rules: parallel.Rules = parallel.DEFAULT_RULES,
) -> Params:
    """Random parameters; with a mesh, each array is created directly in its shards."""
    specs, treedef = jax.tree.flatten(abstract_params(config), is_leaf=is_spec)
    keys = list(jax.random.split(key, len(specs)))

    def build(keys):
        return treedef.unflatten(
            [s.init(k, s.shape, dtype) for s, k in zip(specs, keys, strict=True)]
        )

    if mesh is None:
        return jax.jit(build)(keys)
    shardings = param_shardings(config, mesh, rules)
    return jax.jit(build, out_shardings=shardings)(keys)


def count_params(params: Params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
