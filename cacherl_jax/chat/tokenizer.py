"""One tokenizer interface over three sources: the real Qwen3 vocabulary, any Hugging Face
tokenizer directory, and small byte-level BPE tokenizers trained here for CPU-scale runs.

Every source treats the chat format's special and tag tokens (`<|im_start|>`, `<tool_call>`,
`<think>`, ...) as single ids wherever they appear in the text, as Qwen3's tokenizer does.
Text is NFC-normalised before encoding, as Qwen3's official tokenizer does, so
`decode(encode(x)) == unicodedata.normalize("NFC", x)`.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import os
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from cacherl_jax.errors import UserError

# The pre-tokenizer of Qwen2/Qwen3: digits one by one, letters with one leading non-letter.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3's pattern without the letter run's leading character: a word never carries a space or a
# quote, so a value (" EUR" in prose, "EUR" after a JSON quote) has the same tokens everywhere.
# Spaces become their own pieces (more tokens per text); digits stay single.
SPLIT_SPACE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The pre-tokenizer patterns `train_tokenizer` offers, by the name cacherl_tokenizer.json records.
PATTERNS = {"qwen": QWEN_PATTERN, "split_space": SPLIT_SPACE_PATTERN}

# Qwen3's added tokens, in id order from QWEN3_FIRST_ADDED_ID.
QWEN3_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)  # fmt: skip
QWEN3_FIRST_ADDED_ID = 151_643


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens the chat format is built from."""

    endoftext: int
    im_start: int
    im_end: int
    tool_call: int
    tool_call_end: int
    tool_response: int
    tool_response_end: int
    think: int
    think_end: int

    TEXT: ClassVar[dict[str, str]] = {
        "endoftext": "<|endoftext|>",
        "im_start": "<|im_start|>",
        "im_end": "<|im_end|>",
        "tool_call": "<tool_call>",
        "tool_call_end": "</tool_call>",
        "tool_response": "<tool_response>",
        "tool_response_end": "</tool_response>",
        "think": "<think>",
        "think_end": "</think>",
    }

    @classmethod
    def from_lookup(cls, lookup: dict[str, int], source: str) -> SpecialTokens:
        missing = [text for text in cls.TEXT.values() if text not in lookup]
        if missing:
            raise TokenizerError(
                f"{source}: no single-token id for {', '.join(missing)} (needed by the chat format)"
            )
        return cls(**{name: lookup[text] for name, text in cls.TEXT.items()})


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be loaded or trained as asked."""


class Tokenizer:
    """`encode`, `decode`, `vocab_size` and the special ids, whatever the backend.

    `chat_variant` names the Qwen3 chat template that `render` and the rollout functions follow
    (`chat.template.VARIANTS`): the hybrid `"qwen3"` unless a checkpoint's own template says
    otherwise (`chat.template_check.check_checkpoint_template` sets it).
    """

    def __init__(self, name: str, backend: Any, special_ids: dict[str, int], vocab_size: int):
        self.name = name
        self._backend = backend
        self._special_ids = dict(special_ids)
        self.special = SpecialTokens.from_lookup(self._special_ids, name)
        self.vocab_size = vocab_size
        self.chat_variant = "qwen3"

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(unicodedata.normalize("NFC", text))

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode([int(i) for i in ids])

    def token_id(self, token: str) -> int:
        """The id of a special or tag token (`"<tool_call>"`), or of any text that is one token."""
        if token in self._special_ids:
            return self._special_ids[token]
        ids = self.encode(token)
        if len(ids) != 1:
            raise TokenizerError(f"{token!r} is {len(ids)} tokens in {self.name}, not one")
        return ids[0]

    @property
    def pad_id(self) -> int:
        return self.special.endoftext

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"


class _TiktokenBackend:
    def __init__(self, encoding: Any):
        self.encoding = encoding

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


class _HFTokenizersBackend:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def qwen_bpe_file() -> Path:
    """The Qwen BPE ranks shipped in `qwen-agent` (found without importing it: its import needs
    optional audio packages)."""
    spec = importlib.util.find_spec("qwen_agent")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "the Qwen3 vocabulary comes from the qwen-agent package: "
            "pip install --no-deps qwen-agent==0.0.34 (make does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / "utils" / "qwen.tiktoken"
    if not path.exists():
        raise TokenizerError(f"{path}: missing from the installed qwen-agent package")
    return path


def qwen3_tokenizer() -> Tokenizer:
    """The real Qwen3 tokenizer (151,643 BPE ranks + 26 added tokens), built offline."""
    import tiktoken

    ranks = {}
    with qwen_bpe_file().open("rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    special = {text: QWEN3_FIRST_ADDED_ID + i for i, text in enumerate(QWEN3_ADDED_TOKENS)}
    encoding = tiktoken.Encoding(
        "qwen3", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=special
    )
    return Tokenizer("qwen3", _TiktokenBackend(encoding), special, len(ranks) + len(special))


def hf_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """A Hugging Face tokenizer directory (or its `tokenizer.json`)."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise TokenizerError(
            f"{path}: no tokenizer.json (a Hugging Face tokenizer directory is expected)"
        )
    try:
        tokenizer = HFTokenizer.from_file(str(file))
    except Exception as err:  # the Rust side raises a plain Exception for malformed files
        raise TokenizerError(f"{file}: not a readable tokenizer.json ({err})") from err
    added = {
        token.content: token_id for token_id, token in tokenizer.get_added_tokens_decoder().items()
    }
    return Tokenizer(str(path), _HFTokenizersBackend(tokenizer), added, tokenizer.get_vocab_size())


