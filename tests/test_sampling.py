"""The KV-cache sampler against transformers' `generate`, our own training forward pass, the
chat template's multi-turn continuation, and the statistics of the distributions it samples."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cacherl_jax import parallel, reference
from cacherl_jax.chat import append_generated, append_tool_results, render_prompt, render_text
from cacherl_jax.chat.tokenizer import train_tokenizer
from cacherl_jax.model import Qwen3Config, attention, forward, load_hf_checkpoint, param_shardings
from cacherl_jax.sampling import Sampler, SamplingParams, bucket, kv_cache
from cacherl_jax.sampling.sampler import _sample, uniforms

LOGPROB_TOLERANCE = 1e-4  # float32: sampler (cached, left-padded) vs training forward

# One config for every test, so that they share compiled programs. Untied, so the separate
# output projection is what the sampler must get right.
TINY = Qwen3Config(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, rope_theta=1e6, tie_word_embeddings=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(hf_checkpoint_dir):
    """(params, transformers model) of one random checkpoint."""
    path = hf_checkpoint_dir("tiny-sampling", TINY)
    return load_hf_checkpoint(path)[1], reference.load_hf_model(path)


def _scaled(params, scale: float):
    # A larger output projection makes next-token distributions peaked, as a trained model's are.
    return params if scale == 1 else params | {"lm_head": params["lm_head"] * scale}


@pytest.fixture(scope="module")
def samplers(tiny):
    """`samplers(scale)` -> (params, Sampler) with the output projection scaled."""
    made = {}

    def get(scale: float = 1.0):
        if scale not in made:
            params = _scaled(tiny[0], scale)
            sampler = Sampler(params, TINY)
            made[scale] = params, sampler
        return made[scale]

    return get


@functools.cache
def _forward_jit(config):
    return jax.jit(lambda p, t, s: forward(p, config, t, segment_ids_BxT=s))


def _prompts(rng, lengths, vocab=TINY.vocab_size):
    return [[int(t) for t in rng.integers(0, vocab, n)] for n in lengths]


def _forward_logits(params, config, sequences):
    """Training-forward logits of each row, right-padded into one batch (segment id 0 = pad)."""
    T = bucket(max(len(s) for s in sequences))
    tokens = np.zeros((len(sequences), T), np.int32)
    segments = np.zeros((len(sequences), T), np.int32)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = seq
        segments[row, : len(seq)] = 1
    return np.asarray(_forward_jit(config)(params, tokens, segments))


def _step_logits(params, config, prompts, generations):
    """[row][step] -> the logits the model gives for each generated token's position."""
    full = [list(p) + list(g.token_ids) for p, g in zip(prompts, generations, strict=True)]
    logits = _forward_logits(params, config, full)
    return [
        logits[row, len(p) - 1 : len(p) - 1 + len(g)]
        for row, (p, g) in enumerate(zip(prompts, generations, strict=True))
    ]


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _filtered(logits_V, temperature, top_k, top_p):
    """The sampling distribution's logits, written out in numpy (transformers' semantics)."""
    scaled = logits_V / temperature
    if top_k:
        scaled = np.where(scaled >= np.sort(scaled)[-top_k], scaled, -np.inf)
    if top_p < 1:
        probs = np.exp(_log_softmax(scaled))
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        keep = np.zeros_like(probs, bool)
        keep[order[before < top_p]] = True
        scaled = np.where(keep, scaled, -np.inf)
    return scaled


# --- exactness ------------------------------------------------------------------------------------


def test_greedy_matches_transformers_generate(samplers, tiny, rng):
    hf_model = tiny[1]
    prompts = _prompts(rng, [3, 16, 11])  # left-padded to 16 slots
    new = 16
    generations = samplers()[1].generate(prompts, SamplingParams(temperature=0, max_new_tokens=new))
    import torch

    for row, (prompt, generation) in enumerate(zip(prompts, generations, strict=True)):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                eos_token_id=None,
                pad_token_id=0,
            )
        expected = out[0, len(prompt) :].numpy()
        assert generation.stop_reason == "length"
        np.testing.assert_array_equal(generation.token_ids, expected, err_msg=f"row {row}")


