"""The pretrained miniature base's tools: its corpus (deterministic, nothing of the procedural
suite), the tokenizer's pattern option, the text data format (every token or a span trained), a
toy build, and the recoveries of experiments/sft_with_recoveries.py."""

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from cacherl_jax.agent.procedural import SYSTEM_PROMPT, all_kinds, generate_tasks
from cacherl_jax.agent.procedural.environment import DOMAINS
from cacherl_jax.agent.procedural.solver import reference_trajectory
from cacherl_jax.chat import load_tokenizer, train_tokenizer
from cacherl_jax.chat.tokenizer import QWEN3_ADDED_TOKENS
from cacherl_jax.data import pipeline
from cacherl_jax.data import pretrain_corpus as corpus
from cacherl_jax.model import load_hf_checkpoint, presets
from configs import sft as sft_configs
from experiments import build_tiny_base, sft_with_recoveries


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the corpus --------------------------------------------------------------------------------


def test_the_corpus_is_deterministic_in_its_seed_and_split():
    first = corpus.generate_documents(60, seed=3)
    assert first == corpus.generate_documents(60, seed=3)
    assert first[:30] == corpus.generate_documents(30, seed=3)  # a longer list extends a shorter
    assert first != corpus.generate_documents(60, seed=4)
    assert first != corpus.generate_documents(60, seed=3, split="probe")
    assert {document.kind for document in first} == set(corpus.KINDS)
    assert all(document.text.startswith(document.prompt + document.answer) for document in first)


def test_the_corpus_holds_nothing_of_the_procedural_suite():
    text = "\n".join(document.text for document in corpus.generate_documents(3000, seed=0))
    tool_names = {tool.name for domain in DOMAINS.values() for tool in domain.tools}
    assert len(tool_names) >= 10
    for name in tool_names:
        assert not re.search(rf"\b{re.escape(name)}\b", text), name
    for markup in (SYSTEM_PROMPT, *QWEN3_ADDED_TOKENS, "<tools>", '"arguments"', "# Tools"):
        assert markup not in text, markup
    # No request template's fixed words (the text before its first placeholder, when long).
    for _, kind in all_kinds().values():
        for template in kind.templates:
            fixed = template.split("{")[0].strip()
            if len(fixed) >= 12:
                assert fixed not in text, fixed


# --- the tokenizer's pattern option ------------------------------------------------------------

TEXTS = [
    'The code is EUR and the name is pimo. {"code": "EUR", "name": "pimo"}',
    'Send 12.5 EUR to pimo. {"amount": 12.5, "currency": "EUR", "to": "pimo"}',
] * 20


def _value_ids(tokenizer, value: str) -> tuple[list[int], list[int]]:
    """The ids `value` takes after a space in prose and after a quote in JSON."""
    prose = tokenizer.encode(f"is {value} and")
    json_text = tokenizer.encode(json.dumps({"k": value}))
    return prose, json_text


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_split_space_gives_a_value_the_same_tokens_in_prose_and_json(tmp_path):
    tokenizer = train_tokenizer(TEXTS, 320, tmp_path, from_files=False, pattern="split_space")
    for value in ("EUR", "pimo"):
        value_ids = tokenizer.encode(value)
        prose, json_ids = _value_ids(tokenizer, value)
        assert _contains(prose, value_ids) and _contains(json_ids, value_ids), value
    assert json.loads((tmp_path / "cacherl_tokenizer.json").read_text())["pattern"] == "split_space"
    assert tokenizer.encode("12.5") == [tokenizer.token_id(c) for c in "12.5"]  # digits single


def test_the_default_pattern_is_qwen3s(tmp_path):
    tokenizer = train_tokenizer(TEXTS, 320, tmp_path, from_files=False)
    prose, _ = _value_ids(tokenizer, "EUR")
    assert tokenizer.decode(prose[1:2]) == " EUR"  # the word carries its space, as in Qwen3
    assert json.loads((tmp_path / "cacherl_tokenizer.json").read_text())["pattern"] == "qwen"
    with pytest.raises(ValueError, match="unknown pattern"):
        train_tokenizer(TEXTS, 320, tmp_path, from_files=False, pattern="nope")


# --- the text format -----------------------------------------------------------------------------


