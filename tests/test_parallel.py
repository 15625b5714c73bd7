"""Meshes, logical-axis rules, and sharded loading on 8 simulated CPU devices."""

import jax
import numpy as np
import pytest
from conftest import SHARDABLE_CONFIG
from jax.sharding import PartitionSpec as P

from cacherl_jax import parallel
from cacherl_jax.model import (
    forward,
    init_params,
    load_hf_checkpoint,
    logical_axes,
    param_shardings,
)
from cacherl_jax.model.native_checkpoint import load_params, save_params

MESHES = {
    "data2-fsdp2-tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
    "fsdp8": {"fsdp": 8},
    "data-rest-tensor2": {"data": -1, "tensor": 2},
}


def test_eight_simulated_devices():
    assert jax.device_count() == 8


def test_mesh_shape_resolves_minus_one():
    assert parallel.resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {
        "data": 2,
        "fsdp": 2,
        "tensor": 2,
    }
    mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize(
    "axes, message",
    [
        ({"data": -1, "fsdp": -1}, "at most one mesh axis may be -1"),
        ({"data": 3, "fsdp": -1}, "3 does not divide 8"),
        ({"data": 2, "fsdp": 2}, "needs 4 devices, 8 are available"),
        ({"data": 0, "fsdp": -1}, "positive or -1"),
    ],
)
def test_bad_mesh_shapes(axes, message):
    with pytest.raises(parallel.ShardingError, match=message):
        parallel.resolve_mesh_shape(axes, 8)


def test_rules_map_logical_axes_and_drop_absent_mesh_axes():
    mesh = parallel.make_mesh({"fsdp": 8})
    assert parallel.logical_to_spec(("layers", "embed", "q_heads", "head_dim"), mesh=mesh) == P(
        None, "fsdp", None, None
    )
    assert parallel.logical_to_spec(("batch", "seq"), mesh=mesh) == P("fsdp", None)
    full = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert parallel.logical_to_spec(("vocab", "embed"), mesh=full) == P("tensor", "fsdp")
    assert parallel.logical_to_spec(("batch", None), mesh=full) == P(("data", "fsdp"), None)


def test_rules_refuse_two_logical_axes_on_one_mesh_axis():
    rules = (*parallel.DEFAULT_RULES[:-1], ("norm", "tensor"))
    with pytest.raises(
        parallel.ShardingError, match="'q_heads' and 'norm' both map to mesh axis 'tensor'"
    ):
        parallel.logical_to_spec(("q_heads", "norm"), rules)


def test_unknown_logical_axis():
    with pytest.raises(parallel.ShardingError, match="logical axis 'experts' has no rule"):
        parallel.logical_to_spec(("experts",))


def test_indivisible_dimension_is_named():
    mesh = parallel.make_mesh({"tensor": 8})
    with pytest.raises(
        parallel.ShardingError, match=r"layers\.wk: dimension 'kv_heads' of size 2 cannot be split"
    ):
        param_shardings(SHARDABLE_CONFIG, mesh)


@pytest.fixture(scope="module")
def single_device_logits(hf_checkpoint_dir):
    path = hf_checkpoint_dir("shardable", SHARDABLE_CONFIG)
    config, params = load_hf_checkpoint(path)
    tokens_BxT = np.random.default_rng(0).integers(0, config.vocab_size, (8, 128))
    return (
        path,
        tokens_BxT,
        np.asarray(jax.jit(lambda p, t: forward(p, config, t))(params, tokens_BxT)),
    )


def _sharded_logits(config, params, mesh, tokens_BxT):
    tokens_BxT = jax.device_put(tokens_BxT, parallel.batch_sharding(mesh))
    run = jax.jit(
        lambda p, t: forward(p, config, t), out_shardings=parallel.batch_sharding(mesh, ndim=3)
    )
    return run(params, tokens_BxT)


def _assert_shardings_follow_rules(config, params, mesh):
    axes = logical_axes(config)
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        logical = axes
        for key in path:
            logical = logical[key.key]
        expected = parallel.logical_to_spec(logical, mesh=mesh)
        assert x.sharding.mesh.shape == mesh.shape
        assert x.sharding.spec == expected, (
            f"{jax.tree_util.keystr(path)}: {x.sharding.spec} != {expected}"
        )
        # Each device holds exactly its slice, not a full copy.
        shard_elems = {s.data.size for s in x.addressable_shards}
        assert shard_elems == {
            x.size // np.prod([mesh.shape[a] for a in jax.tree.leaves(tuple(expected))] or [1])
        }


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_load_matches_single_device(mesh_name, single_device_logits):
    path, tokens_BxT, expected = single_device_logits
    mesh = parallel.make_mesh(MESHES[mesh_name])
    config, params = load_hf_checkpoint(path, mesh=mesh)
    _assert_shardings_follow_rules(config, params, mesh)
    logits = _sharded_logits(config, params, mesh, tokens_BxT)
    assert logits.sharding.spec == parallel.batch_sharding(mesh, ndim=3).spec
    np.testing.assert_allclose(
        np.asarray(logits), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()
    )


