"""N processes x D devices against 1 process x N*D devices, as a pod runs one process per host:
`cacherl sft`, `cacherl grpo` (greedy, and temperature 1 with a SIGKILL and a resume) and
`cacherl eval` give the same figures. Real `jax.distributed` processes, gloo collectives, the
coordinator on 127.0.0.1 (tests/multihost.py); the tool cache read-only (cache mode), so no host
sees another's writes."""

import json

import numpy as np
import pytest
from multihost import eval_flags, launch, run

from cacherl_jax.agent.tool_cache import ToolCache, ToolCacheConfig, build_from_trajectories
from cacherl_jax.train.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

TOTAL_DEVICES = 4
LAYOUTS = {"1x4": (1, 4), "2x2": (2, 2)}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def xla(tmp_path_factory):
    """One persistent compilation cache for the module's runs: runs of the same shapes compile
    once (greedy and sampled rollouts share the sampler's programs); a cached executable
    computes what a fresh one does."""
    return {"compilation_cache": tmp_path_factory.mktemp("xla-cache")}


def _compared(record: dict) -> list[str]:
    """The keys to compare: not timings, not paths into the run's own workdir."""
    skipped = ("time/", "seconds", "tokens_per_s")
    return sorted(
        k for k in record if not any(s in k for s in skipped) and k not in ("export", "checkpoint")
    )


def _same_figures(a: dict, b: dict, what: str) -> None:
    """Every number equal to TOLERANCE, every other value equal."""
    keys = _compared(a)
    assert keys == _compared(b), what
    for key in keys:
        if isinstance(a[key], dict):
            _same_figures(a[key], b[key], f"{what} {key}")
        elif isinstance(a[key], float | int):
            np.testing.assert_allclose(a[key], b[key], atol=TOLERANCE, err_msg=f"{what} {key}")
        else:
            assert a[key] == b[key], f"{what} {key}"


def _summaries(result) -> list[dict]:
    return [json.loads(line) for line in result.last_json_lines()]


@pytest.fixture(scope="module")
def shop(shop_sft_run, tmp_path_factory):
    """The shared SFT'd model and data, plus a tool cache built once from the solved
    trajectories and then only read."""
    root = shop_sft_run
    cache_path = tmp_path_factory.mktemp("cache") / "tool_cache.sqlite"
    cache = ToolCache(ToolCacheConfig(str(cache_path)))
    build_from_trajectories(cache, [str(root / "reference.jsonl")], scope_per_trajectory=True)
    cache.close()
    return root, cache_path


def test_sft_on_2x2_equals_1x4(shop, tmp_path, xla):
    """The same losses, norms and data counters at every step, whatever the process count."""
    root, _ = shop
    args = [
        "sft",
        "--config=configs/sft.py:tiny",
        f"--config.data.train={root / 'train.jsonl'}",
        "--config.data.seq_len=512",
        "--config.train.steps=3",
        "--config.train.checkpoint_every=3",
        "--config.train.log_every=1",
        "--config.train.export_hf=False",
    ]
    # 2 x 2 as two slices: a hybrid mesh, data parallel across processes (DCN), FSDP within.
    layouts = {"1x4": (1, 4, []), "2x2": (2, 2, ["--config.dcn_mesh.data=2"])}
    results = {}
    for name, (processes, devices, mesh_flags) in layouts.items():
        workdir = tmp_path / name
        result = run([*args, *mesh_flags, f"--workdir={workdir}"], processes=processes,
                     devices=devices, logs=tmp_path / f"{name}-logs", **xla)  # fmt: skip
        results[name] = (read_metrics(workdir), _summaries(result))
    (one, one_summary), (two, two_summary) = results["1x4"], results["2x2"]
    assert len(one) == len(two) == 3
    for step_one, step_two in zip(one, two, strict=True):
        _same_figures(step_one, step_two, f"step {step_one['step']}")
    _same_figures(two_summary[0], two_summary[1], "the two processes' summaries")
    _same_figures(one_summary[0], two_summary[0], "summary")
    assert one[-1]["param_norm"] > 0 and one[0]["loss"] > 0


