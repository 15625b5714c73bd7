"""Iterative rejection-sampled SFT: a real round on a briefly SFT'd tiny model (sampling, the
reward filter, the round-trip rule, merging, SFT, export, eval, resume), and the selection and
round-trip logic on hand-built rollouts."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from scripted_policy import ScriptedPolicy

from cacherl_jax import cli
from cacherl_jax.agent.environment import Turn
from cacherl_jax.agent.loop import CacheAgentLoop, LoopConfig, Rollout
from cacherl_jax.agent.procedural import generate_tasks, reference_trajectory, write_trajectories
from cacherl_jax.agent.tool_cache import ToolCache, ToolCacheConfig, build_from_trajectories
from cacherl_jax.chat import load_tokenizer, render
from cacherl_jax.chat.template import render_text
from cacherl_jax.chat.tokenizer import train_tokenizer
from cacherl_jax.chat.trajectory import load_jsonl
from cacherl_jax.rl.rewards import Reward
from cacherl_jax.rl.scoring import TaskResult
from cacherl_jax.train import rft, rft_data, sft
from cacherl_jax.train.errors import TrainingError
from cacherl_jax.train.metrics import read_metrics
from configs import rft as rft_configs
from configs import sft as sft_configs

# Whole trainers or servers end to end: `pytest -m "not slow"` (make test-fast) skips them.
pytestmark = pytest.mark.slow

KINDS = ("currency.rate", "currency.convert")  # 1- and 2-call tasks: quick to sample
THRESHOLD = 0.35  # the briefly trained model's rollouts score 0.3-0.4: some pass, some do not


def _one_device():
    # One device instead of the 8 simulated ones: training is several times faster on 2 cores.
    return jax.devices()[:1]


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("rft")
    tasks = generate_tasks("train", 600, seed=0, kinds=list(KINDS))
    write_trajectories(root / "train.jsonl", tasks)
    write_trajectories(root / "base.jsonl", tasks[:40])
    config = sft_configs.get_config("tiny")
    config.data.train = str(root / "train.jsonl")
    config.data.seq_len = 384
    config.data.batch_size = 4
    config.train.steps = 100
    config.train.warmup_steps = 10
    config.train.checkpoint_every = 100
    config.train.async_checkpoints = False
    sft.train(config, root / "sft", progress=False, devices=_one_device())
    return root


def _rft_config(root):
    config = rft_configs.get_config("tiny")
    config.model.checkpoint = str(root / "sft" / "hf")
    config.rft.base_data = str(root / "base.jsonl")
    config.tasks.source = "jsonl"
    config.tasks.path = str(root / "train.jsonl")
    config.tasks.n = 8
    config.eval_tasks.n = 4
    config.eval_tasks.kinds = KINDS
    config.loop.max_len = 384
    config.loop.cache_len = 1024
    config.loop.max_new_tokens = 64
    config.loop.max_turns = 4
    config.rft.samples_per_task = 4
    config.rft.batch_tasks = 4  # two sampler batches
    config.rft.reward_threshold = THRESHOLD
    config.rft.max_per_task = 2
    config.sft.data.seq_len = 384
    config.sft.data.batch_size = 4
    config.sft.train.steps = 6
    config.sft.train.warmup_steps = 2
    config.sft.train.checkpoint_every = 6
    config.sft.train.log_every = 1
    config.sft.train.async_checkpoints = False
    return config


@pytest.fixture(scope="module")
def rft_run(sft_checkpoint, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rft_run") / "run"
    config = _rft_config(sft_checkpoint)
    summary = rft.run(config, run_dir, progress=False, devices=_one_device())
    return config, run_dir, summary


def test_accepted_records_are_rewarded_distinct_and_render_to_the_sampled_tokens(
    sft_checkpoint, rft_run
):
    config, run_dir, summary = rft_run
    records, _ = load_jsonl(run_dir / "round_0" / "accepted.jsonl")
    stats = json.loads((run_dir / "round_0" / "metrics.json").read_text())
    assert records, f"nothing accepted: {stats}"
    assert stats["accepted"] == len(records) == summary["accepted"]
    assert stats["sampled"] == 8 * 4
    assert stats["acceptance_rate"] == pytest.approx(len(records) / 32)
    assert 0.0 <= stats["sample_reward_mean"] <= 1.0
    # Every candidate checked is counted either way; none of the kept ones fails the check.
    assert stats["roundtrip"] + stats["not_roundtrip"] >= len(records)
    assert summary["roundtrip"] == stats["roundtrip"] >= len(records)
    assert stats["accepted_not_roundtrip"] == 0

    tokenizer = load_tokenizer(config.model.checkpoint)
    newline = tokenizer.encode("\n")
    per_task = {}
    for record in records:
        meta = record.metadata
        assert meta["source"] == "rft" and meta["round"] == 0 and meta["roundtrip"] is True
        assert meta["reward"] >= THRESHOLD
        assert meta["tier"] in ("exact", "fuzzy", "best_effort")
        assert record.messages[-1]["role"] == "assistant"
        assert any(m.get("tool_calls") for m in record.messages)  # the SFT'd model calls tools
        # The chat template renders the record back to exactly the tokens that were sampled.
        rendered = render(record.messages, record.tools, tokenizer)
        assert rendered.token_ids[-len(newline) :].tolist() == newline
        assert rft_data.token_key(rendered.token_ids[: -len(newline)]) == meta["tokens_sha1"]
        per_task.setdefault(meta["task_id"], []).append(meta["tokens_sha1"])
    for keys in per_task.values():
        assert len(keys) <= 2 and len(set(keys)) == len(keys)


def test_round_merges_base_and_accepted_trains_exports_and_evaluates(sft_checkpoint, rft_run):
    _, run_dir, summary = rft_run
    round_dir = run_dir / "round_0"
    base, _ = load_jsonl(sft_checkpoint / "base.jsonl")
    accepted, _ = load_jsonl(round_dir / "accepted.jsonl")
    merged, _ = load_jsonl(round_dir / "train.jsonl")
    assert [t.id for t in merged] == [t.id for t in base] + [t.id for t in accepted]
    assert len(merged) == 40 + len(accepted)

    sft_dir = round_dir / "sft"
    sft_config = json.loads((sft_dir / "config.json").read_text())
    assert sft_config["model"]["checkpoint"] == str(sft_checkpoint / "sft" / "hf")
    assert sft_config["data"]["train"] == str(round_dir / "train.jsonl")
    assert [m["step"] for m in read_metrics(sft_dir)] == [1, 2, 3, 4, 5, 6]
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (sft_dir / "hf" / name).exists(), name
    assert summary["final_checkpoint"] == str(sft_dir / "hf")

    for stage in ("eval_before", "eval_after"):
        assert summary[stage]["eval/tasks"] == 4
        assert 0.0 <= summary[stage]["eval/reward/total"] <= 1.0
    (logged,) = read_metrics(run_dir)
    assert logged["step"] == 1 and logged["rft/accepted"] == len(accepted)
    assert "eval/success_rate" in logged
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["accepted"] == summary["accepted"] and on_disk["rounds"] == 1


def test_rerun_skips_the_finished_round_and_reuses_complete_samples(rft_run):
    config, run_dir, summary = rft_run
    round_dir = run_dir / "round_0"
    accepted = round_dir / "accepted.jsonl"
    before = (accepted.read_bytes(), accepted.stat().st_mtime_ns)
    weights = round_dir / "sft" / "hf" / "model.safetensors"
    weights_mtime = weights.stat().st_mtime_ns

    again = rft.run(config, run_dir, progress=False, devices=_one_device())
    assert again["resumed_rounds"] == 1 and again["accepted"] == summary["accepted"]
    assert weights.stat().st_mtime_ns == weights_mtime  # no new SFT, no new export
    assert len(read_metrics(run_dir)) == 1

    # A round interrupted after sampling: the samples are reused, not drawn again or appended.
    (round_dir / "metrics.json").unlink()
    again = rft.run(config, run_dir, progress=False, devices=_one_device())
    assert again["resumed_rounds"] == 0 and again["accepted"] == summary["accepted"]
    assert (accepted.read_bytes(), accepted.stat().st_mtime_ns) == before
    merged, _ = load_jsonl(round_dir / "train.jsonl")
    assert len(merged) == len({t.id for t in merged}) == 40 + summary["accepted"]
    assert [m["step"] for m in read_metrics(round_dir / "sft")] == [1, 2, 3, 4, 5, 6]
    assert len(read_metrics(run_dir)) == 1

    # Other sampling settings in the same workdir are refused, not silently mixed in.
    changed = config.copy_and_resolve_references()
    changed.rft.reward_threshold = 0.9
    (round_dir / "metrics.json").unlink()
    with pytest.raises(TrainingError, match=r"sampled with other settings.*filter"):
        rft.run(changed, run_dir, progress=False, devices=_one_device())


def test_a_second_round_starts_from_the_first_round_s_export(sft_checkpoint, rft_run):
    config, run_dir, first = rft_run
    config = config.copy_and_resolve_references()
    config.rft.rounds = 2
    summary = rft.run(config, run_dir, progress=False, devices=_one_device())
    assert summary["rounds"] == 2
    round_0, round_1 = (json.loads((run_dir / f"round_{k}" / "metrics.json").read_text())
                        for k in (0, 1))  # fmt: skip
    assert round_1["checkpoint"] == round_0["export"] == str(run_dir / "round_0" / "sft" / "hf")
    assert round_1["eval_before"] == round_0["eval_after"]
    assert round_1["trained"], round_1
    sft_config = json.loads((run_dir / "round_1" / "sft" / "config.json").read_text())
    assert sft_config["model"]["checkpoint"] == round_0["export"]
    assert summary["final_checkpoint"] == str(run_dir / "round_1" / "sft" / "hf")
    assert (run_dir / "round_1" / "sft" / "hf" / "tokenizer.json").exists()
    # The round's data: base, then the accepted records of both rounds, each token sequence once.
    accepted = [load_jsonl(run_dir / f"round_{k}" / "accepted.jsonl")[0] for k in (0, 1)]
    merged, _ = load_jsonl(run_dir / "round_1" / "train.jsonl")
    keys = [t.metadata["tokens_sha1"] for t in merged[40:]]
    assert len(keys) == len(set(keys)) == round_1["merged_accepted"]
    assert set(keys) == {t.metadata["tokens_sha1"] for records in accepted for t in records}
    assert {t.metadata["round"] for t in merged[40:]} == {0, 1}
    assert summary["accepted"] == first["accepted"] + round_1["accepted"]
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]


def test_configs_and_command_line(tmp_path, capsys):
    for variant in rft_configs.VARIANTS:
        config = rft_configs.get_config(variant)
        assert config.sft.model.checkpoint == config.sft.data.train == ""
        assert config.sft.train.steps < sft_configs.get_config(variant).train.steps
        assert config.sft.train.lr < sft_configs.get_config(variant).train.lr
    # Sampling and the SFT rendering share one thinking switch, or nothing would round-trip.
    config.loop.enable_thinking = False
    assert config.sft.data.enable_thinking is False
    with pytest.raises(ValueError, match="unknown rft variant"):
        rft_configs.get_config("qwen3_14b")

    configs = Path(rft_configs.__file__).parent
    argv = ["rft", f"--config={configs / 'rft.py'}:tiny", f"--workdir={tmp_path}"]
    assert cli.main(argv) == 2
    assert "cacherl rft: error: config.model.checkpoint is empty" in capsys.readouterr().err


def test_missing_checkpoint_and_data_are_named(sft_checkpoint, tmp_path):
    config = _rft_config(sft_checkpoint)
    config.model.checkpoint = ""
    with pytest.raises(TrainingError, match=r"model.checkpoint is empty"):
        rft.run(config, tmp_path / "a", progress=False)
    config.model.checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(TrainingError, match=r"no config.json"):
        rft.run(config, tmp_path / "b", progress=False)
    config = _rft_config(sft_checkpoint)
    config.rft.base_data = f"{sft_checkpoint / 'base.jsonl'},{tmp_path / 'missing.jsonl'}"
    with pytest.raises(TrainingError, match=r"missing.jsonl does not exist"):
        rft.run(config, tmp_path / "c", progress=False)


# --- selection on hand-built rollouts -------------------------------------------------------------


def _rollout(task_id, sample, tokens, stop="answer"):
    n = len(tokens)
    zeros = np.zeros(n, np.int8)
    return Rollout(
        task_id=task_id, sample=sample, token_ids=np.asarray(tokens, np.int32), loss_mask=zeros,
        logprobs=np.zeros(n, np.float32), raw_logprobs=np.zeros(n, np.float32),
        thinking_mask=zeros, turn_ids=np.zeros(n, np.int32), prompt_length=1, turns=[],
        calls=[], final_answer="x", stop_reason=stop,
    )  # fmt: skip


def _result(rollout, reward, success=True):
    return TaskResult(
        task_id=rollout.task_id, sample=rollout.sample, success=success, process_accuracy=1.0,
        calls=0, stop_reason=rollout.stop_reason, generated_tokens=0,
        reward=Reward(total=reward, answer=1.0, process=1.0, format=1.0, validity=1.0, order=1.0,
                      meta_answer=False, tier="exact", answer_weight=0.6),
    )  # fmt: skip


def _select(specs, config, not_roundtrip=(), seen=None):
    rollouts = [_rollout(*spec[:3], **spec[4]) if len(spec) > 4 else _rollout(*spec[:3])
                for spec in specs]  # fmt: skip
    results = [_result(r, spec[3]) for r, spec in zip(rollouts, specs, strict=True)]
    asked = []

    def roundtrips(i):
        asked.append(i)
        return i not in not_roundtrip

    kept, counts = rft_data.select(rollouts, results, config, roundtrips, seen)
    return kept, counts, asked


def test_select_thresholds_dedups_caps_and_prefers_higher_rewards():
    specs = [
        ("a", 0, [1, 2, 3], 0.9),
        ("a", 1, [1, 2, 3], 0.95),  # same tokens as sample 0: one of them, the better one
        ("a", 2, [1, 2, 4], 0.49),  # below the threshold
        ("a", 3, [1, 2, 5], 0.7),
        ("a", 4, [1, 2, 6], 0.8),  # a's third distinct candidate: over the cap of 2
        ("b", 0, [7, 8], 1.0, {"stop": "max_turns"}),  # no final answer
        ("b", 1, [7, 9], 0.5),  # exactly the threshold
    ]
    config = rft_data.FilterConfig(reward_threshold=0.5, max_per_task=2)
    kept, counts, asked = _select(specs, config)
    assert kept == [1, 4, 6]
    assert counts["sampled"] == 7 and counts["finished"] == 6
    assert counts["above_threshold"] == counts["candidates"] == 5
    assert counts["duplicates"] == 1 and counts["over_cap"] == 1
    assert counts["roundtrip"] == 3 and counts["accepted"] == 3
    assert sorted(asked) == [1, 4, 6]  # the check runs only on what could be kept

    uncapped = rft_data.FilterConfig(reward_threshold=0.5)
    assert _select(specs, uncapped)[0] == [1, 3, 4, 6]


def test_select_round_trip_rule_success_filter_and_shared_seen():
    specs = [("a", 0, [1], 0.9), ("a", 1, [2], 0.8), ("b", 0, [3], 0.7)]
    strict = rft_data.FilterConfig(reward_threshold=0.5, max_per_task=1)
    kept, counts, _ = _select(specs, strict, not_roundtrip={0})
    # a/0 does not re-render to its tokens: the next-best a/1 takes its place.
    assert kept == [1, 2]
    assert counts["not_roundtrip"] == 1 and counts["roundtrip"] == 2
    assert counts["accepted_not_roundtrip"] == 0

    lenient = rft_data.FilterConfig(reward_threshold=0.5, max_per_task=1, keep_nonroundtrip=True)
    kept, counts, _ = _select(specs, lenient, not_roundtrip={0})
    assert kept == [0, 2] and counts["accepted_not_roundtrip"] == 1

    rollouts = [_rollout("a", 0, [1]), _rollout("a", 1, [2])]
    results = [_result(rollouts[0], 0.9, success=False), _result(rollouts[1], 0.6)]
    needs_success = rft_data.FilterConfig(reward_threshold=0.5, require_success=True)
    kept, counts = rft_data.select(rollouts, results, needs_success, lambda i: True)
    assert kept == [1] and counts["above_threshold"] == 2 and counts["candidates"] == 1

    # A later batch of the same round does not accept a token sequence seen before.
    seen = set()
    _select(specs, strict, seen=seen)
    kept, counts, _ = _select([("c", 0, [1], 0.9)], strict, seen=seen)
    assert kept == [] and counts["duplicates"] == 1


# --- the round-trip check on scripted rollouts ------------------------------------------------------


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    tasks = [t for t in generate_tasks("train", 30, seed=5, kinds=["currency.convert"])][:1]
    texts = [render_text(reference_trajectory(t).messages, t.tools) for t in tasks] * 20
    tokenizer = train_tokenizer(texts, 400, root / "tok", from_files=False)
    write_trajectories(root / "train.jsonl", tasks)
    cache = ToolCache(ToolCacheConfig(root / "cache.sqlite", scope_mode="scoped"))
    build_from_trajectories(cache, [root / "train.jsonl"], scope_per_trajectory=True)
    return tasks[0], tokenizer, cache


def _assistant_texts(task, tokenizer):
    """The reference's assistant turns as the model would generate them (through <|im_end|>)."""
    trajectory = reference_trajectory(task)
    rendered = render(trajectory.messages, trajectory.tools, tokenizer)
    return [
        tokenizer.decode(rendered.token_ids[(rendered.turn_ids == turn) & (rendered.loss_mask > 0)])
        for turn in sorted(set(rendered.turn_ids[rendered.loss_mask > 0].tolist()))
    ]


