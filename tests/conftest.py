"""Shared fixtures. Eight simulated CPU devices, so sharding tests run on any machine."""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "")
import jax

# Must happen before any JAX computation creates the CPU backend.
jax.config.update("jax_num_cpu_devices", 8)
# As the CLI does: float32 parity with transformers holds on GPUs too (JAX's default there is
# TF32, 2.6e-4 from the reference on an H200); no effect on CPU.
from cacherl_jax.precision import full_float32_matmuls  # noqa: E402

full_float32_matmuls()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cacherl_jax.model import Qwen3Config  # noqa: E402

# Small Qwen3 shapes chosen to exercise what the checks name: tied and untied embeddings, both
# rope_theta values of the Qwen3 releases, head_dim != hidden/heads, and GQA ratios 2, 3 and 4.
PARITY_CONFIGS = {
    "tied-theta1e6-gqa2": Qwen3Config(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=1e6, tie_word_embeddings=True,
    ),
    "untied-theta5e6-headdim24-gqa3": Qwen3Config(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=6,
        num_kv_heads=2, head_dim=24, rope_theta=5e6, tie_word_embeddings=False,
    ),
    "tied-theta5e6-headdim32-gqa4": Qwen3Config(
        vocab_size=320, hidden_size=48, intermediate_size=112, num_layers=3, num_heads=8,
        num_kv_heads=2, head_dim=32, rope_theta=5e6, tie_word_embeddings=True,
    ),
}  # fmt: skip

# Divisible by 2 and 8 along every sharded axis, for the mesh tests.
SHARDABLE_CONFIG = Qwen3Config(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, rope_theta=1e6, tie_word_embeddings=False,
)  # fmt: skip


@pytest.fixture(scope="session")
def hf_checkpoint_dir(tmp_path_factory):
    """`hf_checkpoint_dir(name, config)`: a random transformers Qwen3 saved once per session."""
    from cacherl_jax import reference

    made = {}

    def make(name: str, config: Qwen3Config):
        if name not in made:
            made[name] = reference.save_random_hf_checkpoint(config, tmp_path_factory.mktemp(name))
        return made[name]

    return make


@pytest.fixture(scope="session")
def shop_sft_run(tmp_path_factory):
    """A briefly SFT'd tiny model and its data (tests/shop_run.py), built once per session.
    `CACHERL_TEST_SHOP_RUN=DIR` reuses one built earlier by `shop_run.build(DIR)` (to iterate on
    the tests that use it without rebuilding)."""
    import shop_run

    reuse = os.environ.get("CACHERL_TEST_SHOP_RUN")
    if reuse and (Path(reuse) / "sft" / "hf" / "config.json").exists():
        return Path(reuse)
    return shop_run.build(tmp_path_factory.mktemp("shop"))


@pytest.fixture(scope="session")
def quick_reproduction(tmp_path_factory, pytestconfig):
    """(workdir, out, compile_cache, headline, stdout) of experiments/reproduce_paper.py at the
    quick preset (tests/quick_reproduction.py), run once per session."""
    import quick_reproduction

    root = tmp_path_factory.mktemp("reproduce")
    workdir, out = root / "runs", root / "results"
    # JAX's persistent compilation cache (content-addressed) kept in pytest's cache directory, so
    # later sessions skip most compilation; a fresh checkout compiles everything once.
    cache = getattr(pytestconfig, "cache", None)  # None with -p no:cacheprovider
    compile_cache = cache.mkdir("reproduce_xla_cache") if cache else root / "xla_cache"
    headline, stdout = quick_reproduction.run(workdir, out, compile_cache)
    return workdir, out, compile_cache, headline, stdout


@pytest.fixture
def rng():
    return np.random.default_rng(0)
