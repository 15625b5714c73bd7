"""One SFT step (forward, backward, clipping, AdamW) of our trainer against transformers + torch.

    .venv/bin/python experiments/bench_train_step.py [--batch 8] [--seq-len 512] [--repeats 5]

Model: Qwen3 with vocab 8192, hidden 512, MLP 1536, 8 layers, 8 heads (4 KV), head_dim 64, tied
embeddings, float32, the same random weights on both sides. Each side runs in its own subprocess
so its peak resident memory is its own. MFU is measured against a float32 matmul peak that this
script measures with JAX in the same run: the fastest of 2048^3 matmuls timed 5 times before the
steps and 3 times after each; `mfu_same_load` instead compares each step with the best matmul
timed right after it (median over the steps). Both sides run in one environment, this
process's without any `glibc.malloc.hugetlb` tunable: neither side's malloc uses huge pages (other
`GLIBC_TUNABLES` are kept and reported). Prints a table, then one JSON line with `ratio` (ours /
transformers tokens per second) and `mfu`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

MODEL = "bench_29m"
# On a GPU each side's process takes only the memory it uses, so the peaks are comparable and
# the parent's JAX does not hold 75% of the device away from the children.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    fn()
    return statistics.median(_timed(fn) for _ in range(repeats))


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def _on_gpu() -> bool:
    """Both sides go to the GPU when JAX has one (torch must see it too), else both stay on CPU."""
    import jax

    return jax.default_backend() == "gpu"


def run_jax(checkpoint: str, batch: int, seq_len: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from cacherl_jax.model import load_hf_checkpoint
    from cacherl_jax.precision import full_float32_matmuls
    from cacherl_jax.train import sft
    from cacherl_jax.train.host_memory import release_freed_memory
    from cacherl_jax.train.optimizer import make_optimizer

    full_float32_matmuls()  # as `cacherl sft` does: float32 like torch's, not TF32, on a GPU

    config, params = load_hf_checkpoint(checkpoint, unroll_layers=True)
    train = ml_collections.ConfigDict(
        dict(lr=1e-4, steps=1000, warmup_steps=0, schedule="cosine", end_lr_ratio=0.1, weight_decay=0.01,
             b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0)
    )  # fmt: skip
    tx, schedule = make_optimizer(train)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "trainable": params,
        "opt_state": jax.jit(tx.init)(params),
    }
    step_config = sft.StepConfig(config, None, 1, 1.0, 2048)
    jitted = jax.jit(sft.make_train_step(step_config, tx, schedule), donate_argnums=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (batch, seq_len + 1))
    batch_arrays = {
        "tokens_BxT": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets_BxT": jnp.asarray(tokens[:, 1:], jnp.int32),
        "loss_mask_BxT": jnp.ones((batch, seq_len), jnp.int32),
        "thinking_mask_BxT": jnp.zeros((batch, seq_len), jnp.int32),
        "segment_ids_BxT": jnp.ones((batch, seq_len), jnp.int32),
        "positions_BxT": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len)),
    }
    # As `sft.train` does: compile ahead, then hand the compiler's freed memory back to the OS.
    step = jitted.lower(state, None, batch_arrays).compile()
    release_freed_memory()
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], None, batch_arrays)
        return float(metrics["loss"])

    first_loss = one_step()
    one_step()
    memory = step.memory_analysis()

    # The float32 matmul peak of this machine, as JAX reaches it: the fastest 2048^3 matmul of
    # the run, timed 5 times before the steps and 3 times after each one. MFU divides by that
    # best rate; `mfu_same_load` divides each step by the best matmul right after it instead, so
    # both see the same load on a shared machine (the peak moves 130-190 GFLOP/s between runs).
    a = jnp.ones((2048, 2048), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()

    def matmul_gflops(times: int) -> float:
        best = min(_timed(lambda: matmul(a, a).block_until_ready()) for _ in range(times))
        return 2 * 2048**3 / best / 1e9

    n_matmul = (
        sum(x.size for k, x in params["layers"].items() if x.ndim >= 3) + params["embed"].size
    )
    flops_per_token = (
        6 * n_matmul + 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
    )
    peaks = [matmul_gflops(5)]
    step_seconds, same_load = [], []
    faults = 0
    for _ in range(repeats):
        before = _minor_faults()
        step_seconds.append(_timed(one_step))
        faults += _minor_faults() - before
        peaks.append(matmul_gflops(3))
        step_gflops = flops_per_token * batch * seq_len / step_seconds[-1] / 1e9
        same_load.append(step_gflops / peaks[-1])
    seconds = statistics.median(step_seconds)
    device_stats = jax.devices()[0].memory_stats() or {}
    return {
        "seconds": seconds,
        "page_faults_per_step": faults / repeats,
        "first_loss": first_loss,
        "peak_rss_gib": _peak_rss_gib(),
        "peak_device_gib": device_stats.get("peak_bytes_in_use", 0) / 1024**3,
        "xla_bytes_gib": (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes
        )
        / 1024**3,
        "matmul_peak_gflops": max(peaks),
        "mfu_same_load": statistics.median(same_load),
        "flops_per_token": flops_per_token,
    }


def run_torch(checkpoint: str, batch: int, seq_len: int, repeats: int) -> dict:
    import numpy as np
    import torch
    import transformers

    device = "cuda" if _on_gpu() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01
    )
    tokens = torch.as_tensor(
        np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq_len + 1)),
        device=device,
    )

    def one_step():
        logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    first_loss = one_step()
    seconds = _median_time(one_step, repeats)
    return {
        "seconds": seconds,
        "first_loss": first_loss,
        "peak_rss_gib": _peak_rss_gib(),
        "peak_device_gib": torch.cuda.max_memory_allocated() / 1024**3 if device == "cuda" else 0.0,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:  # a child process: run one side, print its JSON
        run = run_jax if args.side == "jax" else run_torch
        print(json.dumps(run(args.checkpoint, args.batch, args.seq_len, args.repeats)))
        return

    from cacherl_jax import reference
    from cacherl_jax.model import presets

    config = presets.preset(MODEL)
    # One environment for both sides, so neither gets malloc settings the other lacks.
    tunables = ":".join(
        tunable
        for tunable in os.environ.get("GLIBC_TUNABLES", "").split(":")
        if tunable and not tunable.startswith("glibc.malloc.hugetlb=")
    )
    environ = {**os.environ, "TQDM_DISABLE": "1", "GLIBC_TUNABLES": tunables}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_random_hf_checkpoint(config, tmp)
        for side in ("jax", "torch"):
            command = [
                sys.executable,
                __file__,
                "--side",
                side,
                "--checkpoint",
                tmp,
                "--batch",
                str(args.batch),
                "--seq-len",
                str(args.seq_len),
                "--repeats",
                str(args.repeats),
            ]
            out = subprocess.run(
                command,
                check=True,
                capture_output=True,
                text=True,
                env=environ,
            )
            results[side] = json.loads(out.stdout.strip().splitlines()[-1])

    tokens = args.batch * args.seq_len
    ours, theirs = results["jax"], results["torch"]
    ours_tps, theirs_tps = tokens / ours["seconds"], tokens / theirs["seconds"]
    achieved_gflops = ours["flops_per_token"] * ours_tps / 1e9
    mfu = achieved_gflops / ours["matmul_peak_gflops"]
    import jax

    where = jax.devices()[0].device_kind if _on_gpu() else f"{os.cpu_count()} CPU cores"
    malloc = f"GLIBC_TUNABLES={tunables}" if tunables else "glibc's default malloc"
    print(
        f"SFT step, Qwen3 {MODEL} float32, batch {args.batch} x {args.seq_len}, {where}, {malloc}"
    )
    print(f"{'':<26} {'ours (JAX)':>12} {'transformers':>14}")
    print(f"{'tokens/s':<26} {ours_tps:>12.0f} {theirs_tps:>14.0f}")
    print(f"{'seconds/step':<26} {ours['seconds']:>12.3f} {theirs['seconds']:>14.3f}")
    print(f"{'first-step loss':<26} {ours['first_loss']:>12.4f} {theirs['first_loss']:>14.4f}")
    print(
        f"{'peak RSS GiB (process)':<26} {ours['peak_rss_gib']:>12.2f} {theirs['peak_rss_gib']:>14.2f}"
    )
    print(f"{'page faults per step':<26} {ours['page_faults_per_step']:>12.0f} {'':>14}")
    if _on_gpu():
        print(
            f"{'peak GPU memory GiB':<26} {ours['peak_device_gib']:>12.2f} {theirs['peak_device_gib']:>14.2f}"
        )
    print(
        f"ratio {ours_tps / theirs_tps:.2f}; {achieved_gflops:.1f} GFLOP/s = MFU {mfu:.1%} of the measured JAX f32 matmul peak {ours['matmul_peak_gflops']:.1f} GFLOP/s ({ours['mfu_same_load']:.1%} against the matmuls timed after each step); XLA plans {ours['xla_bytes_gib']:.2f} GiB"
    )
    print(
        json.dumps(
            {
                "tokens_per_s": round(ours_tps, 1),
                "tokens_per_s_transformers": round(theirs_tps, 1),
                "ratio": round(ours_tps / theirs_tps, 3),
                "mfu": round(mfu, 3),
                "mfu_same_load": round(ours["mfu_same_load"], 3),
                "matmul_peak_gflops": round(ours["matmul_peak_gflops"], 1),
                "achieved_gflops": round(achieved_gflops, 1),
                "peak_rss_gib": round(ours["peak_rss_gib"], 3),
                "peak_rss_gib_transformers": round(theirs["peak_rss_gib"], 3),
                "xla_planned_gib": round(ours["xla_bytes_gib"], 3),
                "page_faults_per_step": round(ours["page_faults_per_step"]),
                "device": where,
                "glibc_tunables": tunables,
                "peak_device_gib": round(ours["peak_device_gib"], 3),
                "peak_device_gib_transformers": round(theirs["peak_device_gib"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
