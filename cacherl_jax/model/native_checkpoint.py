"""Our own parameter checkpoints: `config.json` plus an orbax checkpoint of the parameter tree.

Orbax writes each shard from the device that holds it and restores straight into the shardings
asked for, so a checkpoint saved on one mesh loads onto another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, SingleDeviceSharding

from cacherl_jax import parallel
from cacherl_jax.model import params as params_lib
from cacherl_jax.model.config import CheckpointError, Qwen3Config
from cacherl_jax.model.hf_checkpoint import CONFIG_FILE, read_config

PARAMS_DIR = "params"


def save_params(
    config: Qwen3Config, params: params_lib.Params, path: str | os.PathLike[str]
) -> Path:
    path = Path(path).absolute()
    if (path / PARAMS_DIR).exists():
        raise CheckpointError(f"{path / PARAMS_DIR} already exists; choose a new output directory")
    path.mkdir(parents=True, exist_ok=True)
    dtype = jax.tree.leaves(params)[0].dtype
    if jax.process_index() == 0:
        (path / CONFIG_FILE).write_text(
            json.dumps(config.to_hf(torch_dtype=str(dtype)), indent=2) + "\n"
        )
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
    return path


def is_native_checkpoint(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / PARAMS_DIR).is_dir()


def load_params(
    path: str | os.PathLike[str],
    *,
    mesh: Mesh | None = None,
    dtype: Any = None,
    rules: parallel.Rules = parallel.DEFAULT_RULES,
    **config_overrides: Any,
) -> tuple[Qwen3Config, params_lib.Params]:
    """Restores `(config, params)`, each array directly into its shards on `mesh`."""
    path = Path(path).absolute()
    config = read_config(path, **config_overrides)
    if not is_native_checkpoint(path):
        raise CheckpointError(f"{path}: no {PARAMS_DIR}/ directory (not a cacherl_jax checkpoint)")
    checkpointer = ocp.StandardCheckpointer()
    try:
        stored = checkpointer.metadata(path / PARAMS_DIR).item_metadata
    except Exception as err:  # orbax raises several types for unreadable metadata
        raise CheckpointError(f"{path / PARAMS_DIR}: unreadable orbax checkpoint ({err})") from err
    stored_dtype = jax.tree.leaves(stored)[0].dtype
    shardings = (
        params_lib.param_shardings(config, mesh, rules)
        if mesh is not None
        else params_lib.map_specs(lambda s: SingleDeviceSharding(jax.devices()[0]), config)
    )
    target = jax.tree.map(
        lambda spec, sharding: jax.ShapeDtypeStruct(
            spec.shape, dtype or stored_dtype, sharding=sharding
        ),
        params_lib.abstract_params(config),
        shardings,
        is_leaf=params_lib.is_spec,
    )
    try:
        params = checkpointer.restore(path / PARAMS_DIR, target)
    except (ValueError, KeyError) as err:
        raise CheckpointError(
            f"{path / PARAMS_DIR}: does not match {path / CONFIG_FILE} ({err})"
        ) from err
    return config, params