def test_prefill_window_reads_only_the_first_slots(tiny, rng):
    """A fresh cache's prefill attends over the prompt's slots only (`extend(window=...)`): the
    cache and logits of attending over every slot, and slots past the window are not read
    (NaN there poisons the full-cache attention, not the windowed one)."""
    params = tiny[0]
    B, T, S = 3, 16, 48
    tokens_BxT = jnp.asarray(rng.integers(0, TINY.vocab_size, (B, T)), jnp.int32)
    valid_BxT = jnp.asarray(np.arange(T)[None, :] >= np.array([[0], [5], [11]]))
    extend = jax.jit(functools.partial(kv_cache.extend, config=TINY), static_argnames="window")
    clean = kv_cache.init_cache(TINY, B, S)
    full, logits_full = extend(params, cache=clean, tokens_BxT=tokens_BxT, valid_BxT=valid_BxT)
    windowed, logits = extend(
        params, cache=clean, tokens_BxT=tokens_BxT, valid_BxT=valid_BxT, window=T
    )
    # Equal up to float32 rounding: XLA sums the softmax over fewer slots, in another order.
    np.testing.assert_allclose(logits, logits_full, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(windowed), jax.tree.leaves(full), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Keys [L, B, K, D, S] where the attention keeps them transposed, else [L, B, K, S, D].
    k_slots = np.s_[..., T:] if attention.keys_transposed(TINY) else np.s_[:, :, :, T:]
    garbage = dataclasses.replace(
        clean,
        k=clean.k.at[k_slots].set(jnp.nan),
        v=clean.v.at[:, :, :, T:].set(jnp.nan),
    )
    _, poisoned = extend(params, cache=garbage, tokens_BxT=tokens_BxT, valid_BxT=valid_BxT)
    _, guarded = extend(params, cache=garbage, tokens_BxT=tokens_BxT, valid_BxT=valid_BxT, window=T)
    assert np.isnan(poisoned).all()
    np.testing.assert_array_equal(guarded, logits)


@pytest.mark.parametrize(
    "variant",
    [{"attention_impl": "xla"}, {"unroll_layers": True}],
    ids=["xla-attention", "unrolled"],
)
def test_other_attention_and_layer_loop_generate_the_same(variant, samplers, rng):
    """The sampler on `jax.nn.dot_product_attention` (what GPUs and TPUs run) and with the layer
    loop unrolled (per-layer weights) generates what the default CPU configuration does."""
    params, sampler = samplers()
    prompts = _prompts(rng, [5, 16, 11])
    sampling = SamplingParams(temperature=1.0, max_new_tokens=16, seed=3)
    expected = sampler.generate(prompts, sampling)
    got = Sampler(params, TINY.replace(**variant)).generate(prompts, sampling)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=LOGPROB_TOLERANCE)


def test_logprobs_equal_training_forward(samplers, rng):
    """At temperature 1 without filters the sampling distribution is the model's: the sampler's
    log-probs (prefill and every cached decode step) equal the training forward's."""
    params, sampler = samplers()
    prompts = _prompts(rng, [5, 16, 11, 1])
    generations = sampler.generate(
        prompts, [SamplingParams(temperature=1.0, max_new_tokens=16, seed=s) for s in range(4)]
    )
    gap = 0.0
    for logits, g in zip(
        _step_logits(params, TINY, prompts, generations), generations, strict=True
    ):
        expected = np.take_along_axis(_log_softmax(logits), g.token_ids[:, None], 1)[:, 0]
        gap = max(gap, np.abs(g.logprobs - expected).max(), np.abs(g.raw_logprobs - expected).max())
    print(f"max |sampler - training forward| log-prob gap: {gap:.2e}")
    assert gap <= LOGPROB_TOLERANCE


