"""The CPU decode kernels (`cacherl_jax/sampling/_cpu_kernels.cc`) against float64 numpy: the
packed matmul at decode and prefill shapes, the decode attention with its mask rule, the whole
decode layer, every instruction-set variant, and whole generations with and without them."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cacherl_jax.model import Qwen3Config, init_params
from cacherl_jax.sampling import Sampler, SamplingParams, cpu_kernels


def test_the_kernels_are_built_by_the_install():
    """`make test` builds the extension; a failed build would otherwise pass every other test on
    XLA's ops, and the sampler would quietly run at half speed."""
    assert cpu_kernels.AVAILABLE
    assert cpu_kernels.usable(jax.devices("cpu")[:1], jnp.float32)
    assert not cpu_kernels.usable(jax.devices("cpu")[:1], jnp.bfloat16)


def test_pack_is_panels_of_sixteen_output_rows():
    w_OxI = jnp.arange(64 * 3, dtype=jnp.float32).reshape(64, 3)
    packed = cpu_kernels.pack(w_OxI)
    assert packed.shape == (4, 3, 16)
    np.testing.assert_array_equal(packed[1, 2], w_OxI[16:32, 2])
    np.testing.assert_array_equal(cpu_kernels.unpack(packed), w_OxI)
    assert cpu_kernels.packable(w_OxI) and not cpu_kernels.packable(w_OxI[:48])
    assert not cpu_kernels.packable(w_OxI.astype(jnp.bfloat16))


_matmul = jax.jit(cpu_kernels.packed_matmul)


# Odd panel counts (the single-panel tail), inputs of 1, column counts around the 8-column block,
# and a prefill-sized product.
@pytest.mark.parametrize(
    "out,inputs,columns",
    [(32, 1, 1), (48, 7, 3), (64, 64, 8), (1024, 512, 9), (512, 1536, 32), (96, 40, 301)],
)
def test_packed_matmul_equals_float64(out, inputs, columns):
    rng = np.random.default_rng(out + inputs + columns)
    w_OxI = rng.standard_normal((out, inputs), np.float32)
    x_IxN = rng.standard_normal((inputs, columns), np.float32)
    got = np.asarray(_matmul(cpu_kernels.pack(jnp.asarray(w_OxI)), jnp.asarray(x_IxN)))
    expected = w_OxI.astype(np.float64) @ x_IxN.astype(np.float64)
    # float32 sums of `inputs` products of unit normals: error ~ sqrt(inputs) * 2^-24 * |terms|.
    scale = np.abs(w_OxI).astype(np.float64) @ np.abs(x_IxN).astype(np.float64)
    assert np.all(np.abs(got - expected) <= 1e-6 * scale + 1e-30)


def test_packed_matmul_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="does not multiply"):
        cpu_kernels.packed_matmul(jnp.zeros((2, 8, 16)), jnp.zeros((9, 4)))


def _attention_float64(q_BxKxGxD, k_BxKxDxS, v_BxKxSxD, valid_BxS, q_slot):
    """The mask of kv_cache.extend at T = 1, written out: slots up to the query's whose validity
    equals the query slot's, and the query's own slot."""
    B, K, G, D = q_BxKxGxD.shape
    out = np.zeros((B, K, G, D))
    for b in range(B):
        same = valid_BxS[b, : q_slot + 1] == valid_BxS[b, q_slot]
        same[q_slot] = True
        for k in range(K):
            scores_GxS = q_BxKxGxD[b, k].astype(np.float64) @ k_BxKxDxS[b, k, :, : q_slot + 1]
            scores_GxS = np.where(same, scores_GxS, -np.inf)
            p_GxS = np.exp(scores_GxS - scores_GxS.max(axis=1, keepdims=True))
            p_GxS /= p_GxS.sum(axis=1, keepdims=True)
            out[b, k] = p_GxS @ v_BxKxSxD[b, k, : q_slot + 1].astype(np.float64)
    return out


def _norm_and_rope_float64(x_HxD, weight_D, cos_D, sin_D, eps):
    """Per-head RMSNorm then rotate-half RoPE (qwen3.rms_norm, qwen3.apply_rope) in float64."""
    x = x_HxD.astype(np.float64)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight_D
    half = y.shape[-1] // 2
    rotated = np.concatenate([-y[:, half:], y[:, :half]], axis=-1)
    return y * cos_D + rotated * sin_D


