"""Sampling throughput of our KV-cache sampler against transformers' `generate`, same weights.

    .venv/bin/python experiments/bench_sampler.py [--model bench_29m] [--batches 8 32] [--scan-layers]

Both sides run float32 on the same machine in the same process, one after the other: 64-token
random prompts, exactly 128 new tokens per row (stopping disabled), temperature-1 sampling without
top-k/top-p (`--greedy` for argmax), transformers with its KV cache and torch limited to
`--torch-threads` threads. Tokens/s count generated tokens over the whole call (prefill
included). The roofline is the memory-bandwidth limit of decoding: every step reads all weights
once plus the keys and values of the context so far (the average context is prompt + half the new
tokens), at a bandwidth measured here on 512 MB arrays: `roofline_fraction` uses a copy (bytes
read + written, STREAM's convention), `read_roofline_fraction` a read-only pass, which is what
decoding does and which these machines sustain faster. The compute limit is the other bound:
the matmul FLOPs of a whole call (prefill, whose output projection runs for the last token only,
plus one step per new token) at the float32 matmul rate of XLA's dot measured here on
2048-square operands; `compute_fraction` is ours over it.

The layer loop runs unrolled (`unroll_layers`, XLA's CPU backend would otherwise copy each
layer's weights out of the stacked arrays on every step); `--scan-layers` keeps the scan, as a
GPU or TPU run may prefer.

Prints a table, then one JSON line: `ratio` (ours / transformers tokens/s at the first batch
size), `ratio_b32`, `roofline_fraction` (ours / copy-bandwidth limit at the first batch size),
`compute_fraction`, and the same per batch size with a `_b{batch}` suffix.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch too

import jax
import jax.numpy as jnp
import numpy as np

from cacherl_jax import reference
from cacherl_jax.model import count_params, load_hf_checkpoint, presets
from cacherl_jax.precision import full_float32_matmuls
from cacherl_jax.sampling import Sampler, SamplingParams

ON_GPU = jax.default_backend() == "gpu"  # then transformers runs on the GPU too


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (compilation for JAX, allocator for torch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_bandwidth(megabytes: int = 512, repeats: int = 5) -> tuple[float, float]:
    """(copy, read) bytes per second on arrays far larger than the caches. Copy counts each byte
    twice (read and written), as STREAM does; read is a JAX row-max, which only loads."""
    src = np.ones(megabytes * 2**20 // 4, np.float32)
    # Best of a few: the machine's capacity rather than its neighbours' noise.
    if ON_GPU:
        on_device = jnp.asarray(src)
        double = jax.jit(lambda x: x * 2)
        double(on_device).block_until_ready()
        copy = min(_timed(lambda: double(on_device).block_until_ready()) for _ in range(repeats))
    else:
        dst = np.empty_like(src)
        copy = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    rows = jnp.asarray(src).reshape(-1, 4096)
    row_max = jax.jit(lambda x: jnp.max(x, axis=1))
    row_max(rows).block_until_ready()
    read = min(_timed(lambda: row_max(rows).block_until_ready()) for _ in range(repeats))
    return 2 * src.nbytes / copy, src.nbytes / read


def measure_matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """The best float32 matmul FLOP/s of XLA's dot seen here, on [size, size] x [size, size]."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, precision="highest"))

    def run():
        matmul(a, b).block_until_ready()

    run()  # compilation
    return 2 * size**3 / min(_timed(run) for _ in range(repeats))


