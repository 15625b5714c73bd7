"""The trainer -> rollout weight move after each GRPO update: on the devices (one jitted reshard,
`Sampler.set_params`) against the host round trip it replaces (fetch every array to host memory,
cast, put it back in the rollout layout).

    .venv/bin/python experiments/bench_weight_move.py [--model bench_29m] [--devices 8] [--tensor 1]

The parameters start in the training layout (FSDP over every device, float32); the rollout
layout is the sampler's: a copy per `tensor` group of devices, split over heads and MLP columns,
in the compute dtype (bfloat16 here, as on accelerators). Both sides produce identical arrays
(checked). Prints a table, then one JSON line; `ratio` is host round trip / on device (above 1
means the move on the devices is faster). On a pod the on-device move is an all-gather over the
training mesh; on CPU "devices" share one memory, so this measures the program, not the links.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench_29m")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(args.devices))

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding

    from cacherl_jax import parallel
    from cacherl_jax.model import count_params, init_params, presets
    from cacherl_jax.sampling import Sampler
    from cacherl_jax.sampling.sampler import param_specs

    config = presets.preset(args.model, compute_dtype="bfloat16")
    train_mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    params = init_params(config, jax.random.key(0), mesh=train_mesh)
    rollout_mesh = parallel.local_mesh(args.tensor)
    sampler = Sampler(params, config, mesh=rollout_mesh)
    shardings = jax.tree.map(
        lambda spec: NamedSharding(rollout_mesh, spec), param_specs(config, rollout_mesh)
    )

    def on_device():
        sampler.set_params(params)
        jax.block_until_ready(sampler.params)

    def host_round_trip():
        host = jax.device_get(params)
        cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), host)
        return jax.block_until_ready(jax.device_put(cast, shardings))

    def median(fn) -> float:
        fn()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    device_s, host_s = median(on_device), median(host_round_trip)
    for a, b in zip(
        jax.tree.leaves(sampler.params), jax.tree.leaves(host_round_trip()), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    n = count_params(params)
    moved_gib = n * 2 / 2**30
    print(f"model {args.model} ({n / 1e6:.1f}M parameters), {args.devices} devices, "
          f"rollout tensor={args.tensor}")  # fmt: skip
    print(f"{'move':<24}{'median s':>10}{'GiB/s (bf16 out)':>18}")
    print(f"{'on device (ours)':<24}{device_s:>10.4f}{moved_gib / device_s:>18.2f}")
    print(f"{'host round trip':<24}{host_s:>10.4f}{moved_gib / host_s:>18.2f}")
    print(json.dumps({"model": args.model, "devices": args.devices, "tensor": args.tensor,
                      "on_device_s": device_s, "host_round_trip_s": host_s,
                      "ratio": host_s / device_s}))  # fmt: skip


if __name__ == "__main__":
    main()
