"""Qwen3 in pure JAX: config, parameters, forward pass (attention picked per platform in
`attention.py`) and Hugging Face checkpoints."""

from cacherl_jax.model.config import CheckpointError, Qwen3Config, UnsupportedCheckpointError
from cacherl_jax.model.hf_checkpoint import load_hf_checkpoint, read_config, save_hf_checkpoint
from cacherl_jax.model.params import (
    Params,
    ParamSpec,
    abstract_params,
    count_params,
    init_params,
    logical_axes,
    param_shapes,
    param_shardings,
)
from cacherl_jax.model.qwen3 import embed, forward, hidden_states, logits_from_hidden, unembedding

__all__ = [
    "CheckpointError",
    "ParamSpec",
    "Params",
    "Qwen3Config",
    "UnsupportedCheckpointError",
    "abstract_params",
    "count_params",
    "embed",
    "forward",
    "hidden_states",
    "init_params",
    "load_hf_checkpoint",
    "logical_axes",
    "logits_from_hidden",
    "param_shapes",
    "param_shardings",
    "read_config",
    "save_hf_checkpoint",
    "unembedding",
]
