"""GRPO end to end on the procedural suite: a briefly SFT'd tiny model, cache-backed rollouts,
the tier-aware reward, a rise of the validation reward, metrics, export and resume (the analysis
notebook on a results folder of GRPO runs: tests/test_notebook.py)."""

import numpy as np
import pytest
from shop_run import KINDS, SEQ_LEN

from cacherl_jax.agent.outcome import TIERS
from cacherl_jax.agent.procedural import generate_tasks
from cacherl_jax.train import grpo
from cacherl_jax.train.grpo_step import policy_temperature
from cacherl_jax.train.metrics import read_metrics
from configs import grpo as grpo_configs

# Whole trainers or servers end to end: `pytest -m "not slow"` (make test-fast) skips them.
pytestmark = pytest.mark.slow

GRPO_STEPS = 20


@pytest.fixture(scope="module")
def sft_checkpoint(shop_sft_run):
    return shop_sft_run


def _grpo_config(root, steps):
    config = grpo_configs.get_config("tiny")
    config.model.checkpoint = str(root / "sft" / "hf")
    config.cache.build_from = str(root / "reference.jsonl")
    config.tasks.source = "jsonl"
    config.tasks.path = str(root / "train.jsonl")
    config.tasks.n = 0
    # The expected reward under the policy (4 sampled rollouts a task, live tools), which moves
    # smoothly, rather than one greedy rollout, whose answer flips between modes.
    config.eval_tasks.n = 16
    config.eval_tasks.kinds = KINDS
    config.eval.samples = 4
    config.eval.temperature = 1.0
    config.loop.max_len = SEQ_LEN
    config.loop.cache_len = 1024
    config.loop.max_new_tokens = 64
    config.loop.max_turns = 4
    config.grpo.tasks_per_step = 4
    config.loop.group_size = 4
    config.train.steps = steps
    config.train.eval_every = 0
    config.train.checkpoint_every = 10
    config.train.async_checkpoints = False
    return config