def test_filtered_logprobs_are_under_the_sampling_distribution(samplers, rng):
    """With temperature, top-k and top-p, `logprobs` are under the renormalised filtered
    distribution and every token lies inside it; `raw_logprobs` stay the model's."""
    params, sampler = samplers(20.0)
    prompts = _prompts(rng, [7, 3, 12, 9])
    settings = [
        SamplingParams(temperature=0.7, top_k=5, max_new_tokens=16, seed=1),
        SamplingParams(temperature=1.3, top_p=0.6, max_new_tokens=16, seed=2),
        SamplingParams(temperature=0.9, top_k=4, top_p=0.8, max_new_tokens=16, seed=3),
        SamplingParams(temperature=1.0, max_new_tokens=16, seed=4),
    ]
    generations = sampler.generate(prompts, settings)
    step_logits = _step_logits(params, TINY, prompts, generations)
    for row, (logits, g, s) in enumerate(zip(step_logits, generations, settings, strict=True)):
        for step, token in enumerate(g.token_ids):
            filtered = _filtered(logits[step].astype(np.float64), s.temperature, s.top_k, s.top_p)
            assert np.isfinite(filtered[token]), f"row {row} step {step}: excluded token {token}"
            expected = _log_softmax(filtered[None])[0, token]
            assert abs(g.logprobs[step] - expected) <= LOGPROB_TOLERANCE, (row, step)
            raw = _log_softmax(logits[step][None])[0, token]
            assert abs(g.raw_logprobs[step] - raw) <= LOGPROB_TOLERANCE, (row, step)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    conversation = [
        {"role": "user", "content": "What is 12 plus 30?"},
        {
            "role": "assistant",
            "reasoning_content": "I add the two numbers with the tool.",
            "tool_calls": [{"function": {"name": "add", "arguments": {"a": 12, "b": 30}}}],
        },
        {"role": "tool", "content": '{"sum": 42}'},
        {"role": "assistant", "content": "The answer is 42."},
    ]
    corpus = [render_text(conversation, [ADD_TOOL])] * 30
    return train_tokenizer(corpus, 320, tmp_path_factory.mktemp("tok"), from_files=False)


ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
    },
}


def test_continuation_after_tool_turn_matches_full_prefix(samplers, tokenizer):
    """Generate, append the tool-response turn and the next generation prompt to the cache,
    generate again: the same tokens as generating from the whole re-rendered conversation."""
    sampler = samplers()[1]
    questions = ["What is 12 plus 30?", "Add 7 and 5, please.", "What is 1 plus 1?"]
    prompts = [
        render_prompt([{"role": "user", "content": q}], [ADD_TOOL], tokenizer) for q in questions
    ]
    greedy = SamplingParams(
        temperature=0, max_new_tokens=10, stop_token_ids=[tokenizer.special.im_end]
    )
    state, first = sampler.start([p.token_ids for p in prompts], greedy, max_len=1024)

    results = ['{"sum": 42}', '{"sum": 12}', '{"sum": 2}']
    new_tokens, full = [], []
    for prompt, generation, result in zip(prompts, first, results, strict=True):
        so_far = append_generated(prompt, generation.token_ids, tokenizer, turn=1)
        after = append_tool_results(so_far, [result], tokenizer, first_turn=2)
        new_tokens.append(after.token_ids[len(so_far) :].tolist())
        full.append(after.token_ids.tolist())
    new_tokens[2] = []  # a finished conversation: its row sits this turn out
    continued = sampler.resume(state, new_tokens, greedy)[1]
    with pytest.raises(ValueError, match="consumed"):
        sampler.resume(state, new_tokens, greedy)
    from_scratch = sampler.start([*full[:2], prompts[2].token_ids], greedy, max_len=1024)[1]

    for row in range(2):
        np.testing.assert_array_equal(continued[row].token_ids, from_scratch[row].token_ids)
        np.testing.assert_allclose(
            continued[row].logprobs, from_scratch[row].logprobs, atol=LOGPROB_TOLERANCE
        )
    assert continued[2].stop_reason == "inactive" and len(continued[2]) == 0


