"""`cacherl`: the command list and --help of every command, one-line errors for config typos,
`cacherl convert` in both directions, its error messages, and `cacherl check-model`."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import SHARDABLE_CONFIG

from cacherl_jax import cli, config_flags
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


REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
COMMANDS = ["sft", "grpo", "rft", "plan", "augment", "convert", "tokenizer", "chat"]
COMMANDS += ["check-model", "demo", "tasks", "cache", "eval", "serve"]


def test_help_lists_every_command_without_loading_jax():
    # What the console script runs; `cacherl --help` must not pay for JAX or the commands' modules.
    code = (
        "import sys; from cacherl_jax import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit as stop:\n    print(stop.code)\n"
        "print('jax' in sys.modules, sorted(m for m in sys.modules if m.startswith('cacherl_jax')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    *usage, exit_code, loaded = result.stdout.strip().splitlines()
    listed = {line.split()[0] for line in usage if line.startswith("    ") and line.split()}
    assert set(COMMANDS) <= listed
    assert exit_code == "0"
    assert loaded == "False ['cacherl_jax', 'cacherl_jax.cli', 'cacherl_jax.errors']"


def test_importing_the_cli_loads_no_jax():
    code = "import cacherl_jax.cli, sys; print('jax' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("command", "own_flag"),
    [
        ("sft", "--workdir=DIR"),
        ("grpo", "--workdir=DIR"),
        ("rft", "--workdir=DIR"),
        ("plan", "--cpu_devices=N"),
        ("augment", "--output=FILE"),
    ],
)
def test_config_commands_print_their_flags_for_help(command, own_flag, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cacherl {command} --config=FILE[:VARIANT]")
    assert own_flag in out and "--config.FIELD=VALUE" in out


def test_help_with_a_config_lists_its_fields(capsys):
    assert cli.main(["rft", f"--config={CONFIGS}/rft.py:tiny", "-h"]) == 0
    out = capsys.readouterr().out
    assert "  sft.train.steps = 300\n" in out and "  rft.samples_per_task = 4\n" in out


BAD_COMMAND_LINES = [
    (["sft", "--config=configs/sft.py:tiny", "--config.trian.steps=3"], "'trian.steps'", "'train.steps'"),
    (["sft", "--config=configs/sft.py:tiny", "--config.train.stpes=3"], "'train.stpes'", "'train.steps'"),
    (["sft", "--config=configs/sft.py:tyni"], "'tyni'", "'tiny'"),
    (["grpo", "--config=configs/grpo.py:qwen3_4B", "--workdir=w"], "'qwen3_4B'", "'qwen3_4b'"),
    (["rft", "--config=configs/rft.py:tiny", "--noconfig.model.rematt"], "'model.rematt'", "'model.remat'"),
    (["rft", "--config=configs/rft.py:tiny", "--wrokdir=w"], "'wrokdir'", "'workdir'"),
    (["plan", "--config=configs/sft.py:tiny", "--cpu_device=8"], "'cpu_device'", "'cpu_devices'"),
    (["augment", "--config=configs/augment.py:endpiont"], "'endpiont'", "'endpoint'"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "bad", "nearest"), BAD_COMMAND_LINES)
def test_a_typo_is_one_line_naming_the_key_and_the_nearest(argv, bad, nearest, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"cacherl {argv[0]}: error: ") and err.count("\n") == 1
    assert bad in err and f"did you mean {nearest}?" in err


def test_a_typo_from_the_console_script():
    cacherl = Path(sys.executable).parent / "cacherl"
    result = subprocess.run(
        [cacherl, "sft", "--config=configs/sft.py:tiny", "--config.trian.steps=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "cacherl sft: error: unknown config field 'trian.steps' in --config.trian.steps=3; "
        "did you mean 'train.steps'?\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sft", "--workdir=w"], "--config=FILE[:VARIANT] is required"),
        (["sft", f"--config={CONFIGS}/sft.py:tiny"], "--workdir=DIR is required"),
        (["sft", f"--config={CONFIGS}/sft.py:tiny", "--workdir=w", "extra"], "unexpected argument"),
        (["sft", f"--config={CONFIGS}/nothing.py", "--workdir=w"], "no config file"),
        (["sft", f"--config={CONFIGS}/sft.py", "--config.train.steps=many"], "invalid literal"),
    ],
)
def test_other_command_line_mistakes_are_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def _parse(command, *argv):
    flags = cli._config_flags(command)
    return config_flags.parse(command, argv, flags, summary="", example="")


def test_overrides_keep_ml_collections_semantics():
    parsed = _parse(
        "rft",
        f"--config={CONFIGS}/rft.py:tiny",
        "--config.sft.train.steps=7",
        "--config.loop.enable_thinking=false",
        "--noconfig.model.unroll_layers",
        "--config.sft.lora.targets=wq",
        "--config.sft.lora.targets=wv",
        "--workdir",
        "w",
        "--noprogress",
    )
    config = parsed.config
    assert parsed.flags == {"workdir": "w", "progress": False}
    assert config.sft.train.steps == 7 and config.model.unroll_layers is False
    assert config.sft.lora.targets == ("wq", "wv")
    # The thinking switch is one reference shared by sampling and the SFT rounds.
    assert config.loop.enable_thinking is False and config.sft.data.enable_thinking is False
    assert config.is_locked


def test_a_config_outside_a_package_loads_by_path(tmp_path):
    (tmp_path / "mine.py").write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    return ml_collections.ConfigDict({'arg': arg or 'none', 'steps': 1})\n"
    )
    assert config_flags.load_config(f"{tmp_path / 'mine.py'}:x").arg == "x"
    assert config_flags.load_config(str(tmp_path / "mine.py")).arg == "none"


def test_configs_load_from_any_directory(tmp_path):
    # The console script does not put the checkout on sys.path; configs still import `common`.
    code = (
        "import sys; from cacherl_jax.config_flags import load_config; "
        f"config = load_config({str(CONFIGS / 'rft.py')!r} + ':tiny'); "
        "print(config.sft.train.steps, sys.modules['configs.common'].__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["300", str(CONFIGS / "common.py")]


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
