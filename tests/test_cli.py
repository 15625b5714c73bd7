"""`cacherl convert` in both directions, its error messages, and `cacherl check-model`."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import SHARDABLE_CONFIG

from cacherl_jax import cli
from cacherl_jax.model import load_hf_checkpoint
from cacherl_jax.model.native_checkpoint import load_params


def test_convert_both_directions_preserves_every_parameter(hf_checkpoint_dir, tmp_path, capsys):
    source = hf_checkpoint_dir("shardable", SHARDABLE_CONFIG)
    assert cli.main(["convert", "hf-to-jax", str(source), str(tmp_path / "jax")]) == 0
    assert (
        cli.main(
            [
                "convert",
                "jax-to-hf",
                str(tmp_path / "jax"),
                str(tmp_path / "hf"),
                "--max-shard-gb",
                "0.0001",
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()

    _, original = load_hf_checkpoint(source)
    _, native = load_params(tmp_path / "jax")
    _, back = load_hf_checkpoint(tmp_path / "hf")
    for a, b, c in zip(
        jax.tree.leaves(original), jax.tree.leaves(native), jax.tree.leaves(back), strict=True
    ):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_convert_to_bfloat16(hf_checkpoint_dir, tmp_path):
    source = hf_checkpoint_dir("shardable", SHARDABLE_CONFIG)
    assert (
        cli.main(
            ["convert", "hf-to-jax", str(source), str(tmp_path / "jax"), "--dtype", "bfloat16"]
        )
        == 0
    )
    _, params = load_params(tmp_path / "jax")
    assert {x.dtype.name for x in jax.tree.leaves(params)} == {"bfloat16"}


def test_convert_reports_bad_input_without_traceback(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"]})
    )
    assert cli.main(["convert", "hf-to-jax", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cacherl convert: error:" in err and "GPT2LMHeadModel" in err and "Traceback" not in err

    assert cli.main(["convert", "jax-to-hf", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "checkpoint directory does not exist" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "cacherl_jax.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "convert" in result.stdout and "demo" in result.stdout


def test_check_model_runs_every_check(tmp_path, capsys):
    workdir = tmp_path / "check"
    assert (
        cli.main(
            [
                "check-model",
                "--workdir",
                str(workdir),
                "--seq-len",
                "128",
                "--mesh",
                "data=2,fsdp=2,tensor=2",
                "--cpu-devices",
                "8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "data=2 fsdp=2 tensor=2 (8 cpu devices)" in out
    report = json.loads((workdir / "report.json").read_text())
    assert all(step["ok"] for step in report["steps"])
    assert {p.name for p in workdir.iterdir()} == {"hf_random", "jax", "hf_export", "report.json"}


def _matmul_precision_after_cli_setup(env_value: str | None) -> str:
    """The JAX matmul precision a fresh process has after `full_float32_matmuls()`."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "JAX_DEFAULT_MATMUL_PRECISION"}
    if env_value is not None:
        env["JAX_DEFAULT_MATMUL_PRECISION"] = env_value
    code = (
        "import jax; from cacherl_jax.precision import full_float32_matmuls; full_float32_matmuls(); "
        "print(jax.config.jax_default_matmul_precision)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_commands_use_full_float32_matmuls_unless_the_user_chose():
    # JAX's GPU default is TF32; the commands ask for float32 like torch, but a user's choice wins.
    assert _matmul_precision_after_cli_setup(None) == "highest"
    assert _matmul_precision_after_cli_setup("tensorfloat32") == "tensorfloat32"


def test_tasks_writes_noisy_teacher_data_and_rejects_a_bad_fraction(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    argv = ["tasks", "--split", "train", "--n", "40", "--output", str(path)]
    assert cli.main([*argv, "--plan-only-fraction", "0.5"]) == 0
    assert capsys.readouterr().out.strip() == "40"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    plan_only = [r for r in records if r["metadata"].get("plan_only")]
    assert 0 < len(plan_only) < 40
    assert all(len(r["messages"]) == 3 for r in plan_only)  # system, user, the plan
    with pytest.raises(SystemExit) as stop:
        cli.main([*argv, "--plan-only-fraction", "1.5"])
    assert stop.value.code == 2
    assert "--plan-only-fraction: 1.5 is not a fraction in [0, 1]" in capsys.readouterr().err