@pytest.fixture(scope="module")
def grpo_run(sft_checkpoint, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("grpo_run") / "run"
    config = _grpo_config(sft_checkpoint, steps=GRPO_STEPS)
    summary = grpo.train(config, run_dir, progress=False)
    return config, run_dir, summary


def test_grpo_logs_every_metric_and_exports(grpo_run):
    _, run_dir, summary = grpo_run
    for stage in ("eval_before", "eval_after"):
        assert 0.0 <= summary[stage]["eval/reward/total"] <= 1.0
        assert summary[stage]["eval/tasks"] == 16
    records = [m for m in read_metrics(run_dir) if "reward/total" in m]
    assert [m["step"] for m in records] == list(range(1, GRPO_STEPS + 1))
    for key in ("kl_old", "clip_fraction", "entropy", "logp_gap_max", "loop/calls_exact",
                "time/sampling_s", "time/update_s", "response_tokens", "tier/exact_fraction",
                "reward/format", "reward/order", "groups_kept", "grad_norm",
                "time/fidelity_s"):  # fmt: skip
        assert key in records[-1], key
    # The SFT'd model makes tool calls, answered from the cache built from the trajectories.
    assert all(m["loop/calls_exact"] > 0 for m in records)
    # Sampler and trainer agree on the log-probs of the sampled tokens (first update of a step).
    assert max(m["logp_gap_max"] for m in records) < 1e-3
    # Tier fidelity (on in the tiny config): every cached call of a step is replayed on live tools,
    # with an agreement for each tier the step used; the run's totals add up the steps.
    for m in records:
        for tier in TIERS:
            assert m[f"fidelity/{tier}_calls"] == m[f"loop/calls_{tier}"], (m["step"], tier)
            assert (f"fidelity/{tier}_agreement" in m) == (m[f"loop/calls_{tier}"] > 0)
    run_tiers = summary["run_tiers"]
    assert run_tiers["rollouts"] == sum(m["loop/rollouts"] for m in records)
    assert sum(run_tiers[f"tier/{tier}_fraction"] for tier in TIERS) == pytest.approx(1.0)
    for tier in TIERS:
        steps = [m for m in records if m[f"fidelity/{tier}_calls"]]
        calls = sum(m[f"fidelity/{tier}_calls"] for m in steps)
        agree = sum(m[f"fidelity/{tier}_agreement"] * m[f"fidelity/{tier}_calls"] for m in steps)
        assert run_tiers[f"fidelity/{tier}_calls"] == calls
        assert run_tiers[f"fidelity/{tier}_agreement"] == (
            pytest.approx(agree / calls) if calls else None
        )
    # The cache holds the reference's results: an exact hit is the live result (unless the model
    # repeats a state-changing call); a best-effort answer seldom is.
    assert run_tiers["fidelity/exact_agreement"] >= 0.9
    assert (run_tiers["fidelity/best_effort_agreement"] or 0.0) < 0.5
    assert (run_dir / "hf" / "model.safetensors").exists()


def test_grpo_raises_the_validation_reward(grpo_run):
    """The SFT model ends about half its held-out tasks with a plan and no call; GRPO makes it act.

    Measured with `experiments/grpo_smoke.py` on this set-up (docs/demo.md, "A GRPO rise at test size"),
    seeds 0 / 1 / 2, step 0 -> 20: validation reward 0.114 -> 0.226, 0.151 -> 0.233, 0.151 ->
    0.233; meta answers 0.67 -> 0.14, 0.53 -> 0.14, 0.52 -> 0.14; calls per task 0.91 -> 2.16,
    1.28 -> 2.23, 1.28 -> 2.25; order score 0.15 -> 0.38, 0.24 -> 0.39, 0.23 -> 0.40. This test's
    own run (its SFT on 8 simulated devices rounds differently) measured 0.133 -> 0.190, 0.58 ->
    0.34, 1.03 -> 1.78 and 0.18 -> 0.32. The bounds leave room for another CPU's rounding to take
    another path.
    """
    _, _, summary = grpo_run
    before, after = summary["eval_before"], summary["eval_after"]
    print({k: (round(before[k], 3), round(after[k], 3)) for k in before if k.startswith("eval/")})
    assert after["eval/reward/total"] >= before["eval/reward/total"] + 0.04
    assert after["eval/reward/meta_answer"] <= before["eval/reward/meta_answer"] - 0.15
    assert after["eval/calls_per_task"] >= before["eval/calls_per_task"] + 0.5
    assert after["eval/reward/order"] >= before["eval/reward/order"] + 0.08


def test_grpo_resumes_where_it_stopped(grpo_run):
    config, run_dir, _ = grpo_run
    config = config.copy_and_resolve_references()
    config.train.steps = GRPO_STEPS + 2
    again = grpo.train(config, run_dir, progress=False)
    assert again["resumed_from"] == GRPO_STEPS
    steps = [m["step"] for m in read_metrics(run_dir) if "reward/total" in m]
    assert steps == list(range(1, GRPO_STEPS + 3))


def test_advantages_skip_groups_without_signal():
    rewards = np.array([[1.0, 0.0, 0.5, 0.5], [0.3, 0.3, 0.3, 0.3]])
    adv, keep = grpo.advantages_for(rewards, normalize_std=True, skip_equal=True)
    assert keep[0].all() and not keep[1].any()
    assert adv[0].sum() == pytest.approx(0.0, abs=1e-6) and adv[0, 0] > 0 > adv[0, 1]
    _, keep_all = grpo.advantages_for(rewards, normalize_std=False, skip_equal=False)
    assert keep_all.all()


def test_step_tasks_are_a_function_of_seed_and_step():
    tasks = generate_tasks("train", 50, seed=0)
    a = grpo.step_tasks(tasks, 7, 8, seed=1)
    assert [t.id for t in a] == [t.id for t in grpo.step_tasks(tasks, 7, 8, seed=1)]
    assert [t.id for t in a] != [t.id for t in grpo.step_tasks(tasks, 8, 8, seed=1)]
    assert len({t.id for t in a}) == 8


@pytest.mark.parametrize(
    "loop, message",
    [
        (dict(temperature=0.6, top_k=20), 'grpo.old_logp="recompute"'),
        (dict(temperature=0.6, top_p=0.95), 'grpo.old_logp="recompute"'),
    ],
)
def test_sampling_settings_the_trainer_cannot_follow_are_refused(tmp_path, loop, message):
    """The trainer optimises softmax(logits / T); the sampler records that policy's log-probs
    only without top-k / top-p filtering, so those settings need recomputed old log-probs.
    Greedy rollouts train the model's own distribution (T = 1)."""
    for temperature, policy in ((0.0, 1.0), (0.6, 0.6), (1.0, 1.0), (1.3, 1.3)):
        greedy = grpo_configs.get_config("tiny")
        greedy.loop.temperature = temperature
        assert policy_temperature(greedy) == policy
    config = grpo_configs.get_config("tiny")
    config.model.checkpoint = str(tmp_path / "sft")
    config.loop.update(loop)
    with pytest.raises(grpo.TrainingError, match=message):
        grpo.train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written
