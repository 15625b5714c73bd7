"""Masked SFT on hybrid-thinking trajectories.

    cacherl sft --config=configs/sft.py:tiny --config.data.train=data/train.jsonl --workdir=runs/sft
    cacherl sft --config=configs/sft.py:qwen3_0.6b --config.model.checkpoint=/ckpt/Qwen3-0.6B \
        --config.data.train=data/train.jsonl --config.mesh.fsdp=-1 --workdir=runs/sft-0.6b

`arg` picks the variant: `tiny` (the 1.1M-parameter CPU model with a tokenizer trained on the
data itself), `tiny_pretrain` (how `experiments/build_tiny_base.py` pretrains a miniature base
on plain-text documents, every token or each document's `train_span`),
`qwen3_0.6b` ... `qwen3_8b` (load `model.checkpoint`, a Hugging Face
directory, with the real Qwen3 tokenizer, LoRA r=128 as in the paper). Every field can be
overridden on the command line; the resolved config is written to the workdir.
"""

import ml_collections

from configs import common

VARIANTS = (
    "tiny",
    "tiny_pretrain",
    "qwen3_0.6b",
    "qwen3_1.7b",
    "qwen3_4b",
    "qwen3_8b",
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = common.variant("sft", arg, VARIANTS)

    config = ml_collections.ConfigDict()
    config.variant = variant
    config.seed = 0
    config.mesh = common.mesh()
    config.dcn_mesh = common.dcn_mesh()
    config.runtime = common.runtime()
    config.distributed = common.distributed()

    config.model = common.model()
    # shape used when no checkpoint is given (random init)
    config.model.preset = "tiny" if variant.startswith("tiny") else variant

    config.tokenizer = ml_collections.ConfigDict()
    # "qwen3", a tokenizer directory, or "" to train a byte-level BPE on the training data.
    config.tokenizer.spec = "qwen3"
    config.tokenizer.train_vocab_size = 1024

    config.data = ml_collections.ConfigDict()
    config.data.train = ""  # trajectories JSONL (required), or documents JSONL with format "text"
    config.data.format = "trajectories"  # or "text": {"text": ...} documents, every token trained
    config.data.on_error = "raise"  # or "skip": malformed records are reported by file:line:field
    config.data.seq_len = 4096
    config.data.batch_size = 32
    config.data.shuffle = True
    config.data.overflow = "truncate"  # or "skip": sequences longer than seq_len
    config.data.enable_thinking = ml_collections.FieldReference(None, field_type=bool)
    config.data.train_on = "all"  # or "last": only the final assistant message
    config.data.train_thinking = True

    config.train = common.train(
        steps=2000,
        lr=1e-5,
        warmup_steps=100,
        end_lr_ratio=0.1,
        weight_decay=0.01,
        b2=0.95,
        thinking_weight=1.0,
        loss_chunk_size=2048,
        log_every=10,
        checkpoint_every=500,
        log_example_ids=False,  # debugging/tests: which examples each step consumed
    )
    config.lora = common.lora()
    if variant.startswith("tiny"):
        _tiny(config)
    if variant == "tiny_pretrain":
        _tiny_pretrain(config)
    return config


def _tiny(config: ml_collections.ConfigDict) -> None:
    """CPU scale: the tiny model trained from scratch on its own tokenizer, fully fine-tuned."""
    config.model.update(common.CPU_MODEL)
    config.tokenizer.spec = ""  # train a BPE on the training data
    config.data.update(seq_len=512, batch_size=8)
    config.train.update(
        steps=1500, lr=4e-3, warmup_steps=50, weight_decay=0.0, checkpoint_every=200
    )
    config.lora.rank = 0  # full fine-tuning


def _tiny_pretrain(config: ml_collections.ConfigDict) -> None:
    """Pretraining the tiny base on plain documents (`cacherl_jax.data.pretrain_corpus`); the build
    script sets `data.train` and `tokenizer.spec` (the tokenizer it trained on the corpus)."""
    config.data.format = "text"
    # Short rows, small batches: documents are short, and steps (not tokens) teach copying.
    config.data.update(seq_len=256, batch_size=4)
    config.train.update(steps=3000, lr=8e-3, warmup_steps=100, checkpoint_every=500)
