"""Which Qwen3 to build and the mesh it runs on.

    python -c "from configs.model import get_config; print(get_config('qwen3_0.6b'))"

`arg` names a shape from `cacherl_jax.model.presets`: `tiny` (the 1.1M-parameter CPU model of
the demo), `bench_29m` (the transformers timing anchor), `qwen3_0.6b`, `qwen3_1.7b`, `qwen3_4b`
(the official shapes; a real run loads their checkpoint instead).
"""

import dataclasses

import ml_collections

from cacherl_jax.model import presets
from configs import common

VARIANTS = tuple(presets.PRESETS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = common.variant("model", arg, VARIANTS)
    config = ml_collections.ConfigDict()
    config.name = name
    config.model = dataclasses.asdict(presets.preset(name))
    config.mesh = common.mesh()
    return config