def _block_float64(qkv, q_norm, k_norm, cos, sin, keys, values, valid, q_slot, H, eps):
    """The attention block written out: (out [H D, B], keys, values) with the new key and value
    in slot `q_slot`."""
    B, K, D, _ = keys.shape
    G = H // K
    keys, values = keys.astype(np.float64), values.astype(np.float64)
    q_BxKxGxD = np.zeros((B, K, G, D))
    for b in range(B):
        heads = qkv[:, b].reshape(H + 2 * K, D)
        q_BxKxGxD[b] = (
            _norm_and_rope_float64(heads[:H], q_norm, cos[:, b], sin[:, b], eps) / np.sqrt(D)
        ).reshape(K, G, D)
        keys[b, :, :, q_slot] = _norm_and_rope_float64(
            heads[H : H + K], k_norm, cos[:, b], sin[:, b], eps
        )
        values[b, :, q_slot] = heads[H + K :]
    out = _attention_float64(q_BxKxGxD, keys, values, valid, q_slot)
    return out.transpose(1, 2, 3, 0).reshape(H * D, B), keys, values


def _random_block(rng, B, H, K, D, S, q_slot):
    """Block inputs: scores spread over tens (the exponential's range reduction runs, not only
    its polynomial near 0), a full row and a stopped one (its query attends invalid slots)."""
    qkv = rng.standard_normal(((H + 2 * K) * D, B), np.float32) * 3
    norms = [1 + rng.standard_normal(D, np.float32) for _ in range(2)]
    angles = rng.uniform(0, 50, (D, B)).astype(np.float32)
    keys = rng.standard_normal((B, K, D, S), np.float32) * 2
    values = rng.standard_normal((B, K, S, D), np.float32)
    valid = rng.random((B, S)) < 0.8
    valid[1] = True
    valid[2, q_slot] = False
    # q and the new key are RMS-normalised: their scale comes from the norm weights.
    norms[0] *= 8 / np.sqrt(D) ** 0.5
    return [qkv, *norms, np.cos(angles), np.sin(angles), keys, values, valid, q_slot]


def _block(*args, H, eps=1e-6):
    return jax.jit(functools.partial(cpu_kernels.decode_attention, num_heads=H, eps=eps))(*args)


# Head dims on and off the 16-wide vector, groups of 1-4 query heads (and 5: a group of four then
# one), slot counts around the kernel's blocks of slots, the first slot and the last.
@pytest.mark.parametrize(
    "G,D,S,q_slot",
    [
        (2, 64, 192, 100),
        (1, 16, 37, 36),
        (4, 128, 80, 79),
        (2, 24, 70, 0),
        (3, 8, 200, 130),
        (5, 48, 60, 47),
    ],
)
def test_decode_attention_equals_float64(G, D, S, q_slot):
    rng = np.random.default_rng(G * 1000 + D + S)
    B, K = 3, 2
    args = _random_block(rng, B, G * K, K, D, S, q_slot)
    got = [np.asarray(x) for x in _block(*args, H=G * K)]
    expected = _block_float64(*args, G * K, 1e-6)
    for x, y in zip(got, expected, strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-5)
    # The caches changed in slot q_slot only.
    for x, before, slot_axis in zip(got[1:], args[5:7], [3, 2], strict=True):
        assert set(np.argwhere(x != before)[:, slot_axis]) == {q_slot}


def test_decode_attention_reads_no_slot_after_the_query():
    """Slots past the query hold garbage (NaN) in a real cache's unwritten part: never read."""
    args = _random_block(np.random.default_rng(0), 3, 2, 1, 16, 40, 20)
    keys, values = args[5], args[6]
    keys[..., 21:] = np.nan
    values[:, :, 21:] = np.nan
    out = np.asarray(_block(*args, H=2)[0])
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, _block_float64(*args, 2, 1e-6)[0], rtol=2e-5, atol=2e-5)


def test_decode_attention_refuses_a_slot_outside_the_cache():
    args = _random_block(np.random.default_rng(0), 3, 2, 1, 16, 8, 7)
    args[-1] = 8
    with pytest.raises(Exception, match="query slot outside the cache"):
        jax.block_until_ready(_block(*args, H=2))


def test_decode_attention_refuses_heads_that_do_not_divide():
    args = _random_block(np.random.default_rng(0), 3, 4, 2, 16, 8, 7)
    args[0] = args[0][: (3 + 4) * 16]  # qkv rows for 3 query heads and 2 kv heads
    with pytest.raises(Exception, match="multiple of K"):
        jax.block_until_ready(_block(*args, H=3))


def _rms_norm_columns_float64(x_ExB, weight_E, eps):
    x = x_ExB.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=0, keepdims=True) + eps) * weight_E[:, None]


