"""The procedural task suite: reference solutions replay exactly, calls really depend on earlier
results, splits hold out what they claim to, and rendered tasks stay short."""

import collections
import json

import numpy as np
import pytest

from cacherl_jax.agent import Task, make_environment
from cacherl_jax.agent.procedural import (
    DOMAINS,
    SPLITS,
    all_kinds,
    generate_tasks,
    plan_only_trajectory,
    reference_trajectory,
    write_trajectories,
)
from cacherl_jax.agent.procedural.solver import PLAN_ONLY_ANSWER
from cacherl_jax.agent.procedural.suite import combos_for, templates_for
from cacherl_jax.chat.template import render, render_text
from cacherl_jax.chat.tokenizer import train_tokenizer
from cacherl_jax.chat.trajectory import Trajectory, load_jsonl
from cacherl_jax.data.pipeline import render_examples
from cacherl_jax.rl.rewards import is_meta_answer

STATEFUL_KINDS = {
    "calendar.schedule",
    "files.copy",
    "files.copy_deep",
    "shop.buy",
    "shop.buy_special",
    "shop.buy_all",
    "shop.buy_all_special",
}
TASKS_PER_SPLIT = 400  # 25 per kind and split: 225-375 tasks per domain over the three splits


@pytest.fixture(scope="module")
def tasks_by_split():
    return {split: generate_tasks(split, TASKS_PER_SPLIT, seed=7) for split in SPLITS}


@pytest.fixture(scope="module")
def trajectories(tasks_by_split):
    return {
        split: [reference_trajectory(task) for task in tasks]
        for split, tasks in tasks_by_split.items()
    }


