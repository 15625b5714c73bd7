"""LoRA adapters: merged weights against numpy, the base model at init, gradients, sharded init."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PARITY_CONFIGS, SHARDABLE_CONFIG

from cacherl_jax import parallel
from cacherl_jax.model import forward, init_params
from cacherl_jax.model.lora import (
    LORA_RULES,
    LoraConfig,
    abstract_lora,
    init_lora,
    lora_shardings,
    merge_lora,
)

RANK = 8
LORA = LoraConfig(rank=RANK, alpha=16.0)
# Each target's merge written out with its own axes: A's input axes, rank r, B's output axes.
MERGE_EINSUM = {
    "wq": "ler,lrhd->lehd",
    "wk": "ler,lrkd->lekd",
    "wv": "ler,lrkd->lekd",
    "wo": "lhdr,lre->lhde",  # two input axes: heads and head_dim
    "w_gate": "ler,lrf->lef",
    "w_up": "ler,lrf->lef",
    "w_down": "lfr,lre->lfe",
}
CONFIG_NAMES = sorted(PARITY_CONFIGS)


def _random_b(lora_params, seed=1, stddev=0.05):
    """The adapters with B replaced by random values (as after some training)."""
    rng = np.random.default_rng(seed)
    layers = {
        name: (stddev * rng.normal(size=x.shape)).astype(np.float32) if name.endswith("_b") else x
        for name, x in lora_params["layers"].items()
    }
    return {"layers": jax.tree.map(jnp.asarray, layers)}


def _numpy_merge(params, lora_params, lora):
    """W + alpha/r * A @ B per target, in float64 numpy, cast back to float32."""
    layers = dict(params["layers"])
    for name in lora.targets:
        a = np.asarray(lora_params["layers"][f"{name}_a"], np.float64)
        b = np.asarray(lora_params["layers"][f"{name}_b"], np.float64)
        delta = np.einsum(MERGE_EINSUM[name], a, b)
        merged = np.asarray(layers[name], np.float64) + lora.alpha / lora.rank * delta
        layers[name] = merged.astype(np.float32)
    return {**params, "layers": layers}


@functools.cache
def _params(name):
    """Base parameters and initial adapters per config, built once (init compiles are slow)."""
    config = PARITY_CONFIGS[name]
    return init_params(config, jax.random.key(0)), init_lora(config, LORA, jax.random.key(1))


def _tokens(config, seed=0, shape=(2, 24)):
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape)


def test_config():
    assert LoraConfig().scale == 2.0 and LoraConfig(rank=4, alpha=2.0).scale == 0.5
    with pytest.raises(ValueError, match="rank must be positive"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="no LoRA for \\['embed'\\]"):
        LoraConfig(targets=("wq", "embed"))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_abstract_lora_shapes_and_axes(name):
    c = PARITY_CONFIGS[name]
    L, E, F, H, K, D = (
        c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    )  # fmt: skip
    r = RANK
    expected = {
        "wq_a": ((L, E, r), ("layers", "embed", "lora_rank")),
        "wq_b": ((L, r, H, D), ("layers", "lora_rank", "q_heads", "head_dim")),
        "wk_a": ((L, E, r), ("layers", "embed", "lora_rank")),
        "wk_b": ((L, r, K, D), ("layers", "lora_rank", "kv_heads", "head_dim")),
        "wv_a": ((L, E, r), ("layers", "embed", "lora_rank")),
        "wv_b": ((L, r, K, D), ("layers", "lora_rank", "kv_heads", "head_dim")),
        "wo_a": ((L, H, D, r), ("layers", "q_heads", "head_dim", "lora_rank")),
        "wo_b": ((L, r, E), ("layers", "lora_rank", "embed")),
        "w_gate_a": ((L, E, r), ("layers", "embed", "lora_rank")),
        "w_gate_b": ((L, r, F), ("layers", "lora_rank", "mlp")),
        "w_up_a": ((L, E, r), ("layers", "embed", "lora_rank")),
        "w_up_b": ((L, r, F), ("layers", "lora_rank", "mlp")),
        "w_down_a": ((L, F, r), ("layers", "mlp", "lora_rank")),
        "w_down_b": ((L, r, E), ("layers", "lora_rank", "embed")),
    }
    specs = abstract_lora(c, LORA)
    assert set(specs) == {"layers"}
    assert {k: (s.shape, s.logical_axes) for k, s in specs["layers"].items()} == expected
    only_q = abstract_lora(c, LoraConfig(rank=r, targets=("wq",)))["layers"]
    assert sorted(only_q) == ["wq_a", "wq_b"]


def test_init_distribution():
    """B = 0; A ~ normal(0, 1/sqrt(fan_in)) with fan_in the product of the input axes."""
    c = PARITY_CONFIGS["tied-theta5e6-headdim32-gqa4"]
    lora_params = init_lora(c, LoraConfig(rank=64), jax.random.key(0))["layers"]
    fan_in = {
        "wq": c.hidden_size,
        "wo": c.num_heads * c.head_dim,
        "w_up": c.hidden_size,
        "w_down": c.intermediate_size,
    }
    for name, n in fan_in.items():
        a = np.asarray(lora_params[f"{name}_a"])
        assert abs(a.mean()) < 0.05 / np.sqrt(n) * 4
        np.testing.assert_allclose(a.std(), 1 / np.sqrt(n), rtol=0.1)
    for name, x in lora_params.items():
        if name.endswith("_b"):
            assert not np.asarray(x).any(), name
    # Different layers and different targets get different draws.
    a = np.asarray(lora_params["wk_a"])
    assert not np.allclose(a[0], a[1]) and not np.allclose(a, lora_params["wv_a"])


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_merged_weights_match_numpy(name):
    params, lora_params = _params(name)
    lora_params = _random_b(lora_params)
    merged = merge_lora(params, lora_params, LORA)
    expected = _numpy_merge(params, lora_params, LORA)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for target in LORA.targets:
        ours, ref = np.asarray(merged["layers"][target]), expected["layers"][target]
        assert ours.dtype == np.float32 and ours.shape == params["layers"][target].shape
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
        assert not np.allclose(ours, params["layers"][target])  # the delta is not negligible
    for key in ("embed", "final_norm"):
        assert merged[key] is params[key]
    for key in ("attn_norm", "q_norm", "k_norm", "mlp_norm"):
        assert merged["layers"][key] is params["layers"][key]


def test_merge_leaves_non_targets_alone():
    config = PARITY_CONFIGS["tied-theta1e6-gqa2"]
    lora = LoraConfig(rank=RANK, alpha=8.0, targets=("wo", "w_down"))
    params = _params("tied-theta1e6-gqa2")[0]
    lora_params = _random_b(init_lora(config, lora, jax.random.key(1)))
    merged = merge_lora(params, lora_params, lora)
    expected = _numpy_merge(params, lora_params, lora)
    for target in ("wq", "wk", "wv", "w_gate", "w_up"):
        assert merged["layers"][target] is params["layers"][target]
    for target in lora.targets:
        np.testing.assert_allclose(merged["layers"][target], expected["layers"][target], atol=1e-6)
    with pytest.raises(ValueError, match="do not have rank 4"):
        merge_lora(params, lora_params, LoraConfig(rank=4, targets=("wo",)))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_zero_b_forward_equals_base_exactly(name):
    config = PARITY_CONFIGS[name]
    params, lora_params = _params(name)
    tokens = _tokens(config)
    run = jax.jit(lambda p: forward(p, config, tokens))
    np.testing.assert_array_equal(run(merge_lora(params, lora_params, LORA)), run(params))


def _loss(config, tokens):
    """Mean next-token cross-entropy of the LoRA-adapted model, base frozen."""

    def loss(params, lora_params):
        merged = merge_lora(jax.lax.stop_gradient(params), lora_params, LORA)
        logits = forward(merged, config, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def test_gradients_reach_only_the_adapters():
    name = "untied-theta5e6-headdim24-gqa3"
    config = PARITY_CONFIGS[name]
    params, lora_params = _params(name)
    grad_fn = _loss(config, _tokens(config))
    d_params, d_lora = grad_fn(params, lora_params)
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(d_params))
    for target in LORA.targets:
        # At init B = 0, so d/dA = (d/dW) B^T = 0 exactly, while d/dB = A^T (d/dW) is not.
        assert not np.asarray(d_lora["layers"][f"{target}_a"]).any(), target
        assert np.abs(np.asarray(d_lora["layers"][f"{target}_b"])).max() > 0, target
    # Once B is non-zero, A learns too.
    _, d_lora = grad_fn(params, _random_b(lora_params))
    for target in LORA.targets:
        assert np.abs(np.asarray(d_lora["layers"][f"{target}_a"])).max() > 0, target


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_forward_of_merged_matches_numpy_merged_tree(name):
    config = PARITY_CONFIGS[name]
    params, lora_params = _params(name)
    lora_params = _random_b(lora_params)
    tokens = _tokens(config)
    run = jax.jit(lambda p: forward(p, config, tokens))
    ours = np.asarray(run(merge_lora(params, lora_params, LORA)))
    expected = np.asarray(run(_numpy_merge(params, lora_params, LORA)))
    base = np.asarray(run(params))
    scale = np.abs(expected).max()
    assert np.abs(ours - expected).max() <= 1e-5 * scale
    assert np.abs(base - expected).max() > 1e-3 * scale  # the adapters change the model


def test_sharded_init_follows_rules_and_matches_unsharded():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = (*parallel.DEFAULT_RULES, *LORA_RULES)
    lora_params = init_lora(SHARDABLE_CONFIG, LORA, jax.random.key(0), mesh=mesh)
    specs = abstract_lora(SHARDABLE_CONFIG, LORA)["layers"]
    for name, x in lora_params["layers"].items():
        expected = parallel.logical_to_spec(specs[name].logical_axes, rules, mesh)
        assert x.sharding.spec == expected, name
    P = jax.sharding.PartitionSpec
    assert lora_params["layers"]["wq_a"].sharding.spec == P(None, "fsdp", None)
    assert lora_params["layers"]["wq_b"].sharding.spec == P(None, None, "tensor", None)
    assert lora_params["layers"]["wo_a"].sharding.spec == P(None, "tensor", None, None)
    assert lora_params["layers"]["w_down_b"].sharding.spec == P(None, None, "fsdp")
    unsharded = init_lora(SHARDABLE_CONFIG, LORA, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(lora_params), jax.tree.leaves(unsharded), strict=True):
        np.testing.assert_array_equal(a, b)
    # Shardings and the merge compose: merged weights keep the base weights' layout on the mesh.
    params = init_params(SHARDABLE_CONFIG, jax.random.key(1), mesh=mesh)
    merged = jax.jit(lambda p, l: merge_lora(p, l, LORA))(params, _random_b(lora_params))
    np.testing.assert_allclose(
        merged["layers"]["wo"],
        _numpy_merge(params, _random_b(unsharded), LORA)["layers"]["wo"],
        atol=1e-6,
    )


def test_caller_rules_for_lora_rank_are_kept():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = (*parallel.DEFAULT_RULES, ("lora_rank", "data"))
    shardings = lora_shardings(SHARDABLE_CONFIG, LORA, mesh, rules)["layers"]
    P = jax.sharding.PartitionSpec
    assert shardings["wq_a"].spec == P(None, "fsdp", "data")
    assert shardings["wq_b"].spec == P(None, "data", "tensor", None)
    lora_params = init_lora(SHARDABLE_CONFIG, LORA, jax.random.key(0), mesh=mesh, rules=rules)
    assert lora_params["layers"]["wo_b"].sharding.spec == P(None, "data", "fsdp")
    # Errors name the adapter that cannot be split.
    with pytest.raises(parallel.ShardingError, match=r"lora\.layers\.w_down_a"):
        lora_shardings(SHARDABLE_CONFIG, LoraConfig(rank=3), mesh, rules)