def _layer_float64(x, layer, cos, sin, keys, values, valid, q_slot, H, eps):
    """A decoder layer at one token per row written out in float64 (the weights unpacked):
    (x [E, B], keys, values)."""
    w = {name: np.asarray(cpu_kernels.unpack(layer[name]), np.float64) for name in _PACKED}
    qkv = w["w_qkv"] @ _rms_norm_columns_float64(x, layer["attn_norm"], eps)
    attended, keys, values = _block_float64(
        qkv, layer["q_norm"], layer["k_norm"], cos, sin, keys, values, valid, q_slot, H, eps
    )
    x = x + w["wo"] @ attended
    gate, up = np.split(w["w_gate_up"] @ _rms_norm_columns_float64(x, layer["mlp_norm"], eps), 2)
    return x + w["w_down"] @ (gate / (1 + np.exp(-gate)) * up), keys, values


_PACKED = ("w_qkv", "wo", "w_gate_up", "w_down")


def _random_layer(rng, E, H, K, D, F):
    """A sampling-layout layer, packed, with gate values spread over tens (silu's sigmoid on
    both sides of 0 and in its flat tails)."""

    def weight(out, inputs, scale):
        return jnp.asarray(rng.standard_normal((out, inputs), np.float32) * scale / np.sqrt(inputs))

    gate_up = weight(2 * F, E, 1.0).at[:F].multiply(12)
    layer = {
        "attn_norm": 1 + rng.standard_normal(E, np.float32) / 4,
        "mlp_norm": 1 + rng.standard_normal(E, np.float32) / 4,
        "q_norm": 1 + rng.standard_normal(D, np.float32) / 4,
        "k_norm": 1 + rng.standard_normal(D, np.float32) / 4,
        "w_qkv": weight((H + 2 * K) * D, E, 1.0),
        "wo": weight(E, H * D, 1.0),
        "w_gate_up": gate_up,
        "w_down": weight(E, F, 1.0),
    }
    return {name: cpu_kernels.pack(w) if name in _PACKED else w for name, w in layer.items()}


# Two to four query heads per kv head, MLP halves of 3, 5 and 6 panels (odd counts leave the
# matmul's single-panel tail to a chunk), the first slot, a middle one and the last.
@pytest.mark.parametrize("E,H,K,D,F,S,q_slot", [
    (64, 4, 2, 16, 48, 40, 17),
    (96, 4, 1, 32, 80, 70, 0),
    (64, 6, 2, 16, 96, 33, 32),
])  # fmt: skip
def test_decode_layer_equals_float64(E, H, K, D, F, S, q_slot):
    rng = np.random.default_rng(E + H + F + S)
    B = 3
    layer = _random_layer(rng, E, H, K, D, F)
    assert cpu_kernels.layer_fusable(layer)
    block = _random_block(rng, B, H, K, D, S, q_slot)
    cos, sin, keys, values, valid = block[3:8]
    x = rng.standard_normal((E, B), np.float32)
    run = jax.jit(functools.partial(cpu_kernels.decode_layer, num_heads=H, eps=1e-6))
    got = [np.asarray(a) for a in run(x, layer, cos, sin, keys, values, valid, q_slot)]
    expected = _layer_float64(x, layer, cos, sin, keys, values, valid, q_slot, H, 1e-6)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    assert set(np.argwhere(got[1] != keys)[:, 3]) == {q_slot}


def test_decode_layer_refuses_an_unpacked_weight():
    rng = np.random.default_rng(0)
    layer = _random_layer(rng, 64, 2, 1, 16, 48)
    block = _random_block(rng, 3, 2, 1, 16, 20, 5)
    layer["wo"] = cpu_kernels.unpack(layer["wo"])[:, :, None]  # [E, H D, 1]
    with pytest.raises(Exception, match="packed weights"):
        jax.block_until_ready(
            jax.jit(functools.partial(cpu_kernels.decode_layer, num_heads=2, eps=1e-6))(
                rng.standard_normal((64, 3), np.float32), layer, *block[3:8], 5
            )
        )


_VARIANT_CHECK = """
import numpy as np, jax, jax.numpy as jnp
from cacherl_jax.sampling import cpu_kernels
rng = np.random.default_rng(1)
w = rng.standard_normal((96, 50), np.float32); x = rng.standard_normal((50, 13), np.float32)
y = np.asarray(jax.jit(cpu_kernels.packed_matmul)(cpu_kernels.pack(jnp.asarray(w)), x))
assert np.abs(y - w.astype(np.float64) @ x).max() < 1e-4
qkv = rng.standard_normal((8 * 24, 2), np.float32); norm = 1 + rng.standard_normal(24, np.float32)
angles = rng.uniform(0, 9, (24, 2)).astype(np.float32)
k = rng.standard_normal((2, 2, 24, 70), np.float32); v = rng.standard_normal((2, 2, 70, 24), np.float32)
valid = rng.random((2, 70)) < 0.7
block = jax.jit(lambda *a: cpu_kernels.decode_attention(*a, num_heads=4, eps=1e-6))
out = block(qkv, norm, norm, np.cos(angles), np.sin(angles), k, v, valid, 69)
def packed(o, i, scale=1.0):
    return cpu_kernels.pack(jnp.asarray(rng.standard_normal((o, i), np.float32) * scale / i**0.5))
layer = dict(attn_norm=norm[:16].repeat(2), mlp_norm=norm[:16].repeat(2), q_norm=norm,
             k_norm=norm, w_qkv=packed(8 * 24, 32), wo=packed(32, 4 * 24),
             w_gate_up=packed(96, 32, 8), w_down=packed(32, 48))
x = rng.standard_normal((32, 2), np.float32)
run = jax.jit(lambda *a: cpu_kernels.decode_layer(*a, num_heads=4, eps=1e-6))
layer_out = run(x, layer, np.cos(angles), np.sin(angles), k, v, valid, 69)
np.savez(
    __import__("sys").argv[1],
    attention=np.concatenate([np.asarray(x).ravel() for x in out]),
    layer=np.concatenate([np.asarray(x).ravel() for x in layer_out]),
)
print(cpu_kernels.info())
"""


