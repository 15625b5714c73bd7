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

import ml_collections

from configs import common, sft

VARIANTS = ("tiny", "qwen3_0.6b", "qwen3_1.7b", "qwen3_4b", "qwen3_8b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = common.variant("rft", arg, VARIANTS)

    config = ml_collections.ConfigDict()
    config.variant = variant
    config.seed = 0
    config.mesh = common.mesh()
    config.dcn_mesh = common.dcn_mesh()
    config.runtime = common.runtime()
    config.rollout = common.rollout()
    config.distributed = common.distributed()
    config.model = common.model()  # model.checkpoint is required

    config.tokenizer = ml_collections.ConfigDict()
    # "" : each round's checkpoint directory's own tokenizer.json (copied into every export);
    # or "qwen3" / a tokenizer directory for all rounds.
    config.tokenizer.spec = "qwen3"

    # Tasks to sample, as in configs/grpo.py.
    config.tasks = common.tasks(n=2000)
    config.eval_tasks = common.tasks(n=64)

    config.cache = common.tool_cache()
    config.cache.build_from = ""  # "" : rft.base_data (comma-separated trajectories JSONL)

    # One assistant-thinking switch for sampling and for re-rendering the records in SFT:
    # accepted records round-trip only if both render the same way.
    enable_thinking = ml_collections.FieldReference(None, field_type=bool)
    config.loop = common.loop(enable_thinking)
    config.reward = common.reward()

    config.rft = ml_collections.ConfigDict()
    config.rft.rounds = 1
    config.rft.samples_per_task = 8
    # Tasks per sampler batch: batch_tasks x samples_per_task rows share one KV cache, so this
    # bounds sampling memory.
    config.rft.batch_tasks = 8
    config.rft.reward_threshold = 0.8
    config.rft.require_success = False  # also require the environment's success verdict
    config.rft.max_per_task = 4  # distinct accepted rollouts per task (0: all)
    # Keep accepted rollouts whose re-rendered messages are not the sampled tokens (counted
    # either way; see cacherl_jax/train/rft.py).
    config.rft.keep_nonroundtrip = False
    config.rft.base_data = ""  # the SFT data to merge with (comma-separated JSONL; may be empty)
    config.rft.accumulate = True  # merge the accepted records of earlier rounds too

    config.sft = sft.get_config(variant)
    config.sft.model.checkpoint = ""  # set each round: the current model
    config.sft.tokenizer.spec = ""  # set each round: the current model's tokenizer
    config.sft.data.train = ""  # set each round: <workdir>/round_K/train.jsonl
    config.sft.data.enable_thinking = enable_thinking
    config.sft.train.update(steps=500, lr=5e-6, warmup_steps=20, checkpoint_every=250)

    config.eval = common.evaluation()
    config.eval.enabled = True  # the starting model and each round's, on eval_tasks
    if variant == "tiny":
        _tiny(config)
    return config


def _tiny(config: ml_collections.ConfigDict) -> None:
    """CPU scale: the SFT'd tiny model with its own tokenizer, short rollouts, a few tasks."""
    config.model.update(common.CPU_MODEL)
    config.tokenizer.spec = ""
    config.tasks.n = 256
    config.loop.update(max_new_tokens=96, max_len=512, cache_len=1536, tool_result_max_tokens=256)
    config.rft.update(samples_per_task=4, batch_tasks=16, max_per_task=2)
    config.sft.train.update(steps=300, lr=1e-3, checkpoint_every=100)