def test_row_results_do_not_depend_on_the_batch(samplers, rng):
    """Randomness is keyed by (seed, position): a row samples the same tokens whatever shares its
    batch and however much it is padded (16 or 64 slots here)."""
    sampler = samplers(20.0)[1]
    prompts = _prompts(rng, [6, 3, 12, 9, 40, 50, 33])
    sampling = SamplingParams(temperature=1.0, top_k=8, top_p=0.9, max_new_tokens=16, seed=11)
    short_batch = sampler.generate(prompts[:4], [sampling] * 4)[0]
    long_batch = sampler.generate([prompts[0], *prompts[4:]], [sampling] * 4)[0]
    np.testing.assert_array_equal(short_batch.token_ids, long_batch.token_ids)
    np.testing.assert_allclose(short_batch.logprobs, long_batch.logprobs, atol=LOGPROB_TOLERANCE)


def test_stop_tokens_max_new_tokens_and_stop_reasons(samplers, rng):
    sampler = samplers()[1]
    prompts = _prompts(rng, [4, 9, 6])
    greedy = SamplingParams(temperature=0, max_new_tokens=16)
    reference_run = sampler.generate(prompts, greedy)
    stop = int(reference_run[0].token_ids[3])
    first = list(reference_run[0].token_ids).index(stop)  # it may already occur earlier
    settings = [
        SamplingParams(temperature=0, max_new_tokens=16, stop_token_ids=[stop, 0]),
        SamplingParams(temperature=0, max_new_tokens=5),
        SamplingParams(temperature=0, max_new_tokens=16),
    ]
    generations = sampler.generate(prompts, settings)
    assert generations[0].stop_reason == "stop"
    assert generations[0].token_ids.tolist() == reference_run[0].token_ids[: first + 1].tolist()
    assert generations[1].stop_reason == "length" and len(generations[1]) == 5
    assert generations[1].token_ids.tolist() == reference_run[1].token_ids[:5].tolist()
    assert generations[2].stop_reason == "length" and len(generations[2]) == 16


def test_cache_full_is_reported_and_refuses_more(samplers):
    sampler = samplers()[1]
    state, generations = sampler.start([[1, 2, 3]], SamplingParams(max_new_tokens=16), max_len=24)
    assert generations[0].stop_reason == "cache_full"
    assert len(generations[0]) == 24 - 16  # the prompt chunk took 16 slots
    with pytest.raises(
        ValueError, match=r"row 0: 2 new tokens do not fit in the cache \(24 of 24 slots used"
    ):
        sampler.resume(state, [[4, 5]], SamplingParams(max_new_tokens=4))


# --- sampling statistics ----------------------------------------------------------------------------


def _chi_square_pvalue(counts, probs):
    """Pearson's test, with categories of expected count < 5 merged into one."""
    expected = probs / probs.sum() * counts.sum()
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return stats.chisquare(observed, expected).pvalue


def test_temperature_one_frequencies_match_softmax():
    """4096 rows share one logit vector, each with its own seed: the token counts fit the softmax."""
    key = jax.random.key(0)
    V, B = 48, 4096
    logits_V = 2.0 * jax.random.normal(key, (V,))
    tokens_B, logp_B, _ = jax.jit(functools.partial(_sample, top_k_cap=0, use_top_p=False))(
        jnp.broadcast_to(logits_V, (B, V)),
        uniforms(jnp.arange(B, dtype=jnp.uint32), jnp.full((B, 1), 5))[:, 0],
        jnp.ones(B),
        jnp.zeros(B, jnp.int32),
        jnp.ones(B),
    )
    probs = np.asarray(jax.nn.softmax(logits_V), np.float64)
    counts = np.bincount(np.asarray(tokens_B), minlength=V)
    assert _chi_square_pvalue(counts, probs) > 1e-3
    np.testing.assert_allclose(np.asarray(logp_B), np.log(probs)[np.asarray(tokens_B)], atol=1e-5)


def test_model_first_token_frequencies_match_softmax(samplers, rng):
    """The same through the whole sampler: 1024 seeds of one prompt, first generated token
    (in calls of 4 rows, the compiled shape the other tests use)."""
    params, sampler = samplers(20.0)
    prompt = _prompts(rng, [9])[0]
    tokens = []
    for seed in range(0, 1024, 4):
        generations = sampler.generate(
            [prompt] * 4, [SamplingParams(max_new_tokens=1, seed=seed + i) for i in range(4)]
        )
        tokens.extend(int(g.token_ids[0]) for g in generations)
    probs = np.exp(_log_softmax(_forward_logits(params, TINY, [prompt])[0, len(prompt) - 1]))
    counts = np.bincount(tokens, minlength=TINY.vocab_size)
    assert _chi_square_pvalue(counts, probs.astype(np.float64)) > 1e-3