def test_every_instruction_set_variant_gives_the_same_results(tmp_path):
    """The AVX2 and portable builds of the loops, which this machine would not pick, against the
    one it picks (each in a fresh process: the variant is chosen when the extension loads)."""
    results = {}
    for cap in ["", "avx2", "generic"]:
        path = tmp_path / f"results-{cap or 'best'}.npz"
        env = dict(os.environ, CACHERL_CPU_ISA=cap, JAX_PLATFORMS="cpu")
        done = subprocess.run(
            [sys.executable, "-c", _VARIANT_CHECK, str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert (cap or "") in done.stdout
        results[cap] = dict(np.load(path))
    for cap in ["avx2", "generic"]:
        np.testing.assert_allclose(
            results[cap]["attention"], results[""]["attention"], rtol=1e-5, atol=1e-6
        )
        # A layer's sums cancel (outputs near 0 from terms near 4), and only the vector builds
        # fuse multiply-adds: an error of float32 rounding relative to the largest output.
        layer = results[""]["layer"]
        np.testing.assert_allclose(
            results[cap]["layer"], layer, rtol=0, atol=2e-5 * np.abs(layer).max()
        )


# --- whole generations ----------------------------------------------------------------------------

# Three query heads share one kv head; the fused q/k/v projection has (3 + 1 + 1) x 16 = 80 rows,
# not whole pairs of panels, so it stays unpacked on XLA's dot while the rest is packed.
SMALL = Qwen3Config(
    vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=3,
    num_kv_heads=1, head_dim=16, tie_word_embeddings=True,
)  # fmt: skip


# Two query heads: 64 rows of q/k/v, every matmul packed, so decode steps run `decode_layer`.
FUSED = SMALL.replace(num_heads=2)


@pytest.mark.parametrize("config", [SMALL, FUSED], ids=["per-op", "whole-layer"])
def test_generation_with_and_without_the_kernels_agree(config):
    """Same tokens greedily, and log-probs within float32 noise at temperature 1, over a
    continuation too: with a step that mixes the kernels and XLA's dot, and with whole layers in
    one call."""
    params = init_params(config, jax.random.key(3))
    with_kernels = Sampler(params, config, cpu_kernels=True)
    without = Sampler(params, config, cpu_kernels=False)
    layer, plain = with_kernels.weights["layers"][0], without.weights["layers"][0]
    assert layer["w_gate_up"].ndim == 3 and layer["w_down"].ndim == 3
    assert layer["w_qkv"].ndim == (2 if config is SMALL else 3)  # 80 rows in SMALL
    assert cpu_kernels.layer_fusable(layer) == (config is FUSED)
    assert plain["w_gate_up"].ndim == 2 and with_kernels.weights["unembed_VxE"].ndim == 3
    prompts = [[5, 6, 7], list(range(1, 20)), [9]]
    for sampling in [
        SamplingParams(temperature=0, max_new_tokens=24),
        SamplingParams(temperature=1.0, max_new_tokens=24, seed=4),
    ]:
        state_a, a = with_kernels.start(prompts, sampling)
        state_b, b = without.start(prompts, sampling)
        _, a2 = with_kernels.resume(state_a, [[3, 4], [5], [6, 7, 8]])
        _, b2 = without.resume(state_b, [[3, 4], [5], [6, 7, 8]])
        for x, y in zip(a + a2, b + b2, strict=True):
            np.testing.assert_array_equal(x.token_ids, y.token_ids)
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)


def test_asking_for_the_kernels_where_they_cannot_run_is_refused():
    params = init_params(SMALL, jax.random.key(0))
    with pytest.raises(ValueError, match="cannot run here"):
        Sampler(params, SMALL.replace(compute_dtype="bfloat16"), cpu_kernels=True)
