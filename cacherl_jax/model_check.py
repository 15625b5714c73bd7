"""`cacherl check-model`: every path of the model layer, checked against transformers.

A random Hugging Face Qwen3 goes through every path the model layer offers (safetensors ->
sharded JAX params -> orbax -> JAX forward -> safetensors -> transformers), and each step's
logits are compared with the transformers float32 reference. (`cacherl demo` is the pipeline.)
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cacherl_jax import parallel, reference
from cacherl_jax.model import Qwen3Config, count_params, forward, hidden_states, presets, qwen3
from cacherl_jax.model.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from cacherl_jax.model.native_checkpoint import load_params, save_params

DEMO_MODEL = presets.preset("tiny")
F32_TOLERANCE = 1e-4
BF16_TOLERANCE = 2e-2


def _describe(config: Qwen3Config, n_params: int) -> str:
    return (
        f"Qwen3 {n_params / 1e6:.2f}M params (vocab {config.vocab_size}, hidden {config.hidden_size}, "
        f"{config.num_layers} layers, {config.num_heads} heads / {config.num_kv_heads} kv, "
        f"head_dim {config.head_dim}, rope_theta {config.rope_theta:g})"
    )


def _causality_gap(params, config: Qwen3Config, seq_len: int) -> float:
    """Largest gradient of position t's logits with respect to inputs after t (must be 0)."""
    t = seq_len // 2
    x_1xTxE = jax.random.normal(jax.random.key(0), (1, seq_len, config.hidden_size))

    def logits_at_t(x_1xTxE):
        h_1xTxE = hidden_states(params, config, x_1xTxE)
        return jnp.sum(qwen3.logits_from_hidden(h_1xTxE[:, t : t + 1], qwen3.unembedding(params)))

    grad_1xTxE = jax.jit(jax.grad(logits_at_t))(x_1xTxE)
    return float(jnp.max(jnp.abs(grad_1xTxE[0, t + 1 :])))


def run(
    workdir: str | Path = "runs/demo",
    seq_len: int = 512,
    seed: int = 0,
    mesh_axes: dict[str, int] | None = None,
) -> dict:
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    mesh = parallel.make_mesh(mesh_axes or parallel.DEFAULT_MESH_AXES)
    rows: list[tuple[str, float, float | None, float]] = []

    def timed(fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        return out, time.perf_counter() - start

    hf_dir, seconds = timed(
        reference.save_random_hf_checkpoint, DEMO_MODEL, workdir / "hf_random", seed=seed
    )
    hf_model = reference.load_hf_model(hf_dir)
    batch_shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    batch = batch_shards * max(1, 2 // batch_shards)
    tokens_BxT = np.random.default_rng(seed).integers(0, DEMO_MODEL.vocab_size, (batch, seq_len))
    expected = reference.hf_logits(hf_model, tokens_BxT)
    rows.append(("random transformers Qwen3 -> safetensors", float("nan"), None, seconds))

    (config, params), seconds = timed(load_hf_checkpoint, hf_dir, mesh=mesh)
    rows.append(
        (f"load safetensors onto mesh {parallel.describe(mesh)}", float("nan"), None, seconds)
    )
    _, seconds = timed(save_params, config, params, workdir / "jax")
    rows.append(("save orbax checkpoint", float("nan"), None, seconds))
    (config, params), seconds = timed(load_params, workdir / "jax", mesh=mesh)
    rows.append(("restore orbax checkpoint", float("nan"), None, seconds))

    tokens = jax.device_put(tokens_BxT, parallel.batch_sharding(mesh))
    for dtype, tolerance in (("float32", F32_TOLERANCE), ("bfloat16", BF16_TOLERANCE)):
        run_config = config.replace(compute_dtype=dtype)
        step = jax.jit(lambda p, t, c=run_config: forward(p, c, t))
        jax.block_until_ready(step(params, tokens))  # compile
        logits, seconds = timed(lambda s=step: jax.block_until_ready(s(params, tokens)))
        rows.append(
            (
                f"JAX forward ({dtype}) vs transformers float32",
                reference.relative_error(logits, expected),
                tolerance,
                seconds,
            )
        )

    _, seconds = timed(save_hf_checkpoint, config, params, workdir / "hf_export")
    exported = reference.hf_logits(reference.load_hf_model(workdir / "hf_export"), tokens_BxT)
    rows.append(
        (
            "export -> transformers loads it",
            reference.relative_error(exported, expected),
            F32_TOLERANCE,
            seconds,
        )
    )

    gap, seconds = timed(_causality_gap, params, config, min(seq_len, 128))
    rows.append(("causality: d logits[t] / d input[>t]", gap, 0.0, seconds))

    print(
        f"\ncacherl demo: {_describe(config, count_params(params))}, batch {batch} x {seq_len} tokens\n"
    )
    print(f"{'step':<58} {'max|Δ|/max|ref|':>15} {'tolerance':>10} {'seconds':>8}  ok")
    results = []
    for name, error, tolerance, seconds in rows:
        ok = tolerance is None or error <= tolerance
        err_text = "" if np.isnan(error) else f"{error:.2e}"
        tol_text = "" if tolerance is None else f"{tolerance:.0e}"
        print(f"{name:<58} {err_text:>15} {tol_text:>10} {seconds:>8.2f}  {'yes' if ok else 'NO'}")
        results.append(
            {
                "step": name,
                "error": None if np.isnan(error) else error,
                "ok": ok,
                "seconds": seconds,
            }
        )
    report = {
        "model": _describe(config, count_params(params)),
        "workdir": str(workdir),
        "steps": results,
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {workdir}/ (hf_random/, jax/, hf_export/, report.json)")
    if not all(r["ok"] for r in results):
        raise SystemExit("demo: a check failed (see the table above)")
    return report
