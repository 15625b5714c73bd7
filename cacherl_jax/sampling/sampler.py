"""Batched sampling with a KV cache: prefill, then one jitted `lax.while_loop` over new tokens.

    sampler = Sampler(params, config)
    generations = sampler.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=128))

Each call runs one compiled program: the prompt chunk is written into the cache, then the loop
samples a token for every row, feeds it back through the model (one cache slot per step) and stops
when every row has emitted a stop token or reached its `max_new_tokens`. The cache is donated, so
its buffers are updated in place. Every sampled token, the last included, is written into the
cache, so `resume` can append a tool-response turn and keep generating without recomputing the
prefix (`start` / `resume`).

Shapes are bucketed (batch, prompt chunk, output length) so that a compiled program is reused
across calls whose sizes differ a little.

Per row: prompt, seed, temperature, top-k, top-p, stop tokens and max new tokens. Randomness is
keyed by (seed, RoPE position of the sampled token), so a row's sample does not depend on which
other rows share the batch or how it was padded.

Log-probabilities. `logprobs` are under the distribution actually sampled from: the logits divided
by the temperature, then restricted to the top-k and to the top-p nucleus (in that order, as
transformers does) and renormalised. That is what an importance ratio against the sampling policy
needs. Greedy rows (temperature 0) sample from a point mass; for them `logprobs` is the
temperature-1 log-probability instead. `raw_logprobs` is always the temperature-1, unfiltered
log-probability of the token, i.e. what the training forward pass computes.

The model runs through `kv_cache.extend`, i.e. the model's own layer code, on the parameter
tree as it is (cast once to the compute dtype).

Meshes. A sampler runs on one process's own devices (`parallel.local_mesh`): every host of a
multi-host run samples its own rows with no cross-host collective while decoding, so hosts whose
rows take different numbers of turns never wait for each other. The batch is split over the
mesh's axes other than `tensor`; the weights are split over `tensor` along heads and MLP columns
(Megatron style) and the KV cache along KV heads, so a model larger than one device fits, and
replicated over the rest: decoding streams every weight once per step, so data parallelism
without per-step communication is the fast layout for what fits on one device. `set_params`
moves weights from any training layout (e.g. FSDP over every process's devices) to this one in
one jitted reshard, device to device (`parallel.local_copy_fn`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cacherl_jax import parallel
from cacherl_jax.model import qwen3
from cacherl_jax.model.config import Qwen3Config
from cacherl_jax.model.params import Params, logical_axes, param_shapes
from cacherl_jax.sampling import kv_cache
from cacherl_jax.sampling.kv_cache import KVCache

# Row states in the decode loop, and the reasons a row stopped.
_RUNNING, _STOP, _LENGTH, _CACHE_FULL, _INACTIVE = 0, 1, 2, 3, 4
STOP_REASONS = {
    _STOP: "stop",  # emitted one of its stop tokens (the last token of the generation)
    _LENGTH: "length",  # reached max_new_tokens
    _CACHE_FULL: "cache_full",  # no cache slot left for another token
    _INACTIVE: "inactive",  # given no new tokens in `resume`: not generated for
}

# Attention logits of one prefill piece stay under this many float32 numbers (256 MB).
_PREFILL_PIECE_ELEMENTS = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one row. `temperature=0` is greedy; `top_k=0` and `top_p=1` disable those."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class Generation:
    """What one row generated. A stop token, when one ended the row, is its last token."""

    token_ids: np.ndarray  # int32 [N]
    logprobs: np.ndarray  # float32 [N], under the sampling distribution (module docstring)
    raw_logprobs: np.ndarray  # float32 [N], temperature 1 and unfiltered
    stop_reason: str  # a value of STOP_REASONS

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass
class DecodeState:
    """A batch's KV cache between `start`/`resume` calls. Each call consumes the state it is given
    (its buffers are donated) and returns a new one."""

    cache: KVCache | None
    batch_size: int  # real rows; the cache may hold padding rows beyond them

    @property
    def max_len(self) -> int:
        return self._live().max_len

    @property
    def length(self) -> int:
        """Cache slots used (shared by all rows, holes included)."""
        return int(self._live().length)

    def _live(self) -> KVCache:
        if self.cache is None:
            raise ValueError("this DecodeState was consumed by a later start/resume call")
        return self.cache


def bucket(n: int, minimum: int = 16) -> int:
    """Rounds a size up so that compiled shapes repeat: powers of two, then multiples of 512."""
    n = max(n, minimum)
    if n <= 512:
        return 1 << (n - 1).bit_length()
    return -(-n // 512) * 512


def uniforms(seeds_B: jax.Array, positions_BxN: jax.Array) -> jax.Array:
    """The uniform in [0, 1) that row b uses to sample its token at RoPE position p: a function of
    (seed, p) only, so a row's sample does not depend on the rest of the batch or on padding."""

    def one(seed, position):
        return jax.random.uniform(jax.random.fold_in(jax.random.key(seed), position))

    return jax.vmap(jax.vmap(one, in_axes=(None, 0)))(seeds_B, positions_BxN)


