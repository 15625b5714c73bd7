"""Masked SFT: `cacherl sft --config=configs/sft.py:tiny --workdir=runs/x`.

The same command runs on a laptop and a pod: the mesh comes from the config, batches are built
per host and assembled into global arrays, and the train step is one pure function jitted once
with explicit shardings and the state donated. Re-running the command in a workdir that holds a
checkpoint resumes it exactly (parameters, optimizer, step and data position).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from cacherl_jax import fs, parallel
from cacherl_jax.chat import Tokenizer, load_tokenizer, train_tokenizer
from cacherl_jax.chat.template import render_text
from cacherl_jax.chat.template_check import copy_chat_template, load_checked_tokenizer
from cacherl_jax.chat.trajectory import load_jsonl
from cacherl_jax.data import pipeline as data_pipeline
from cacherl_jax.model import (
    Qwen3Config,
    init_params,
    load_hf_checkpoint,
    presets,
    qwen3,
    read_config,
    save_hf_checkpoint,
)
from cacherl_jax.model import lora as lora_lib
from cacherl_jax.train import checkpoint as checkpoint_lib
from cacherl_jax.train.errors import TrainingError
from cacherl_jax.train.host_memory import release_freed_memory
from cacherl_jax.train.loss import chunked_cross_entropy, sft_weights
from cacherl_jax.train.metrics import MetricsWriter
from cacherl_jax.train.optimizer import make_optimizer
from cacherl_jax.train.preemption import Preemption
from cacherl_jax.train.step import batch_shards, init_train_state, make_update_step

log = logging.getLogger(__name__)

# What goes to the devices; example ids stay on the host (for logging which examples a step saw).
BATCH_KEYS = tuple(key for key in data_pipeline.BATCH_KEYS if key != "example_ids_BxT")


# --- the pure part: loss and train step -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepConfig:
    model: Qwen3Config
    lora: lora_lib.LoraConfig | None
    grad_accum: int
    thinking_weight: float
    loss_chunk_size: int

    @classmethod
    def from_config(
        cls,
        config: ml_collections.ConfigDict,
        model: Qwen3Config,
        lora: lora_lib.LoraConfig | None,
    ) -> StepConfig:
        """The step's settings from an SFT config (`train.*`) and the resolved model."""
        return cls(
            model=model,
            lora=lora,
            grad_accum=config.train.grad_accum,
            thinking_weight=config.train.thinking_weight,
            loss_chunk_size=config.train.loss_chunk_size,
        )


def model_params(trainable: Any, base: Any, step_config: StepConfig) -> Any:
    """The parameters the forward pass sees: the trainable ones, or the frozen base plus LoRA."""
    if step_config.lora is None:
        return trainable
    return lora_lib.merge_lora(jax.lax.stop_gradient(base), trainable, step_config.lora)


def loss_sum_and_count(
    trainable, base, batch, step_config: StepConfig
) -> tuple[jax.Array, jax.Array]:
    """Masked next-token cross-entropy as (sum, count) over the batch's trained targets."""
    params = model_params(trainable, base, step_config)
    x_BxTxE = qwen3.embed(params, step_config.model, batch["tokens_BxT"])
    h_BxTxE = qwen3.hidden_states(
        params,
        step_config.model,
        x_BxTxE,
        positions_BxT=batch["positions_BxT"],
        segment_ids_BxT=batch["segment_ids_BxT"],
    )
    weights_BxT = sft_weights(
        batch["loss_mask_BxT"], batch["thinking_mask_BxT"], step_config.thinking_weight
    )
    return chunked_cross_entropy(
        h_BxTxE,
        qwen3.unembedding(params),
        batch["targets_BxT"],
        weights_BxT,
        chunk_size=step_config.loss_chunk_size,
    )


def make_train_step(
    step_config: StepConfig, tx: optax.GradientTransformation, schedule: optax.Schedule
):
    """`(state, base, batch) -> (state, metrics)`; `state` = {step, trainable, opt_state}.

    The loss is the mean over every trained token of the whole batch, so micro-batches (and
    sharded batches) add up exactly; `trained_tokens` is that count.
    """

    def loss_fn(trainable, base, micro_batch):
        loss_sum, _ = loss_sum_and_count(trainable, base, micro_batch, step_config)
        return loss_sum, {}

    def count_fn(batch):
        return jnp.sum(batch["loss_mask_BxT"] > 0)

    update_step = make_update_step(loss_fn, count_fn, tx, schedule, step_config.grad_accum)

    def train_step(state, base, batch):
        state, metrics = update_step(state, base, batch)
        metrics["trained_tokens"] = metrics.pop("count")
        return state, metrics

    return train_step


