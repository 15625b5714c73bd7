"""experiments/reproduce_paper.py end to end at the quick preset: two seeds, every variant, the
tables' statistics recomputed from the per-seed numbers, each ablation's settings read back from
its runs' resolved configs, titles that call it the CPU smoke ablation it is, and a rerun that
skips the finished work."""

import json
import statistics
from pathlib import Path

import ml_collections
import pytest
from quick_reproduction import SEEDS, VARIANTS, run

from cacherl_jax.model import count_params, load_hf_checkpoint
from cacherl_jax.pipeline_demo import apply_overrides

# Whole trainers or servers end to end: `pytest -m "not slow"` (make test-fast) skips them.
pytestmark = pytest.mark.slow

GRPO_VARIANTS = VARIANTS[:-1]
METRICS = ("eval/reward/total", "eval/process_accuracy", "eval/success_rate")


@pytest.fixture(scope="module")
def reproduced(quick_reproduction):
    return quick_reproduction


def _config(path: Path) -> dict:
    return json.loads(path.read_text())


def _stat(values):
    return statistics.fmean(values), statistics.stdev(values)


def test_every_variant_and_seed_ran_and_the_outputs_exist(reproduced):
    workdir, out, _, headline, stdout = reproduced
    assert headline["ran"] == len(SEEDS) * len(VARIANTS) and headline["skipped"] == 0
    assert headline["seeds"] == list(SEEDS) and headline["beta"] == 0.04
    for name in ("stage_table.md", "ablation_table.md", "results.json", "README.md"):
        assert (out / name).stat().st_size > 0
    assert not list(out.rglob("*.safetensors"))  # checkpoints stay under the workdir
    results = json.loads((out / "results.json").read_text())
    assert set(results["per_seed"]) == set(VARIANTS)
    for name in VARIANTS:
        assert set(results["per_seed"][name]) == {str(s) for s in SEEDS}
        for seed in SEEDS:
            assert (workdir / f"seed{seed}" / name / "result.json").exists()
    assert (
        "--preset quick" in results["command"]
        and results["command"] in (out / "README.md").read_text()
    )
    assert results["git"]["commit"] and results["sizes"]["sft_steps"] == 8
    stage_table = (out / "stage_table.md").read_text()
    ablation_table = (out / "ablation_table.md").read_text()
    assert stage_table.split("\n\n")[-1].strip() in stdout
    for title in ("no teacher reasoning", "no thinking", "exact-only cache", "fixed-weight"):
        assert title in ablation_table
    assert "no KL" in ablation_table and "SFT only" in ablation_table


def test_every_output_says_it_is_a_cpu_smoke_ablation_not_the_papers_result(reproduced):
    workdir, out, _, headline, stdout = reproduced
    _, params = load_hf_checkpoint(workdir / f"seed{SEEDS[0]}" / "full" / "sft" / "hf")
    n = count_params(params)
    results = json.loads((out / "results.json").read_text())
    assert headline["model_params"] == n and results["model"]["params"] == n
    assert results["model"]["num_layers"] == 4 and results["model"]["vocab_size"] == 512
    size = f"{n / 1e6:.1f}M-parameter model on the procedural suite"
    for name in ("stage_table.md", "ablation_table.md", "README.md"):
        title, _, body = (out / name).read_text().partition("\n")
        assert title.startswith("# CPU smoke ablation"), (name, title)
        assert size in title and "(not the paper's result)" in title, (name, title)
        assert f"{n:,} parameters" in body and "not the paper's result" in body, name
    assert f"CPU smoke ablation: a {size} (not the paper's result)" in stdout