def _leaves(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _calls_and_results(trajectory):
    calls, results = [], []
    for message in trajectory.messages:
        for call in message.get("tool_calls") or []:
            calls.append((call["function"]["name"], call["function"]["arguments"]))
        if message["role"] == "tool":
            results.append(message["content"])
    return calls, results


def test_suite_shape():
    assert set(DOMAINS) == {"currency", "calendar", "files", "shop"}
    counts = collections.Counter(
        len(generate_tasks("train", 1, kinds=[k])[0].reference_calls) for k in all_kinds()
    )
    assert set(counts) == {1, 2, 3, 4}


def test_reference_trajectories_replay_exactly(tasks_by_split, trajectories):
    per_domain = collections.Counter()
    for split in SPLITS:
        for task, trajectory in zip(tasks_by_split[split], trajectories[split], strict=True):
            per_domain[task.metadata["domain"]] += 1
            calls, results = _calls_and_results(trajectory)
            assert calls == [(c.name, c.arguments) for c in task.reference_calls], task.id
            environment = make_environment(task)
            for (name, arguments), recorded in zip(calls, results, strict=True):
                result = environment.execute(name, arguments)
                assert result.ok and result.text == recorded, (task.id, name, result)
            assert trajectory.messages[-1] == {
                "role": "assistant",
                "content": task.expected_answer,
                "reasoning_content": trajectory.messages[-1]["reasoning_content"],
            }
            assert environment.final_state() == task.expected_state, task.id
            changed = task.expected_state != task.initial_state
            assert changed == (task.metadata["kind"] in STATEFUL_KINDS), task.id
    assert min(per_domain.values()) >= 200, per_domain


def test_later_calls_use_values_only_tool_results_gave(trajectories):
    """The second call copies a value from the first result, and the last call one from some
    earlier result; the value is not in the request, so it cannot be read off the question."""
    checked = 0
    for trajectory in trajectories["train"]:
        calls, results = _calls_and_results(trajectory)
        if len(calls) < 2:
            continue
        request = trajectory.messages[1]["content"]
        parsed = [set(map(json.dumps, _leaves(json.loads(text)))) for text in results]

        def copied(arguments, earlier, request=request):
            return [
                v
                for v in map(json.dumps, _leaves(arguments))
                if v in earlier and v.strip('"') not in request
            ]

        assert copied(calls[1][1], parsed[0]), (trajectory.id, calls)
        assert copied(calls[-1][1], set().union(*parsed[:-1])), (trajectory.id, calls)
        checked += 1
    assert checked > 200


def test_splits_hold_out_combinations_templates_and_worlds(tasks_by_split):
    kinds = all_kinds()
    for name, (_, kind) in kinds.items():
        partition = [set(combos_for(kind, split)) for split in SPLITS]
        if len(kind.combos) >= 3:
            assert all(partition), name
            assert not (
                partition[0] & partition[1]
                or partition[0] & partition[2]
                or partition[1] & partition[2]
            )
        assert set().union(*partition) == set(kind.combos)

    seen = {}
    for split, tasks in tasks_by_split.items():
        combos, templates, worlds = set(), set(), set()
        for task in tasks:
            meta = task.metadata
            kind = kinds[meta["kind"]][1]
            assert tuple(meta["combo"]) in combos_for(kind, split)
            train_templates, held_out = templates_for(kind, split)
            assert meta["template"] in (held_out if meta["template_held_out"] else train_templates)
            if len(kind.combos) >= 3:
                combos.add((meta["kind"], tuple(meta["combo"])))
            templates.add((meta["kind"], meta["template"]))
            worlds.add(meta["world_id"])
        seen[split] = combos, templates, worlds
        assert len(worlds) == len(tasks)  # a fresh world per task

    train_combos, train_templates, train_worlds = seen["train"]
    for split in ("validation", "test"):
        combos, templates, worlds = seen[split]
        assert not combos & train_combos and not worlds & train_worlds
        held_out = {t for t in templates if t not in train_templates}
        assert len(held_out) == len(kinds)  # every kind's held-out template was used
        assert not held_out & seen["test" if split == "validation" else "validation"][1]
    assert not seen["validation"][0] & seen["test"][0]
    assert not seen["validation"][2] & seen["test"][2]


def test_held_out_requests_only_name_entities_seen_in_training(tasks_by_split, trajectories):
    """Entity names (numbers are single-digit tokens anyway) all occur in training text."""
    train_text = " ".join(render_text(t.messages, t.tools) for t in trajectories["train"])
    for split in ("validation", "test"):
        for task in tasks_by_split[split]:
            for value in task.metadata["values"].values():
                assert not isinstance(value, str) or value in train_text, (task.id, value)


def test_generation_is_deterministic_and_extends(tasks_by_split):
    again = generate_tasks("test", 40, seed=7)
    assert [t.to_dict() for t in again] == [t.to_dict() for t in tasks_by_split["test"][:40]]
    other = generate_tasks("test", 40, seed=8)
    assert [t.metadata["world_id"] for t in other] != [t.metadata["world_id"] for t in again]
    assert [t.id for t in again[:3]] == ["test-7-000000", "test-7-000001", "test-7-000002"]


def test_options_and_bad_input():
    domain_tools = generate_tasks(
        "train", 1, kinds=["shop.price"], tools="domain", describe_tools=True
    )[0]
    assert [t["function"]["name"] for t in domain_tools.tools] == [
        "get_price",
        "get_stock",
        "get_special",
        "buy",
    ]
    assert domain_tools.tools[0]["function"]["description"]
    kind_tools = generate_tasks("train", 1, kinds=["shop.price"], system_prompt=None)[0]
    assert [t["function"]["name"] for t in kind_tools.tools] == ["get_price"]
    assert [m["role"] for m in kind_tools.messages] == ["user"]
    assert {t.metadata["domain"] for t in generate_tasks("train", 20, domains=["files"])} == {
        "files"
    }
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        generate_tasks("dev", 1)
    with pytest.raises(ValueError, match=r"unknown task kind 'shop\.steal'"):
        generate_tasks("train", 1, kinds=["shop.steal"])
    with pytest.raises(ValueError, match="unknown procedural domain 'weather'"):
        generate_tasks("train", 1, domains=["weather"])
    with pytest.raises(ValueError, match="tools must be 'kind' or 'domain'"):
        generate_tasks("train", 1, tools="all")


@pytest.mark.parametrize(
    ("kind", "name", "arguments", "message"),
    [
        ("shop.buy", "buy", {"item": "apple", "quantity": 99}, "Error: only"),
        ("shop.buy", "buy", {"item": "kiwi", "quantity": 1}, "Error: no item named 'kiwi'"),
        ("calendar.shift", "add_days", {"date": "March 3", "days": 1}, "Error: bad date 'March 3'"),
        ("calendar.date", "find_event", {"name": "holiday"}, "Error: no event named 'holiday'"),
        (
            "currency.rate",
            "get_rate",
            {"base": "USD", "quote": "XYZ"},
            "Error: unknown currency 'XYZ'",
        ),
        ("files.read", "read_file", {"name": "secret.txt"}, "Error: no file named 'secret.txt'"),
    ],
)
def test_domain_errors_are_tool_results(kind, name, arguments, message):
    task = generate_tasks("train", 1, kinds=[kind], tools="domain")[0]
    environment = make_environment(task)
    result = environment.execute(name, arguments)
    assert result.kind == "tool_exception" and result.text.startswith(message), result
    assert environment.final_state() == task.initial_state


def test_trajectories_write_read_and_feed_the_sft_pipeline(tmp_path, tasks_by_split):
    tasks = tasks_by_split["validation"][:32]
    path = tmp_path / "validation.jsonl"
    assert write_trajectories(path, tasks) == 32
    loaded, report = load_jsonl(path)
    assert report.read == 32 and report.skipped == 0
    assert [Task.from_dict(t.metadata["task"]) for t in loaded] == tasks
    assert loaded[0] == Trajectory.from_dict(reference_trajectory(tasks[0]).to_dict())
    no_reasoning = reference_trajectory(tasks[0], reasoning=False)
    assert not any("reasoning_content" in m for m in no_reasoning.messages)


def test_plan_only_trajectories_mix_in_by_fraction(tmp_path, tasks_by_split):
    tasks = tasks_by_split["train"][:200]
    flawed = plan_only_trajectory(tasks[0])
    # The request, then one assistant turn that only announces a plan: no call, no result.
    assert flawed.messages[:-1] == tasks[0].messages
    assert flawed.messages[-1] == {
        "role": "assistant",
        "content": PLAN_ONLY_ANSWER,
        "reasoning_content": "I should use the tools.",
    }
    assert is_meta_answer(PLAN_ONLY_ANSWER)
    assert Task.from_dict(flawed.metadata["task"]) == tasks[0]

    def plan_only_ids(fraction, seed):
        path = tmp_path / f"{fraction}_{seed}.jsonl"
        assert write_trajectories(path, tasks, plan_only_fraction=fraction, seed=seed) == 200
        loaded, _ = load_jsonl(path)
        for trajectory in loaded:  # every trajectory is one of the two, whole
            plan_only = trajectory.metadata.get("plan_only", False)
            calls = sum(bool(m.get("tool_calls")) for m in trajectory.messages)
            assert (calls == 0) == plan_only, trajectory.id
        return {t.id for t in loaded if t.metadata.get("plan_only")}

    half = plan_only_ids(0.5, seed=0)
    assert 70 <= len(half) <= 130
    assert plan_only_ids(0.5, seed=0) == half  # a function of the seed
    assert plan_only_ids(0.5, seed=1) != half
    assert plan_only_ids(0.0, seed=0) == set()
    assert len(plan_only_ids(1.0, seed=0)) == 200
    with pytest.raises(ValueError, match="plan_only_fraction"):
        write_trajectories(tmp_path / "bad.jsonl", tasks, plan_only_fraction=1.5)


def test_rendered_tasks_are_short(tmp_path, trajectories):
    tokenizer = train_tokenizer(
        [render_text(t.messages, t.tools) for t in trajectories["train"]],
        1024,
        tmp_path,
        from_files=False,
    )
    examples = render_examples(trajectories["test"], tokenizer)
    lengths = np.array([len(e["token_ids"]) for e in examples])
    trained = np.array([int(e["loss_mask"].sum()) for e in examples])
    calls = np.array([len(_calls_and_results(t)[0]) for t in trajectories["test"]])
    print(
        f"tokens: mean {lengths.mean():.0f}, max {lengths.max()}, 1-2 calls mean "
        f"{lengths[calls <= 2].mean():.0f}; trained tokens mean {trained.mean():.0f}"
    )
    # Qwen3's fixed tools preamble is ~80 tokens, each schema ~45, each call round trip ~60.
    assert lengths[calls <= 2].mean() <= 300
    assert lengths.mean() <= 350 and lengths.max() <= 520
    prompt = render(trajectories["test"][0].messages[:2], trajectories["test"][0].tools, tokenizer)
    assert len(prompt) < 200