def _rollout_of(task, tokenizer, cache, turns_ids):
    loop = CacheAgentLoop(ScriptedPolicy([turns_ids]), tokenizer, cache, LoopConfig(group_size=1))
    (rollout,) = loop.run([task])
    return rollout


def test_roundtrip_check_accepts_the_template_s_own_tokens_only(scripted):
    task, tokenizer, cache = scripted
    texts = _assistant_texts(task, tokenizer)
    assert len(texts) == 3 and "<tool_call>" in texts[0]

    def check(turns_ids):
        rollout = _rollout_of(task, tokenizer, cache, turns_ids)
        assert rollout.stop_reason == "answer" and len(rollout.calls) == 2
        messages = rft_data.rollout_messages(task, rollout)
        assert [m["role"] for m in messages[-5:]] == ["assistant", "tool"] * 2 + ["assistant"]
        assert messages[-1]["content"] == rollout.final_answer
        return rft_data.roundtrip_mismatch(
            rollout, messages, rft_data.rollout_tools(task), tokenizer
        )

    # The template's own tokenisation of its own text: re-rendering gives the same ids.
    assert check([tokenizer.encode(t) for t in texts]) is None

    # The same text in another tokenisation (one token per character): same messages once
    # parsed, other token ids, so SFT on the re-rendered record would train unsampled tokens.
    split = [tokenizer.encode(t) for t in texts]
    body = texts[2].removesuffix("<|im_end|>")
    split[2] = [i for ch in body for i in tokenizer.encode(ch)] + tokenizer.encode("<|im_end|>")
    assert split[2] != tokenizer.encode(texts[2])
    why = check(split)
    assert why is not None and why.startswith("token ")

    # JSON with other spacing than the template writes: parses to the same call, renders apart.
    compact = texts[0].replace('", "arguments": ', '","arguments":')
    assert compact != texts[0]
    why = check([tokenizer.encode(compact), *(tokenizer.encode(t) for t in texts[1:])])
    assert why is not None and why.startswith("token ")


def test_multi_turn_rollouts_rebuild_every_user_turn_but_do_not_round_trip(scripted):
    """After a second user query the template drops the earlier turns' reasoning, so the
    re-rendered conversation is not what was sampled: such a rollout must not become SFT data."""
    task, tokenizer, cache = scripted
    follow_up = Turn([{"role": "user", "content": "And once more?"}], task.turns[0].reference_calls)
    two_turns = dataclasses.replace(task, turns=[task.turns[0], follow_up])
    ids = [tokenizer.encode(t) for t in _assistant_texts(task, tokenizer)]
    rollout = _rollout_of(two_turns, tokenizer, cache, ids + ids)
    assert rollout.stop_reason == "answer" and len(rollout.turns) == 6
    messages = rft_data.rollout_messages(two_turns, rollout)
    roles = [m["role"] for m in messages[len(task.messages) :]]
    one_turn = ["assistant", "tool", "assistant", "tool", "assistant"]
    assert roles == [*one_turn, "user", *one_turn]
    assert messages[len(task.messages) + 5]["content"] == "And once more?"
    why = rft_data.roundtrip_mismatch(
        rollout, messages, rft_data.rollout_tools(two_turns), tokenizer
    )
    assert why is not None and why.startswith("token ")