def test_means_and_stds_are_those_of_the_per_seed_numbers(reproduced):
    _, out, _, headline, _ = reproduced
    results = json.loads((out / "results.json").read_text())
    per_seed, summary = results["per_seed"], results["summary"]
    stage_rows = (out / "stage_table.md").read_text()
    for stage, label in (("base", "base"), ("sft", "SFT"), ("grpo", "GRPO")):
        row = next(line for line in stage_rows.splitlines() if line.startswith(f"| {label} |"))
        for key in METRICS:
            mean, std = _stat([per_seed["full"][str(s)]["stages"][stage][key] for s in SEEDS])
            assert summary["stages"][stage][key]["mean"] == pytest.approx(mean, abs=1e-12)
            assert summary["stages"][stage][key]["std"] == pytest.approx(std, abs=1e-12)
            assert f"{mean:.3f} ± {std:.3f}" in row
    assert headline["grpo_reward_mean"] == pytest.approx(
        statistics.fmean(per_seed["full"][str(s)]["final"][METRICS[0]] for s in SEEDS)
    )
    ablation_rows = (out / "ablation_table.md").read_text().splitlines()
    for name in VARIANTS:
        finals = [per_seed[name][str(s)]["final"] for s in SEEDS]
        fulls = [per_seed["full"][str(s)]["final"] for s in SEEDS]
        title = results["variants"][name]["title"]
        row = next(line for line in ablation_rows if line.startswith(f"| {title} |"))
        for key in METRICS:
            mean, std = _stat([f[key] for f in finals])
            assert summary["variants"][name][key]["mean"] == pytest.approx(mean, abs=1e-12)
            assert summary["variants"][name][key]["std"] == pytest.approx(std, abs=1e-12)
            assert f"{mean:.3f} ± {std:.3f}" in row
            delta_mean, delta_std = _stat(
                [f[key] - g[key] for f, g in zip(finals, fulls, strict=True)]
            )
            assert summary["deltas"][name][key]["mean"] == pytest.approx(delta_mean, abs=1e-12)
            assert summary["deltas"][name][key]["std"] == pytest.approx(delta_std, abs=1e-12)
            if name != "full":
                assert f"{delta_mean:+.3f} ± {delta_std:.3f}" in row


def test_sft_only_is_the_full_runs_sft_stage(reproduced):
    workdir, out, _, _, _ = reproduced
    per_seed = json.loads((out / "results.json").read_text())["per_seed"]
    for seed in map(str, SEEDS):
        assert per_seed["sft_only"][seed]["final"] == per_seed["full"][seed]["stages"]["sft"]
        assert per_seed["sft_only"][seed]["grpo_train"] is None
        assert not (workdir / f"seed{seed}" / "sft_only" / "grpo").exists()
        assert not (workdir / f"seed{seed}" / "sft_only" / "sft").exists()
        # One evaluation of the full run's SFT model, which every variant sharing it read.
        memo = json.loads(
            (workdir / f"seed{seed}" / "full" / "sft" / "stage_eval.json").read_text()
        )
        assert len(memo) == 1


def _assistant_messages(path: str):
    for line in Path(path).read_text().splitlines():
        for message in json.loads(line)["messages"]:
            if message["role"] == "assistant":
                yield message