def test_sharded_init_follows_rules():
    mesh = parallel.make_mesh(MESHES["data2-fsdp2-tensor2"])
    params = init_params(SHARDABLE_CONFIG, jax.random.key(0), mesh=mesh)
    _assert_shardings_follow_rules(SHARDABLE_CONFIG, params, mesh)
    # Same values as the unsharded init: sharding changes placement, never numbers.
    for a, b in zip(
        jax.tree.leaves(params),
        jax.tree.leaves(init_params(SHARDABLE_CONFIG, jax.random.key(0))),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_native_checkpoint_restores_onto_another_mesh(tmp_path, single_device_logits):
    path, tokens_BxT, expected = single_device_logits
    config, params = load_hf_checkpoint(path, mesh=parallel.make_mesh(MESHES["fsdp8"]))
    save_params(config, params, tmp_path / "native")
    mesh = parallel.make_mesh(MESHES["data2-fsdp2-tensor2"])
    config_back, params_back = load_params(tmp_path / "native", mesh=mesh)
    assert config_back == config
    _assert_shardings_follow_rules(config, params_back, mesh)
    np.testing.assert_allclose(
        np.asarray(_sharded_logits(config, params_back, mesh, tokens_BxT)),
        expected,
        rtol=1e-5,
        atol=1e-6,
    )


def test_distributed_initialize_only_when_enabled(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    parallel.initialize_distributed(None)
    parallel.initialize_distributed({"enabled": False, "coordinator_address": "host:1234"})
    assert calls == []
    parallel.initialize_distributed(
        {
            "enabled": True,
            "coordinator_address": "host:1234",
            "num_processes": 4,
            "process_id": None,
        }
    )
    assert calls == [{"coordinator_address": "host:1234", "num_processes": 4}]


def test_sharded_load_reads_only_each_devices_block(single_device_logits, monkeypatch):
    """On fsdp=8 every sharded array is read from disk in 1/8 pieces, never whole."""
    from cacherl_jax.model import hf_checkpoint

    path = single_device_logits[0]
    reads = []
    original = hf_checkpoint._read_block

    def recording_read_block(kind, tensor_slice, index, shape):
        block = original(kind, tensor_slice, index, shape)
        reads.append((tuple(tensor_slice.get_shape()), block.size))
        return block

    monkeypatch.setattr(hf_checkpoint, "_read_block", recording_read_block)
    load_hf_checkpoint(path, mesh=parallel.make_mesh({"fsdp": 8}))
    matrix_reads = [(shape, size) for shape, size in reads if len(shape) == 2]
    assert matrix_reads and all(size * 8 == np.prod(shape) for shape, size in matrix_reads)


# --- many processes (simulated here by the process index and count; the real thing is
# tests/test_multihost.py) ------------------------------------------------------------------------


def _as_process(monkeypatch, index: int, count: int) -> None:
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)


def test_process_shares_are_contiguous_blocks_in_process_order(monkeypatch):
    items = list(range(11))
    for even, count in ((True, 1), (False, 3), (False, 4)):
        blocks = []
        for index in range(count):
            _as_process(monkeypatch, index, count)
            blocks.append(list(parallel.process_share(items, even=even)))
        assert [x for block in blocks for x in block] == items
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    _as_process(monkeypatch, 0, 4)
    with pytest.raises(parallel.ShardingError, match="10 tasks do not split evenly over 4"):
        parallel.process_share(list(range(10)), "tasks")


def test_allgather_objects_on_one_process_is_the_value():
    value = {"rows": [1, 2], "name": "x"}
    assert parallel.allgather_objects(value) == [value]


def test_local_mesh_splits_a_process_devices_into_data_and_tensor():
    mesh = parallel.local_mesh(4)
    assert dict(mesh.shape) == {"data": 2, "tensor": 4}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.local_devices())
    with pytest.raises(parallel.ShardingError, match="tensor=3 must divide the 8 devices"):
        parallel.local_mesh(3)


def test_dcn_axes_are_checked_and_all_ones_is_one_slice():
    mesh = parallel.make_mesh({"data": 1, "fsdp": -1}, dcn_axes={"data": 1, "fsdp": 1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8}
    with pytest.raises(parallel.ShardingError, match="dcn mesh axes must be among"):
        parallel.make_mesh({"data": 1, "fsdp": -1}, dcn_axes={"pipeline": 2})
    with pytest.raises(parallel.ShardingError, match="8 devices do not split into 3 slices"):
        parallel.make_mesh({"data": 1, "fsdp": -1}, dcn_axes={"data": 3})


def test_local_copy_needs_a_local_mesh():
    mesh = parallel.make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
    with pytest.raises(parallel.ShardingError, match=r"move to a mesh from parallel\.local_mesh"):
        parallel.local_copy_fn({}, mesh)


def test_start_turns_on_the_compilation_cache_and_builds_the_mesh(tmp_path):
    config = {
        "mesh": {"data": 2, "fsdp": -1, "tensor": 1},
        "dcn_mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "distributed": {"enabled": False},
        "runtime": {"compilation_cache_dir": str(tmp_path / "xla")},
    }
    previous = jax.config.jax_compilation_cache_dir
    try:
        mesh = parallel.start(config)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
