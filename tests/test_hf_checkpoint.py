"""Hugging Face checkpoints: config round trips, export parity, sharded files and every bad input."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PARITY_CONFIGS
from safetensors.numpy import load_file, save_file

from cacherl_jax import reference
from cacherl_jax.model import (
    CheckpointError,
    Qwen3Config,
    UnsupportedCheckpointError,
    forward,
    init_params,
    load_hf_checkpoint,
    read_config,
    save_hf_checkpoint,
)
from cacherl_jax.model.hf_checkpoint import INDEX_FILE, SINGLE_FILE

TOLERANCE = 1e-4
CONFIG = PARITY_CONFIGS["untied-theta5e6-headdim24-gqa3"]


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


# --- config.json -----------------------------------------------------------------------------


def test_config_round_trip_through_transformers():
    import transformers

    for config in PARITY_CONFIGS.values():
        hf = transformers.Qwen3Config(**config.to_hf())
        assert Qwen3Config.from_hf(hf.to_dict()) == config


@pytest.mark.parametrize("where", ["top-level", "rope_parameters"])
def test_rope_theta_read_from_either_place(where):
    hf = CONFIG.to_hf()
    del hf["rope_theta"], hf["rope_parameters"]
    if where == "top-level":
        hf["rope_theta"] = 5e6
    else:
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6}
    assert Qwen3Config.from_hf(hf).rope_theta == 5e6


def test_head_dim_defaults_to_hidden_over_heads():
    hf = CONFIG.to_hf()
    del hf["head_dim"]
    assert Qwen3Config.from_hf(hf).head_dim == CONFIG.hidden_size // CONFIG.num_heads


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"architectures": ["LlamaForCausalLM"]}, "LlamaForCausalLM"),
        ({"use_sliding_window": True}, "sliding-window"),
        ({"attention_bias": True}, "attention biases"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "'yarn'"),
        ({"hidden_act": "gelu"}, "gelu"),
    ],
)
def test_unsupported_options_are_refused_by_name(changes, message):
    with pytest.raises(UnsupportedCheckpointError, match=message):
        Qwen3Config.from_hf({**CONFIG.to_hf(), **changes})


# --- export ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_export_round_trip_gives_same_logits_in_transformers(name, tmp_path, rng):
    config = PARITY_CONFIGS[name]
    params = init_params(config, jax.random.key(3))
    save_hf_checkpoint(config, params, tmp_path)
    hf_model = reference.load_hf_model(tmp_path)  # transformers.AutoModelForCausalLM
    tokens_BxT = rng.integers(0, config.vocab_size, (2, 512))
    ours = np.asarray(jax.jit(lambda p, t: forward(p, config, t))(params, tokens_BxT))
    assert reference.relative_error(ours, reference.hf_logits(hf_model, tokens_BxT)) <= TOLERANCE
    # ... and loading our export back gives bit-identical parameters.
    config_back, params_back = load_hf_checkpoint(tmp_path)
    assert config_back == config
    for a, b in zip(jax.tree.leaves(params_back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sharded_export_writes_index_and_loads_everywhere(tmp_path, rng):
    params = init_params(CONFIG, jax.random.key(4))
    save_hf_checkpoint(CONFIG, params, tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (tmp_path / SINGLE_FILE).exists()
    assert all((tmp_path / f).exists() for f in files)
    assert (
        sum(a.nbytes for f in files for a in load_file(tmp_path / f).values())
        == index["metadata"]["total_size"]
    )

    tokens_BxT = rng.integers(0, CONFIG.vocab_size, (1, 128))
    ours = np.asarray(forward(params, CONFIG, tokens_BxT))
    expected = reference.hf_logits(reference.load_hf_model(tmp_path), tokens_BxT)
    assert reference.relative_error(ours, expected) <= TOLERANCE
    _, params_back = load_hf_checkpoint(tmp_path)
    for a, b in zip(jax.tree.leaves(params_back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_export_and_load(tmp_path):
    params = init_params(CONFIG, jax.random.key(5))
    save_hf_checkpoint(CONFIG, params, tmp_path, dtype=jnp.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, params_bf16 = load_hf_checkpoint(tmp_path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params_bf16))
    np.testing.assert_array_equal(
        params_bf16["layers"]["wq"], params["layers"]["wq"].astype(jnp.bfloat16), strict=True
    )


# --- bad input -----------------------------------------------------------------------------------


@pytest.fixture
def good_checkpoint(hf_checkpoint_dir, tmp_path):
    return _copy(hf_checkpoint_dir("bad-input-base", CONFIG), tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")


def test_missing_config_json(good_checkpoint):
    (good_checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_hf_checkpoint(good_checkpoint)


def test_corrupt_config_json(good_checkpoint):
    (good_checkpoint / "config.json").write_text('{"vocab_size": 384,\n  "hidden_size": }')
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON at line 2"):
        load_hf_checkpoint(good_checkpoint)


def test_missing_safetensors_mentions_bin_files(good_checkpoint):
    (good_checkpoint / SINGLE_FILE).rename(good_checkpoint / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors.*pytorch_model\.bin"):
        load_hf_checkpoint(good_checkpoint)


def test_wrong_architecture_is_named(good_checkpoint):
    _edit_config(good_checkpoint, architectures=["MistralForCausalLM"])
    with pytest.raises(UnsupportedCheckpointError, match="MistralForCausalLM"):
        load_hf_checkpoint(good_checkpoint)


def test_tensor_with_unexpected_shape_names_tensor_and_shapes(good_checkpoint):
    tensors = load_file(good_checkpoint / SINGLE_FILE)
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, good_checkpoint / SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=rf"{name} has shape \(47, 64\), config\.json implies \(48, 64\)"
    ):
        load_hf_checkpoint(good_checkpoint)


def test_config_disagreeing_with_tensors(good_checkpoint):
    _edit_config(good_checkpoint, intermediate_size=CONFIG.intermediate_size * 2)
    with pytest.raises(
        CheckpointError,
        match=r"mlp\.down_proj\.weight has shape \(64, 96\), config\.json implies \(64, 192\)",
    ):
        load_hf_checkpoint(good_checkpoint)


def test_missing_tensor_is_named(good_checkpoint):
    tensors = load_file(good_checkpoint / SINGLE_FILE)
    del tensors["model.layers.0.mlp.down_proj.weight"]
    save_file(tensors, good_checkpoint / SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"missing tensors model\.layers\.0\.mlp\.down_proj\.weight"
    ):
        load_hf_checkpoint(good_checkpoint)


def test_corrupt_safetensors_file(good_checkpoint):
    (good_checkpoint / SINGLE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: not a readable safetensors file"
    ):
        load_hf_checkpoint(good_checkpoint)


def test_index_referring_to_missing_shard(tmp_path):
    params = init_params(CONFIG, jax.random.key(6))
    save_hf_checkpoint(CONFIG, params, tmp_path, max_shard_bytes=60_000)
    shard = sorted(tmp_path.glob("model-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"refers to missing files: .*{shard.name}"):
        load_hf_checkpoint(tmp_path)


def test_tied_checkpoint_may_carry_lm_head(tmp_path):
    """Some tied checkpoints store lm_head.weight anyway; it is the embedding and is ignored."""
    config = PARITY_CONFIGS["tied-theta1e6-gqa2"]
    save_hf_checkpoint(config, init_params(config, jax.random.key(7)), tmp_path)
    tensors = load_file(tmp_path / SINGLE_FILE)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    save_file(tensors, tmp_path / SINGLE_FILE, metadata={"format": "pt"})
    _, params = load_hf_checkpoint(tmp_path)
    assert "lm_head" not in params


def test_read_config_names_the_file(good_checkpoint):
    _edit_config(good_checkpoint, rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(
        UnsupportedCheckpointError, match=r"config\.json: RoPE scaling type 'linear'"
    ):
        read_config(good_checkpoint)
