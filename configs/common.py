"""Blocks the experiment configs share, each defined once: `from configs import common`.

Every block returns a fresh value at accelerator scale; a config's `_tiny` function shrinks what
it needs for the CPU. `cacherl` puts this checkout on `sys.path` when it loads
`--config=configs/NAME.py`, so the configs import this module by name, never by file path.
"""

from __future__ import annotations

import difflib

import ml_collections

# The CPU model: float32 compute, no remat, unrolled layers (a faster backward on CPU; a scan
# compiles faster for deep models, hence the accelerator default).
CPU_MODEL = dict(compute_dtype="float32", remat=False, unroll_layers=True)
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def variant(kind: str, arg: str | None, variants: tuple[str, ...]) -> str:
    """`arg`, or the first of `variants` when None; a ValueError names the nearest variant."""
    name = arg or variants[0]
    if name not in variants:
        (nearest,) = difflib.get_close_matches(name, variants, n=1, cutoff=0.0)
        raise ValueError(
            f"unknown {kind} variant {name!r}; did you mean {nearest!r}? (one of {variants})"
        )
    return name


def mesh() -> dict[str, int]:
    """Mesh axes within a slice or node (ICI / NVLink; -1: the remaining devices);
    parallel.DEFAULT_RULES maps model axes onto them. FSDP within a slice is the default."""
    return dict(data=1, fsdp=-1, tensor=1)


def dcn_mesh() -> dict[str, int]:
    """How each mesh axis is further split across slices or nodes (DCN, the slow links): e.g.
    `data=2` on two v5p slices or two 8-GPU nodes makes data parallelism the only traffic between
    them (one gradient all-reduce per step). All 1: a single slice."""
    return dict(data=1, fsdp=1, tensor=1)


def rollout() -> dict:
    """Where each host samples: its own devices, the weights split over `tensor` of them
    (a divisor of the model's KV heads; 1 keeps a whole copy per device)."""
    return dict(tensor=1)


def runtime() -> dict:
    """Process-level settings: a persistent XLA compilation cache directory ("" = off; local or
    gs://), which makes a restarted or preempted job skip recompiling."""
    return dict(compilation_cache_dir="")


def distributed() -> dict:
    """`jax.distributed.initialize` for multi-host runs; "" / 0 / -1 leave a value to JAX's
    detection (TPU pods, SLURM)."""
    return dict(enabled=False, coordinator_address="", num_processes=0, process_id=-1)


def model() -> ml_collections.ConfigDict:
    """The model to train: an HF directory to start from, dtypes, and how the layers compile."""
    config = ml_collections.ConfigDict()
    config.checkpoint = ""  # a Hugging Face Qwen3 directory to start from
    config.compute_dtype = "bfloat16"
    config.param_dtype = "float32"
    config.remat = True
    config.unroll_layers = False
    return config


def train(**fields) -> ml_collections.ConfigDict:
    """The `train` block: AdamW with a warmup-then-decay schedule, clipping, checkpointing and the
    HF export. `fields` sets each trainer's own values (steps, lr, b2, ...) and adds its fields."""
    config = ml_collections.ConfigDict()
    config.schedule = "cosine"  # or "linear"
    config.b1 = 0.9
    config.eps = 1e-8
    config.max_grad_norm = 1.0
    config.grad_accum = 1
    config.keep_checkpoints = 2
    config.async_checkpoints = True
    config.export_hf = True
    for key, value in fields.items():
        config[key] = value
    return config


def lora() -> ml_collections.ConfigDict:
    """LoRA r=128 on every projection, as in the paper; rank 0 is full fine-tuning."""
    config = ml_collections.ConfigDict()
    config.rank = 128
    config.alpha = 256.0
    config.targets = LORA_TARGETS
    return config


def tasks(n: int) -> ml_collections.ConfigDict:
    """Tasks to roll out: the procedural suite (split/seed/kinds), trajectories JSONL with
    `metadata.task` (as `cacherl tasks` writes them), or BFCL multi-turn."""
    config = ml_collections.ConfigDict()
    config.source = "procedural"  # "procedural" | "jsonl" | "bfcl"
    config.path = ""  # jsonl: trajectories file; bfcl: category (default multi_turn_base)
    config.n = n
    config.seed = 0
    config.domains = ()
    config.kinds = ()
    return config


def tool_cache() -> ml_collections.ConfigDict:
    """The tool cache that answers the rollouts' calls."""
    config = ml_collections.ConfigDict()
    config.path = ""  # "" : <workdir>/tool_cache.sqlite
    # Where each process keeps its private copy when there are several ("" = a temporary
    # directory): local disk, never a network filesystem.
    config.local_dir = ""
    config.build_from = ""  # trajectories JSONL recorded into the cache (comma-separated)
    config.fuzzy_threshold = 80.0
    config.scope_mode = "scoped"  # procedural results depend on each task's world
    return config


def loop(enable_thinking: ml_collections.FieldReference | None = None) -> ml_collections.ConfigDict:
    """CacheAgentLoop rollouts; `enable_thinking` may be a reference another block shares."""
    config = ml_collections.ConfigDict()
    config.mode = "cache"  # "cache" | "live" | "hybrid"
    config.max_turns = 6
    config.max_new_tokens = 1024
    config.max_len = 8192  # tokens per rollout (the update's row length)
    # KV-cache slots per sampler row (0: 2 x max_len); prompt padding and rows that stop early
    # leave holes, so multi-turn rollouts need more slots than tokens.
    config.cache_len = 0
    config.tool_result_max_tokens = 2048
    config.temperature = 1.0  # GRPO trains the policy sampled: softmax(logits / temperature)
    config.top_k = 0
    config.top_p = 1.0
    if enable_thinking is None:
        enable_thinking = ml_collections.FieldReference(None, field_type=bool)
    config.enable_thinking = enable_thinking
    config.cache_scope = "task"
    # Cache mode: a call the task's tools refuse (unknown tool, bad arguments) gets the
    # environment's own error, as on live tools, instead of a cache lookup.
    config.answer_rejections = False
    # Seconds every live tool call sleeps before it answers: a real API's latency, to measure what
    # the cache saves (0: off).
    config.tool_latency_s = 0.0
    return config


def reward() -> ml_collections.ConfigDict:
    """The cache-tier-aware reward: `a(tier) * R_answer + (1 - a(tier)) * R_process`."""
    config = ml_collections.ConfigDict()
    config.answer_weights = dict(exact=0.60, fuzzy=0.30, best_effort=0.10)
    config.tier_aware = True
    # Which calls' cache tiers set a(tier): "paper" (every call, the paper's formula) or "matched"
    # (only calls that match a reference call: a wrong call missing the cache is not excused).
    # "trusted": as "matched", and an answer reached through a wrong call the cache answered
    # approximately counts only its expectation on live tools (x untrusted_answer_scale).
    config.tier_rule = "paper"
    config.untrusted_answer_scale = 0.05
    config.fixed_answer_weight = 0.60
    config.format_weight = 0.2
    config.validity_weight = 0.2
    config.order_weight = 0.6
    config.meta_penalty = 0.5
    return config


def evaluation() -> ml_collections.ConfigDict:
    """Validation during training: greedy, one sample per task."""
    config = ml_collections.ConfigDict()
    config.temperature = 0.0  # greedy
    config.samples = 1
    # Validation tasks are not in the cache: evaluate with live tools (success judged on the real
    # final state), or "cache" for cheap curves on training tasks.
    config.mode = "live"
    return config
