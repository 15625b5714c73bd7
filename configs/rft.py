"""Iterative rejection-sampled SFT (RFT): sample, keep the rewarded rollouts, fine-tune, repeat.

    cacherl rft --config=configs/rft.py:tiny --config.model.checkpoint=runs/sft/hf \
        --config.rft.base_data=data/train.jsonl --config.tasks.source=jsonl \
        --config.tasks.path=data/train.jsonl --workdir=runs/rft
    cacherl rft --config=configs/rft.py:qwen3_4b --config.model.checkpoint=/ckpt/sft-4b/hf \
        --config.rft.base_data=data/train.jsonl --config.rft.rounds=3 --workdir=runs/rft-4b

`arg` picks the variant: `tiny` (CPU scale, procedural tasks, the tiny model's own tokenizer) or
`qwen3_0.6b` / `qwen3_1.7b` / `qwen3_4b` (the real Qwen3 tokenizer, LoRA SFT per round).
`model.checkpoint` is an HF directory (e.g. the `hf/` an SFT run exports). `sft` is an embedded
`configs/sft.py` config for each round's fine-tuning, with fewer steps and a lower learning rate;
its `model.checkpoint`, `tokenizer.spec`, `data.train`, `mesh` and `distributed` are set by the
trainer each round (the current model, its tokenizer, the merged data, the top-level mesh).
Every field can be overridden on the command line (`--config.sft.train.steps=100`).
"""

import importlib.util
from pathlib import Path

import ml_collections

VARIANTS = ("tiny", "qwen3_0.6b", "qwen3_1.7b", "qwen3_4b")


def _sft_config(variant: str) -> ml_collections.ConfigDict:
    # Loaded by path: `--config=configs/rft.py` does not put the repository on sys.path.
    spec = importlib.util.spec_from_file_location(
        "_cacherl_sft_config", Path(__file__).with_name("sft.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown rft variant {variant!r}; choose one of {VARIANTS}")
    tiny = variant == "tiny"

    config = ml_collections.ConfigDict()
    config.variant = variant
    config.seed = 0
    config.mesh = dict(data=1, fsdp=-1, tensor=1)
    config.distributed = dict(enabled=False, coordinator_address="", num_processes=0, process_id=-1)

    config.model = ml_collections.ConfigDict()
    config.model.checkpoint = ""  # HF directory to start from (required)
    config.model.compute_dtype = "float32" if tiny else "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat = not tiny
    config.model.unroll_layers = tiny

    config.tokenizer = ml_collections.ConfigDict()
    # "" : each round's checkpoint directory's own tokenizer.json (copied into every export);
    # or "qwen3" / a tokenizer directory for all rounds.
    config.tokenizer.spec = "" if tiny else "qwen3"

    # Tasks to sample, as in configs/grpo.py: the procedural suite, trajectories JSONL with
    # `metadata.task` (as `cacherl tasks` writes them), or BFCL multi-turn.
    config.tasks = ml_collections.ConfigDict()
    config.tasks.source = "procedural"  # "procedural" | "jsonl" | "bfcl"
    config.tasks.path = ""
    config.tasks.n = 256 if tiny else 2000
    config.tasks.seed = 0
    config.tasks.domains = ()
    config.tasks.kinds = ()
    config.eval_tasks = ml_collections.ConfigDict()
    config.eval_tasks.source = "procedural"
    config.eval_tasks.path = ""
    config.eval_tasks.n = 64
    config.eval_tasks.seed = 0
    config.eval_tasks.domains = ()
    config.eval_tasks.kinds = ()

    config.cache = ml_collections.ConfigDict()
    config.cache.path = ""  # "" : <workdir>/tool_cache.sqlite
    config.cache.build_from = ""  # "" : rft.base_data (comma-separated trajectories JSONL)
    config.cache.fuzzy_threshold = 80.0
    config.cache.scope_mode = "scoped"  # procedural results depend on each task's world

    # One assistant-thinking switch for sampling and for re-rendering the records in SFT:
    # accepted records round-trip only if both render the same way.
    enable_thinking = ml_collections.FieldReference(None, field_type=bool)

    config.loop = ml_collections.ConfigDict()
    config.loop.mode = "cache"  # "cache" | "live" | "hybrid"
    config.loop.max_turns = 6
    config.loop.max_new_tokens = 96 if tiny else 1024
    config.loop.max_len = 512 if tiny else 8192
    config.loop.cache_len = 1536 if tiny else 0  # KV-cache slots per row (0: 2 x max_len)
    config.loop.tool_result_max_tokens = 256 if tiny else 2048
    config.loop.temperature = 1.0
    config.loop.top_k = 0
    config.loop.top_p = 1.0
    config.loop.enable_thinking = enable_thinking
    config.loop.cache_scope = "task"

    config.reward = ml_collections.ConfigDict()
    config.reward.answer_weights = dict(exact=0.60, fuzzy=0.30, best_effort=0.10)
    config.reward.tier_aware = True
    config.reward.fixed_answer_weight = 0.60
    config.reward.format_weight = 0.2
    config.reward.validity_weight = 0.2
    config.reward.order_weight = 0.6
    config.reward.meta_penalty = 0.5

    config.rft = ml_collections.ConfigDict()
    config.rft.rounds = 1
    config.rft.samples_per_task = 4 if tiny else 8
    # Tasks per sampler batch: batch_tasks x samples_per_task rows share one KV cache, so this
    # bounds sampling memory.
    config.rft.batch_tasks = 16 if tiny else 8
    config.rft.reward_threshold = 0.8
    config.rft.require_success = False  # also require the environment's success verdict
    config.rft.max_per_task = 2 if tiny else 4  # distinct accepted rollouts per task (0: all)
    # Keep accepted rollouts whose re-rendered messages are not the sampled tokens (counted
    # either way; see cacherl_jax/train/rft.py).
    config.rft.keep_nonroundtrip = False
    config.rft.base_data = ""  # the SFT data to merge with (comma-separated JSONL; may be empty)
    config.rft.accumulate = True  # merge the accepted records of earlier rounds too

    sft = _sft_config(variant)
    sft.model.checkpoint = ""  # set each round: the current model
    sft.tokenizer.spec = ""  # set each round: the current model's tokenizer
    sft.data.train = ""  # set each round: <workdir>/round_K/train.jsonl
    sft.data.enable_thinking = enable_thinking
    sft.train.steps = 300 if tiny else 500
    sft.train.lr = 1e-3 if tiny else 5e-6
    sft.train.warmup_steps = 20
    sft.train.checkpoint_every = 100 if tiny else 250
    config.sft = sft

    config.eval = ml_collections.ConfigDict()
    config.eval.enabled = True  # the starting model and each round's, on eval_tasks
    config.eval.temperature = 0.0  # greedy
    config.eval.samples = 1
    config.eval.mode = "live"  # validation tasks are not in the cache
    return config
