"""The model presets in configs/model.py build the official Qwen3 shapes."""

import jax
import pytest

from cacherl_jax import parallel
from cacherl_jax.model import Qwen3Config, abstract_params, param_shapes, presets
from configs import model as model_configs

# Non-embedding parameter counts from the Qwen3 model cards (0.44B, 1.4B, 3.6B).
NON_EMBEDDING = {"qwen3_0.6b": 0.44e9, "qwen3_1.7b": 1.4e9, "qwen3_4b": 3.6e9}


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_presets_build_valid_configs(name):
    config = model_configs.get_config(name)
    qwen3 = Qwen3Config(**config.model)
    assert (
        set(jax.tree.leaves(param_shapes(qwen3)))
        and abstract_params(qwen3)["embed"].shape[0] == qwen3.vocab_size
    )
    assert dict(parallel.make_mesh(config.mesh).shape)["fsdp"] == jax.device_count()


@pytest.mark.parametrize("name", sorted(NON_EMBEDDING))
def test_official_shapes_have_the_published_sizes(name):
    qwen3 = Qwen3Config(**model_configs.get_config(name).model)
    shapes = param_shapes(qwen3)
    non_embedding = sum(x.size for x in jax.tree.leaves(shapes)) - shapes["embed"].size
    assert abs(non_embedding - NON_EMBEDDING[name]) / NON_EMBEDDING[name] < 0.03


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model 'qwen3_8b'"):
        model_configs.get_config("qwen3_8b")
