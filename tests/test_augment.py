"""The hybrid-thinking pipeline: rules, validation, resumable output, a teacher over real HTTP with
injected faults, SIGKILL and rerun, and BFCL ground truth executed live.

The end-to-end run against our own `cacherl serve` and the local-checkpoint teacher (both need a
JAX model) are in test_augment_serve.py.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from openai_stub import OpenAIStub

from cacherl_jax.agent.environment import Task
from cacherl_jax.agent.tool_cache import ToolCache, ToolCacheConfig
from cacherl_jax.chat import render_text
from cacherl_jax.chat.trajectory import Trajectory, load_jsonl
from cacherl_jax.data.thinking import (
    AugmentRules,
    augment,
    augment_main,
    plan_record,
    sidecar_paths,
    validate_reasoning,
)
from cacherl_jax.data.thinking.rules import keeps_thinking
from configs import augment as augment_config

REPO = Path(__file__).resolve().parents[1]
ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers. Returns their sum.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
GOOD_REASONING = "The user wants a sum, so I call add with both numbers from the request."


def conversation(record_id, a, b, *, text_before_call="", reasoning=None):
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "add", "arguments": {"a": a, "b": b}},
    }
    assistant = {"role": "assistant", "content": text_before_call, "tool_calls": [call]}
    if reasoning is not None:
        assistant["reasoning_content"] = reasoning
    return {
        "id": record_id,
        "messages": [
            {"role": "system", "content": "You are a calculator."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            assistant,
            {
                "role": "tool",
                "tool_call_id": "c1",
                "name": "add",
                "content": json.dumps({"sum": a + b}),
            },
            {"role": "assistant", "content": f"The answer is {a + b}."},
        ],
        "tools": [ADD_TOOL],
        "metadata": {"source": "test"},
    }


def write_input(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def make_config(tmp_path, spec, variant="template", **overrides):
    config = augment_config.get_config(variant)
    config.input.spec = str(spec)
    config.output = str(tmp_path / "out.jsonl")
    for dotted, value in overrides.items():
        section = config
        *parents, name = dotted.split("__")
        for parent in parents:
            section = section[parent]
        section[name] = value
    return config


def output_ids(path):
    lines = Path(path).read_text().splitlines() if Path(path).exists() else []
    return [json.loads(line)["id"] for line in lines]


def endpoint_overrides(stub, **extra):
    return {
        "teacher__endpoint__base_url": stub.base_url,
        "teacher__endpoint__model": "stub",
        "teacher__endpoint__concurrency": 4,
        "teacher__endpoint__timeout_s": 0.5,
        "teacher__endpoint__max_retries": 3,
        "teacher__endpoint__backoff_initial_s": 0.01,
        "teacher__endpoint__backoff_max_s": 0.05,
        **extra,
    }


# --- rules ----------------------------------------------------------------------------------------


def test_plan_wraps_existing_text_keeps_reasoning_and_always_explains_the_answer():
    rules = AugmentRules()
    wrapped = plan_record(
        Trajectory.from_dict(conversation("w", 1, 2, text_before_call="Let me add these.")), rules
    )
    assert wrapped.origins == {2: "wrapped"}
    assert wrapped.trajectory.messages[2]["reasoning_content"] == "Let me add these."
    assert wrapped.trajectory.messages[2]["content"] == ""
    assert [(step.index, step.kind) for step in wrapped.steps] == [(4, "answer")]
    # The teacher sees the conversation before the step and the step as it was taken.
    (answer,) = wrapped.steps
    assert (
        answer.context
        == conversation("w", 1, 2, text_before_call="Let me add these.")["messages"][:4]
    )
    assert answer.message["content"] == "The answer is 3."

    existing = conversation("e", 1, 2, reasoning="I add 1 and 2 with add.")
    existing["messages"][4]["reasoning_content"] = "old answer reasoning"
    plan = plan_record(Trajectory.from_dict(existing), rules)
    assert plan.origins == {2: "existing"}
    assert [step.index for step in plan.steps] == [4]  # the final answer gets fresh reasoning
    assert "reasoning_content" not in plan.trajectory.messages[4]

    bare = plan_record(Trajectory.from_dict(conversation("b", 1, 2)), rules)
    assert [(step.index, step.kind, step.tool_names) for step in bare.steps] == [
        (2, "call", ["add"]),
        (4, "answer", []),
    ]


def test_plan_explains_only_rendered_steps_unless_asked_for_all():
    record = conversation("m", 1, 2)
    record["messages"] += [
        {"role": "user", "content": "And 5 plus 6?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 5, "b": 6}}}
        ]},
        {"role": "tool", "content": '{"sum": 11}'},
        {"role": "assistant", "content": "11."},
    ]  # fmt: skip
    trajectory = Trajectory.from_dict(record)
    assert [s.index for s in plan_record(trajectory, AugmentRules()).steps] == [6, 8]
    assert [s.index for s in plan_record(trajectory, AugmentRules(steps="all")).steps] == [
        2,
        4,
        6,
        8,
    ]


def test_no_thinking_share_is_deterministic():
    rules = AugmentRules(no_thinking_share=0.3, seed=7)
    ids = [f"record-{i}" for i in range(2000)]
    kept = [keeps_thinking(i, rules) for i in ids]
    assert kept == [keeps_thinking(i, rules) for i in ids]
    assert 0.27 < 1 - sum(kept) / len(kept) < 0.33
    plan = plan_record(
        Trajectory.from_dict(conversation(ids[kept.index(False)], 1, 2, reasoning="r")), rules
    )
    assert not plan.thinking and not plan.steps
    assert all("reasoning_content" not in m for m in plan.trajectory.messages)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ('I call add. <tool_call>\n{"name": "add"}\n</tool_call>', "tool_call_tag"),
        ("<think>I call add for the sum.</think>", "markup"),
        ('I call add with {"name": "add", "arguments": {"a": 1, "b": 2}} now.', "json_call"),
        ('Calling add: {"arguments": {"a": 1}, "name": "add"}', "json_call"),
        ("I will run add(a=1, b=2) to get the sum of both.", "call_syntax"),
        ("add it", "too_short"),
        ("I call add. " + "x" * 5000, "too_long"),
        ("I will sum the two numbers with the tool now.", "missing_tool_mention"),
        (GOOD_REASONING, None),
        ("The sum {of both} needs add; the result {a: 1} is not a call.", None),
    ],
)
def test_validate_reasoning(text, reason):
    assert validate_reasoning(text, ["add"], AugmentRules()) == reason


def test_tool_mention_accepts_spaced_names():
    rules = AugmentRules()
    assert (
        validate_reasoning("I need the get weather tool for Paris now.", ["get_weather"], rules)
        is None
    )


# --- template teacher: output, rerun, repair ------------------------------------------------------


def test_template_run_renders_thinking_where_the_rules_say_and_reruns_skip(tmp_path):
    records = [conversation(f"r{i}", i, 2 * i) for i in range(10)]
    records.append(conversation("wrapped", 3, 4, text_before_call="I should add 3 and 4."))
    source = write_input(tmp_path / "in.jsonl", records)
    config = make_config(
        tmp_path,
        source,
        rules__no_thinking_share=0.3,
        tool_cache__path=str(tmp_path / "cache.sqlite"),
    )
    summary = augment(config, progress=False)

    out, _ = load_jsonl(config.output)
    assert sorted(t.id for t in out) == sorted(r["id"] for r in records)
    thinking = [t for t in out if t.metadata["augment"]["thinking"]]
    plain = [t for t in out if not t.metadata["augment"]["thinking"]]
    assert thinking and plain
    for trajectory in thinking:
        text = render_text(trajectory.messages, trajectory.tools)
        for message in trajectory.messages[2:]:
            if message["role"] == "assistant":
                assert f"<think>\n{message['reasoning_content']}\n</think>\n\n" in text
        assert "add" in trajectory.messages[2]["reasoning_content"]
    for trajectory in plain:
        assert all("reasoning_content" not in m for m in trajectory.messages)
        assert render_text(trajectory.messages, trajectory.tools).endswith(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
            + trajectory.messages[-1]["content"]
            + "<|im_end|>\n"
        )
    wrapped = next(t for t in out if t.id == "wrapped")
    if wrapped.metadata["augment"]["thinking"]:
        assert wrapped.messages[2]["reasoning_content"] == "I should add 3 and 4."

    run = summary["run"]
    assert run["written"] == len(records) and run["rejected"] == 0
    assert run["no_thinking"] == len(plain)
    assert summary["dataset"]["records"] == len(records)
    assert sum(summary["dataset"]["histograms"]["reasoning_chars_per_step"].values()) == sum(
        1 for t in thinking for m in t.messages if m.get("reasoning_content")
    )
    assert summary["tool_cache"]["recorded"] == len(records)
    assert json.loads(sidecar_paths(config.output)[1].read_text())["run"] == run

    before = Path(config.output).read_bytes()
    again = augment(config, progress=False)
    assert again["run"]["skipped_done"] == len(records) and again["run"]["written"] == 0
    assert Path(config.output).read_bytes() == before
    assert len(again["previous_runs"]) == 1

    write_input(source, [*records, conversation("new", 5, 5)])
    augment(config, progress=False)
    assert output_ids(config.output) == [t.id for t in out] + ["new"]


def test_partial_last_line_is_cut_and_redone(tmp_path):
    source = write_input(tmp_path / "in.jsonl", [conversation(f"r{i}", i, 1) for i in range(5)])
    config = make_config(tmp_path, source)
    augment(config, progress=False)
    data = Path(config.output).read_bytes()
    Path(config.output).write_bytes(data[:-25])  # what a kill in the middle of a write leaves
    summary = augment(config, progress=False)
    assert summary["truncated_partial_line_bytes"] > 0 and summary["run"]["written"] == 1
    assert sorted(output_ids(config.output)) == [f"r{i}" for i in range(5)]


def test_bad_input_is_reported_by_file_line_field(tmp_path, capsys):
    bad = conversation("bad", 1, 1)
    bad["messages"][1]["role"] = "robot"
    question_only = {"id": "q", "messages": [{"role": "user", "content": "Hi?"}]}
    source = write_input(
        tmp_path / "in.jsonl",
        [conversation("ok", 1, 1), bad, conversation("ok2", 2, 2), question_only],
    )
    argv = [
        "--config=configs/augment.py",
        f"--input={source}",
        f"--output={tmp_path / 'out.jsonl'}",
        "--progress=false",
    ]
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with pytest.raises(SystemExit) as exit_info:
            augment_main(argv)
        assert exit_info.value.code == 2
        assert f"{source}:2: messages[1].role: must be one of" in capsys.readouterr().err
        augment_main([*argv, "--config.input.on_error=skip"])
    finally:
        os.chdir(cwd)
    # The failed run kept what it finished before the bad line; the rerun skips it.
    assert "1 written, 1 rejected, 1 already done" in capsys.readouterr().out
    assert sorted(output_ids(tmp_path / "out.jsonl")) == ["ok", "ok2"]
    (rejected,) = load_jsonl(sidecar_paths(tmp_path / "out.jsonl")[0])[0]
    assert (rejected.id, rejected.metadata["augment"]["reason"]) == ("q", "no_assistant_message")
    summary = json.loads(sidecar_paths(tmp_path / "out.jsonl")[1].read_text())
    assert summary["source"]["input_records_skipped"] == 1
    assert summary["source"]["input_errors"][0].startswith(f"{source}:2: messages[1].role")


# --- an endpoint teacher over HTTP ----------------------------------------------------------------


def _step_key(body):
    """Which step a request explains: its user prompt without the retry feedback."""
    return body["messages"][1]["content"].split("Your previous reply was rejected")[0]


def test_endpoint_faults_are_retried_counted_and_lose_nothing(tmp_path):
    """500s, hangs past the timeout and malformed bodies on the first try of every step; one record
    whose requests always fail ends in the rejected file, and a rerun with a healthy server
    completes it."""
    seen, injected, lock = {}, [], threading.Lock()
    faults = [None, "hang", b"{not json", b'{"choices": []}', b'{"object": "chat.completion"}']

    def flaky(body):
        key = _step_key(body)
        with lock:
            seen[key] = seen.get(key, 0) + 1
            first = seen[key] == 1
        if "666 plus" in key:
            return None
        if first:
            fault = faults[sum(map(ord, key)) % len(faults)]
            injected.append(repr(fault))
            if fault == "hang":
                time.sleep(1.0)  # past the 0.5 s timeout
                return GOOD_REASONING
            return fault
        return GOOD_REASONING

    records = [conversation(f"r{i}", i, 3) for i in range(9)] + [conversation("poison", 666, 1)]
    source = write_input(tmp_path / "in.jsonl", records)
    with OpenAIStub(flaky, usage=(100, 20)) as stub:
        config = make_config(
            tmp_path, source, "endpoint", **endpoint_overrides(stub),
            teacher__endpoint__price_input_per_mtok=1.0, teacher__endpoint__price_output_per_mtok=2.0,
        )  # fmt: skip
        summary = augment(config, progress=False)
    assert len(injected) == 18 and set(injected) == {repr(fault) for fault in faults}
    run = summary["run"]
    rejected_path = sidecar_paths(config.output)[0]
    rejected, _ = load_jsonl(rejected_path)
    assert summary["status"] == "completed"
    assert sorted(output_ids(config.output)) == sorted(f"r{i}" for i in range(9))
    assert [t.id for t in rejected] == ["poison"]
    assert rejected[0].metadata["augment"]["reason"] == "http_500"
    assert run["record_failures"] == {"http_500": 1}
    # Every healthy step failed once and then succeeded; the poison record's step failed
    # 1 + max_retries times (its other step too, or it was never tried: both count retries).
    assert run["retries"] >= 18 + 3
    assert run["teacher_errors"]["http_500"] >= 1
    successes = run["teacher_requests"] - run["teacher_failures"]
    assert successes == 18
    assert run["prompt_tokens"] == 100 * successes and run["completion_tokens"] == 20 * successes
    assert run["cost_usd"] == pytest.approx(successes * (100 * 1.0 + 20 * 2.0) / 1e6)
    for trajectory in load_jsonl(config.output)[0]:
        assert trajectory.messages[2]["reasoning_content"] == GOOD_REASONING

    with OpenAIStub(lambda body: GOOD_REASONING) as healthy:
        config.teacher.endpoint.base_url = healthy.base_url
        summary = augment(config, progress=False)
    assert summary["run"]["written"] == 1 and summary["run"]["skipped_done"] == 9
    assert sorted(output_ids(config.output)) == sorted(r["id"] for r in records)
    assert rejected_path.read_text() == ""


@pytest.mark.parametrize("on_invalid", ["drop_record", "drop_thinking", "template"])
def test_invalid_reasoning_is_regenerated_then_handled(tmp_path, on_invalid):
    def teacher(body):
        prompt = body["messages"][1]["content"]
        if "3 plus" in prompt:  # this record's steps never get a valid reasoning
            return "The numbers go into the tool."
        if "Your previous reply was rejected because it contained <tool_call>" in prompt:
            return GOOD_REASONING
        return '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'

    source = write_input(
        tmp_path / "in.jsonl", [conversation("good", 1, 2), conversation("bad", 3, 4)]
    )
    with OpenAIStub(teacher) as stub:
        config = make_config(
            tmp_path, source, "endpoint", **endpoint_overrides(stub), rules__on_invalid=on_invalid
        )
        summary = augment(config, progress=False)
    run = summary["run"]
    good = next(t for t in load_jsonl(config.output)[0] if t.id == "good")
    assert [s["attempts"] for s in good.metadata["augment"]["steps"]] == [2, 2]
    assert good.messages[2]["reasoning_content"] == GOOD_REASONING
    assert run["rejection_reasons"]["tool_call_tag"] == 2
    assert run["rejection_reasons"]["missing_tool_mention"] == 3  # max_attempts for the call step

    written = {t.id: t for t in load_jsonl(config.output)[0]}
    rejected = {t.id: t for t in load_jsonl(sidecar_paths(config.output)[0])[0]}
    if on_invalid == "drop_record":
        assert "bad" in rejected and "bad" not in written
        assert run["record_failures"] == {"invalid:missing_tool_mention": 1}
    elif on_invalid == "drop_thinking":
        assert written["bad"].metadata["augment"] == {
            "thinking": False,
            "reason": "invalid:missing_tool_mention",
        }
        assert all("reasoning_content" not in m for m in written["bad"].messages)
    else:
        origins = [s["origin"] for s in written["bad"].metadata["augment"]["steps"]]
        assert origins == ["template_fallback", "teacher"]
        assert "add" in written["bad"].messages[2]["reasoning_content"]


def test_budget_stops_submitting_and_a_rerun_continues(tmp_path):
    source = write_input(tmp_path / "in.jsonl", [conversation(f"r{i}", i, 1) for i in range(8)])
    with OpenAIStub(lambda body: GOOD_REASONING, usage=(1000, 0)) as stub:
        config = make_config(
            tmp_path, source, "endpoint", **endpoint_overrides(stub, teacher__endpoint__concurrency=1),
            teacher__endpoint__price_input_per_mtok=1000.0, run__max_cost_usd=3.0,
        )  # fmt: skip
        summary = augment(config, progress=False)
        assert summary["status"] == "budget_exhausted"
        assert 0 < summary["run"]["written"] < 8
        config.run.max_cost_usd = 0.0
        augment(config, progress=False)
    assert sorted(output_ids(config.output)) == [f"r{i}" for i in range(8)]


# --- SIGKILL and rerun ----------------------------------------------------------------------------


def augment_command(*args):
    """`cacherl augment ARGS` as a command line that runs this checkout's code."""
    main = (
        "import sys; from cacherl_jax.data.thinking import augment_main; augment_main(sys.argv[1:])"
    )
    return [sys.executable, "-c", main, *args]