def load_tokenizer(spec: str | os.PathLike[str]) -> Tokenizer:
    """`"qwen3"` for the real Qwen3 vocabulary, else a tokenizer directory (ours or Hugging Face's)."""
    if str(spec) == "qwen3":
        return qwen3_tokenizer()
    path = Path(spec)
    if not path.exists():
        raise TokenizerError(f"{spec}: neither 'qwen3' nor an existing tokenizer directory")
    return hf_tokenizer(path)


def train_tokenizer(
    corpus: Sequence[str | os.PathLike[str]] | Iterable[str],
    vocab_size: int,
    output_dir: str | os.PathLike[str],
    *,
    from_files: bool = True,
    pattern: str = "qwen",
) -> Tokenizer:
    """Trains a byte-level BPE with Qwen3's added tokens (ids 0..25, in Qwen3's order), saves
    `tokenizer.json` into `output_dir` and returns it loaded.

    `pattern` names the pre-tokenizer (`PATTERNS`): "qwen" (Qwen3's) or "split_space" (words
    without a leading space or quote). Every byte is in the vocabulary, so any text encodes;
    digits stay single tokens.
    """
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    if pattern not in PATTERNS:
        raise TokenizerError(f"unknown pattern {pattern!r} (one of {', '.join(PATTERNS)})")
    minimum = len(QWEN3_ADDED_TOKENS) + 256
    if vocab_size < minimum:
        raise TokenizerError(
            f"vocab_size {vocab_size} is below {minimum} (26 added tokens + 256 bytes)"
        )
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERNS[pattern]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN3_ADDED_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if from_files:
        files = [str(f) for f in corpus]
        missing = [f for f in files if not Path(f).exists()]
        if missing:
            raise TokenizerError(f"corpus files not found: {', '.join(missing)}")
        tokenizer.train(files, trainer)
    else:
        tokenizer.train_from_iterator(corpus, trainer)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output_dir / "tokenizer.json"))
    (output_dir / "cacherl_tokenizer.json").write_text(
        json.dumps(
            {
                "kind": "byte-level-bpe",
                "vocab_size": tokenizer.get_vocab_size(),
                "pattern": pattern,
            }
        )
        + "\n"
    )
    return hf_tokenizer(output_dir)