def test_each_variant_ran_with_its_settings(reproduced):
    workdir, _, _, _, _ = reproduced
    for seed in SEEDS:
        runs = workdir / f"seed{seed}"
        grpo = {name: _config(runs / name / "grpo" / "config.json") for name in GRPO_VARIANTS}
        sft = {n: _config(runs / n / "sft" / "config.json") for n in ("full", "no_reasoning", "no_thinking")}  # fmt: skip
        for name, config in grpo.items():
            assert config["seed"] == seed
            assert config["grpo"]["tasks_per_step"] == 4 and config["loop"]["group_size"] == 2
            assert config["loop"]["max_new_tokens"] == 32  # the quick preset's rollouts
            assert config["grpo"]["beta"] == (0.0 if name == "no_kl" else 0.04)
            assert config["reward"]["tier_aware"] is (name != "fixed_weight")
            assert config["cache"]["exact_only"] == (name == "exact_only")
            rules = {"matched_reward": "matched", "trusted_reward": "trusted"}
            assert config["reward"]["tier_rule"] == rules.get(name, "paper")
            assert config["loop"]["mode"] == ("live" if name == "live_tools" else "cache")
            assert config["loop"]["answer_rejections"] is (name == "answer_rejections")
            assert config["loop"]["enable_thinking"] is (False if name == "no_thinking" else None)
            # The ablations of the GRPO stage start from the full run's SFT model and data.
            own = name if name in sft else "full"
            assert config["model"]["checkpoint"] == str(runs / own / "sft" / "hf")
            # GRPO's tasks and cache: the other training tasks written beside SFT's data.
            grpo_tasks = str(Path(sft[own]["data"]["train"]).parent / "grpo.raw.jsonl")
            assert config["tasks"]["path"] == config["cache"]["build_from"] == grpo_tasks
            if own == "full" and name != "full":
                assert not (runs / name / "sft").exists()

        assert sft["full"]["data"]["enable_thinking"] is None
        assert sft["no_reasoning"]["data"]["enable_thinking"] is None
        assert sft["no_thinking"]["data"]["enable_thinking"] is False
        with_reasoning = list(_assistant_messages(sft["full"]["data"]["train"]))
        assert all(m.get("reasoning_content") for m in with_reasoning)
        for name in ("no_reasoning", "no_thinking"):
            messages = list(_assistant_messages(sft[name]["data"]["train"]))
            assert len(messages) == len(with_reasoning)
            assert not any(
                m.get("reasoning_content") or "<think>" in m["content"] for m in messages
            )
        assert sft["no_reasoning"]["data"]["train"].endswith("train.raw.jsonl")
        assert sft["full"]["train"]["steps"] == 8 and sft["full"]["seed"] == seed
        for name in sft:  # the quick preset's vocabulary: one set of shapes for every run
            assert sft[name]["tokenizer"]["train_vocab_size"] == 512
            assert _config(runs / name / "sft" / "hf" / "config.json")["vocab_size"] == 512


def test_the_results_folder_keeps_each_runs_metrics_and_validation_records(reproduced):
    workdir, out, _, _, _ = reproduced
    for seed in SEEDS:
        for name in VARIANTS:
            run_dir, kept = workdir / f"seed{seed}" / name, out / "runs" / f"seed{seed}" / name
            assert (kept / "result.json").read_bytes() == (run_dir / "result.json").read_bytes()
            stages = ("sft",) if name == "sft_only" else ("sft", "grpo")
            for stage in (*stages, "base") if name == "full" else stages:
                records = (kept / f"validation_{stage}.jsonl").read_text().splitlines()
                assert len(records) == 8  # the quick preset's validation tasks, one line each
            if name != "sft_only":
                assert (kept / "grpo_metrics.jsonl").read_bytes() == (
                    run_dir / "grpo" / "metrics.jsonl"
                ).read_bytes()
    claims = (out / "claims.md").read_text()
    for part in ("| cache |", "| live tools |", "| paper:", "| matched:", "| fixed:", "| exact |"):
        assert part in claims, part


def test_a_rerun_skips_finished_work(reproduced):
    workdir, out, compile_cache, _, _ = reproduced
    # A later session whose workdir lost a finished run finds it in the results folder.
    (workdir / f"seed{SEEDS[0]}" / "no_kl" / "result.json").unlink()
    results = sorted(workdir.rglob("result.json"))
    before = {path: path.stat().st_mtime_ns for path in results}
    stage_table = (out / "stage_table.md").read_text()
    headline, stdout = run(workdir, out, compile_cache)
    assert headline["ran"] == 0 and headline["skipped"] == len(SEEDS) * len(VARIANTS)
    assert stdout.count("done earlier, skipped") == len(SEEDS) * len(VARIANTS)
    assert {path: path.stat().st_mtime_ns for path in results} == before
    assert (out / "stage_table.md").read_text() == stage_table


def test_overrides_must_name_existing_fields_of_the_right_type():
    config = ml_collections.ConfigDict({"grpo": {"beta": 0.04}, "reward": {"tier_aware": True}})
    apply_overrides(config, {"grpo.beta": 0, "reward.tier_aware": False})
    assert config.grpo.beta == 0.0 and config.reward.tier_aware is False
    with pytest.raises(KeyError, match="betta"):
        apply_overrides(config, {"grpo.betta": 0.0})
    with pytest.raises(KeyError, match="no section 'grpoo'"):
        apply_overrides(config, {"grpoo.beta": 0.0})
    with pytest.raises(TypeError):
        apply_overrides(config, {"reward.tier_aware": "no"})