_sample_filtered = jax.jit(functools.partial(_sample, top_k_cap=8, use_top_p=True))


def test_top_k_and_top_p_never_emit_excluded_tokens():
    """Random logits, per-row temperature, k and p (and some greedy rows): every sampled token is
    inside its row's allowed set and its log-prob is under the renormalised filtered softmax."""
    B, V = 2048, 64
    key_logits, key_k, key_p = jax.random.split(jax.random.key(1), 3)
    logits_BxV = 3.0 * jax.random.normal(key_logits, (B, V))
    top_k_B = jax.random.randint(key_k, (B,), 0, 9)
    top_p_B = jax.random.uniform(key_p, (B,), minval=0.05, maxval=1.0)
    greedy_B = np.arange(B) % 16 == 0
    temperature_B = np.where(greedy_B, 0.0, np.linspace(0.3, 1.5, B)).astype(np.float32)
    tokens_B, logp_B, raw_B = map(
        np.asarray,
        _sample_filtered(
            logits_BxV,
            uniforms(jnp.arange(B, dtype=jnp.uint32), jnp.zeros((B, 1), jnp.int32))[:, 0],
            temperature_B,
            top_k_B,
            top_p_B,
        ),
    )
    logits_BxV = np.asarray(logits_BxV, np.float64)
    raw_expected_B = np.take_along_axis(_log_softmax(logits_BxV), tokens_B[:, None], 1)[:, 0]
    np.testing.assert_allclose(raw_B, raw_expected_B, atol=1e-5)
    # Greedy rows: the argmax, and the temperature-1 log-prob.
    np.testing.assert_array_equal(tokens_B[greedy_B], logits_BxV[greedy_B].argmax(axis=-1))
    np.testing.assert_array_equal(logp_B[greedy_B], raw_B[greedy_B])
    for b in np.flatnonzero(~greedy_B):
        k, p = int(top_k_B[b]), float(top_p_B[b])
        filtered = _filtered(logits_BxV[b], float(temperature_B[b]), k, p)
        assert np.isfinite(filtered[tokens_B[b]]), f"row {b}: sampled an excluded token"
        assert abs(logp_B[b] - _log_softmax(filtered[None])[0, tokens_B[b]]) <= 1e-4


def test_greedy_picks_the_first_of_tied_maxima():
    """Integer logits tie often; greedy rows (under top-k and top-p too) take the first maximum,
    as argmax and transformers do."""
    B, V = 512, 64
    logits_BxV = np.random.default_rng(2).integers(0, 4, (B, V)).astype(np.float32)
    tokens_B, logp_B, raw_B = _sample_filtered(
        logits_BxV,
        jnp.linspace(0.0, 0.999, B),
        jnp.zeros(B),
        jnp.arange(B, dtype=jnp.int32) % 9,
        jnp.linspace(0.05, 1.0, B),
    )
    np.testing.assert_array_equal(np.asarray(tokens_B), logits_BxV.argmax(axis=-1))
    np.testing.assert_array_equal(np.asarray(logp_B), np.asarray(raw_B))


def test_filtered_frequencies_match_the_filtered_softmax():
    """2048 seeds on one logit vector with temperature 0.8, top-k 8 and top-p 0.9: the counts fit
    the renormalised filtered distribution, and no excluded token ever appears."""
    B, V = 2048, 64
    logits_V = 2.0 * jax.random.normal(jax.random.key(4), (V,))
    tokens_B = _sample_filtered(
        jnp.broadcast_to(logits_V, (B, V)),
        uniforms(jnp.arange(B, dtype=jnp.uint32), jnp.zeros((B, 1), jnp.int32))[:, 0],
        jnp.full(B, 0.8),
        jnp.full(B, 8, jnp.int32),
        jnp.full(B, 0.9),
    )[0]
    filtered = _filtered(np.asarray(logits_V, np.float64), 0.8, 8, 0.9)
    probs = np.exp(_log_softmax(filtered[None])[0])
    counts = np.bincount(np.asarray(tokens_B), minlength=V)
    assert counts[probs == 0].sum() == 0
    assert _chi_square_pvalue(counts, probs) > 1e-3