def _grpo_args(root, cache_path, workdir, temperature: float) -> list[str]:
    return [
        "grpo",
        "--config=configs/grpo.py:tiny",
        f"--config.model.checkpoint={root / 'sft' / 'hf'}",
        f"--config.cache.path={cache_path}",
        "--config.tasks.source=jsonl",
        f"--config.tasks.path={root / 'train.jsonl'}",
        "--config.tasks.n=0",
        "--config.eval_tasks.n=2",
        "--config.grpo.tasks_per_step=4",
        "--config.grpo.minibatches=2",  # two updates a step, rows gathered across processes
        "--config.grpo.beta=0.04",  # the reference's log-prob pass and the KL term too
        "--config.loop.group_size=4",
        "--config.loop.max_new_tokens=48",
        "--config.loop.max_len=512",
        "--config.loop.cache_len=1024",
        f"--config.loop.temperature={temperature}",
        "--config.train.steps=2",
        "--config.train.checkpoint_every=1",
        "--config.train.async_checkpoints=False",
        "--config.train.eval_every=0",
        "--config.train.save_rollouts=True",
        "--config.train.export_hf=False",
        f"--workdir={workdir}",
    ]


def _rollouts(workdir, step: int) -> list[dict]:
    lines = (workdir / "rollouts" / f"step_{step}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _differing_token_share(a: list[dict], b: list[dict]) -> float:
    differ = total = 0
    for x, y in zip(a, b, strict=True):
        assert (x["task_id"], x["sample"]) == (y["task_id"], y["sample"])
        n = max(len(x["token_ids"]), len(y["token_ids"]))
        same = sum(s == t for s, t in zip(x["token_ids"], y["token_ids"], strict=False))
        differ, total = differ + n - same, total + n
    return differ / total


def test_grpo_greedy_on_2x2_equals_1x4(shop, tmp_path, xla):
    """Greedy rollouts: the same tokens, rewards, metrics and validation on both layouts, and
    both processes print the same summary."""
    root, cache_path = shop
    runs = {}
    for name, (processes, devices) in LAYOUTS.items():
        workdir = tmp_path / name
        result = run(_grpo_args(root, cache_path, workdir, 0.0), processes=processes,
                     devices=devices, logs=tmp_path / f"{name}-logs", **xla)  # fmt: skip
        runs[name] = workdir, _summaries(result)
    (one, one_summary), (two, two_summary) = runs["1x4"], runs["2x2"]
    for step in (1, 2):
        assert _rollouts(one, step) == _rollouts(two, step)  # tokens, masks, tiers, rewards
    for a, b in zip(read_metrics(one), read_metrics(two), strict=True):
        _same_figures(a, b, f"step {a['step']}")
    _same_figures(two_summary[0], two_summary[1], "the two processes' summaries")
    _same_figures(one_summary[0], two_summary[0], "summary")
    assert "eval_before" in one_summary[0] and one_summary[0]["loop/rollouts"] == 16


def test_grpo_sampled_on_2x2_resumes_after_sigkill(shop, tmp_path, xla):
    """Temperature 1: the 2 x 2 run finishes without deadlock although its hosts' rows end after
    different numbers of turns, and draws the tokens 1 x 4 draws (a draw can only flip within
    float rounding: the share that differs is reported). Both 2 x 2 processes are SIGKILLed
    after step 1's checkpoint; the restarted run's step 2 equals the uninterrupted one's."""
    root, cache_path = shop
    one = tmp_path / "1x4"
    run(
        _grpo_args(root, cache_path, one, 1.0),
        processes=1,
        devices=4,
        logs=tmp_path / "1x4-logs",
        **xla,
    )

    two = tmp_path / "2x2"
    args = _grpo_args(root, cache_path, two, 1.0)
    first = launch(args, processes=2, devices=2, logs=tmp_path / "2x2-first", **xla)
    _wait_for(
        lambda: (two / "checkpoints" / "1").exists() and not (two / "checkpoints" / "2").exists(),
        first,
    )
    first.kill()
    assert max(m["step"] for m in read_metrics(two)) == 1  # killed before step 2 finished
    run(args, processes=2, devices=2, logs=tmp_path / "2x2-resumed", **xla)

    share = np.mean([_differing_token_share(_rollouts(one, s), _rollouts(two, s)) for s in (1, 2)])
    print(f"share of rollout tokens that differ between 2x2 and 1x4 at temperature 1: {share:.4f}")
    assert share == 0.0, "expected none for the tiny model: a draw flips only within rounding"
    for a, b in zip(read_metrics(one), read_metrics(two), strict=True):
        _same_figures(a, b, f"step {a['step']}")
    assert any(m.get("groups_kept", 0) > 0 and abs(m["loss"]) > 0 for m in read_metrics(one)), (
        "no group carried a signal: the comparison would not test the update"
    )


def _wait_for(condition, launched, timeout: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        codes = [p.poll() for p in launched.procs]
        assert all(c is None for c in codes), (
            f"a process exited early ({codes}): {launched._tails()}"
        )
        assert time.monotonic() < deadline, "step 1's checkpoint never appeared"
        time.sleep(0.2)


def test_eval_on_2x2_equals_1x4(shop, tmp_path, xla):
    root, _ = shop
    tables = {}
    for name, (processes, devices) in LAYOUTS.items():
        output = tmp_path / name
        args = ["eval", f"--checkpoint={root / 'sft' / 'hf'}", "--suite=validation", "--n=6",
                "--max-new-tokens=48", "--max-len=512", f"--output={output}"]  # fmt: skip
        result = run(args, processes=processes, devices=devices, logs=tmp_path / f"{name}-logs",
                     flags=eval_flags, **xla)  # fmt: skip
        tables[name] = (output / "suite.json", result.outputs)
    one, two = (json.loads(tables[n][0].read_text()) for n in ("1x4", "2x2"))
    assert [r["task_id"] for r in one["results"]] == [r["task_id"] for r in two["results"]]
    _same_figures(one["metrics"], two["metrics"], "suite metrics")
    assert one["results"] == two["results"]
    assert one["metrics"]["tasks"] == 6


def test_rft_on_2x2_equals_1x4(shop, tmp_path, xla):
    """One round: each process samples its block of the tasks; the accepted records (duplicates
    across processes included) and the round's SFT are those of 1 x 4."""
    root, cache_path = shop
    args = [
        "rft",
        "--config=configs/rft.py:tiny",
        f"--config.model.checkpoint={root / 'sft' / 'hf'}",
        f"--config.rft.base_data={root / 'train.jsonl'}",
        f"--config.cache.path={cache_path}",
        "--config.tasks.source=jsonl",
        f"--config.tasks.path={root / 'train.jsonl'}",
        "--config.tasks.n=6",
        "--config.eval.enabled=False",  # evaluation: test_eval_on_2x2_equals_1x4
        "--config.rft.samples_per_task=2",
        "--config.rft.reward_threshold=0.0",
        "--config.loop.max_new_tokens=48",
        "--config.loop.temperature=0.0",
        # Rows share their batch's cache slots, so a full cache cuts a row short depending on
        # the other rows in its batch, which differ with the process count: room for all.
        "--config.loop.cache_len=4096",
        "--config.sft.train.steps=2",
        "--config.sft.train.checkpoint_every=2",
        "--config.sft.train.async_checkpoints=False",
        "--config.sft.data.seq_len=512",
    ]
    rounds = {}
    for name, (processes, devices) in LAYOUTS.items():
        workdir = tmp_path / name
        run([*args, f"--workdir={workdir}"], processes=processes, devices=devices,
            logs=tmp_path / f"{name}-logs", **xla)  # fmt: skip
        round_dir = workdir / "round_0"
        rounds[name] = (
            json.loads((round_dir / "metrics.json").read_text()),
            (round_dir / "accepted.jsonl").read_text(),
        )
    (one, one_accepted), (two, two_accepted) = rounds["1x4"], rounds["2x2"]
    assert one_accepted == two_accepted
    assert one["accepted"] > 0 and one["trained"], "nothing accepted: the SFT went untested"
    _same_figures(one, two, "round 0")
