"""GRPO with CacheAgentLoop rollouts and the cache-tier-aware reward.

    cacherl grpo --config=configs/grpo.py:tiny --config.model.checkpoint=runs/sft/hf \
        --config.cache.build_from=data/train.jsonl --workdir=runs/grpo
    cacherl grpo --config=configs/grpo.py:qwen3_4b --config.model.checkpoint=/ckpt/sft-4b/hf ...

`arg` picks the variant: `tiny` (CPU scale, procedural tasks, full fine-tuning of an SFT'd tiny
model) or `qwen3_0.6b` / `qwen3_1.7b` / `qwen3_4b` (LoRA r=128, beta 0.15, lr 1e-6, G=16 as in
the paper). `model.checkpoint` is an HF directory (e.g. the `hf/` an SFT run exports, which also
holds its tokenizer). Every field can be overridden on the command line.
"""

import ml_collections

VARIANTS = ("tiny", "qwen3_0.6b", "qwen3_1.7b", "qwen3_4b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown grpo variant {variant!r}; choose one of {VARIANTS}")
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
    # "": the checkpoint directory's own tokenizer.json (a tiny SFT run exports its trained one);
    # "qwen3": the real Qwen3 vocabulary, which Qwen3 SFT exports do not carry.
    config.tokenizer.spec = "" if tiny else "qwen3"

    # Tasks: the procedural suite (split/seed/kinds), or tasks stored in trajectories JSONL
    # (`metadata.task`, as `cacherl tasks` writes them), or BFCL multi-turn.
    config.tasks = ml_collections.ConfigDict()
    config.tasks.source = "procedural"  # "procedural" | "jsonl" | "bfcl"
    config.tasks.path = ""  # jsonl: trajectories file; bfcl: category (default multi_turn_base)
    config.tasks.n = 2000
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
    config.cache.build_from = ""  # trajectories JSONL recorded into the cache (comma-separated)
    config.cache.fuzzy_threshold = 80.0
    config.cache.scope_mode = "scoped"  # procedural results depend on each task's world
    config.cache.exact_only = False  # the ablation: non-exact calls get "no recorded result"

    config.loop = ml_collections.ConfigDict()
    config.loop.group_size = 4 if tiny else 16  # G rollouts per task
    config.loop.mode = "cache"  # "cache" | "live" | "hybrid"
    config.loop.max_turns = 6
    config.loop.max_new_tokens = 96 if tiny else 1024
    config.loop.max_len = 512 if tiny else 8192  # tokens per rollout (the update's row length)
    # KV-cache slots per sampler row (0: 2 x max_len); prompt padding and rows that stop early
    # leave holes, so multi-turn rollouts need more slots than tokens.
    config.loop.cache_len = 1536 if tiny else 0
    config.loop.tool_result_max_tokens = 256 if tiny else 2048
    config.loop.temperature = 1.0
    config.loop.top_k = 0
    config.loop.top_p = 1.0
    config.loop.enable_thinking = ml_collections.FieldReference(None, field_type=bool)
    config.loop.cache_scope = "task"

    config.reward = ml_collections.ConfigDict()
    config.reward.answer_weights = dict(exact=0.60, fuzzy=0.30, best_effort=0.10)
    config.reward.tier_aware = True
    config.reward.fixed_answer_weight = 0.60
    config.reward.format_weight = 0.2
    config.reward.validity_weight = 0.2
    config.reward.order_weight = 0.6
    config.reward.meta_penalty = 0.5

    config.grpo = ml_collections.ConfigDict()
    config.grpo.tasks_per_step = 8 if tiny else 32
    config.grpo.eps_low = 0.2
    config.grpo.eps_high = 0.28
    config.grpo.beta = 0.0 if tiny else 0.15
    config.grpo.kl_estimator = "k3"
    config.grpo.aggregation = "token-mean"  # or "seq-mean-token-mean"
    config.grpo.normalize_std = True  # False: Dr.GRPO advantages
    config.grpo.equal_reward_groups = "skip"  # or "keep" (their advantages are 0 anyway)
    config.grpo.minibatches = 1  # updates per step, each on a slice of the rollouts
    config.grpo.old_logp = "sampler"  # or "recompute" with the trainer's forward pass
    config.grpo.loss_chunk_size = 2048
    config.grpo.entropy = True

    config.train = ml_collections.ConfigDict()
    config.train.steps = 40 if tiny else 500
    config.train.lr = 2e-4 if tiny else 1e-6
    config.train.warmup_steps = 0 if tiny else 10
    config.train.schedule = "cosine"
    config.train.end_lr_ratio = 0.5
    config.train.weight_decay = 0.0
    config.train.b1 = 0.9
    config.train.b2 = 0.99
    config.train.eps = 1e-8
    config.train.max_grad_norm = 1.0
    config.train.grad_accum = 1
    config.train.log_every = 1
    config.train.checkpoint_every = 10 if tiny else 50
    config.train.keep_checkpoints = 2
    config.train.async_checkpoints = True
    config.train.export_hf = True
    config.train.eval_every = 10 if tiny else 50  # 0: only before the first and after the last

    config.eval = ml_collections.ConfigDict()
    config.eval.temperature = 0.0  # greedy
    config.eval.samples = 1
    # Validation tasks are not in the cache: evaluate with live tools (success judged on the real
    # final state), or "cache" for cheap curves on training tasks.
    config.eval.mode = "live"

    config.lora = ml_collections.ConfigDict()
    config.lora.rank = 0 if tiny else 128
    config.lora.alpha = 256.0
    config.lora.targets = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    return config
