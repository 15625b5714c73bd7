"""The SFT trainer: learning, masking, exact resume after SIGKILL, sharding, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sft_data import addition_trajectories

from cacherl_jax import cli, parallel
from cacherl_jax.chat.trajectory import write_jsonl
from cacherl_jax.data import pipeline as data_pipeline
from cacherl_jax.model import init_params, load_hf_checkpoint, presets
from cacherl_jax.train import sft
from cacherl_jax.train.errors import CheckpointMismatchError, TrainingError
from cacherl_jax.train.metrics import read_metrics
from cacherl_jax.train.optimizer import init_optimizer_state, make_optimizer
from configs import sft as sft_configs

# Whole trainers or servers end to end: `pytest -m "not slow"` (make test-fast) skips them.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def train(config, workdir, **kwargs):
    """In-process runs use one of the 8 simulated devices (the sharding test covers eight)."""
    config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    return sft.train(config, workdir, progress=False, devices=jax.devices()[:1], **kwargs)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_jsonl(path, addition_trajectories(48))
    return path


def small_config(data_file, **train):
    """The `tiny` variant for tests: 256-token rows, batch 4, a small tokenizer of its own."""
    config = sft_configs.get_config("tiny")
    config.data.train = str(data_file)
    config.data.seq_len = 256
    config.data.batch_size = 4
    config.tokenizer.train_vocab_size = 512
    config.train.steps = 20
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.train.warmup_steps = 2
    config.train.async_checkpoints = False
    config.model.unroll_layers = False
    config.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    for key, value in train.items():
        config.train[key] = value
    return config


def test_sft_overfits_a_small_set_and_writes_a_run_directory(tmp_path):
    data = tmp_path / "small.jsonl"
    write_jsonl(data, addition_trajectories(8))
    config = small_config(data, steps=60, lr=1e-2, log_every=10, checkpoint_every=30)
    summary = train(config, tmp_path / "run")
    tmp_path = tmp_path / "run"
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(10, 61, 10))
    assert metrics[-1]["loss"] < metrics[0]["loss"] / 2.5, [m["loss"] for m in metrics]
    for key in (
        "loss",
        "trained_tokens",
        "grad_norm",
        "param_norm",
        "update_norm",
        "lr",
        "tokens_per_s",
    ):
        assert np.isfinite(metrics[-1][key]), key
    assert json.loads((tmp_path / "config.json").read_text())["data"]["seq_len"] == 256
    assert list((tmp_path / "tensorboard").iterdir())
    # The export is a Hugging Face checkpoint of the trained weights, with the tokenizer beside it.
    config_back, params = load_hf_checkpoint(summary["export"])
    assert (Path(summary["export"]) / "tokenizer.json").exists() and config_back.num_layers == 4
    assert float(jnp.abs(params["embed"]).sum()) > 0


def _step_setup(config, mesh, batches):
    model = presets.preset("tiny", vocab_size=512, unroll_layers=False)
    tx, schedule = make_optimizer(config.train)
    params = init_params(model, jax.random.key(0), mesh=mesh)
    opt_state = init_optimizer_state(tx, params, mesh)
    mu = opt_state[1][0].mu  # Adam's first moment is sharded like the parameter it follows
    assert all(jax.tree.leaves(jax.tree.map(lambda m, p: m.sharding == p.sharding, mu, params)))
    state = {"step": jnp.zeros((), jnp.int32), "trainable": params, "opt_state": opt_state}
    step_config = sft.StepConfig(model, None, config.train.grad_accum, 1.0, 512)
    step = jax.jit(sft.make_train_step(step_config, tx, schedule))
    sharding = parallel.batch_sharding(mesh)
    losses = []
    for batch in batches:
        state, metrics = step(state, None, sft._to_global(batch, sharding))
        losses.append(float(metrics["loss"]))
    return state, losses


def _batches(data_file, n, batch_size=8):
    from cacherl_jax.chat import train_tokenizer
    from cacherl_jax.chat.template import render_text
    from cacherl_jax.chat.trajectory import load_jsonl

    trajectories, _ = load_jsonl(data_file)
    tokenizer = train_tokenizer(
        (render_text(t.messages, t.tools) for t in trajectories),
        512,
        data_file.parent / "tok",
        from_files=False,
    )
    examples = data_pipeline.render_examples(trajectories, tokenizer)
    config = data_pipeline.PipelineConfig(
        seq_len=256, batch_size=batch_size, pad_id=tokenizer.pad_id
    )
    iterator = iter(data_pipeline.make_dataset(examples, config))
    return [next(iterator) for _ in range(n)]


def test_sharded_training_matches_one_device(data_file):
    config = small_config(data_file, lr=5e-3)
    batches = _batches(data_file, 4)
    one = parallel.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    eight = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state_one, losses_one = _step_setup(config, one, batches)
    state_eight, losses_eight = _step_setup(config, eight, batches)
    np.testing.assert_allclose(losses_eight, losses_one, rtol=2e-5)
    assert losses_one[-1] < losses_one[0]
    for a, b in zip(
        jax.tree.leaves(state_eight["trainable"]),
        jax.tree.leaves(state_one["trainable"]),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_is_exact(data_file):
    batches = _batches(data_file, 2)
    mesh = parallel.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    state_1, losses_1 = _step_setup(small_config(data_file, grad_accum=1), mesh, batches)
    state_4, losses_4 = _step_setup(small_config(data_file, grad_accum=4), mesh, batches)
    np.testing.assert_allclose(losses_4, losses_1, rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(state_4["trainable"]), jax.tree.leaves(state_1["trainable"]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_masked_targets_get_no_gradient(data_file):
    (batch,) = _batches(data_file, 1)
    model = presets.preset("tiny", vocab_size=512)
    params = init_params(model, jax.random.key(1))
    step_config = sft.StepConfig(model, None, 1, 1.0, 512)
    arrays = {k: jnp.asarray(batch[k]) for k in sft.BATCH_KEYS}
    changed = dict(arrays)
    masked = arrays["loss_mask_BxT"] == 0
    changed["targets_BxT"] = jnp.where(
        masked, (arrays["targets_BxT"] + 7) % 507, arrays["targets_BxT"]
    )
    assert int(jnp.sum(changed["targets_BxT"] != arrays["targets_BxT"])) > 100

    def value_and_grad(b):
        return jax.value_and_grad(lambda p: sft.loss_sum_and_count(p, None, b, step_config)[0])(
            params
        )

    loss_a, grads_a = value_and_grad(arrays)
    loss_b, grads_b = value_and_grad(changed)
    assert float(loss_a) == float(loss_b)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_array_equal(a, b)


def _sft_command(config_overrides, workdir):
    return [
        sys.executable,
        "-m",
        "cacherl_jax.cli",
        "sft",
        "--config=configs/sft.py:tiny",
        f"--workdir={workdir}",
        "--progress=false",
        *config_overrides,
    ]


def test_resume_after_sigkill_gives_the_same_params_and_each_example_once(data_file, tmp_path):
    overrides = [
        f"--config.data.train={data_file}",
        "--config.data.seq_len=256",
        "--config.data.batch_size=4",
        "--config.tokenizer.train_vocab_size=512",
        "--config.train.steps=36",
        "--config.train.checkpoint_every=6",
        "--config.train.log_every=6",
        "--config.train.warmup_steps=2",
        "--config.train.log_example_ids=true",
        "--config.model.unroll_layers=false",
        "--config.mesh.fsdp=1",
    ]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    reference_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(
        _sft_command(overrides, reference_dir), cwd=REPO, env=env, check=True, capture_output=True
    )

    process = subprocess.Popen(
        _sft_command(overrides, killed_dir),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while (
        not (killed_dir / "checkpoints" / "12").exists()
        and process.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (killed_dir / "checkpoints" / "12").exists() and not (killed_dir / "hf").exists(), (
        "kill came too late"
    )
    subprocess.run(
        _sft_command(overrides, killed_dir), cwd=REPO, env=env, check=True, capture_output=True
    )

    _, reference = load_hf_checkpoint(reference_dir / "hf")
    _, resumed = load_hf_checkpoint(killed_dir / "hf")
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(a, b)
    # Steps re-run after the kill replace what the killed run logged for them.
    consumed = {}
    for line in (killed_dir / "example_ids.jsonl").read_text().splitlines():
        record = json.loads(line)
        consumed[record["step"]] = record["example_ids"]
    assert sorted(consumed) == list(range(1, 37))
    ids = [i for step in sorted(consumed) for i in consumed[step]]
    epoch = 48
    assert sorted(ids[:epoch]) == list(range(epoch)), "first epoch: every example exactly once"
    straight = {
        json.loads(l)["step"]: json.loads(l)["example_ids"]
        for l in (reference_dir / "example_ids.jsonl").read_text().splitlines()
    }
    assert straight == consumed
    assert [m["step"] for m in read_metrics(killed_dir)] == [6, 12, 18, 24, 30, 36]


def test_nan_loss_stops_without_saving(data_file, tmp_path, capsys):
    config = small_config(data_file, thinking_weight=float("nan"))
    with pytest.raises(
        TrainingError,
        match=r"step 5: loss is nan; stopping without saving \(last good checkpoint: step None\)",
    ):
        train(config, tmp_path)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


def test_workdir_with_another_configs_checkpoint_is_refused(data_file, tmp_path):
    train(small_config(data_file, steps=10, checkpoint_every=10), tmp_path)
    other = small_config(data_file, steps=10)
    other.data.batch_size = 8
    with pytest.raises(CheckpointMismatchError, match=r"data\.batch_size: checkpoint 4, config 8"):
        train(other, tmp_path)


def test_bad_datasets(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TrainingError, match="no usable trajectories"):
        train(small_config(empty), tmp_path / "a")
    broken = tmp_path / "broken.jsonl"
    write_jsonl(broken, addition_trajectories(3))
    broken.write_text(broken.read_text() + '{"id": "x", "messages": [{"role": "robot"}]}\n')
    code = cli.main(
        [
            "sft",
            "--config=configs/sft.py:tiny",
            f"--config.data.train={broken}",
            f"--workdir={tmp_path / 'b'}",
        ]
    )
    assert code == 2
    assert "broken.jsonl:4: messages[0].role" in capsys.readouterr().err


@pytest.mark.parametrize("overflow", ["truncate", "skip"])
def test_overlong_sequences_are_counted(tmp_path, overflow):
    data = tmp_path / "long.jsonl"
    write_jsonl(data, addition_trajectories(24, long_every=3))
    config = small_config(data, steps=5, log_every=5, checkpoint_every=5)
    config.data.overflow = overflow
    train(config, tmp_path / "run")
    (last,) = read_metrics(tmp_path / "run")
    counted = {k: v for k, v in last.items() if k.startswith("data/")}
    assert counted, last
    key = "data/truncated" if overflow == "truncate" else "data/skipped"
    assert counted[key] >= 1, counted


def test_lora_training_keeps_the_base_and_exports_merged(data_file, tmp_path):
    config = small_config(data_file, steps=10, lr=1e-2, checkpoint_every=10)
    config.lora.rank = 4
    config.lora.alpha = 8.0
    summary = train(config, tmp_path)
    metrics = read_metrics(tmp_path)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    _, exported = load_hf_checkpoint(summary["export"])
    base = init_params(
        presets.preset("tiny", vocab_size=exported["embed"].shape[0]), jax.random.key(0)
    )
    np.testing.assert_array_equal(exported["embed"], base["embed"])  # not a LoRA target: unchanged
    assert not np.array_equal(exported["layers"]["wq"], base["layers"]["wq"])  # merged adapters

    # A run given a tokenizer directory exports that tokenizer with its weights.
    config = small_config(data_file, steps=2, checkpoint_every=2)
    config.tokenizer.spec = str(tmp_path / "tokenizer")
    summary = train(config, tmp_path / "given_tokenizer")
    exported_tokenizer = Path(summary["export"]) / "tokenizer.json"
    assert (
        exported_tokenizer.read_bytes() == (tmp_path / "tokenizer" / "tokenizer.json").read_bytes()
    )


def test_plan_reports_memory(capsys):
    assert (
        cli.main(
            ["plan", "--config=configs/sft.py:tiny", "--cpu_devices=8", "--config.mesh.fsdp=-1"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "optimizer state" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["activations_gib_per_device"] > 0
    assert result["optimizer_gib_per_device"] == pytest.approx(
        2 * result["params_gib_per_device"], rel=0.01
    )