# --- setup ---------------------------------------------------------------------------------------------


def _tokenizer(config: ml_collections.ConfigDict, workdir: Path, texts: Iterable[str]) -> Tokenizer:
    """The config's tokenizer, or one trained on `texts` (the training data as text)."""
    spec = config.tokenizer.spec
    if spec:  # the chat variant of the checkpoint trained from, checked against its template
        return load_checked_tokenizer(spec, config.model.checkpoint or None)
    local = workdir / "tokenizer"
    if (local / "tokenizer.json").exists():  # a resumed run keeps the vocabulary it started with
        return load_tokenizer(local)
    return train_tokenizer(texts, config.tokenizer.train_vocab_size, local, from_files=False)


def model_config(
    config: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None
) -> Qwen3Config:
    """The model a config asks for: a checkpoint's or a preset's shape, with the runtime options.

    A tokenizer trained for this run (`tokenizer.spec == ""`) sets the vocabulary size.
    """
    runtime = {
        "compute_dtype": config.model.compute_dtype,
        "remat": config.model.remat,
        "unroll_layers": config.model.unroll_layers,
    }
    if config.model.checkpoint:
        model = read_config(config.model.checkpoint, **runtime)
    else:
        model = presets.preset(config.model.preset, **runtime)
        if tokenizer is not None and config.tokenizer.spec == "":
            model = model.replace(vocab_size=tokenizer.vocab_size)
    if tokenizer is None:
        return model
    if tokenizer.vocab_size > model.vocab_size:
        raise TrainingError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids, the model only {model.vocab_size} embeddings"
        )
    return model


def fingerprint(config: ml_collections.ConfigDict, model: Qwen3Config) -> dict[str, Any]:
    """What must not change between a checkpoint and the run resuming it."""
    architecture = {
        k: v for k, v in dataclasses.asdict(model).items() if k in Qwen3Config.__dataclass_fields__
    }
    for runtime in ("compute_dtype", "remat", "unroll_layers", "attention_block", "attention_impl"):
        architecture.pop(runtime, None)
    return {
        "model": architecture,
        "model_checkpoint": config.model.checkpoint,
        "param_dtype": config.model.param_dtype,
        "lora": {
            "rank": config.lora.rank,
            "alpha": config.lora.alpha,
            "targets": list(config.lora.targets),
        }
        if config.lora.rank
        else None,
        "tokenizer": config.tokenizer.spec or f"trained:{config.tokenizer.train_vocab_size}",
        "data": {
            "train": config.data.train,
            "seq_len": config.data.seq_len,
            "batch_size": config.data.batch_size,
        },
        "seed": config.seed,
    }


def _to_global(
    batch: Mapping[str, np.ndarray], sharding: jax.sharding.NamedSharding
) -> dict[str, jax.Array]:
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(batch[key]))
        for key in BATCH_KEYS
    }


