"""Matmul precision: float32 that means float32 on every backend."""

from __future__ import annotations

import os


def full_float32_matmuls() -> None:
    """Multiply float32 matrices in float32 unless the user chose otherwise.

    JAX on NVIDIA GPUs runs float32 matmuls in TF32 by default; torch does not. Measured on an
    H200: our float32 logits 2.6e-4 (relative) from transformers' float32, against < 1e-5 at
    "highest". `JAX_DEFAULT_MATMUL_PRECISION=default` (or `tensorfloat32`) brings TF32 back.
    bfloat16 compute and CPU runs are unaffected.
    """
    if "JAX_DEFAULT_MATMUL_PRECISION" not in os.environ:
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
