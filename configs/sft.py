"""Masked SFT on hybrid-thinking trajectories.

    cacherl sft --config=configs/sft.py:tiny --config.data.train=data/train.jsonl --workdir=runs/sft
    cacherl sft --config=configs/sft.py:qwen3_0.6b --config.model.checkpoint=/ckpt/Qwen3-0.6B \
        --config.data.train=data/train.jsonl --config.mesh.fsdp=-1 --workdir=runs/sft-0.6b

`arg` picks the variant: `tiny` (the 1.1M-parameter CPU model with a tokenizer trained on the
data itself), `qwen3_0.6b`, `qwen3_1.7b`, `qwen3_4b` (load `model.checkpoint`, a Hugging Face
directory, with the real Qwen3 tokenizer, LoRA r=128 as in the paper). Every field can be
overridden on the command line; the resolved config is written to the workdir.
"""

import ml_collections

VARIANTS = ("tiny", "qwen3_0.6b", "qwen3_1.7b", "qwen3_4b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown sft variant {variant!r}; choose one of {VARIANTS}")
    tiny = variant == "tiny"

    config = ml_collections.ConfigDict()
    config.variant = variant
    config.seed = 0
    # Mesh axes (-1: the remaining devices); parallel.DEFAULT_RULES maps model axes onto them.
    config.mesh = dict(data=1, fsdp=-1, tensor=1)
    config.distributed = dict(enabled=False, coordinator_address="", num_processes=0, process_id=-1)

    config.model = ml_collections.ConfigDict()
    config.model.preset = variant  # shape used when no checkpoint is given (random init)
    config.model.checkpoint = ""  # a Hugging Face Qwen3 directory to start from
    config.model.compute_dtype = "float32" if tiny else "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat = not tiny
    config.model.unroll_layers = (
        tiny  # faster backward on CPU; a scan compiles faster for deep models
    )

    config.tokenizer = ml_collections.ConfigDict()
    # "qwen3", a tokenizer directory, or "" to train a byte-level BPE on the training data.
    config.tokenizer.spec = "" if tiny else "qwen3"
    config.tokenizer.train_vocab_size = 1024

    config.data = ml_collections.ConfigDict()
    config.data.train = ""  # trajectories JSONL (required)
    config.data.on_error = "raise"  # or "skip": malformed records are reported by file:line:field
    config.data.seq_len = 512 if tiny else 4096
    config.data.batch_size = 8 if tiny else 32
    config.data.shuffle = True
    config.data.overflow = "truncate"  # or "skip": sequences longer than seq_len
    config.data.enable_thinking = ml_collections.FieldReference(None, field_type=bool)
    config.data.train_on = "all"  # or "last": only the final assistant message
    config.data.train_thinking = True

    config.train = ml_collections.ConfigDict()
    config.train.steps = 1500 if tiny else 2000
    config.train.lr = 4e-3 if tiny else 1e-5
    config.train.warmup_steps = 50 if tiny else 100
    config.train.schedule = "cosine"  # or "linear"
    config.train.end_lr_ratio = 0.1
    config.train.weight_decay = 0.0 if tiny else 0.01
    config.train.b1 = 0.9
    config.train.b2 = 0.95
    config.train.eps = 1e-8
    config.train.max_grad_norm = 1.0
    config.train.grad_accum = 1
    config.train.thinking_weight = 1.0
    config.train.loss_chunk_size = 2048
    config.train.log_every = 10
    config.train.checkpoint_every = 200 if tiny else 500
    config.train.keep_checkpoints = 2
    config.train.async_checkpoints = True
    config.train.export_hf = True
    config.train.log_example_ids = False  # debugging/tests: which examples each step consumed

    config.lora = ml_collections.ConfigDict()
    config.lora.rank = 0 if tiny else 128  # 0: full fine-tuning
    config.lora.alpha = 256.0
    config.lora.targets = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    return config
