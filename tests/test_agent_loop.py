"""CacheAgentLoop: a scripted policy pins tokens, masks, tiers and stop reasons exactly; a real
tiny model checks that the rollout's log-probs are the training forward's (nothing re-tokenised)."""

import json

import jax
import numpy as np
import pytest
from scripted_policy import ScriptedPolicy

from cacherl_jax.agent.factory import make_environment
from cacherl_jax.agent.loop import CacheAgentLoop, LoopConfig, fidelity_report
from cacherl_jax.agent.procedural import generate_tasks, reference_trajectory, write_trajectories
from cacherl_jax.agent.tool_cache import ToolCache, ToolCacheConfig, build_from_trajectories
from cacherl_jax.chat.template import ROLE_IDS, render, render_text
from cacherl_jax.chat.tokenizer import train_tokenizer
from cacherl_jax.model import Qwen3Config, init_params
from cacherl_jax.rl.rewards import score_rollout
from cacherl_jax.sampling import Sampler
from cacherl_jax.train.grpo_step import rollouts_to_batch, target_logprobs


@pytest.fixture(scope="module")
def tasks():
    return generate_tasks("train", 60, seed=3)


@pytest.fixture(scope="module")
def tokenizer(tasks, tmp_path_factory):
    texts = [render_text(reference_trajectory(t).messages, t.tools) for t in tasks]
    return train_tokenizer(texts, 1024, tmp_path_factory.mktemp("tok"), from_files=False)


@pytest.fixture()
def cache(tasks, tmp_path):
    path = tmp_path / "train.jsonl"
    write_trajectories(path, tasks)
    cache = ToolCache(ToolCacheConfig(tmp_path / "cache.sqlite", scope_mode="scoped"))
    build_from_trajectories(cache, [path], scope_per_trajectory=True)
    return cache


def _reference_turns(task, tokenizer):
    """The reference trajectory rendered, and its assistant turns' token ids as the model would
    generate them (everything up to and including `<|im_end|>`)."""
    trajectory = reference_trajectory(task)
    rendered = render(trajectory.messages, trajectory.tools, tokenizer)
    turns = []
    for turn in sorted(set(rendered.turn_ids[rendered.loss_mask > 0].tolist())):
        turns.append(rendered.token_ids[(rendered.turn_ids == turn) & (rendered.loss_mask > 0)])
    return rendered, turns


def _by_calls(tasks, n):
    return [t for t in tasks if len(t.reference_calls) == n]


def test_replaying_the_reference_gives_the_reference_tokens_exactly(tasks, tokenizer, cache):
    """Scripted with the reference's own assistant tokens, the loop must rebuild the reference
    conversation token for token, with the loss mask on exactly the generated tokens."""
    chosen = _by_calls(tasks, 1)[:1] + _by_calls(tasks, 2)[:1] + _by_calls(tasks, 3)[:1]
    references = [_reference_turns(t, tokenizer) for t in chosen]
    policy = ScriptedPolicy([turns for _, turns in references])
    loop = CacheAgentLoop(policy, tokenizer, cache, LoopConfig(group_size=1, max_len=1024))
    rollouts = loop.run(chosen)
    for task, (rendered, turns), rollout in zip(chosen, references, rollouts, strict=True):
        # The template closes the conversation with "\n" after the final <|im_end|>; a rollout
        # ends on the <|im_end|> the model generated.
        end = int(np.flatnonzero(rendered.loss_mask)[-1]) + 1
        assert tokenizer.decode(rendered.token_ids[end:].tolist()) == "\n"
        rendered = type(rendered)(
            *(getattr(rendered, f)[:end] for f in rendered.__dataclass_fields__)
        )
        np.testing.assert_array_equal(rollout.token_ids, rendered.token_ids)
        np.testing.assert_array_equal(rollout.loss_mask, rendered.loss_mask)
        np.testing.assert_array_equal(rollout.thinking_mask, rendered.thinking_mask)
        np.testing.assert_array_equal(rollout.turn_ids, rendered.turn_ids)
        # The policy was conditioned on exactly the rollout's tokens (no extra, none missing).
        np.testing.assert_array_equal(policy.fed[chosen.index(task)], rollout.token_ids)
        # Sampler log-probs under the generated tokens, 0 elsewhere.
        generated = np.concatenate([-0.01 * (1 + np.arange(len(t))) for t in turns])
        generated -= chosen.index(task)
        np.testing.assert_allclose(rollout.logprobs[rollout.loss_mask > 0], generated, rtol=1e-6)
        assert not rollout.logprobs[rollout.loss_mask == 0].any()
        assert [c.tier for c in rollout.calls] == ["exact"] * len(task.reference_calls)
        assert rollout.stop_reason == "answer" and rollout.final_answer == task.expected_answer
        assert rollout.prompt_length == int(np.argmax(rendered.loss_mask))
        reward = score_rollout(task, rollout.outcome())
        assert reward.total == pytest.approx(1.0), reward
        roles = {rendered.role_ids[a] for a, _, _ in rollout.turn_boundaries()}
        assert ROLE_IDS["tool"] in roles or not task.reference_calls
    assert loop.metrics["calls_exact"] == 6 and loop.metrics["stop_answer"] == 3
    assert loop.metrics["rounds"] == 4  # the longest task: 3 calls + the answer