def start_child(command):
    """Starts `command` with SIGINT at its default: a suite started in the background
    (`make test &`) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
    handler in the child."""
    return subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_sigkill_mid_run_then_rerun_writes_every_input_exactly_once(tmp_path):
    delay = {"s": 0.15}
    source = write_input(tmp_path / "in.jsonl", [conversation(f"r{i}", i, 7) for i in range(30)])
    output = tmp_path / "out.jsonl"

    def slow(body):
        time.sleep(delay["s"])
        return GOOD_REASONING

    with OpenAIStub(slow) as stub:
        command = augment_command(
            "--config=configs/augment.py:endpoint", f"--input={source}", f"--output={output}",
            "--progress=false", f"--config.teacher.endpoint.base_url={stub.base_url}",
            "--config.teacher.endpoint.concurrency=2", "--config.run.fsync_every=1",
        )  # fmt: skip
        process = start_child(command)
        deadline = time.monotonic() + 60
        while len(output_ids(output)) < 4 and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_with = len(output_ids(output))
        assert 4 <= killed_with < 30

        delay["s"] = 0.0
        rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    ids = output_ids(output)
    assert sorted(ids) == sorted(f"r{i}" for i in range(30)) and len(ids) == 30
    summary = json.loads(sidecar_paths(output)[1].read_text())
    assert summary["run"]["skipped_done"] >= killed_with
    assert summary["run"]["written"] == 30 - summary["run"]["skipped_done"]


