"""Which Qwen3 to build and the mesh it runs on; other configs build on this one.

    python -c "from configs.model import get_config; print(get_config('qwen3_0.6b'))"

`arg` names a shape from `cacherl_jax.model.presets`: `tiny` (the 1.1M-parameter CPU model of
the demo), `bench_29m` (the transformers timing anchor), `qwen3_0.6b`, `qwen3_1.7b`, `qwen3_4b`
(the official shapes; a real run loads their checkpoint instead).
"""

import dataclasses

import ml_collections

from cacherl_jax.model import presets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = arg or "tiny"
    config = ml_collections.ConfigDict()
    config.name = name
    config.model = dataclasses.asdict(presets.preset(name))
    # Mesh axes; -1 takes the remaining devices. parallel.DEFAULT_RULES maps logical axes onto them.
    config.mesh = dict(data=1, fsdp=-1, tensor=1)
    config.distributed = dict(
        enabled=False, coordinator_address=None, num_processes=None, process_id=None
    )
    return config