def _call_tokens(tokenizer, name, arguments, answer=None):
    body = json.dumps({"name": name, "arguments": arguments})
    text = f"<think>\nok\n</think>\n\n<tool_call>\n{body}\n</tool_call><|im_end|>"
    if answer is not None:
        text = f"<think>\nok\n</think>\n\n{answer}<|im_end|>"
    return tokenizer.encode(text)


def test_tiers_truncation_and_stop_reasons(tasks, tokenizer, cache):
    task = _by_calls(tasks, 2)[0]
    first = task.reference_calls[0]
    perturbed = dict(first.arguments)
    key = next(k for k, v in perturbed.items() if isinstance(v, str))
    perturbed[key] = perturbed[key] + "x"
    scripts = [
        # fuzzy (one argument value perturbed), then best_effort (a tool never recorded)
        [_call_tokens(tokenizer, first.name, perturbed), _call_tokens(tokenizer, "teleport", {}),
         _call_tokens(tokenizer, "", {}, answer="done")],
        # exact, then runs out of turns
        [_call_tokens(tokenizer, first.name, first.arguments)] * 3,
        # cut off mid-turn
        [tokenizer.encode("<think>\nI keep thinking and")],
    ]  # fmt: skip
    policy = ScriptedPolicy(scripts, stop_reasons={(2, 0): "length"})
    config = LoopConfig(group_size=1, max_turns=3, max_len=1024)
    a, b, c = CacheAgentLoop(policy, tokenizer, cache, config).run([task] * 3)
    assert [x.tier for x in a.calls] == ["fuzzy", "best_effort"] and a.worst_tier == "best_effort"
    assert 80 <= a.calls[0].score < 100 and a.calls[1].score == 0.0
    assert json.loads(a.calls[1].result)["error"] == "no_recorded_result"
    assert a.stop_reason == "answer" and a.final_answer == "done"
    assert [x.tier for x in b.calls] == ["exact", "exact"] and b.stop_reason == "max_turns"
    assert len(b.turns) == 3
    assert c.stop_reason == "max_tokens" and not c.calls and c.final_answer is None
    assert len(c.turns) == 1 and c.num_generated == len(scripts[2][0])


def test_answer_rejections_gives_a_refused_call_the_environments_error(tasks, tokenizer, cache):
    """With `answer_rejections`, a call to a tool the task does not offer and one whose
    arguments its schema rejects get, in cache mode, exactly the text a live environment answers
    them with (tier "rejected", counted as exact); a valid call still comes from the cache.
    Without it the unknown tool gets the cache's "no recorded result"."""
    task = _by_calls(tasks, 2)[0]
    first = task.reference_calls[0]
    calls = [("teleport", {"to": "moon"}), (first.name, {}), (first.name, first.arguments)]
    script = [_call_tokens(tokenizer, name, arguments) for name, arguments in calls]
    script.append(_call_tokens(tokenizer, "", {}, answer="done"))
    env = make_environment(task)
    live = [env.execute(name, arguments) for name, arguments in calls]
    assert [r.kind for r in live[:2]] == ["unknown_tool", "bad_arguments"]

    config = LoopConfig(group_size=1, max_turns=4, answer_rejections=True)
    loop = CacheAgentLoop(ScriptedPolicy([script]), tokenizer, cache, config)
    (rollout,) = loop.run([task])
    assert [c.tier for c in rollout.calls] == ["rejected", "rejected", "exact"]
    assert [c.result for c in rollout.calls] == [r.text for r in live]
    assert [c.result_kind for c in rollout.calls[:2]] == ["unknown_tool", "bad_arguments"]
    assert rollout.worst_tier == "exact" and loop.metrics["calls_rejected"] == 2.0

    plain = LoopConfig(group_size=1, max_turns=4)
    (before,) = CacheAgentLoop(ScriptedPolicy([script]), tokenizer, cache, plain).run([task])
    assert before.calls[0].tier == "best_effort"
    assert json.loads(before.calls[0].result)["error"] == "no_recorded_result"


def test_tool_results_are_truncated_by_tokens(tasks, tokenizer, cache):
    task = _by_calls(tasks, 1)[0]
    turns = _reference_turns(task, tokenizer)[1]
    config = LoopConfig(group_size=1, tool_result_max_tokens=3)
    rollout = CacheAgentLoop(ScriptedPolicy([turns]), tokenizer, cache, config).run([task])[0]
    (call,) = rollout.calls
    full = cache.lookup(call.name, call.arguments, scope=task.id).result
    assert call.truncated_tokens == len(tokenizer.encode(full)) - 3 > 0
    head, note = call.result.rsplit("\n", 1)
    assert note == f"[truncated: {call.truncated_tokens} more tokens]"
    assert tokenizer.encode(full)[:3] == tokenizer.encode(head)
    # What the model saw is the truncated text.
    assert head in tokenizer.decode(rollout.token_ids[rollout.loss_mask == 0].tolist())