def flops_per_call(config, n_params: int, batch: int, prompt_len: int, new: int) -> float:
    """Matmul FLOPs of one generate call: the prefill (output projection for the last prompt
    token only) and one decode step per new token. Attention's and the norms' are left out."""
    unembed = config.vocab_size * config.hidden_size
    layers = n_params - unembed * (1 if config.tie_word_embeddings else 2)
    prefill = 2 * layers * batch * prompt_len + 2 * unembed * batch
    return prefill + new * 2 * (layers + unembed) * batch


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bytes_per_step(config, n_params: int, batch: int, context: float) -> float:
    """Weights (float32, the tied embedding read once as the output projection) plus the keys and
    values of `context` cached tokens per row."""
    kv = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4
    return 4 * n_params + batch * context * kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench_29m", choices=sorted(presets.PRESETS))
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument(
        "--scan-layers",
        action="store_true",
        help="keep the layer scan rolled (default: unrolled, faster on CPU)",
    )
    args = parser.parse_args()

    import torch

    full_float32_matmuls()  # as `cacherl serve` does: float32 like torch's, not TF32, on a GPU
    torch.set_num_threads(args.torch_threads)
    torch_device = "cuda" if ON_GPU else "cpu"
    config = presets.preset(args.model, unroll_layers=not args.scan_layers)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = reference.random_hf_model(config)
        hf_model.save_pretrained(tmp)
        _, params = load_hf_checkpoint(tmp)
    hf_model.to(torch_device)
    n_params = count_params(params)
    sampler = Sampler(params, config)
    bandwidth, read_bandwidth = measure_bandwidth()
    matmul_rate = measure_matmul_rate()
    rng = np.random.default_rng(0)
    new = args.new_tokens
    context = args.prompt_len + (new - 1) / 2

    rows, read_limits, compute_limits = [], [], []
    for batch in args.batches:
        prompts_BxT = rng.integers(0, config.vocab_size, (batch, args.prompt_len))
        sampling = [
            SamplingParams(temperature=0.0 if args.greedy else 1.0, max_new_tokens=new, seed=row)
            for row in range(batch)
        ]

        def ours(prompts_BxT=prompts_BxT, sampling=sampling):
            generations = sampler.generate(prompts_BxT.tolist(), sampling)
            assert all(len(g) == new for g in generations)

        def transformers_generate(prompts_BxT=prompts_BxT, batch=batch):
            with torch.no_grad():
                out = hf_model.generate(
                    torch.as_tensor(prompts_BxT, device=torch_device),
                    attention_mask=torch.ones(
                        prompts_BxT.shape, dtype=torch.long, device=torch_device
                    ),
                    do_sample=not args.greedy,
                    top_k=0,
                    top_p=1.0,
                    temperature=1.0,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            assert out.cpu().shape == (batch, args.prompt_len + new)  # .cpu() waits for the GPU

        ours_rate = batch * new / _median_seconds(ours, args.repeats)
        hf_rate = (
            float("nan")
            if args.skip_transformers
            else batch * new / _median_seconds(transformers_generate, args.repeats)
        )
        step_bytes = bytes_per_step(config, n_params, batch, context)
        rows.append((batch, ours_rate, hf_rate, batch * bandwidth / step_bytes))
        read_limits.append(batch * read_bandwidth / step_bytes)
        flops = flops_per_call(config, n_params, batch, args.prompt_len, new)
        compute_limits.append(batch * new * matmul_rate / flops)

    skipped = args.skip_transformers
    mode = "greedy" if args.greedy else "sampling at temperature 1"
    print(
        f"Qwen3 {args.model}: {n_params / 1e6:.1f}M params, float32, prompts {args.prompt_len} "
        f"tokens, {new} new tokens per row, {mode}; "
        f"{jax.devices()[0].device_kind if ON_GPU else f'{os.cpu_count()} CPU cores'}, torch threads "
        f"{args.torch_threads}, bandwidth {bandwidth / 1e9:.1f} GB/s copy / "
        f"{read_bandwidth / 1e9:.1f} GB/s read, matmuls {matmul_rate / 1e9:.0f} GFLOP/s; "
        f"layers {'scanned' if args.scan_layers else 'unrolled'}; "
        f"jax {jax.__version__} / torch {torch.__version__}"
    )
    print(
        f"{'batch':>5} {'ours tok/s':>11} {'transformers tok/s':>19} "
        f"{'ratio':>6} {'roofline tok/s':>15} {'of roofline':>12} {'of read roofline':>17} "
        f"{'compute limit tok/s':>20} {'of compute limit':>17}"
    )
    for (batch, ours_rate, hf_rate, limit), read_limit, compute_limit in zip(
        rows, read_limits, compute_limits, strict=True
    ):
        print(
            f"{batch:>5} {ours_rate:>11.0f} {hf_rate:>19.0f} "
            f"{ours_rate / hf_rate:>6.2f} {limit:>15.0f} {ours_rate / limit:>12.2f} "
            f"{ours_rate / read_limit:>17.2f} {compute_limit:>20.0f} "
            f"{ours_rate / compute_limit:>17.2f}"
        )
    result = {
        "model": args.model,
        "prompt_len": args.prompt_len,
        "new_tokens": new,
        "greedy": args.greedy,
        "bandwidth_gb_per_s": round(bandwidth / 1e9, 2),
        "read_bandwidth_gb_per_s": round(read_bandwidth / 1e9, 2),
        "matmul_gflop_per_s": round(matmul_rate / 1e9, 1),
        "unroll_layers": not args.scan_layers,
    }
    for i, ((batch, ours_rate, hf_rate, limit), read_limit, compute_limit) in enumerate(
        zip(rows, read_limits, compute_limits, strict=True)
    ):
        suffix = "" if i == 0 else f"_b{batch}"
        result |= {
            f"batch{suffix}": batch,
            f"tokens_per_s{suffix}": round(ours_rate, 1),
            f"tokens_per_s_transformers{suffix}": None if skipped else round(hf_rate, 1),
            f"ratio{suffix}": None if skipped else round(ours_rate / hf_rate, 3),
            f"roofline_tokens_per_s{suffix}": round(limit, 1),
            f"roofline_fraction{suffix}": round(ours_rate / limit, 3),
            f"read_roofline_fraction{suffix}": round(ours_rate / read_limit, 3),
            f"compute_limit_tokens_per_s{suffix}": round(compute_limit, 1),
            f"compute_fraction{suffix}": round(ours_rate / compute_limit, 3),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