# --- sources --------------------------------------------------------------------------------------


def test_bfcl_trajectories_match_a_fresh_live_execution(tmp_path):
    """Every multi_turn_base entry: the output's calls and tool results are those of a fresh
    execution of the task (rebuilt from the record itself) in the live BFCL environment."""
    from cacherl_jax.agent.bfcl import execute_ground_truth

    config = make_config(
        tmp_path, "bfcl:multi_turn_base", tool_cache__path=str(tmp_path / "cache.sqlite")
    )
    summary = augment(config, progress=False)
    trajectories, _ = load_jsonl(config.output)
    assert len(trajectories) == 200 and summary["run"]["rejected"] == 0

    total_calls = 0
    for trajectory in trajectories:
        task = Task.from_dict(trajectory.metadata["task"])
        fresh = execute_ground_truth(task)
        calls = [
            c
            for m in trajectory.messages
            if m["role"] == "assistant"
            for c in m.get("tool_calls", [])
        ]
        results = [m for m in trajectory.messages if m["role"] == "tool"]
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
            (call.name, call.arguments) for call in fresh
        ], trajectory.id
        assert [m["content"] for m in results] == [call.result.text for call in fresh], (
            trajectory.id
        )
        assert [m["tool_call_id"] for m in results] == [c["id"] for c in calls]
        assert sum(m["role"] == "user" for m in trajectory.messages) == len(task.turns)
        total_calls += len(fresh)
    assert total_calls == 1142
    cache = summary["tool_cache"]
    assert cache["calls_seen"] == 1142 and cache["recorded"] + cache["already_present"] == 1142


