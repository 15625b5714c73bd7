"""Qwen3 (dense) model configuration, read from and written to Hugging Face `config.json` form."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from cacherl_jax.errors import UserError

ARCHITECTURE = "Qwen3ForCausalLM"

_COMPUTE_DTYPES = ("float32", "bfloat16")
# "auto": the platform's (attention.implementation); the others name one of attention.py's.
ATTENTION_IMPLS = ("auto", "xla", "cpu_blocked", "splash", "cudnn")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read: missing or corrupt files, missing or misshapen tensors."""


class UnsupportedCheckpointError(CheckpointError):
    """A checkpoint asks for something this implementation does not compute (and would get wrong)."""


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Shapes of a Qwen3 dense decoder plus how to compute it.

    The first block of fields is the architecture (round-trips through Hugging Face's
    `config.json`); the second says how to run it and is not exported:

    - `compute_dtype`: activations and matmul inputs ("float32" or "bfloat16"); norms, softmax
      and RoPE run in float32 whatever it is.
    - `remat`: recompute each block in the backward pass instead of keeping its activations.
    - `attention_block`: queries per block of the training forward's attention, which skips
      the keys after each block's end (None: one block).
    - `unroll_layers`: unroll the layer scan (faster on CPU, compile time grows with depth).
    - `attention_impl`: "auto" (the platform's choice, see `model/attention.py`), "xla"
      (`jax.nn.dot_product_attention`), "cpu_blocked" (the form written for XLA's CPU backend),
      "splash" (TPU's Pallas kernel) or "cudnn" (cuDNN's fused kernel on GPU).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40_960
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    compute_dtype: str = "float32"
    remat: bool = False
    attention_block: int | None = 128
    unroll_layers: bool = False
    attention_impl: str = "auto"

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):  # keep the config hashable (it is a jit static arg)
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.attention_block is not None and self.attention_block <= 0:
            raise ValueError(
                f"attention_block must be positive or None, got {self.attention_block}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"
            )
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype must be one of {_COMPUTE_DTYPES}, got {self.compute_dtype!r}"
            )

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> Qwen3Config:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, config_dict: Mapping[str, Any], **overrides: Any) -> Qwen3Config:
        """Builds a config from a Hugging Face `config.json` dictionary.

        Refuses, by name, the options that Qwen3 checkpoints may carry but this model does not
        implement (sliding windows, attention biases, scaled RoPE), instead of silently computing
        something else.
        """
        architectures = config_dict.get("architectures") or [ARCHITECTURE]
        if ARCHITECTURE not in architectures:
            raise UnsupportedCheckpointError(
                f"expected architecture {ARCHITECTURE}, the checkpoint declares {architectures}"
            )
        model_type = config_dict.get("model_type", "qwen3")
        if model_type != "qwen3":
            raise UnsupportedCheckpointError(f"expected model_type 'qwen3', got {model_type!r}")
        if config_dict.get("use_sliding_window"):
            raise UnsupportedCheckpointError(
                "sliding-window attention (use_sliding_window) is not supported"
            )
        if config_dict.get("attention_bias"):
            raise UnsupportedCheckpointError(
                "attention biases (attention_bias=true) are not supported"
            )
        if config_dict.get("hidden_act", "silu") != "silu":
            raise UnsupportedCheckpointError(
                f"hidden_act {config_dict['hidden_act']!r} is not supported"
            )

        rope_theta = _rope_theta(config_dict)
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [key for key in required if key not in config_dict]
        if missing:
            raise CheckpointError(f"config.json lacks required fields: {', '.join(missing)}")
        num_heads = config_dict["num_attention_heads"]
        head_dim = config_dict.get("head_dim") or config_dict["hidden_size"] // num_heads
        fields = dict(
            vocab_size=config_dict["vocab_size"],
            hidden_size=config_dict["hidden_size"],
            intermediate_size=config_dict["intermediate_size"],
            num_layers=config_dict["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config_dict.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(config_dict.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config_dict.get("tie_word_embeddings", False)),
            max_position_embeddings=config_dict.get("max_position_embeddings", 40_960),
            bos_token_id=config_dict.get("bos_token_id"),
            eos_token_id=config_dict.get("eos_token_id"),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self, *, torch_dtype: str = "float32") -> dict[str, Any]:
        """The `config.json` dictionary that `transformers` reads back into the same model.

        `rope_theta` is written both at the top level (transformers 4) and under
        `rope_parameters` (transformers 5).
        """
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id)
            if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "torch_dtype": torch_dtype,
        }


def _rope_theta(config_dict: Mapping[str, Any]) -> float:
    """`rope_theta` from the top level (transformers 4) or `rope_parameters` (transformers 5)."""
    rope_parameters = config_dict.get("rope_parameters") or {}
    rope_scaling = config_dict.get("rope_scaling") or {}
    for section in (rope_parameters, rope_scaling):
        rope_type = section.get("rope_type", section.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedCheckpointError(f"RoPE scaling type {rope_type!r} is not supported")
    if "rope_theta" in rope_parameters:
        return rope_parameters["rope_theta"]
    if "rope_theta" in config_dict:
        return config_dict["rope_theta"]
    raise CheckpointError(
        "config.json has no rope_theta (neither top-level nor under rope_parameters)"
    )
