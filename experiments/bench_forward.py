"""Forward and forward+backward throughput of our Qwen3 against transformers/PyTorch, same weights.

    .venv/bin/python experiments/bench_forward.py [--model bench_29m] [--batch 8] [--seq-len 512]

Both sides run float32 on the same machine, one after the other, on the same random checkpoint
and tokens. The training number is one loss + gradient (no optimizer update) with next-token
cross-entropy over every position. Prints a table, then one JSON line; `ratio` is
ours / transformers for forward+backward tokens per second (above 1 means we are faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from cacherl_jax import reference
from cacherl_jax.model import count_params, forward, load_hf_checkpoint, presets


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (compilation for JAX, allocator for torch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _jax_loss(params, config, tokens_BxT):
    logits_BxTxV = forward(params, config, tokens_BxT[:, :-1])
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    targets_BxT = tokens_BxT[:, 1:]
    return -jnp.mean(jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench_29m", choices=sorted(presets.PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--scan-layers",
        action="store_true",
        help="keep the layer scan rolled (default: unrolled, faster on CPU)",
    )
    args = parser.parse_args()

    import torch

    config = presets.preset(args.model, unroll_layers=not args.scan_layers)
    tokens_BxT = np.random.default_rng(0).integers(
        0, config.vocab_size, (args.batch, args.seq_len + 1)
    )
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = reference.random_hf_model(config)
        hf_model.save_pretrained(tmp)
        _, params = load_hf_checkpoint(tmp)

    tokens = jnp.asarray(tokens_BxT)
    jax_forward = jax.jit(lambda p, t: forward(p, config, t[:, :-1]))
    jax_grad = jax.jit(jax.value_and_grad(lambda p, t: _jax_loss(p, config, t)))

    torch_tokens = torch.as_tensor(tokens_BxT)

    def torch_forward():
        with torch.no_grad():
            return hf_model(torch_tokens[:, :-1]).logits

    def torch_grad():
        hf_model.zero_grad(set_to_none=True)
        logits = hf_model(torch_tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch_tokens[:, 1:].reshape(-1)
        )
        loss.backward()
        return loss

    # Same numbers on both sides before timing anything.
    jax_loss = float(jax_grad(params, tokens)[0])
    torch_loss = float(torch_grad().detach())
    assert abs(jax_loss - torch_loss) <= 1e-4 * abs(torch_loss), (jax_loss, torch_loss)

    n_tokens = args.batch * args.seq_len
    seconds = {
        "forward_jax": _median_seconds(
            lambda: jax.block_until_ready(jax_forward(params, tokens)), args.repeats
        ),
        "forward_torch": _median_seconds(torch_forward, args.repeats),
        "train_jax": _median_seconds(
            lambda: jax.block_until_ready(jax_grad(params, tokens)), args.repeats
        ),
        "train_torch": _median_seconds(torch_grad, args.repeats),
    }
    rate = {k: n_tokens / v for k, v in seconds.items()}

    print(
        f"Qwen3 {args.model}: {count_params(params) / 1e6:.1f}M params, batch {args.batch} x {args.seq_len}, "
        f"float32, layers {'scanned' if args.scan_layers else 'unrolled'}, {os.cpu_count()} CPU cores, jax {jax.__version__} / torch {torch.__version__}"
    )
    print(f"{'pass':<22} {'ours tok/s':>12} {'transformers tok/s':>20} {'ratio':>7}")
    for name, label in (("forward", "forward"), ("train", "forward+backward")):
        ratio = rate[f"{name}_jax"] / rate[f"{name}_torch"]
        print(
            f"{label:<22} {rate[f'{name}_jax']:>12.0f} {rate[f'{name}_torch']:>20.0f} {ratio:>7.2f}"
        )
    print(
        json.dumps(
            {
                "model": args.model,
                "batch": args.batch,
                "seq_len": args.seq_len,
                "unroll_layers": not args.scan_layers,
                "forward_tokens_per_s": round(rate["forward_jax"], 1),
                "forward_tokens_per_s_transformers": round(rate["forward_torch"], 1),
                "forward_ratio": round(rate["forward_jax"] / rate["forward_torch"], 3),
                "train_tokens_per_s": round(rate["train_jax"], 1),
                "train_tokens_per_s_transformers": round(rate["train_torch"], 1),
                "ratio": round(rate["train_jax"] / rate["train_torch"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
