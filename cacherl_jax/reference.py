"""The transformers/PyTorch reference Qwen3, for parity tests, the demo and benchmarks.

Needs the `test` extra (torch and transformers); imported only where a comparison is made.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cacherl_jax.model.config import Qwen3Config


def _torch_and_transformers() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as err:
        raise ImportError(
            "the transformers reference needs the test extra: pip install -e '.[test]' (or `make test`)"
        ) from err
    transformers.utils.logging.disable_progress_bar()  # its bars would interleave with our tables
    return torch, transformers


def random_hf_model(config: Qwen3Config, *, seed: int = 0, norm_noise: float = 0.1) -> Any:
    """A `transformers.Qwen3ForCausalLM` in float32 with random weights.

    Norm weights are perturbed away from 1 so a norm applied to the wrong axis shows in the logits.
    """
    torch, transformers = _torch_and_transformers()
    hf_config = transformers.Qwen3Config(**config.to_hf())
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(hf_config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(norm_noise * torch.randn(param.shape, generator=generator))
    return model


def save_random_hf_checkpoint(
    config: Qwen3Config, path: str | os.PathLike[str], *, seed: int = 0
) -> Path:
    model = random_hf_model(config, seed=seed)
    model.save_pretrained(str(path))
    return Path(path)


def load_hf_model(path: str | os.PathLike[str]) -> Any:
    torch, transformers = _torch_and_transformers()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_logits(
    model: Any, tokens_BxT: np.ndarray, positions_BxT: np.ndarray | None = None
) -> np.ndarray:
    """float32 logits of the reference model for unpadded rows."""
    torch, _ = _torch_and_transformers()
    kwargs = {}
    if positions_BxT is not None:
        kwargs["position_ids"] = torch.as_tensor(np.asarray(positions_BxT), dtype=torch.long)
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens_BxT), dtype=torch.long), **kwargs)
    return out.logits.float().numpy()


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference|: the error relative to the logits' scale."""
    return float(
        np.max(np.abs(np.asarray(ours, np.float64) - reference)) / np.max(np.abs(reference))
    )