def _sample(
    logits_BxV: jax.Array,
    uniform_B: jax.Array,
    temperature_B: jax.Array,
    top_k_B: jax.Array,
    top_p_B: jax.Array,
    *,
    top_k_cap: int,
    use_top_p: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(token_B, logprob_B under the sampling distribution, raw temperature-1 logprob_B)."""
    greedy_B = temperature_B == 0
    scaled_BxV = logits_BxV / jnp.where(greedy_B, 1.0, temperature_B)[:, None]
    if top_k_cap:
        # Keep logits >= the k-th largest (ties kept, as transformers does).
        top_BxK = lax.top_k(scaled_BxV, top_k_cap)[0]
        kth_B = jnp.take_along_axis(top_BxK, jnp.maximum(top_k_B - 1, 0)[:, None], axis=1)[:, 0]
        threshold_B = jnp.where(top_k_B > 0, kth_B, -jnp.inf)
        scaled_BxV = jnp.where(scaled_BxV >= threshold_B[:, None], scaled_BxV, -jnp.inf)
    if use_top_p:
        # The nucleus: most probable tokens while the mass before each is < top_p.
        # Computed once: XLA:GPU would otherwise recompute the softmax inside the comparison
        # below with another rounding, and a token tied with the threshold could drop out.
        probs_BxV = lax.optimization_barrier(jax.nn.softmax(scaled_BxV, axis=-1))
        sorted_BxV = -jnp.sort(-probs_BxV, axis=-1)
        before_BxV = jnp.cumsum(sorted_BxV, axis=-1) - sorted_BxV
        kept_B = jnp.sum(before_BxV < top_p_B[:, None], axis=-1)
        min_kept_B = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=1)[:, 0]
        keep_BxV = (probs_BxV >= min_kept_B[:, None]) | (top_p_B[:, None] >= 1)
        scaled_BxV = jnp.where(keep_BxV, scaled_BxV, -jnp.inf)

    max_B = jnp.max(scaled_BxV, axis=-1)
    weights_BxV = jnp.exp(scaled_BxV - max_B[:, None])  # unnormalised sampling distribution
    # A greedy row draws from weight 1 on the maxima of its logits with u = 0: the first of them,
    # as argmax picks. XLA:CPU's argmax over V is ~30x slower than a max.
    raw_max_B = jnp.max(logits_BxV, axis=-1)
    draw_BxV = jnp.where(greedy_B[:, None], logits_BxV == raw_max_B[:, None], weights_BxV)
    token_B = _inverse_cdf(draw_BxV, jnp.where(greedy_B, 1.0, uniform_B)).astype(jnp.int32)

    def at(x_BxV):
        return jnp.take_along_axis(x_BxV, token_B[:, None], axis=1)[:, 0]

    # Log-probs of the chosen token only: no [B, V] log-softmax is materialised.
    logp_B = at(scaled_BxV) - max_B - jnp.log(jnp.sum(weights_BxV, axis=-1))
    raw_sum_B = jnp.sum(jnp.exp(logits_BxV - raw_max_B[:, None]), axis=-1)
    raw_B = at(logits_BxV) - raw_max_B - jnp.log(raw_sum_B)
    return token_B, jnp.where(greedy_B, raw_B, logp_B), raw_B


_CDF_BLOCK = 128


def _inverse_cdf(weights_BxV: jax.Array, uniform_B: jax.Array) -> jax.Array:
    """An index drawn with probability weights / sum(weights) from one uniform in [0, 1) per row
    (Gumbel-max would need V random numbers). Never an index of weight 0, even with rounding;
    uniform 1 draws the first index of positive weight.

    Two levels: a block of 128 by the blocks' cumulative weights, then an index inside it. A
    cumulative sum over all V is several times slower on XLA's CPU backend.
    """
    B, V = weights_BxV.shape
    C = _CDF_BLOCK
    N = -(-V // C)
    w_BxNxC = jnp.pad(weights_BxV, ((0, 0), (0, N * C - V))).reshape(B, N, C)
    block_BxN = jnp.sum(w_BxNxC, axis=-1)
    # u in (0, total]: the first index whose cumulative weight reaches u has weight > 0.
    u_B = (1.0 - uniform_B) * jnp.sum(block_BxN, axis=-1)
    block_B, rest_B = _first_reaching(block_BxN, u_B)
    inner_BxC = jnp.take_along_axis(w_BxNxC, block_B[:, None, None], axis=1)[:, 0]
    index_B, _ = _first_reaching(inner_BxC, rest_B)
    return block_B * C + index_B


def _first_reaching(w_BxN: jax.Array, u_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(first index of positive weight whose cumulative weight reaches u, u minus the weight before
    it). If rounding leaves u above the total, the last index of positive weight."""
    N = w_BxN.shape[-1]
    cdf_BxN = jnp.cumsum(w_BxN, axis=-1)
    positive_BxN = w_BxN > 0
    reach_BxN = (cdf_BxN >= u_B[:, None]) & positive_BxN
    last_B = N - 1 - jnp.argmax(positive_BxN[:, ::-1], axis=-1)
    index_B = jnp.where(jnp.any(reach_BxN, axis=-1), jnp.argmax(reach_BxN, axis=-1), last_B)
    before_B = jnp.take_along_axis(cdf_BxN - w_BxN, index_B[:, None], axis=1)[:, 0]
    return index_B, u_B - before_B


@dataclasses.dataclass(frozen=True)
class _RowArrays:
    """Per-row sampling settings as device arrays (a pytree)."""

    seeds_B: jax.Array
    temperature_B: jax.Array
    top_k_B: jax.Array
    top_p_B: jax.Array
    max_new_B: jax.Array
    stop_ids_BxS: jax.Array
    active_B: jax.Array


jax.tree_util.register_dataclass(
    _RowArrays,
    data_fields=[f.name for f in dataclasses.fields(_RowArrays)],
    meta_fields=[],
)


def _prefill_and_decode(
    params: Params,
    cache: KVCache,
    tokens_PxBxC: jax.Array,
    valid_PxBxC: jax.Array,
    rows: _RowArrays,
    *,
    config: Qwen3Config,
    num_out: int,
    top_k_cap: int,
    use_top_p: bool,
    prefill_window: int | None,
) -> tuple[KVCache, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Writes the new tokens (P pieces of C slots) into the cache, then decodes until every row
    stopped. Returns (cache, tokens_BxN, logprobs_BxN, raw_logprobs_BxN, counts_B, reasons_B).
    `prefill_window`: the prefill's attention reads only the cache's first slots (see
    `kv_cache.extend`); the caller knows that no later slot holds a token."""
    B = tokens_PxBxC.shape[1]
    if config.unroll_layers:
        # Each layer's weights and cache buffers sliced out once here, not on every step.
        params = qwen3.unstack_layers(params)
        cache = kv_cache.unstack_layers(cache)

    def prefill_piece(p, carry):
        cache, _ = carry
        return kv_cache.extend(
            params, config, cache, tokens_PxBxC[p], valid_PxBxC[p], window=prefill_window
        )

    V = config.vocab_size
    cache, logits_BxV = lax.fori_loop(
        0, tokens_PxBxC.shape[0], prefill_piece, (cache, jnp.zeros((B, V), jnp.float32))
    )
    # Every sampled token is fed back, so the loop may not take more steps than free slots.
    limit = jnp.minimum(jnp.max(jnp.where(rows.active_B, rows.max_new_B, 0)), num_out)
    limit = jnp.minimum(limit, cache.max_len - cache.length)
    sample = functools.partial(_sample, top_k_cap=top_k_cap, use_top_p=use_top_p)
    # All random numbers at once (the step-th token of a live row is at position start + step),
    # rather than a threefry call inside every step.
    positions_BxN = cache.next_position_B[:, None] + jnp.arange(num_out, dtype=jnp.int32)
    uniform_BxN = uniforms(rows.seeds_B, positions_BxN)
    # RoPE tables for the same positions, also computed once: inside the step XLA would fuse
    # (and so recompute) cos and sin into every layer's consumers.
    cos_BxNxD, sin_BxNxD = qwen3.rope_tables(positions_BxN, config.head_dim, config.rope_theta)

    def cond(state):
        step, reason_B = state[0], state[-1]
        return (step < limit) & jnp.any(reason_B == _RUNNING)

    def body(state):
        step, cache, logits_BxV, tokens_BxN, logp_BxN, raw_BxN, count_B, reason_B = state
        token_B, logp_B, raw_B = sample(
            logits_BxV,
            lax.dynamic_index_in_dim(uniform_BxN, step, axis=1, keepdims=False),
            rows.temperature_B,
            rows.top_k_B,
            rows.top_p_B,
        )
        live_B = reason_B == _RUNNING
        tokens_BxN = lax.dynamic_update_slice(tokens_BxN, token_B[:, None], (0, step))
        logp_BxN = lax.dynamic_update_slice(logp_BxN, logp_B[:, None], (0, step))
        raw_BxN = lax.dynamic_update_slice(raw_BxN, raw_B[:, None], (0, step))
        count_B = count_B + live_B
        stopped_B = live_B & jnp.any(token_B[:, None] == rows.stop_ids_BxS, axis=1)
        long_B = live_B & ~stopped_B & (count_B >= rows.max_new_B)
        reason_B = jnp.where(stopped_B, _STOP, jnp.where(long_B, _LENGTH, reason_B))
        # Rows that were already done write an invalid slot: a hole that nothing attends to.
        rope = (
            lax.dynamic_slice_in_dim(cos_BxNxD, step, 1, axis=1),
            lax.dynamic_slice_in_dim(sin_BxNxD, step, 1, axis=1),
        )
        cache, logits_BxV = kv_cache.extend(
            params, config, cache, token_B[:, None], live_B[:, None], rope
        )
        return step + 1, cache, logits_BxV, tokens_BxN, logp_BxN, raw_BxN, count_B, reason_B

    zeros_BxN = jnp.zeros((B, num_out), jnp.float32)
    state = (
        jnp.int32(0),
        cache,
        logits_BxV,
        jnp.zeros((B, num_out), jnp.int32),
        zeros_BxN,
        zeros_BxN,
        jnp.zeros((B,), jnp.int32),
        jnp.where(rows.active_B, _RUNNING, _INACTIVE),
    )
    _, cache, _, tokens_BxN, logp_BxN, raw_BxN, count_B, reason_B = lax.while_loop(
        cond, body, state
    )
    reason_B = jnp.where(reason_B == _RUNNING, _CACHE_FULL, reason_B)
    if config.unroll_layers:
        cache = kv_cache.stack_layers(cache)
    return cache, tokens_BxN, logp_BxN, raw_BxN, count_B, reason_B


# Module-level, so that every Sampler of one config shares the compiled programs.
_run = jax.jit(
    _prefill_and_decode,
    static_argnames=("config", "num_out", "top_k_cap", "use_top_p", "prefill_window"),
    donate_argnames=("cache",),
)


# Rollout weights: split over `tensor` only (heads, MLP columns, vocabulary), never over the batch
# axes, which hold the rows.
ROLLOUT_RULES: parallel.Rules = tuple(
    (name, "tensor" if name in ("vocab", "q_heads", "kv_heads", "mlp") else None)
    for name, _ in parallel.DEFAULT_RULES
)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the rows are split over: all but `tensor`."""
    return tuple(a for a in mesh.axis_names if a != "tensor")


def param_specs(config: Qwen3Config, mesh: Mesh) -> Params:
    """The rollout layout's PartitionSpec of every parameter."""
    return jax.tree.map(
        lambda axes: parallel.logical_to_spec(axes, ROLLOUT_RULES, mesh),
        logical_axes(config),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def cache_shardings(config: Qwen3Config, mesh: Mesh) -> KVCache:
    """Rows over the batch axes, keys and values also over `tensor` along KV heads."""
    tensor = mesh.shape.get("tensor", 1)
    if config.num_kv_heads % tensor:
        raise parallel.ShardingError(
            f"rollout tensor={tensor} must divide the model's {config.num_kv_heads} KV heads"
        )
    rows = batch_axes(mesh)
    heads = "tensor" if "tensor" in mesh.shape else None
    layers_rows_heads = NamedSharding(mesh, PartitionSpec(None, rows, heads))  # [L, B, K, ...]
    return KVCache(
        k=layers_rows_heads,
        v=layers_rows_heads,
        valid_BxS=NamedSharding(mesh, PartitionSpec(rows)),
        length=NamedSharding(mesh, PartitionSpec()),
        next_position_B=NamedSharding(mesh, PartitionSpec(rows)),
    )


def _cast_fn(config: Qwen3Config):
    dtype = qwen3.compute_dtype(config)
    return lambda params: jax.tree.map(lambda w: w.astype(dtype), params)


@functools.cache
def _prepare_fn(config: Qwen3Config, mesh: Mesh | None):
    """The parameters in the compute dtype (once, not per step), in the rollout layout: one
    program on this process's devices, or, for parameters that span other processes' devices
    too (a multi-host training layout), the move of `parallel.local_copy_fn`."""
    if mesh is None:
        return jax.jit(_cast_fn(config))
    specs = param_specs(config, mesh)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
    cast = jax.jit(_cast_fn(config))  # in the source layout: the reshard moves half the bytes
    across_processes = functools.cache(
        lambda: parallel.local_copy_fn(specs, mesh, transform=_cast_fn(config))
    )

    def prepare(params: Params) -> Params:
        if all(x.is_fully_addressable for x in jax.tree.leaves(params)):
            return jax.device_put(cast(params), shardings)  # device to device
        return across_processes()(params)

    return prepare


def lower_generate(
    config: Qwen3Config,
    mesh: Mesh,
    *,
    batch: int,
    max_len: int,
    prompt_len: int,
    num_out: int,
) -> jax.stages.Lowered:
    """The sampler's program (prefill of a `prompt_len` chunk, then up to `num_out` decode steps)
    lowered on abstract inputs in the rollout layout over `mesh`: `cacherl plan` compiles it for
    a target's devices without allocating anything."""

    def abstract(shape, dtype, sharding):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    specs = param_specs(config, mesh)
    params = jax.tree.map(
        lambda s, spec: abstract(s.shape, s.dtype, NamedSharding(mesh, spec)),
        param_shapes(config, qwen3.compute_dtype(config)),
        specs,
    )
    cache_shapes = jax.eval_shape(functools.partial(kv_cache.init_cache, config, batch, max_len))
    cache = jax.tree.map(
        lambda s, sh: abstract(s.shape, s.dtype, sh),
        cache_shapes,
        cache_shardings(config, mesh),
    )
    rows_sharding = NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))
    pieces = NamedSharding(mesh, PartitionSpec(None, batch_axes(mesh)))
    row = functools.partial(abstract, (batch,), sharding=rows_sharding)
    rows = _RowArrays(
        seeds_B=row(dtype=jnp.uint32),
        temperature_B=row(dtype=jnp.float32),
        top_k_B=row(dtype=jnp.int32),
        top_p_B=row(dtype=jnp.float32),
        max_new_B=row(dtype=jnp.int32),
        stop_ids_BxS=abstract((batch, 4), jnp.int32, rows_sharding),
        active_B=row(dtype=jnp.bool_),
    )
    return _run.lower(
        params,
        cache,
        abstract((1, batch, prompt_len), jnp.int32, pieces),
        abstract((1, batch, prompt_len), jnp.bool_, pieces),
        rows,
        config=config,
        num_out=num_out,
        top_k_cap=0,
        use_top_p=False,
        prefill_window=prompt_len,
    )


class Sampler:
    """Generates from a Qwen3 with a KV cache; see the module docstring.

    `params`/`config`: the model (any sharding). `mesh`: this process's devices to sample on
    (`parallel.local_mesh`): rows over its non-`tensor` axes, weights over `tensor`.
    `min_prompt_bucket`: smallest prompt-chunk length compiled for.
    """

    def __init__(
        self,
        params: Params,
        config: Qwen3Config,
        *,
        mesh: Mesh | None = None,
        min_prompt_bucket: int = 16,
    ):
        self.config = config
        self.mesh = mesh
        self.min_prompt_bucket = min_prompt_bucket
        cache_sharding = None if mesh is None else cache_shardings(config, mesh)
        self._prepare = _prepare_fn(config, mesh)
        self.params = self._prepare(params)
        self._init_cache = jax.jit(
            kv_cache.init_cache, static_argnums=(0, 1, 2), out_shardings=cache_sharding
        )

    # --- public API ---------------------------------------------------------------------------

    def set_params(self, params: Params) -> None:
        """Samples from new weights from now on, e.g. after a policy update; compiled programs
        are reused."""
        self.params = self._prepare(params)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    ) -> list[Generation]:
        """One generation per prompt, from a cache sized for this call."""
        return self.start(prompts, sampling)[1]

    def start(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        *,
        max_len: int | None = None,
    ) -> tuple[DecodeState, list[Generation]]:
        """Generates from fresh prompts and returns the cache for `resume`.

        `max_len`: cache slots per row, enough for every turn to come (default: room for this
        prompt and its new tokens only).
        """
        sampling = self._per_row(sampling, len(prompts))
        chunk = bucket(max((len(p) for p in prompts), default=1), self.min_prompt_bucket)
        if max_len is None:
            max_len = chunk + bucket(max(s.max_new_tokens for s in sampling))
        batch = self._batch_bucket(len(prompts))
        cache = self._init_cache(self.config, batch, max_len)
        state = DecodeState(cache, len(prompts))
        return self.resume(state, prompts, sampling)

    def resume(
        self,
        state: DecodeState,
        new_tokens: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    ) -> tuple[DecodeState, list[Generation]]:
        """Appends `new_tokens[i]` to row i's cache and generates on from there.

        Row i's cache already ends with the tokens it generated last (all of them, the stop token
        included), so `new_tokens` is only what follows: e.g. `<|im_end|>` if the row stopped
        without one, `\\n`, the tool-response turn and the next generation prompt. A row given no
        tokens is left alone (stop reason `inactive`). `state` is consumed.
        """
        cache = state._live()
        new_tokens = [[int(t) for t in row] for row in new_tokens]
        if len(new_tokens) != state.batch_size:
            raise ValueError(
                f"got {len(new_tokens)} rows of tokens for a batch of {state.batch_size}"
            )
        sampling = self._per_row(sampling, state.batch_size)
        lengths = [len(t) for t in new_tokens]
        for row, tokens in enumerate(new_tokens):
            bad = [t for t in tokens if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(
                    f"row {row}: token id {bad[0]} outside the vocabulary [0, {self.config.vocab_size})"
                )
        used, size = int(cache.length), cache.max_len
        room = size - used - 1  # at least one slot must stay free for a generated token
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[longest] > room:
            raise ValueError(
                f"row {longest}: {lengths[longest]} new tokens do not fit in the cache "
                f"({used} of {size} slots used, one must stay free for generation); "
                f"start with a larger max_len"
            )
        chunk = min(bucket(max(max(lengths), 1), self.min_prompt_bucket), room)
        batch = cache.batch_size
        piece = self._prefill_piece(batch, chunk, size)

        tokens_BxC = np.zeros((batch, chunk), np.int32)
        valid_BxC = np.zeros((batch, chunk), bool)
        for row, tokens in enumerate(new_tokens):  # left-padded: the last slot is a real token
            if tokens:
                tokens_BxC[row, chunk - len(tokens) :] = tokens
                valid_BxC[row, chunk - len(tokens) :] = True
        pieces = chunk // piece
        tokens_PxBxC = tokens_BxC.reshape(batch, pieces, piece).transpose(1, 0, 2)
        valid_PxBxC = valid_BxC.reshape(batch, pieces, piece).transpose(1, 0, 2)

        rows = self._row_arrays(sampling, [n > 0 for n in lengths], batch)
        num_out = bucket(max(s.max_new_tokens for s in sampling))
        top_k_cap = max(s.top_k for s in sampling)
        top_k_cap = min(bucket(top_k_cap, 1), self.config.vocab_size) if top_k_cap else 0
        use_top_p = any(s.top_p < 1 and not s.greedy for s in sampling)
        state.cache = None  # donated below
        sharded = self._batch_sharding(leading=1)
        cache, tokens_BxN, logp_BxN, raw_BxN, count_B, reason_B = _run(
            self.params,
            cache,
            self._put(tokens_PxBxC, sharded),
            self._put(valid_PxBxC, sharded),
            rows,
            config=self.config,
            num_out=num_out,
            top_k_cap=top_k_cap,
            use_top_p=use_top_p,
            # A fresh cache's prefill attends over the prompt's slots, not the whole cache (a
            # third of it in bench_sampler.py). Only then: a window that follows `used` would
            # compile a program per turn of a conversation.
            prefill_window=chunk if used == 0 else None,
        )
        tokens_BxN, logp_BxN, raw_BxN, count_B, reason_B = jax.device_get(
            (tokens_BxN, logp_BxN, raw_BxN, count_B, reason_B)
        )
        generations = [
            Generation(
                token_ids=tokens_BxN[b, : count_B[b]].copy(),
                logprobs=logp_BxN[b, : count_B[b]].copy(),
                raw_logprobs=raw_BxN[b, : count_B[b]].copy(),
                stop_reason=STOP_REASONS[int(reason_B[b])],
            )
            for b in range(state.batch_size)
        ]
        return DecodeState(cache, state.batch_size), generations

    # --- helpers ------------------------------------------------------------------------------

    def _per_row(
        self, sampling: SamplingParams | Sequence[SamplingParams], n: int
    ) -> list[SamplingParams]:
        if isinstance(sampling, SamplingParams):
            return [sampling] * n
        sampling = list(sampling)
        if len(sampling) != n:
            raise ValueError(f"got {len(sampling)} SamplingParams for {n} rows")
        for row, s in enumerate(sampling):
            bad = [t for t in s.stop_token_ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"row {row}: stop token {bad[0]} outside the vocabulary")
        return sampling

    def _batch_shards(self) -> int:
        if self.mesh is None:
            return 1
        return math.prod(self.mesh.shape[a] for a in batch_axes(self.mesh))

    def _batch_bucket(self, n: int) -> int:
        b = bucket(n, 1)
        return -(-b // self._batch_shards()) * self._batch_shards()

    def _batch_sharding(self, leading: int = 0):
        """Batch axis (after `leading` axes) over the batch axes; None without a mesh."""
        if self.mesh is None:
            return None
        spec = PartitionSpec(*([None] * leading), batch_axes(self.mesh))
        return NamedSharding(self.mesh, spec)

    def _put(self, x: np.ndarray, sharding) -> jax.Array:
        return jnp.asarray(x) if sharding is None else jax.device_put(x, sharding)

    def _prefill_piece(self, batch: int, chunk: int, size: int) -> int:
        """Largest power-of-two divisor of `chunk` whose attention logits stay bounded."""
        per_row = batch // self._batch_shards() * self.config.num_heads * size
        piece = chunk
        while piece > 16 and piece % 2 == 0 and piece * per_row > _PREFILL_PIECE_ELEMENTS:
            piece //= 2
        return piece

    def _row_arrays(
        self, sampling: list[SamplingParams], active: list[bool], batch: int
    ) -> _RowArrays:
        pad = batch - len(sampling)
        sampling = sampling + [SamplingParams()] * pad
        active = active + [False] * pad
        n_stop = bucket(max(len(s.stop_token_ids) for s in sampling), 4)
        stop_ids = np.full((batch, n_stop), -1, np.int32)
        for row, s in enumerate(sampling):
            stop_ids[row, : len(s.stop_token_ids)] = s.stop_token_ids
        sharded = self._batch_sharding()
        host = _RowArrays(
            seeds_B=np.asarray([s.seed % 2**32 for s in sampling], np.uint32),
            temperature_B=np.asarray([s.temperature for s in sampling], np.float32),
            top_k_B=np.asarray([s.top_k for s in sampling], np.int32),
            top_p_B=np.asarray([s.top_p for s in sampling], np.float32),
            max_new_B=np.asarray([s.max_new_tokens for s in sampling], np.int32),
            stop_ids_BxS=stop_ids,
            active_B=np.asarray(active, bool),
        )
        return jax.tree.map(lambda x: self._put(x, sharded), host)