def test_text_examples_train_every_token_and_end_the_document(tmp_path):
    path = corpus.write_corpus(tmp_path / "c.jsonl", corpus.generate_documents(4, seed=0))
    texts, _ = pipeline.load_text_records(path)
    tokenizer = train_tokenizer(texts, 300, tmp_path / "tokenizer", from_files=False)
    (example,) = pipeline.text_examples(texts[:1], tokenizer)
    assert example["token_ids"].tolist() == [*tokenizer.encode(texts[0]), tokenizer.pad_id]
    assert example["loss_mask"].all() and not example["thinking_mask"].any()
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        pipeline.load_text_records(tmp_path / "bad.jsonl")


def test_answers_only_documents_train_exactly_the_answers_tokens(tmp_path):
    documents = corpus.generate_documents(12, seed=0)
    path = corpus.write_corpus(tmp_path / "c.jsonl", documents, answers_only=True)
    texts, spans = pipeline.load_text_records(path)
    assert [text[start:end] for text, (start, end) in zip(texts, spans, strict=True)] == [
        document.answer for document in documents
    ]
    tokenizer = train_tokenizer(texts, 300, tmp_path / "tokenizer", from_files=False)
    examples = pipeline.text_examples(texts, tokenizer, spans)
    for text, (start, end), example in zip(texts, spans, examples, strict=True):
        ids = example["token_ids"].tolist()[:-1]
        # Independently: a token is trained when the text decoded up to it ends after the answer
        # starts and the text decoded before it ends before the answer does.
        expected = [
            int(
                len(tokenizer.decode(ids[: i + 1])) > start and len(tokenizer.decode(ids[:i])) < end
            )
            for i in range(len(ids))
        ]
        assert example["loss_mask"].tolist() == [*expected, 0]
        trained = tokenizer.decode([t for t, m in zip(ids, expected, strict=True) if m])
        assert _covers_the_answer(trained, text[start:end])


def _covers_the_answer(trained: str, answer: str) -> bool:
    """The trained tokens cover the answer, and at most a token's worth of text around it."""
    return answer in trained and len(trained) - len(answer) <= 8


def test_a_bad_train_span_names_its_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = '{"text": "abc", "train_span": [0, 2]}\n'
    for span in ("[2, 9]", "[2, 2]", "[true, 2]", "[0]", '"0-2"'):
        bad.write_text(f'{good}{{"text": "abc", "train_span": {span}}}\n')
        with pytest.raises(ValueError, match=r"bad\.jsonl:2: \"train_span\" must be"):
            pipeline.load_text_records(bad)


# --- the shipped base ----------------------------------------------------------------------------


def test_the_pretraining_config_trains_every_token_of_text_documents():
    assert sft_configs.get_config("tiny_pretrain").data.format == "text"
    assert sft_configs.get_config("tiny").data.format == "trajectories"


# --- a toy build ---------------------------------------------------------------------------------


def test_a_toy_build_produces_a_loadable_base(tmp_path):
    out = tmp_path / "base"
    argv = [
        "--steps", "20", "--documents", "200", "--tokenizer-tasks", "12", "--vocab-size", "400",
        "--batch-size", "8", "--seq-len", "128", "--probe-documents", "0", "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    record = build_tiny_base.build(build_tiny_base.parse_args(argv))
    assert record["steps"] == 20 and np.isfinite(record["final_loss"])
    assert record["corpus"]["documents"] == 200
    tokenizer = load_tokenizer(out)
    model, _ = load_hf_checkpoint(out)
    assert model.hidden_size == presets.preset("tiny").hidden_size
    assert tokenizer.vocab_size <= model.vocab_size
    for name, digest in record["sha256"].items():
        assert _sha256(out / name) == digest


# --- SFT data with recoveries (experiments/sft_with_recoveries.py) ------------------------------


def test_a_recovery_is_a_failed_call_its_real_error_and_the_original_call():
    (task,) = generate_tasks("train", 1, seed=0, kinds=["files.read"])
    trajectory = reference_trajectory(task).to_dict()
    recovered = sft_with_recoveries.with_recovery(trajectory, random.Random(0))
    before, after = trajectory["messages"], recovered["messages"]
    first = next(i for i, m in enumerate(before) if m.get("tool_calls"))
    assert after[:first] == before[:first] and after[first + 3 :] == before[first + 1 :]
    good = before[first]["tool_calls"][0]["function"]["arguments"]["name"]
    failed = after[first]["tool_calls"][0]["function"]["arguments"]["name"]
    assert failed == good[:-1]
    assert after[first + 1] == {
        "role": "tool",
        "name": "read_file",
        "content": f"Error: no file named '{failed}'",
    }
    assert after[first + 2]["tool_calls"] == before[first]["tool_calls"]
    assert f'not "{failed}"' in after[first + 2]["reasoning_content"]
