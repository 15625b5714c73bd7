"""The augmentation run: source -> plan -> teacher (concurrent) -> validation -> resumable output.

    cacherl augment --config=configs/augment.py:endpoint --input=data/raw.jsonl \
        --output=data/thinking.jsonl --config.teacher.endpoint.base_url=http://host:8000/v1

The main thread reads the source, records its calls into the tool cache, plans each record and
submits its steps to a pool of `teacher.concurrency` threads (inline for the template teacher);
a record is written as soon as all its steps are back, so the output is in completion order,
not input order. At most `max_pending_steps` steps are in flight, so memory stays bounded on
inputs of any size. Ctrl-C (or SIGTERM) stops submitting, writes what is finished and the
summary, and exits; a rerun continues from there.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from cacherl_jax.chat.trajectory import Trajectory, TrajectoryError
from cacherl_jax.data.thinking.output import (
    AppendOnlyJsonl,
    ResumableOutput,
    dataset_stats,
    format_summary,
    read_ids,
    sidecar_paths,
)
from cacherl_jax.data.thinking.prompts import PromptLimits, teacher_messages
from cacherl_jax.data.thinking.rules import (
    AugmentRules,
    RecordPlan,
    Step,
    apply_reasoning,
    clean_reasoning,
    plan_record,
    strip_thinking,
    unit_hash,
    validate_reasoning,
)
from cacherl_jax.data.thinking.sources import CacheRecorder, Source, source_from_spec
from cacherl_jax.data.thinking.teachers import (
    Teacher,
    TeacherError,
    TeacherRequest,
    make_teacher,
    template_reasoning,
)
from cacherl_jax.errors import UserError

logger = logging.getLogger(__name__)


class AugmentError(UserError, ValueError):
    """A configuration or input the run cannot start with."""


@dataclasses.dataclass
class StepOutcome:
    """How explaining one step went. `reasoning` is None when the step failed (`error` says why:
    a teacher error label, or "invalid:<reason>" after the last rejected attempt)."""

    index: int
    reasoning: str | None
    origin: str  # "teacher" | "template_fallback" | "failed"
    attempts: int
    error: str | None = None
    detail: str = ""


class RunStats:
    """Counters of one run; steps update them from worker threads."""

    def __init__(self, teacher_name: str):
        self.lock = threading.Lock()
        self.teacher = teacher_name
        self.started = time.monotonic()
        self.teacher_requests = self.teacher_failures = self.retries = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.cost_usd = 0.0
        self.rejection_reasons: collections.Counter[str] = collections.Counter()
        self.teacher_errors: collections.Counter[str] = collections.Counter()
        self.record_failures: collections.Counter[str] = collections.Counter()
        self.wrap_rejections: collections.Counter[str] = collections.Counter()
        self.step_origins: collections.Counter[str] = collections.Counter()
        self.read = self.written = self.rejected = self.no_thinking = self.thinking_dropped = 0
        self.skipped_done = self.skipped_rejected = self.duplicate_ids = 0

    def request(self, reply: Any = None, error: TeacherError | None = None) -> None:
        with self.lock:
            self.teacher_requests += 1
            if reply is not None:
                self.retries += reply.retries
                self.prompt_tokens += reply.prompt_tokens
                self.completion_tokens += reply.completion_tokens
                self.cost_usd += reply.cost_usd
            if error is not None:
                self.retries += error.retries
                self.teacher_failures += 1
                self.teacher_errors[error.reason] += 1

    def rejection(self, reason: str) -> None:
        with self.lock:
            self.rejection_reasons[reason] += 1

    def postfix(self) -> dict[str, Any]:
        return {
            "done": self.written,
            "failed": self.rejected,
            "retried": self.retries,
            "tokens": self.prompt_tokens + self.completion_tokens,
            "cost": f"${self.cost_usd:.4f}",
        }

    def to_dict(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        finished = self.written + self.rejected
        return {
            "teacher": self.teacher,
            "elapsed_s": round(elapsed, 3),
            "records_per_s": round(finished / elapsed, 2) if elapsed > 0 else 0.0,
            "read": self.read,
            "written": self.written,
            "rejected": self.rejected,
            "no_thinking": self.no_thinking,
            "thinking_dropped": self.thinking_dropped,
            "skipped_done": self.skipped_done,
            "skipped_rejected": self.skipped_rejected,
            "duplicate_input_ids": self.duplicate_ids,
            "teacher_requests": self.teacher_requests,
            "teacher_failures": self.teacher_failures,
            "retries": self.retries,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "step_origins": dict(sorted(self.step_origins.items())),
            "rejection_reasons": dict(sorted(self.rejection_reasons.items())),
            "teacher_errors": dict(sorted(self.teacher_errors.items())),
            "record_failures": dict(sorted(self.record_failures.items())),
            "existing_text_rejected": dict(sorted(self.wrap_rejections.items())),
        }


def step_seed(rules: AugmentRules, step: Step, attempt: int) -> int:
    return int(unit_hash("teacher-seed", rules.seed, step.record_id, step.index, attempt) * 2**31)


def explain_step(
    step: Step, teacher: Teacher, rules: AugmentRules, limits: PromptLimits, stats: RunStats
) -> StepOutcome:
    """Asks the teacher until a reasoning passes validation (at most `rules.max_attempts` times)."""
    rejected_for = None
    attempts = 1 if teacher.deterministic else rules.max_attempts
    for attempt in range(attempts):
        messages = (
            teacher_messages(step, limits=limits, rejected_for=rejected_for)
            if teacher.reads_prompt
            else []
        )
        request = TeacherRequest(step, messages, attempt, step_seed(rules, step, attempt))
        try:
            reply = teacher.explain(request)
        except TeacherError as error:
            stats.request(error=error)
            return StepOutcome(step.index, None, "failed", attempt + 1, error.reason, error.message)
        stats.request(reply)
        text = clean_reasoning(reply.text)
        rejected_for = validate_reasoning(text, step.tool_names, rules)
        if rejected_for is None:
            return StepOutcome(step.index, text, "teacher", attempt + 1)
        stats.rejection(rejected_for)
    if rules.on_invalid == "template":
        text = template_reasoning(step)
        if validate_reasoning(text, step.tool_names, rules) is None:
            return StepOutcome(step.index, text, "template_fallback", attempts)
    return StepOutcome(step.index, None, "failed", attempts, f"invalid:{rejected_for}")


class _InlineExecutor:
    """`submit` runs the call at once: a pure-Python teacher gains nothing from threads."""

    def submit(self, fn, /, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # handed to the done callback like a pool would; Ctrl-C is not
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


class _DaemonPool:
    """A fixed pool of daemon worker threads. Unlike ThreadPoolExecutor's workers, they do not hold
    the process at exit: after Ctrl-C a request stuck until its timeout is simply abandoned."""

    def __init__(self, workers: int):
        self._tasks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"teacher-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, fn, args = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

    def submit(self, fn, /, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._tasks.put((future, fn, args))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            while True:
                try:
                    task = self._tasks.get_nowait()
                except queue.Empty:
                    break
                if task is not None:
                    task[0].cancel()
        for _ in self._threads:
            self._tasks.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


@dataclasses.dataclass
class _InFlight:
    original: Trajectory
    plan: RecordPlan
    outcomes: list[StepOutcome] = dataclasses.field(default_factory=list)
    remaining: int = 0


@dataclasses.dataclass(frozen=True)
class RunSettings:
    output: str
    max_cost_usd: float = 0.0  # 0: no budget; otherwise stop submitting once spent
    max_pending_steps: int = 0  # 0: 4 x the teacher's concurrency
    fsync_every: int = 16
    fsync_interval_s: float = 1.0
    retry_rejected: bool = True  # a rerun tries the records of the rejected file again
    progress: bool = True


class AugmentRun:
    """One run over a source; `run()` returns the summary (also written next to the output)."""

    def __init__(
        self,
        source: Source,
        teacher: Teacher,
        rules: AugmentRules,
        settings: RunSettings,
        *,
        limits: PromptLimits | None = None,
        recorder: CacheRecorder | None = None,
    ):
        self.source, self.teacher, self.rules, self.settings = source, teacher, rules, settings
        self.limits, self.recorder = limits or PromptLimits(), recorder
        self.stats = RunStats(teacher.name)
        self.rejected_path, self.summary_path = sidecar_paths(settings.output)
        self._finished: queue.Queue[_InFlight] = queue.Queue()
        self._pending_steps = 0
        self._pending_lock = threading.Lock()
        self._seen: set[str] = set()

    # -- steps (worker threads) --------------------------------------------------------------

    def _step_done(self, state: _InFlight, index: int, future: concurrent.futures.Future) -> None:
        if future.cancelled():  # an interrupted run: the record is neither written nor rejected
            with self._pending_lock:
                self._pending_steps -= 1
            return
        try:
            outcome = future.result()
        except BaseException as exc:  # a bug: the record is rejected with it, not lost
            logger.exception("explaining step %d of %r failed", index, state.original.id)
            outcome = StepOutcome(index, None, "failed", 0, "internal_error", repr(exc))
        with self._pending_lock:
            state.outcomes.append(outcome)
            state.remaining -= 1
            self._pending_steps -= 1
            finished = state.remaining == 0
        if finished:
            self._finished.put(state)

    # -- records (main thread) ---------------------------------------------------------------

    def _reject(self, trajectory: Trajectory, reason: str, detail: str = "", step=None) -> None:
        trajectory.metadata["augment"] = {
            "status": "rejected",
            "reason": reason,
            "detail": detail[:500],
            "step": step,
        }
        self.rejected.write(trajectory)
        self.stats.rejected += 1
        self.stats.record_failures[reason] += 1

    def _finish(self, state: _InFlight) -> None:
        stats, plan = self.stats, state.plan
        stats.wrap_rejections.update(plan.wrap_rejections)
        if not any(message["role"] == "assistant" for message in plan.trajectory.messages):
            self._reject(state.original, "no_assistant_message")  # nothing to train on
            return
        failed = [outcome for outcome in state.outcomes if outcome.reasoning is None]
        if failed:
            first = min(failed, key=lambda outcome: outcome.index)
            if first.error.startswith("invalid:") and self.rules.on_invalid == "drop_thinking":
                trajectory = plan.trajectory
                trajectory.messages = strip_thinking(trajectory.messages)
                trajectory.metadata["augment"] = {"thinking": False, "reason": first.error}
                self.output.write(trajectory)
                stats.written += 1
                stats.thinking_dropped += 1
            else:
                self._reject(state.original, first.error, first.detail, first.index)
            return
        origins = dict(plan.origins)
        attempts = {}
        for outcome in state.outcomes:
            origins[outcome.index] = outcome.origin
            attempts[outcome.index] = outcome.attempts
        trajectory = apply_reasoning(
            plan, {outcome.index: outcome.reasoning for outcome in state.outcomes}
        )
        stats.step_origins.update(origins.values())
        trajectory.metadata["augment"] = {
            "thinking": plan.thinking,
            "teacher": self.teacher.name if state.outcomes else None,
            "steps": [
                {"index": index, "origin": origins[index], "attempts": attempts.get(index, 0)}
                for index in sorted(origins)
            ],
        }
        if not plan.thinking:
            trajectory.metadata["augment"]["reason"] = "no_thinking_share"
            stats.no_thinking += 1
        self.output.write(trajectory)
        stats.written += 1

    def _drain(self, bar: Any, limit: int) -> None:
        """Writes finished records; waits while more than `limit` steps are in flight."""
        while True:
            with self._pending_lock:
                wait = self._pending_steps > limit
            try:
                state = self._finished.get(timeout=0.25) if wait else self._finished.get_nowait()
            except queue.Empty:
                if not wait:
                    return
                bar.set_postfix(self.stats.postfix(), refresh=True)
                continue
            self._finish(state)
            bar.update(1)
            bar.set_postfix(self.stats.postfix(), refresh=False)

    def _submit(self, executor: Any, trajectory: Trajectory) -> None:
        plan = plan_record(trajectory, self.rules)
        state = _InFlight(trajectory, plan, remaining=len(plan.steps))
        if not plan.steps:
            self._finished.put(state)
            return
        with self._pending_lock:
            self._pending_steps += len(plan.steps)
        for step in plan.steps:
            future = executor.submit(
                explain_step, step, self.teacher, self.rules, self.limits, self.stats
            )
            future.add_done_callback(
                lambda done, state=state, index=step.index: self._step_done(state, index, done)
            )

    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        settings = self.settings
        self.output = ResumableOutput(
            settings.output,
            fsync_every=settings.fsync_every,
            fsync_interval_s=settings.fsync_interval_s,
        )
        skip_ids = set(self.output.done_ids)
        if not settings.retry_rejected:
            skip_rejected = read_ids(self.rejected_path) - skip_ids
        else:
            skip_rejected = set()
        self.rejected = AppendOnlyJsonl(
            self.rejected_path,
            fresh=settings.retry_rejected,
            fsync_every=settings.fsync_every,
            fsync_interval_s=settings.fsync_interval_s,
        )
        if self.teacher.concurrency > 1:
            executor: Any = _DaemonPool(self.teacher.concurrency)
        else:
            executor = _InlineExecutor()
        max_pending = settings.max_pending_steps or 4 * self.teacher.concurrency
        total = self.source.total()
        bar = tqdm(
            total=total,
            unit="rec",
            disable=not settings.progress,
            dynamic_ncols=True,
            smoothing=0.05,
        )
        status = "completed"
        try:
            for trajectory in self.source:
                self.stats.read += 1
                if self.recorder is not None:
                    self.recorder.add(trajectory)
                if trajectory.id in skip_ids:
                    self.stats.skipped_done += 1
                    bar.update(1)
                    continue
                if trajectory.id in skip_rejected:
                    self.stats.skipped_rejected += 1
                    bar.update(1)
                    continue
                if trajectory.id in self._seen:
                    self.stats.duplicate_ids += 1  # the output keeps one record per id
                    bar.update(1)
                    continue
                self._seen.add(trajectory.id)
                if settings.max_cost_usd and self.stats.cost_usd >= settings.max_cost_usd:
                    status = "budget_exhausted"
                    break
                self._submit(executor, trajectory)
                self._drain(bar, max_pending)
            self._drain(bar, 0)
        except BaseException as exc:
            # Ctrl-C, SIGTERM or a bad input record: stop asking, keep what is already finished.
            executor.shutdown(wait=False, cancel_futures=True)
            executor = None
            while True:
                try:
                    self._finish(self._finished.get_nowait())
                except queue.Empty:
                    break
            if not isinstance(exc, KeyboardInterrupt):
                raise
            status = "interrupted"
        finally:
            bar.close()
            if self.recorder is not None:
                self.recorder.flush()
            self.output.close()
            self.rejected.close()
            if executor is not None:
                executor.shutdown(wait=True)
            self.teacher.close()
        if status == "budget_exhausted":
            logger.warning("max_cost_usd %.4f reached: stopped submitting", settings.max_cost_usd)
        return self._summary(status)

    def _summary(self, status: str) -> dict[str, Any]:
        previous: list[dict[str, Any]] = []
        if self.summary_path.exists():
            try:
                old = json.loads(self.summary_path.read_text())
                previous = [*old.get("previous_runs", []), old["run"]]
            except (OSError, ValueError, KeyError, TypeError):
                previous = []
        summary = {
            "status": status,
            "output": self.settings.output,
            "rejected_file": str(self.rejected_path),
            "source": {"name": self.source.name, **self.source.report()},
            "tool_cache": self.recorder.report() if self.recorder is not None else None,
            "truncated_partial_line_bytes": self.output.truncated_bytes,
            "rules": dataclasses.asdict(self.rules),
            "run": self.stats.to_dict(),
            "dataset": dataset_stats(self.settings.output).to_dict(),
            "previous_runs": previous,
        }
        temporary = self.summary_path.with_name(self.summary_path.name + ".tmp")
        temporary.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        os.replace(temporary, self.summary_path)
        return summary


# --- from a config -----------------------------------------------------------------------------


def augment(config: Any, *, progress: bool = True) -> dict[str, Any]:
    """Runs the pipeline an ml-collections config (configs/augment.py) describes; returns the
    summary. `config.input.spec` and `config.output` must be set."""
    if not config.output:
        raise AugmentError("no output: pass --output=FILE.jsonl (or set config.output)")
    if not config.input.spec:
        raise AugmentError(
            "no input: pass --input=FILE.jsonl, --input=bfcl:multi_turn_base or "
            "--input=procedural:SPLIT:N (or set config.input.spec)"
        )
    if os.path.abspath(config.input.spec) == os.path.abspath(config.output):
        raise AugmentError("the output must be another file than the input")
    try:
        rules = AugmentRules.from_config(config.rules)
        limits = PromptLimits(**config.prompt.to_dict())
        source = source_from_spec(config.input.spec, config.input)
    except TrajectoryError:
        raise
    except (TypeError, ValueError) as exc:
        raise AugmentError(str(exc)) from exc
    recorder = None
    if config.tool_cache.path:
        from cacherl_jax.agent.tool_cache import ToolCache, ToolCacheConfig

        # Scoped lookups, so the recorder's conflict counts mean what a scoped reader sees.
        scope_mode = "global" if config.tool_cache.scope == "none" else "scoped"
        cache = ToolCache(ToolCacheConfig(path=config.tool_cache.path, scope_mode=scope_mode))
        recorder = CacheRecorder(cache, scope=config.tool_cache.scope)
    try:
        teacher = make_teacher(config.teacher)
    except (TypeError, ValueError) as exc:
        raise AugmentError(f"teacher: {exc}") from exc
    settings = RunSettings(
        output=config.output,
        max_cost_usd=config.run.max_cost_usd,
        max_pending_steps=config.run.max_pending_steps,
        fsync_every=config.run.fsync_every,
        fsync_interval_s=config.run.fsync_interval_s,
        retry_rejected=config.run.retry_rejected,
        progress=progress,
    )
    try:
        return AugmentRun(source, teacher, rules, settings, limits=limits, recorder=recorder).run()
    finally:
        if recorder is not None:
            recorder.cache.close()


def _parse_flags(argv: Sequence[str]) -> Any:
    """`--config=FILE[:ARG]` with `--config.FIELD=VALUE` overrides, plus --input, --output and
    --progress (absl flags, as the other config commands of `cacherl`)."""
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    full_argv = ["cacherl augment", *argv]
    config_flags.DEFINE_config_file(
        "config", None, "an ml-collections config file[:arg]", flag_values=flag_values,
        sys_argv=full_argv,
    )  # fmt: skip
    flags.DEFINE_string(
        "input", None, "FILE.jsonl, bfcl:CATEGORY or procedural:SPLIT:N[:SEED]",
        flag_values=flag_values,
    )  # fmt: skip
    flags.DEFINE_string(
        "output", None, "the augmented JSONL (appended to, resumable)", flag_values=flag_values
    )
    flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=flag_values)
    try:
        flag_values(full_argv)
    except flags.Error as err:
        raise AugmentError(str(err)) from err
    if flag_values.config is None:
        raise AugmentError("--config=configs/augment.py[:VARIANT] is required")
    config = flag_values.config
    if flag_values.input is not None:
        config.input.spec = flag_values.input
    if flag_values.output is not None:
        config.output = flag_values.output
    return config, flag_values.progress


def augment_main(argv: Sequence[str]) -> None:
    """`cacherl augment --config=configs/augment.py[:VARIANT] --input=... --output=...`.

    Prints the summary; exits 2 on a bad config or input, 130 when interrupted (the output stays
    consistent and a rerun continues)."""
    from cacherl_jax.agent.bfcl import BfclError
    from cacherl_jax.agent.tool_cache import ToolCacheError
    from cacherl_jax.chat.tokenizer import TokenizerError

    def interrupt(signum, frame):  # SIGTERM (a scheduler stopping us): stop like Ctrl-C
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, interrupt) if main_thread else None
    try:
        config, progress = _parse_flags(argv)
        summary = augment(config, progress=progress)
    except (AugmentError, BfclError, ToolCacheError, TokenizerError, TrajectoryError) as err:
        print(f"cacherl augment: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
    print(format_summary(summary))
    print(f"summary: {sidecar_paths(config.output)[1]}")
    if summary["status"] == "interrupted":
        raise SystemExit(130)
