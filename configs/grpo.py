"""GRPO with CacheAgentLoop rollouts and the cache-tier-aware reward.

    cacherl grpo --config=configs/grpo.py:tiny --config.model.checkpoint=runs/sft/hf \
        --config.cache.build_from=data/train.jsonl --workdir=runs/grpo
    cacherl grpo --config=configs/grpo.py:qwen3_4b --config.model.checkpoint=/ckpt/sft-4b/hf \
        --config.cache.build_from=data/train.jsonl --workdir=runs/grpo-4b

`arg` picks the variant: `tiny` (CPU scale, procedural tasks, full fine-tuning of an SFT'd tiny
model) or `qwen3_0.6b` / `qwen3_1.7b` / `qwen3_4b` / `qwen3_8b` (LoRA r=128, beta 0.15, lr 1e-6,
G=16 as in the paper). `model.checkpoint` is an HF directory (e.g. the `hf/` an SFT run exports, which also
holds its tokenizer). Every field can be overridden on the command line.
"""

import ml_collections

from configs import common

VARIANTS = ("tiny", "qwen3_0.6b", "qwen3_1.7b", "qwen3_4b", "qwen3_8b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = common.variant("grpo", arg, VARIANTS)

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
    # "": the checkpoint directory's own tokenizer.json (a tiny SFT run exports its trained one);
    # "qwen3": the real Qwen3 vocabulary, which Qwen3 SFT exports do not carry.
    config.tokenizer.spec = "qwen3"

    config.tasks = common.tasks(n=2000)
    config.eval_tasks = common.tasks(n=64)

    config.cache = common.tool_cache()
    config.cache.exact_only = False  # the ablation: non-exact calls get "no recorded result"

    config.loop = common.loop()
    config.loop.group_size = 16  # G rollouts per task

    config.reward = common.reward()

    config.grpo = ml_collections.ConfigDict()
    config.grpo.tasks_per_step = 32
    config.grpo.eps_low = 0.2
    config.grpo.eps_high = 0.28
    config.grpo.beta = 0.15
    config.grpo.kl_estimator = "k3"
    config.grpo.aggregation = "token-mean"  # or "seq-mean-token-mean"
    config.grpo.normalize_std = True  # False: Dr.GRPO advantages
    config.grpo.equal_reward_groups = "skip"  # or "keep" (their advantages are 0 anyway)
    config.grpo.minibatches = 1  # updates per step, each on a slice of the rollouts
    config.grpo.old_logp = "sampler"  # or "recompute" with the trainer's forward pass
    config.grpo.loss_chunk_size = 2048
    config.grpo.entropy = True

    config.train = common.train(
        steps=500,
        lr=1e-6,
        warmup_steps=10,
        end_lr_ratio=0.5,
        weight_decay=0.0,
        b2=0.99,
        log_every=1,
        checkpoint_every=50,
        eval_every=50,  # 0: only before the first and after the last
        save_rollouts=False,  # rollouts/step_N.jsonl: every rollout's tokens, reward and tiers
        # Replay every cached call of the step on a fresh live environment and log, per tier, how
        # often the cache's result equals the live one (costs one live call per cached call).
        tier_fidelity=False,
    )
    config.eval = common.evaluation()
    config.lora = common.lora()
    if variant == "tiny":
        _tiny(config)
    return config


def _tiny(config: ml_collections.ConfigDict) -> None:
    """CPU scale: the SFT'd tiny model with its own tokenizer, short rollouts, no KL term."""
    config.model.update(common.CPU_MODEL)
    config.tokenizer.spec = ""
    config.loop.update(
        group_size=4, max_new_tokens=96, max_len=512, cache_len=1536, tool_result_max_tokens=256
    )
    config.grpo.update(tasks_per_step=8, beta=0.0)
    config.train.update(
        steps=40, lr=2e-4, warmup_steps=0, checkpoint_every=10, eval_every=10, tier_fidelity=True
    )
    config.lora.rank = 0  # full fine-tuning