def test_live_mode_runs_the_environment_and_reports_its_state(tasks, tokenizer):
    shop = [t for t in generate_tasks("train", 300, seed=5, domains=["shop"])
            if t.expected_state != t.initial_state][:2]  # fmt: skip
    scripts = [_reference_turns(t, tokenizer)[1] for t in shop]
    rollouts = CacheAgentLoop(
        ScriptedPolicy(scripts), tokenizer, None, LoopConfig(group_size=1, mode="live")
    ).run(shop)
    for task, rollout in zip(shop, rollouts, strict=True):
        assert {c.tier for c in rollout.calls} == {"live"}
        assert rollout.final_state == task.expected_state
        assert score_rollout(task, rollout.outcome()).answer == 1.0


def test_hybrid_writes_live_results_back(tasks, tokenizer, tmp_path):
    task = _by_calls(tasks, 1)[0]
    cache = ToolCache(ToolCacheConfig(tmp_path / "empty.sqlite", scope_mode="scoped"))
    turns = _reference_turns(task, tokenizer)[1]
    config = LoopConfig(group_size=1, mode="hybrid")
    first = CacheAgentLoop(ScriptedPolicy([turns]), tokenizer, cache, config).run([task])[0]
    again = CacheAgentLoop(ScriptedPolicy([turns]), tokenizer, cache, config).run([task])[0]
    assert [c.tier for c in first.calls] == ["live"] and [c.tier for c in again.calls] == ["exact"]
    assert first.calls[0].result == again.calls[0].result


def test_fidelity_report(tasks, cache):
    chosen = tasks[:20]
    calls = {t.id: [(c.name, c.arguments) for c in t.reference_calls] for t in chosen}
    report = fidelity_report(chosen, calls, cache)
    exact = report["by_tier"]["exact"]
    assert exact["calls"] == report["calls"] == sum(len(v) for v in calls.values())
    assert exact["agreement"] == 1.0


def test_prompts_longer_than_max_len_are_refused(tasks, tokenizer, cache):
    loop = CacheAgentLoop(
        ScriptedPolicy([[]]), tokenizer, cache, LoopConfig(group_size=1, max_len=8)
    )
    with pytest.raises(ValueError, match="max_len is 8"):
        loop.run(tasks[:1])


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_a_real_tiny_model_drives_the_loop(tasks, tokenizer, cache, temperature):
    """Random weights emit mostly junk; what must hold is that the rollout's sampler log-probs are
    what the training forward computes on the rollout's tokens (1e-4), for every generated token,
    across several turns: the KV-cache continuation and the token bookkeeping agree. At a
    temperature T the sampled policy is softmax(logits / T), GRPO's trainer at T computes the
    same, and the raw log-probs stay those of temperature 1."""
    config = Qwen3Config(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, tie_word_embeddings=True,
    )  # fmt: skip
    params = init_params(config, jax.random.key(0))
    loop_config = LoopConfig(
        group_size=3, max_new_tokens=24, max_turns=3, max_len=768, temperature=temperature
    )
    sampler = Sampler(params, config)
    chosen = _by_calls(tasks, 2)[:2]
    rollouts = CacheAgentLoop(sampler, tokenizer, cache, loop_config).run(chosen, seed=1)
    assert len(rollouts) == 6 and [r.sample for r in rollouts] == [0, 1, 2] * 2
    for r in rollouts:
        assert r.num_generated > 0
        assert r.stop_reason in ("answer", "max_turns", "max_tokens")
    seq_len = max(len(r.token_ids) for r in rollouts)
    batch = rollouts_to_batch(
        [r.token_ids for r in rollouts], [r.loss_mask for r in rollouts],
        [r.logprobs for r in rollouts], [0.0] * len(rollouts), seq_len,
    )  # fmt: skip
    trainer = np.asarray(target_logprobs(params, config, batch, temperature=temperature))
    mask = batch["loss_mask_BxT"] > 0
    gap = np.abs(trainer - batch["old_logp_BxT"])[mask]
    assert mask.sum() == sum(r.num_generated for r in rollouts)
    assert gap.max() < 1e-4, gap.max()
    raw = np.concatenate([r.raw_logprobs[np.asarray(r.loss_mask) > 0] for r in rollouts])
    trainer_t1 = np.asarray(target_logprobs(params, config, batch))[mask]
    assert np.abs(trainer_t1 - raw).max() < 1e-4
    # Different samples of one task differ (seeds per row).
    assert not np.array_equal(rollouts[0].token_ids, rollouts[1].token_ids)