def _fetch(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    return {key: float(value) for key, value in jax.device_get(dict(metrics)).items()}


# --- the run -------------------------------------------------------------------------------------------


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    progress: bool = True,
    devices: list[jax.Device] | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) SFT in `workdir`; returns a summary with the final metrics.

    `devices` (default: all) is the set the config's mesh is laid over.
    """
    workdir = fs.workdir_path(workdir)
    mesh = make_checked_mesh(config, devices)
    workdir.mkdir(parents=True, exist_ok=True)
    model, data_iterator = load_data(config, workdir)

    lora = lora_config(config)
    base, trainable = init_model_params(config, model, lora, mesh)
    tx, schedule = make_optimizer(config.train)
    state, state_shardings = init_train_state(tx, trainable, mesh)
    checkpoints = checkpoint_lib.Checkpoints(
        workdir / "checkpoints",
        fingerprint(config, model),
        keep=config.train.keep_checkpoints,
        async_save=config.train.async_checkpoints,
    )
    state, start_step = resume(checkpoints, state, data_iterator)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    step_config = StepConfig.from_config(config, model, lora)
    batch_sharding = parallel.batch_sharding(mesh)
    train_step = jit_train_step(step_config, tx, schedule, state_shardings, base, batch_sharding)
    # Traced under the mesh: "auto" attention reads its platform there, and TPU's splash kernel
    # runs per chip through it.
    with jax.set_mesh(mesh):
        state, last, preempted_at = run_steps(
            config,
            workdir,
            train_step,
            state,
            base,
            data_iterator,
            batch_sharding,
            checkpoints,
            start_step,
            progress=progress,
        )

    summary = {"steps": config.train.steps, "resumed_from": start_step, **last}
    if preempted_at is not None:  # not the trained model yet: no export
        return summary | {"preempted_at": preempted_at}
    if config.train.export_hf:
        final = model_params(state["trainable"], base, step_config)
        summary["export"] = str(export_hf(config, workdir, model, final))
    return summary


# --- the steps of `train` ------------------------------------------------------------------------------


def make_checked_mesh(
    config: ml_collections.ConfigDict, devices: list[jax.Device] | None
) -> jax.sharding.Mesh:
    """The config's mesh over `devices` (after joining the distributed job), once the config is
    known to give training data and a batch that splits into its micro-batches and shards."""
    parallel.initialize_distributed(config.distributed)
    mesh = parallel.make_mesh(dict(config.mesh), devices=devices)
    if config.data.batch_size % (config.train.grad_accum * batch_shards(mesh)):
        raise TrainingError(
            f"data.batch_size {config.data.batch_size} must split into grad_accum="
            f"{config.train.grad_accum} microbatches over {batch_shards(mesh)} batch shards "
            f"(mesh {parallel.describe(mesh)})"
        )
    if not config.data.train:
        raise TrainingError(
            "config.data.train is empty: give a trajectories JSONL (--config.data.train=PATH)"
        )
    return mesh


def load_data(
    config: ml_collections.ConfigDict, workdir: Path
) -> tuple[Qwen3Config, Iterator[dict[str, Any]]]:
    """The model the run trains and this host's iterator of packed batches: the data is turned
    into examples with the run's tokenizer (trained on it at the start of a fresh run when
    `tokenizer.spec` is empty), which may set the model's vocabulary.

    `data.format` "trajectories" renders chat trajectories (masked as `data.train_on` says);
    "text" trains on plain documents (JSONL of `{"text": ...}`, every token trained, or of
    `{"text": ..., "train_span": [start, end]}`, the span's tokens only: pretraining)."""
    readers = {"trajectories": _trajectory_examples, "text": _text_examples}
    if config.data.format not in readers:
        raise TrainingError(
            f"data.format must be one of {', '.join(readers)}, got {config.data.format!r}"
        )
    texts, make_examples = readers[config.data.format](config)
    tokenizer = _tokenizer(config, workdir, texts)
    model = model_config(config, tokenizer)
    examples = make_examples(tokenizer)
    pipeline_config = data_pipeline.PipelineConfig(
        seq_len=config.data.seq_len,
        batch_size=config.data.batch_size,
        seed=config.seed,
        shuffle=config.data.shuffle,
        overflow=config.data.overflow,
        pad_id=tokenizer.pad_id,
    )
    try:
        dataset = data_pipeline.make_dataset(
            examples,
            pipeline_config,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    except ValueError as err:  # e.g. nothing trainable within seq_len
        raise TrainingError(f"{config.data.train}: {err}") from err
    return model, iter(dataset)


def _trajectory_examples(config: ml_collections.ConfigDict):
    """(the trajectories as text, tokenizer -> their rendered examples)."""
    trajectories, report = load_jsonl(config.data.train, on_error=config.data.on_error)
    if not trajectories:
        raise TrainingError(
            f"{config.data.train}: no usable trajectories "
            f"({report.skipped} malformed records skipped)"
        )
    texts = (render_text(t.messages, t.tools) for t in trajectories)

    def make_examples(tokenizer: Tokenizer) -> list[dict[str, np.ndarray]]:
        return data_pipeline.render_examples(
            trajectories,
            tokenizer,
            enable_thinking=config.data.enable_thinking,
            train_on=config.data.train_on,
            train_thinking=config.data.train_thinking,
        )

    return texts, make_examples


def _text_examples(config: ml_collections.ConfigDict):
    """(the documents, tokenizer -> their examples: every token trained, or a document's
    `train_span` only)."""
    try:
        texts, spans = data_pipeline.load_text_records(config.data.train)
    except (OSError, ValueError) as err:
        raise TrainingError(f"data.format='text': {err}") from err
    if not texts:
        raise TrainingError(f"{config.data.train}: no documents")
    return texts, lambda tokenizer: data_pipeline.text_examples(texts, tokenizer, spans)


def lora_config(config: ml_collections.ConfigDict) -> lora_lib.LoraConfig | None:
    """The config's LoRA adapters; None (`lora.rank` 0) for full fine-tuning."""
    if not config.lora.rank:
        return None
    return lora_lib.LoraConfig(
        rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets)
    )


def init_model_params(
    config: ml_collections.ConfigDict,
    model: Qwen3Config,
    lora: lora_lib.LoraConfig | None,
    mesh: jax.sharding.Mesh,
) -> tuple[Any, Any]:
    """(frozen base, trainable) parameters placed in their shards: a checkpoint's or a fresh init
    from `config.seed`. With LoRA the base stays frozen and the adapters train; without it the
    base is None and every parameter trains."""
    param_dtype = jnp.dtype(config.model.param_dtype)
    key = jax.random.key(config.seed)
    if config.model.checkpoint:
        _, params = load_hf_checkpoint(
            config.model.checkpoint,
            mesh=mesh,
            dtype=param_dtype,
            compute_dtype=model.compute_dtype,
            remat=model.remat,
            unroll_layers=model.unroll_layers,
        )
    else:
        params = init_params(model, key, dtype=param_dtype, mesh=mesh)
    if lora is None:
        return None, params
    return params, lora_lib.init_lora(model, lora, jax.random.fold_in(key, 1), mesh=mesh)


def resume(
    checkpoints: checkpoint_lib.Checkpoints, state: dict[str, Any], data_iterator: Iterator
) -> tuple[dict[str, Any], int]:
    """The latest checkpoint's state and step, with the data iterator moved to where it was; the
    fresh `state` and step 0 without one."""
    restored = checkpoints.restore_latest(state)
    if restored is None:
        return state, 0
    state, data_state, start_step = restored
    data_pipeline.set_state(data_iterator, data_state)
    log.info("resumed from step %d", start_step)
    return state, start_step


def jit_train_step(
    step_config: StepConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    state_shardings: Any,
    base: Any,
    batch_sharding: jax.sharding.NamedSharding,
):
    """`make_train_step` jitted with explicit shardings and the state donated."""
    base_shardings = None if base is None else jax.tree.map(lambda x: x.sharding, base)
    return jax.jit(
        make_train_step(step_config, tx, schedule),
        in_shardings=(state_shardings, base_shardings, {k: batch_sharding for k in BATCH_KEYS}),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )


def run_steps(
    config: ml_collections.ConfigDict,
    workdir: Path,
    train_step,
    state: dict[str, Any],
    base: Any,
    data_iterator: Iterator[dict[str, Any]],
    batch_sharding: jax.sharding.NamedSharding,
    checkpoints: checkpoint_lib.Checkpoints,
    start_step: int,
    *,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, float], int | None]:
    """The steps from `start_step` to `train.steps`: metrics every `log_every` steps, a checkpoint
    (state and data position) every `checkpoint_every`, both after the last step; a non-finite
    loss stops the run without saving. A SIGTERM (`Preemption`) stops it after the current step,
    saved. Returns the state, the last logged metrics and the step a preemption stopped at (None
    when the run went to `train.steps`)."""
    writer = MetricsWriter(workdir, resume_step=start_step, enabled=jax.process_index() == 0)
    ids_log = workdir / "example_ids.jsonl" if config.train.log_example_ids else None
    steps = config.train.steps
    bar = tqdm(
        total=steps,
        initial=start_step,
        desc="sft",
        unit="step",
        disable=not progress or jax.process_index(),
    )
    last: dict[str, float] = {}
    window_start, window_tokens = time.perf_counter(), 0
    compiled_step = None
    preempted_at = None
    with Preemption() as preemption:
        try:
            for step in range(start_step, steps):
                batch = next(data_iterator)
                global_batch = _to_global(batch, batch_sharding)
                if compiled_step is None:  # every batch has the same shapes: one compilation
                    compiled_step = train_step.lower(state, base, global_batch).compile()
                    release_freed_memory()  # the compiler's, before the step's buffers come on top
                state, metrics = compiled_step(state, base, global_batch)
                window_tokens += int(np.sum(batch["segment_ids_BxT"] > 0))
                if ids_log is not None and jax.process_index() == 0:
                    _append_example_ids(ids_log, step + 1, batch)
                is_log = (step + 1) % config.train.log_every == 0 or step + 1 == steps
                is_checkpoint = (step + 1) % config.train.checkpoint_every == 0 or step + 1 == steps
                if is_log or is_checkpoint:
                    last = _fetch_finite(metrics, step + 1, checkpoints)
                    elapsed = time.perf_counter() - window_start
                    last["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                    last.update(_data_stats(batch))
                    writer.write(step + 1, last)
                    window_start, window_tokens = time.perf_counter(), 0
                    bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
                if is_checkpoint:
                    checkpoints.save(step + 1, state, data_pipeline.get_state(data_iterator))
                bar.update()
                # Every process asks after every step but the last (the run ends there anyway).
                if step + 1 < steps and preemption.requested():
                    if not is_checkpoint:
                        checkpoints.save(step + 1, state, data_pipeline.get_state(data_iterator))
                    preempted_at = _saved_for_preemption(step + 1, checkpoints)
                    break
        finally:
            bar.close()
            checkpoints.wait()
            writer.close()
    return state, last, preempted_at


def export_hf(
    config: ml_collections.ConfigDict, workdir: Path, model: Qwen3Config, params: Any
) -> Path:
    """`params` as a Hugging Face checkpoint in `workdir/hf` (replacing an earlier export), with
    the run's tokenizer unless that is the built-in "qwen3" vocabulary."""
    with fs.local_directory(workdir / "hf") as export_dir:
        if export_dir.exists() and jax.process_index() == 0:
            shutil.rmtree(export_dir)
        save_hf_checkpoint(model, params, export_dir)
        spec = config.tokenizer.spec
        source = Path(spec or workdir / "tokenizer")
        if source.is_dir():
            source = source / "tokenizer.json"
        if spec != "qwen3" and jax.process_index() == 0:
            shutil.copy(source, export_dir / "tokenizer.json")
        if config.model.checkpoint and jax.process_index() == 0:  # keeps its chat variant
            copy_chat_template(config.model.checkpoint, export_dir)
    return workdir / "hf"


def _saved_for_preemption(step: int, checkpoints: checkpoint_lib.Checkpoints) -> int:
    checkpoints.wait()  # the scheduler's SIGKILL follows: the checkpoint must be on disk first
    log.warning("preempted: saved step %d, exiting; rerun the same command to resume", step)
    return step


def _fetch_finite(
    metrics: Mapping[str, jax.Array], step: int, checkpoints: checkpoint_lib.Checkpoints
) -> dict[str, float]:
    last = _fetch(metrics)
    if not np.isfinite(last["loss"]):
        raise TrainingError(
            f"step {step}: loss is {last['loss']}; stopping without saving "
            f"(last good checkpoint: step {checkpoints.latest_step()})"
        )
    return last


def _append_example_ids(path: Path, step: int, batch: Mapping[str, np.ndarray]) -> None:
    with path.open("a") as f:
        f.write(json.dumps({"step": step, "example_ids": _example_ids(batch)}) + "\n")


def _example_ids(batch: Mapping[str, np.ndarray]) -> list[int]:
    ids = np.asarray(batch["example_ids_BxT"])
    return sorted({int(i) for i in ids[ids >= 0]})


def _data_stats(batch: Mapping[str, Any]) -> dict[str, float]:
    # Whole-run counts from the pipeline: examples packed, truncated and skipped so far, epoch.
    return {f"data/{k}": float(v) for k, v in batch["stats"].items()}