# --- sharding and errors ----------------------------------------------------------------------------


def test_sharded_over_a_mesh_matches_one_device(samplers, rng):
    """Weights in training shardings on a data=2, fsdp=2, tensor=2 mesh: the sampler splits the
    batch over data x fsdp, weights and KV heads over tensor, and generates what one device does."""
    params, single = samplers()
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded_params = jax.device_put(params, param_shardings(TINY, mesh))
    prompts = _prompts(rng, [5, 12, 3])
    sampling = SamplingParams(temperature=1.0, max_new_tokens=16, seed=5)
    state, on_mesh = Sampler(sharded_params, TINY, mesh=mesh).start(prompts, sampling)
    assert state.cache.k.sharding.spec[1:3] == (("data", "fsdp"), "tensor")  # [L, B, K, ...]
    for a, b in zip(on_mesh, single.generate(prompts, sampling), strict=True):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=LOGPROB_TOLERANCE)


# KV heads divide by 4, so the rollout weights and cache can split over tensor=4.
TENSOR4 = Qwen3Config(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
    num_kv_heads=4, head_dim=16, rope_theta=1e6, tie_word_embeddings=False,
)  # fmt: skip


def test_tensor_parallel_rollouts_match_one_copy(hf_checkpoint_dir, rng):
    """8 devices: weights moved from FSDP over all 8 to tensor=4 x data=2 (checked equal, leaf by
    leaf, and split over heads) sample what tensor=1 x data=8 does: greedy tokens identical,
    log-probs to 1e-5, multi-turn `resume` included."""
    params = load_hf_checkpoint(hf_checkpoint_dir("tensor4", TENSOR4))[1]
    params = _scaled(params, 4.0)
    train_mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    trained = jax.device_put(params, param_shardings(TENSOR4, train_mesh))
    prompts = _prompts(rng, [7, 19, 4, 11, 2, 9, 13, 5])
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    outputs = {}
    for tensor in (1, 4):
        sampler = Sampler(trained, TENSOR4, mesh=parallel.local_mesh(tensor))
        moved = sampler.params
        for got, want in zip(jax.tree.leaves(moved), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        wk = moved["layers"]["wk"]  # [L, E, K, D]
        assert wk.sharding.shard_shape(wk.shape)[2] == 4 // tensor
        state, first = sampler.start(prompts, greedy, max_len=96)
        state, second = sampler.resume(state, [[1, 2, 3]] * len(prompts), greedy)
        assert state.cache.k.sharding.shard_shape(state.cache.k.shape)[2] == 4 // tensor
        outputs[tensor] = first + second
    for a, b in zip(outputs[1], outputs[4], strict=True):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_tensor_must_divide_kv_heads(samplers):
    params = samplers()[0]
    with pytest.raises(parallel.ShardingError, match="tensor=4 must divide the model's 2 KV"):
        Sampler(params, TINY, mesh=parallel.local_mesh(4))


def test_bad_input_is_refused_clearly(samplers):
    sampler = samplers()[1]
    with pytest.raises(ValueError, match="row 1: token id 999 outside the vocabulary"):
        sampler.generate([[1, 2], [3, 999]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="row 0: stop token 384 outside the vocabulary"):
        sampler.generate([[1, 2]], [SamplingParams(stop_token_ids=[384])])
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 rows"):
        sampler.generate([[1, 2], [3]], [SamplingParams()])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_bucket():
    sizes = (1, 16, 17, 100, 512, 513, 1100)
    assert [bucket(n) for n in sizes] == [16, 16, 32, 128, 512, 1024, 1536]
    assert bucket(3, minimum=1) == 4
