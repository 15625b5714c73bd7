"""Live tool latency (`make_environment(task, latency_s=...)`, `loop.tool_latency_s`): every call
of a slow environment sleeps first and answers as the plain one does; the config field reaches
the environments of the training loops (GRPO, RFT) and never those of evaluation."""

import math
import time
import types

import pytest
from scripted_policy import ScriptedPolicy

from cacherl_jax.agent import environment as environment_module
from cacherl_jax.agent import make_environment
from cacherl_jax.agent.loop import CacheAgentLoop
from cacherl_jax.agent.procedural import generate_tasks, reference_trajectory
from cacherl_jax.chat.template import render, render_text
from cacherl_jax.chat.tokenizer import train_tokenizer
from cacherl_jax.train import rft
from cacherl_jax.train.errors import TrainingError
from cacherl_jax.train.rollout_setup import loop_config, training_env
from configs import grpo as grpo_configs
from configs import rft as rft_configs


@pytest.fixture(scope="module")
def task():
    """A shop task whose reference changes the state, so final states can differ."""
    tasks = generate_tasks("train", 300, seed=5, domains=["shop"])
    return next(t for t in tasks if t.expected_state != t.initial_state)


def _calls(task):
    """The reference calls, plus an unknown tool and bad arguments (errors sleep too)."""
    calls = [(c.name, c.arguments) for c in task.reference_calls]
    return [*calls, ("no_such_tool", {}), (calls[0][0], {"unexpected": 1})]


def _run(environment, calls):
    """Each call's result and seconds, then the final state."""
    answers = []
    for name, arguments in calls:
        start = time.perf_counter()
        result = environment.execute(name, arguments)
        answers.append((result, time.perf_counter() - start))
    return answers, environment.final_state()


def test_a_slow_environment_sleeps_per_call_and_answers_as_the_plain_one(task):
    calls = _calls(task)
    plain, plain_state = _run(make_environment(task), calls)
    slow_env = make_environment(task, latency_s=0.05)
    slow, slow_state = _run(slow_env, calls)
    assert [r for r, _ in slow] == [r for r, _ in plain]
    assert {r.kind for r, _ in slow} == {"ok", "unknown_tool", "bad_arguments"}
    assert slow_state == plain_state == task.expected_state
    assert all(seconds >= 0.05 for _, seconds in slow)
    assert len(slow_env.history) == len(calls)
    # The rest of the protocol is the plain environment's.
    assert slow_env.tool_schemas() == make_environment(task).tool_schemas()
    slow_env.begin_turn(0)
    assert slow_env.final_state() == slow_state


@pytest.mark.parametrize("latency_s", [0.0, 0.25])
def test_sleep_is_called_exactly_when_the_latency_is_positive(task, latency_s, monkeypatch):
    slept = []
    monkeypatch.setattr(environment_module.time, "sleep", slept.append)
    environment = make_environment(task, latency_s=latency_s)
    assert environment.latency_s == latency_s
    calls = _calls(task)
    _run(environment, calls)
    assert slept == ([latency_s] * len(calls) if latency_s else [])


@pytest.mark.parametrize("latency_s", [-0.1, math.nan])
def test_a_negative_latency_is_refused(task, latency_s):
    with pytest.raises(ValueError, match="tool latency must be >= 0 seconds"):
        make_environment(task, latency_s=latency_s)


def test_grpo_config_latency_reaches_the_training_environments(task):
    config = grpo_configs.get_config("tiny")
    assert training_env(config)(task).latency_s == 0.0  # off by default
    config.loop.tool_latency_s = 0.25
    assert training_env(config)(task).latency_s == 0.25
    # The loop settings do not carry it (LoopConfig has no such field), evaluation's neither.
    assert loop_config(config).group_size == config.loop.group_size
    assert loop_config(config, evaluation=True).mode == config.eval.mode
    config.loop.tool_latency_s = -1.0
    with pytest.raises(TrainingError, match=r"loop\.tool_latency_s must be >= 0"):
        training_env(config)


def test_a_live_training_loop_pays_the_latency_in_its_tool_phase(task, tmp_path):
    """The loop GRPO trains with, live: its `tools_s` (what bench_grpo_step reports) holds every
    call's sleep, and the rollout ends in the reference's state."""
    trajectory = reference_trajectory(task)
    texts = [render_text(trajectory.messages, task.tools)]
    tokenizer = train_tokenizer(texts, 512, tmp_path, from_files=False)
    rendered = render(trajectory.messages, trajectory.tools, tokenizer)
    generated = rendered.loss_mask > 0
    turns = [rendered.token_ids[(rendered.turn_ids == t) & generated]
             for t in sorted(set(rendered.turn_ids[generated].tolist()))]  # fmt: skip
    config = grpo_configs.get_config("tiny")
    config.loop.update(mode="live", group_size=1, tool_latency_s=0.05)
    loop = CacheAgentLoop(
        ScriptedPolicy([turns]), tokenizer, None, loop_config(config), make_env=training_env(config)
    )
    (rollout,) = loop.run([task])
    assert len(rollout.calls) == len(task.reference_calls) >= 1
    assert {call.tier for call in rollout.calls} == {"live"}
    assert rollout.final_state == task.expected_state
    assert loop.metrics["tools_s"] >= 0.05 * len(rollout.calls)


def test_rft_samples_with_the_latency_and_evaluates_without(task, monkeypatch):
    config = rft_configs.get_config("tiny")
    config.loop.tool_latency_s = 0.25
    policy = types.SimpleNamespace(sampler=None, tokenizer=None)
    cache = object()  # cache mode only needs one to be given; nothing samples here
    sampling = rft._RoundSampling(policy, cache, [task], config, 0)
    assert sampling.loop.make_env(task).latency_s == 0.25
    loops = []

    def evaluate(loop, *args, **kwargs):
        loops.append(loop)
        return {}, []

    monkeypatch.setattr(rft, "evaluate", evaluate)
    rft._evaluate(policy, cache, [task], config)
    assert loops[0].make_env(task).latency_s == 0.0


def test_the_rft_fingerprint_ignores_the_latency():
    config = rft_configs.get_config("tiny")
    before = rft.sampling_fingerprint(config, "ckpt")
    config.loop.tool_latency_s = 1.0
    assert rft.sampling_fingerprint(config, "ckpt") == before
    config.loop.max_len += 1
    assert rft.sampling_fingerprint(config, "ckpt") != before
