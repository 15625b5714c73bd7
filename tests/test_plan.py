"""`cacherl plan`: TPU topologies by name, the qwen3_8b preset, every GRPO program compiled for a
TPU slice on this CPU machine, and splash attention's temporaries against the dense form's.

The TPU compiles run in `.venv-tpu` (libtpu; `make tpu-plan-env`), in a subprocess with the
platform pinned to the CPU; a missing `.venv-tpu` fails these tests, it does not skip them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from cacherl_jax.model import attention, param_shapes, presets
from cacherl_jax.train import plan, topology

ROOT = Path(__file__).resolve().parents[1]
TPU_PYTHON = ROOT / ".venv-tpu" / "bin" / "python"
TPU_ENV = {
    "JAX_PLATFORMS": "cpu",
    "TPU_SKIP_MDS_QUERY": "1",
    # Several compile-only libtpu processes at once (pytest workers, a plan in another shell).
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "PYTHONPATH": str(ROOT),
}


PLAN_SFT = ["--config=configs/sft.py:tiny"]
# The tiny GRPO config at small shapes (each program compiles in seconds), with a KL term.
SMALL_GRPO = [
    "--config=configs/grpo.py:tiny",
    "--config.model.unroll_layers=False",
    "--config.loop.max_len=256",
    "--config.loop.cache_len=512",
    "--config.loop.max_new_tokens=16",
    "--config.grpo.tasks_per_step=2",
    "--config.grpo.beta=0.1",
]


def run_tpu(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    assert TPU_PYTHON.exists(), f"{TPU_PYTHON} is missing: run `make tpu-plan-env` first"
    return subprocess.run(
        [str(TPU_PYTHON), *args],
        cwd=ROOT,
        env=os.environ | TPU_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_topology_names_map_to_slices():
    for name, topology_name, chips, hosts, memory in [
        ("v5p-16", "v5p:2x2x2", 8, 2, 95.0),
        ("v5p-64", "v5p:2x4x4", 32, 8, 95.0),
        ("v5e-16", "v5e:4x4", 16, 4, 16.0),
        ("v4-8", "v4:2x2x1", 4, 1, 32.0),
        ("v5p:2x2x1", "v5p:2x2x1", 4, 1, 95.0),
    ]:
        target = topology.parse(name)
        assert (target.topology_name, target.chips, target.hosts) == (topology_name, chips, hosts)
        assert target.chip_memory_gib == memory
    for bad in ("v5p-12", "v9-16", "v5p", "v5p:2xq"):
        with pytest.raises(topology.TopologyError):
            topology.parse(bad)


def test_qwen3_8b_preset_has_8_19b_parameters():
    config = presets.preset("qwen3_8b")
    assert not config.tie_word_embeddings and config.max_position_embeddings == 40_960
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes(config)))
    assert count == pytest.approx(8.19e9, abs=0.01e9)


def test_auto_attention_follows_the_mesh_platform():
    config = presets.preset("tiny")
    mesh = jax.make_mesh((8,), ("fsdp",), devices=jax.devices("cpu"))
    with jax.set_mesh(mesh):
        assert attention.implementation(config) == "cpu_blocked"
    for impl in ("splash", "cudnn"):
        assert attention.implementation(config.replace(attention_impl=impl)) == impl
    assert attention.cudnn_supported(np.dtype("bfloat16"), 128, 512)
    assert not attention.cudnn_supported(np.float32, 128, 512)
    assert not attention.cudnn_supported(np.dtype("bfloat16"), 256, 512)


def test_topology_without_libtpu_names_the_extra():
    """The main environment has no libtpu: one line naming the extra, exit status 2."""
    done = subprocess.run(
        [sys.executable, "-m", "cacherl_jax.cli", "plan", *PLAN_SFT, "--topology=v5p-16"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "pip install -e '.[tpu-plan]'" in done.stderr and "make tpu-plan-env" in done.stderr


def test_grpo_plan_compiles_every_program_for_a_tpu_topology():
    done = run_tpu(["-m", "cacherl_jax.cli", "plan", "--topology=v5p:2x2x1", *SMALL_GRPO])
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["platform"] == "tpu" and result["devices"] == 4 and result["hosts"] == 1
    assert set(result["programs"]) == {"grpo update", "log-probs", "sampler"}
    for name, program in result["programs"].items():
        assert program["flops"] > 0 and program["total_gib"] > 0, name
    # beta > 0 without LoRA keeps a frozen copy of the parameters.
    assert result["reference_gib_per_device"] == pytest.approx(result["params_gib_per_device"])
    assert result["kv_cache_gib_per_device"] > 0 and result["weight_move_gib"] > 0
    assert "fits" in out and "sampler" in out and "weight move" in out
    assert plan.verdict(result, 95.0).startswith("fits")
    tight = plan.verdict(result, result["total_gib_per_device"] / 2)
    assert tight.startswith("does not fit:") and "try" in tight and "remat" in tight


SPLASH_CHECK = """
    import json
    import jax, jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec
    from cacherl_jax.model import attention, presets, qwen3

    devices = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
    mesh = jax.make_mesh((4,), ("fsdp",), devices=devices)
    B, T, H, K, D = 4, 4096, 32, 8, 128
    sharding = NamedSharding(mesh, PartitionSpec("fsdp"))
    args = [jax.ShapeDtypeStruct((B, T, n, D), jnp.bfloat16, sharding=sharding) for n in (H, K, K)]
    args.append(jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sharding))
    temps = {}
    for impl in ("auto", "xla"):
        config = presets.preset(
            "qwen3_4b", compute_dtype="bfloat16", attention_impl=impl, attention_block=None
        )

        def forward(q, k, v, segment_ids):
            index = jnp.broadcast_to(jnp.arange(T), (B, T))
            mask = qwen3.attention_mask(segment_ids, segment_ids, index, index)
            return attention.self_attention(q, k, v, mask, config)

        with jax.set_mesh(mesh):
            temps[attention.implementation(config)] = (
                jax.jit(forward).lower(*args).compile().memory_analysis().temp_size_in_bytes
            )
    # The backward kernels too, under the CLI's "highest" float32 precision (bfloat16 operands).
    jax.config.update("jax_default_matmul_precision", "highest")
    config = presets.preset("qwen3_4b", compute_dtype="bfloat16", attention_impl="splash")
    T = 512
    args = [jax.ShapeDtypeStruct((B, T, n, D), jnp.bfloat16, sharding=sharding) for n in (H, K, K)]
    args.append(jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sharding))

    def loss(q, k, v, segment_ids):
        index = jnp.broadcast_to(jnp.arange(T), (B, T))
        mask = qwen3.attention_mask(segment_ids, segment_ids, index, index)
        return jnp.sum(attention.self_attention(q, k, v, mask, config).astype(jnp.float32))

    with jax.set_mesh(mesh):
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    print(json.dumps(temps))
"""


def test_splash_attention_compiles_for_tpu_with_far_smaller_temporaries():
    """4 rows x 4,096 tokens, 32 heads over 4 v5p chips: the dense form's [T, T] logits per head
    against splash's tiles; the backward pass compiles too."""
    done = run_tpu(["-c", textwrap.dedent(SPLASH_CHECK)])
    assert done.returncode == 0, done.stderr[-3000:]
    temps = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(temps) == {"splash", "xla"}  # "auto" on a TPU mesh is splash
    assert temps["xla"] > 1024**3  # ~2 GiB of float32 logits per chip
    assert temps["splash"] < temps["xla"] / 10