def test_procedural_solver_source_records_its_calls(tmp_path):
    cache_path = tmp_path / "cache.sqlite"
    config = make_config(tmp_path, "procedural:train:12:3", tool_cache__path=str(cache_path))
    augment(config, progress=False)
    trajectories, _ = load_jsonl(config.output)
    assert [t.id for t in trajectories] == [f"train-3-{i:06d}" for i in range(12)]
    with ToolCache(ToolCacheConfig(path=str(cache_path), scope_mode="scoped")) as cache:
        for trajectory in trajectories:
            pending = {}
            for message in trajectory.messages:
                for call in message.get("tool_calls", []):
                    pending = call["function"]
                if message["role"] == "tool":
                    hit = cache.lookup(pending["name"], pending["arguments"], scope=trajectory.id)
                    assert (hit.tier, hit.result) == ("exact", message["content"])


def test_ctrl_c_stops_at_once_keeps_finished_records_and_a_rerun_completes(tmp_path):
    """After SIGINT the run writes what is finished and its summary and exits 130 without waiting
    for requests that hang; nothing is written twice and a rerun completes the rest."""
    hang = {"after": 6}
    answered = []
    source = write_input(tmp_path / "in.jsonl", [conversation(f"r{i}", i, 9) for i in range(20)])
    output = tmp_path / "out.jsonl"

    def teacher(body):
        answered.append(1)
        if len(answered) > hang["after"]:
            time.sleep(30)  # far past anything the test waits for
        return GOOD_REASONING

    with OpenAIStub(teacher) as stub:
        command = augment_command(
            "--config=configs/augment.py:endpoint", f"--input={source}", f"--output={output}",
            "--progress=false", f"--config.teacher.endpoint.base_url={stub.base_url}",
            "--config.teacher.endpoint.concurrency=2", "--config.teacher.endpoint.timeout_s=60",
        )  # fmt: skip
        process = start_child(command)
        deadline = time.monotonic() + 60
        while len(answered) <= hang["after"] + 1 and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        assert process.wait(timeout=20) == 130
        assert time.monotonic() - started < 10
        summary = json.loads(sidecar_paths(output)[1].read_text())
        assert summary["status"] == "interrupted"
        assert 1 <= len(output_ids(output)) == summary["run"]["written"] < 20

        hang["after"] = 10**9
        rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    ids = output_ids(output)
    assert sorted(ids) == sorted(f"r{i}" for i in range(20)) and len(ids) == 20
