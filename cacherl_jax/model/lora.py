"""LoRA adapters for the stacked Qwen3 projection weights.

The paper trains LoRA (r = 128) on the attention and MLP projections with the base model frozen.
Each target weight W of a layer, viewed as a matrix [inputs, outputs], gets A [inputs, r] and
B [r, outputs]; the adapted weight is W + (alpha / r) * A @ B. A and B keep W's leading `layers`
axis and its head axes split out (`wq_a` [L, E, r], `wq_b` [L, r, H, D]; `wo` has two input axes,
so `wo_a` is [L, H, D, r]), so every axis has a logical name and shards like the weight it adapts.

`merge_lora` builds an ordinary params tree, so `forward` and `hidden_states` need no LoRA code:
the trainer differentiates `forward(merge_lora(stop_gradient(params), lora_params, cfg), ...)`
with respect to `lora_params` only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cacherl_jax import parallel
from cacherl_jax.model.config import Qwen3Config
from cacherl_jax.model.params import Params, ParamSpec, abstract_params, is_spec, path_name

# How many leading (after `layers`) axes of each adaptable weight are its inputs.
INPUT_AXES: dict[str, int] = {
    "wq": 1,
    "wk": 1,
    "wv": 1,
    "wo": 2,  # [L, H, D, E]: the attention output contracts heads and head_dim
    "w_gate": 1,
    "w_up": 1,
    "w_down": 1,
}

# `lora_rank` is never sharded by default: r is small and every device needs all of it.
LORA_RULES: parallel.Rules = (("lora_rank", None),)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, scaling (`alpha / rank`) and which `params["layers"]` weights get adapters."""

    rank: int = 128
    alpha: float = 256.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        unknown = sorted(set(self.targets) - set(INPUT_AXES))
        if unknown:
            raise ValueError(f"no LoRA for {unknown}; adaptable weights: {sorted(INPUT_AXES)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"duplicate LoRA targets in {self.targets}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _lora_a_init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """normal(0, 1/sqrt(fan_in)), fan_in = product of the input axes (all but layers and rank)."""
    fan_in = math.prod(shape[1:-1])
    return jax.random.normal(key, shape, dtype) / jnp.sqrt(jnp.asarray(fan_in, dtype))


def _zeros(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    del key  # B = 0: the adapted model starts exactly equal to the base model
    return jnp.zeros(shape, dtype)


def abstract_lora(config: Qwen3Config, lora: LoraConfig) -> Params:
    """`{"layers": {"wq_a": ParamSpec, "wq_b": ParamSpec, ...}}` for the targets of `lora`."""
    base = abstract_params(config)["layers"]
    r = lora.rank
    layers = {}
    for name in lora.targets:
        spec = base[name]
        n_in = INPUT_AXES[name]
        L, dims, axes = spec.shape[0], spec.shape[1:], spec.logical_axes[1:]
        layers[f"{name}_a"] = ParamSpec(
            (L, *dims[:n_in], r), ("layers", *axes[:n_in], "lora_rank"), _lora_a_init
        )
        layers[f"{name}_b"] = ParamSpec(
            (L, r, *dims[n_in:]), ("layers", "lora_rank", *axes[n_in:]), _zeros
        )
    return {"layers": layers}


def _with_lora_rules(rules: parallel.Rules) -> parallel.Rules:
    """`rules` plus `LORA_RULES` unless the caller's rules already place `lora_rank`."""
    return tuple(rules) if "lora_rank" in dict(rules) else (*rules, *LORA_RULES)


def lora_shardings(
    config: Qwen3Config,
    lora: LoraConfig,
    mesh: Mesh,
    rules: parallel.Rules = parallel.DEFAULT_RULES,
) -> Params:
    """A NamedSharding for every adapter array; sharded dimensions are checked to divide evenly."""
    rules = _with_lora_rules(rules)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: parallel.named_sharding(
            mesh, s.logical_axes, s.shape, rules, f"lora.{path_name(path)}"
        ),
        abstract_lora(config, lora),
        is_leaf=is_spec,
    )


def init_lora(
    config: Qwen3Config,
    lora: LoraConfig,
    key: jax.Array,
    *,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    rules: parallel.Rules = parallel.DEFAULT_RULES,
) -> Params:
    """Adapters with A random and B zero; with a mesh, each array is created in its shards."""
    specs, treedef = jax.tree.flatten(abstract_lora(config, lora), is_leaf=is_spec)
    keys = list(jax.random.split(key, len(specs)))

    def build(keys):
        return treedef.unflatten(
            [s.init(k, s.shape, dtype) for s, k in zip(specs, keys, strict=True)]
        )

    if mesh is None:
        return jax.jit(build)(keys)
    return jax.jit(build, out_shardings=lora_shardings(config, lora, mesh, rules))(keys)


def lora_delta(a: jax.Array, b: jax.Array, w_shape: tuple[int, ...]) -> jax.Array:
    """A @ B per layer, reshaped to the weight's layout: [L, *in, r] x [L, r, *out] -> w_shape."""
    L, r = a.shape[0], a.shape[-1]
    a_LxIxR = a.reshape(L, -1, r)
    b_LxRxO = b.reshape(L, r, -1)
    return jnp.einsum("lir,lro->lio", a_LxIxR, b_LxRxO).reshape(w_shape)


def merge_lora(params: Params, lora_params: Params, lora: LoraConfig) -> Params:
    """`params` with every target weight replaced by W + scale * A @ B; the rest shared as is.

    Pure jnp, differentiable with respect to `lora_params` (and `params`, unless the caller
    stops their gradient). The merged weight has the promoted dtype of W and the adapters.
    """
    layers = dict(params["layers"])
    adapters = lora_params["layers"]
    for name in lora.targets:
        w = layers[name]
        a, b = adapters[f"{name}_a"], adapters[f"{name}_b"]
        if a.shape[-1] != lora.rank or b.shape[1] != lora.rank:
            raise ValueError(f"{name}: adapters {a.shape} x {b.shape} do not have rank {lora.rank}")
        layers[name] = w + lora.scale * lora_delta(a, b, w.shape)
    return {**params, "layers": layers}
