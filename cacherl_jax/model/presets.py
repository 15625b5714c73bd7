"""Named Qwen3 shapes: the official releases (to load their checkpoints) and small CPU models."""

from cacherl_jax.model.config import Qwen3Config

_QWEN3_VOCAB = 151_936

PRESETS: dict[str, Qwen3Config] = {
    # The 1.1M-parameter shape that learned the procedural tasks on 2 CPU cores (shared/DEMO_NOTES.md).
    "tiny": Qwen3Config(
        vocab_size=1024, hidden_size=128, intermediate_size=512, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=True,
    ),
    # The model transformers' training and sampling speed was measured on (shared/DESIGN.md).
    "bench_29m": Qwen3Config(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=8,
        num_heads=8, num_kv_heads=4, head_dim=64, tie_word_embeddings=True,
    ),
    "qwen3_0.6b": Qwen3Config(
        vocab_size=_QWEN3_VOCAB, hidden_size=1024, intermediate_size=3072, num_layers=28,
        num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=True,
    ),
    "qwen3_1.7b": Qwen3Config(
        vocab_size=_QWEN3_VOCAB, hidden_size=2048, intermediate_size=6144, num_layers=28,
        num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=True,
    ),
    "qwen3_4b": Qwen3Config(
        vocab_size=_QWEN3_VOCAB, hidden_size=2560, intermediate_size=9728, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, tie_word_embeddings=True,
    ),
    "qwen3_8b": Qwen3Config(
        vocab_size=_QWEN3_VOCAB, hidden_size=4096, intermediate_size=12288, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, tie_word_embeddings=False,
    ),
}  # fmt: skip


def preset(name: str, **overrides) -> Qwen3Config:
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
