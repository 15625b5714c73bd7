"""CacheAgentLoop: batched multi-turn rollouts whose tool calls are answered from the tool cache.

    loop = CacheAgentLoop(sampler, tokenizer, cache, LoopConfig(group_size=8))
    rollouts = loop.run(tasks, seed=0)          # len(tasks) * group_size rollouts

All G samples of every task share one batch. Each round generates one assistant turn for every
row still going (one compiled sampler call), parses it, answers its tool calls, and appends the
tool-response turn and the next generation prompt to the row's KV cache (`Sampler.resume`), so
the prefix is never recomputed. The rollout's tokens are the prompt, each sampled token exactly as
sampled (never decoded and re-encoded) and the rendered tool turns; the loss mask is 1 only on
sampled tokens and the sampler's log-probs sit under them (0 elsewhere).

Modes: `cache` answers every call from the `ToolCache`; `live` runs the task's environment (one
per row, so state evolves per rollout); `hybrid` takes exact cache hits and runs anything else
live, writing the result back to the cache (exact hits do not touch the environment, so with
stateful tools its final state can lag: use hybrid to grow the cache, live to judge state).

A row stops on a final answer (a turn without tool calls) after the task's last user turn, at
`max_turns` assistant turns, or when its tokens run out (`max_new_tokens` without an end token,
its `max_len` token budget, or no cache slots for the next turn). Multi-turn tasks (BFCL) get their next user message after
each final answer. The rollout keeps every earlier turn's reasoning as generated, where Qwen3's
template would drop it when re-rendering a conversation from scratch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np

from cacherl_jax.agent.environment import (
    Environment,
    Task,
    ToolResult,
    checked_call,
    schema_name,
)
from cacherl_jax.agent.factory import environment_class, make_environment
from cacherl_jax.agent.outcome import TIERS, CallOutcome, RolloutOutcome, worst_tier
from cacherl_jax.agent.tool_cache import ToolCache
from cacherl_jax.chat.parse import ParsedAssistant, parse_assistant
from cacherl_jax.chat.template import (
    Rendered,
    Span,
    append_generated,
    append_tool_results,
    encode_spans,
    generation_prompt_spans,
    render_prompt,
)
from cacherl_jax.chat.tokenizer import Tokenizer
from cacherl_jax.sampling.sampler import Generation, SamplingParams

Mode = Literal["cache", "live", "hybrid"]
MODES = ("cache", "live", "hybrid")
STOP_REASONS = ("answer", "max_turns", "max_tokens")


class Policy(Protocol):
    """What the loop needs from a sampler (`cacherl_jax.sampling.Sampler` is one)."""

    def start(self, prompts, sampling, *, max_len: int): ...

    def resume(self, state, new_tokens, sampling): ...


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    group_size: int = 4  # G rollouts per task
    mode: Mode = "cache"
    max_turns: int = 8  # assistant turns per rollout
    max_new_tokens: int = 256  # per assistant turn
    max_len: int = 2048  # tokens per rollout: prompt, generated and tool turns together
    # KV-cache slots per row. Slots are shared by the batch: left-padding of
    # prompts and tool turns, and rows that stop before the longest of a round, leave holes.
    cache_len: int = 0  # 0: 2 x max_len
    tool_result_max_tokens: int = 512  # longer results are cut at a token boundary, with a note
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    enable_thinking: bool | None = None
    cache_scope: Literal["task", "world", "none"] = "task"  # scope of cache lookups and writes
    # Cache mode: a call the task's tool schemas refuse (an unknown tool, arguments the schema
    # rejects) gets the environment's own error, as on live tools, instead of a cache lookup.
    answer_rejections: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.group_size < 1 or self.max_turns < 1:
            raise ValueError("group_size and max_turns must be at least 1")
        if self.cache_len and self.cache_len <= self.max_len:
            raise ValueError(f"cache_len ({self.cache_len}) must exceed max_len ({self.max_len})")

    @property
    def cache_slots(self) -> int:
        return self.cache_len or 2 * self.max_len


@dataclasses.dataclass
class CallRecord:
    """One tool call of a rollout and how it was answered."""

    turn: int  # index of the assistant turn that made it
    name: str
    arguments: dict[str, Any] | None
    tier: str  # exact / fuzzy / best_effort from the cache; "live" when run live; "rejected"
    score: float  # cache similarity 0-100 (100 for live and exact)
    result: str  # what the model was shown (after truncation)
    result_kind: str = "ok"  # live and rejected: the environment's ToolResult kind
    truncated_tokens: int = 0
    problems: tuple[str, ...] = ()  # parse problems of the turn the call came from
    user_turn: int = 0  # which of the task's user turns it answers (multi-turn tasks)


@dataclasses.dataclass
class Rollout:
    task_id: str
    sample: int  # index within the task's group
    token_ids: np.ndarray  # int32 [N]
    loss_mask: np.ndarray  # int8 [N]: 1 on sampled tokens
    logprobs: np.ndarray  # float32 [N]: sampler log-probs, 0 where the mask is 0
    raw_logprobs: np.ndarray  # float32 [N]: the same at temperature 1, unfiltered (the trainer's)
    thinking_mask: np.ndarray  # int8 [N]
    turn_ids: np.ndarray  # int32 [N]: message index of every token
    prompt_length: int
    turns: list[ParsedAssistant]
    calls: list[CallRecord]
    final_answer: str | None
    stop_reason: str
    final_state: dict[str, Any] | None = None

    @property
    def worst_tier(self) -> str:
        return worst_tier(c.tier for c in self.calls)

    @property
    def num_generated(self) -> int:
        return int(self.loss_mask.sum())

    def turn_boundaries(self) -> list[tuple[int, int, int]]:
        """(start, stop, message index) of each contiguous run of one message's tokens."""
        change = np.flatnonzero(np.diff(self.turn_ids)) + 1
        starts = np.concatenate([[0], change])
        stops = np.concatenate([change, [len(self.turn_ids)]])
        return [(int(a), int(b), int(self.turn_ids[a])) for a, b in zip(starts, stops, strict=True)]

    def outcome(self) -> RolloutOutcome:
        """What the reward functions read."""
        return RolloutOutcome(
            turns=tuple(self.turns),
            calls=tuple(CallOutcome(c.name, c.arguments, c.tier) for c in self.calls),
            final_answer=self.final_answer,
            final_state=self.final_state,
        )


@dataclasses.dataclass
class _Row:
    task: Task
    sample: int
    seed: int
    rendered: Rendered
    logprobs: list[np.ndarray]
    raw_logprobs: list[np.ndarray]
    prompt_length: int
    env: Environment | None
    user_turn: int = 0  # index into task.turns
    message_index: int = 0  # message index the next tokens belong to (template turn ids)
    turns: list[ParsedAssistant] = dataclasses.field(default_factory=list)
    calls: list[CallRecord] = dataclasses.field(default_factory=list)
    final_answer: str | None = None
    stop_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def drop_pending(self, n: int) -> None:
        """Takes back the last `n` appended (never fed) tokens: a turn that did not fit."""
        fields = dataclasses.astuple(self.rendered)
        self.rendered = Rendered(*(x[: len(x) - n] for x in fields))
        for chunks in (self.logprobs, self.raw_logprobs):
            assert len(chunks[-1]) == n, "the last chunk must be the dropped turn"
            chunks.pop()


def row_seed(seed: int, task_id: str, sample: int) -> int:
    """A 31-bit seed per (run seed, task, sample): rows sample independently of batch layout."""
    digest = hashlib.blake2b(f"{seed}/{task_id}/{sample}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class PromptTooLongError(ValueError):
    """A task's rendered prompt does not fit the rollout's token budget (`max_len`)."""


def cache_scope(task: Task, scope: str) -> str | None:
    """The cache scope of a task's calls: its id, its world (procedural tasks), or none."""
    if scope == "none":
        return None
    if scope == "world":
        return task.metadata.get("world_id", task.id)
    return task.id


class CacheAgentLoop:
    def __init__(
        self,
        policy: Policy,
        tokenizer: Tokenizer,
        cache: ToolCache | None,
        config: LoopConfig = LoopConfig(),
        *,
        make_env: Callable[[Task], Environment] = make_environment,
    ):
        if config.mode in ("cache", "hybrid") and cache is None:
            raise ValueError(f"mode {config.mode!r} needs a ToolCache")
        self.policy = policy
        self.tokenizer = tokenizer
        self.cache = cache
        self.config = config
        self.make_env = make_env
        self.metrics: dict[str, float] = {}

    # --- public -------------------------------------------------------------------------------

    def run(self, tasks: Sequence[Task], seed: int = 0) -> list[Rollout]:
        """G rollouts per task (task-major order); per-phase timings land in `self.metrics`."""
        cfg = self.config
        timing = dict.fromkeys(("sampling_s", "parsing_s", "tools_s", "render_s"), 0.0)
        t0 = time.perf_counter()
        rows = [self._new_row(task, g, seed) for task in tasks for g in range(cfg.group_size)]
        timing["render_s"] += time.perf_counter() - t0
        if not rows:
            return []
        too_long = [r for r in rows if r.prompt_length >= cfg.max_len]
        if too_long:
            r = too_long[0]
            raise PromptTooLongError(
                f"task {r.task.id!r}: its prompt has {r.prompt_length} tokens, max_len is {cfg.max_len}"
            )

        t0 = time.perf_counter()
        state, generations = self.policy.start(
            [r.rendered.token_ids.tolist() for r in rows],
            [self._sampling(r, cfg.max_len - r.prompt_length) for r in rows],
            max_len=cfg.cache_slots,
        )
        timing["sampling_s"] += time.perf_counter() - t0
        rounds = 1
        while True:
            deltas = []
            for row, generation in zip(rows, generations, strict=True):
                if row.done:
                    deltas.append([])
                    continue
                deltas.append(self._after_generation(row, generation, timing))
            slots_left = cfg.cache_slots - state.length - 1
            for row, delta in zip(rows, deltas, strict=True):
                # Out of tokens: the rollout's budget, or the batch's cache slots, cannot hold
                # this turn plus at least a few generated tokens.
                if delta and (len(row.rendered) + 8 > cfg.max_len or len(delta) + 8 > slots_left):
                    row.stop_reason = "max_tokens"
                    row.drop_pending(len(delta))
                    delta.clear()
            if all(row.done for row in rows):
                break
            t0 = time.perf_counter()
            state, generations = self.policy.resume(
                state, deltas, [self._sampling(r, cfg.max_len - len(r.rendered)) for r in rows]
            )
            timing["sampling_s"] += time.perf_counter() - t0
            rounds += 1

        rollouts = [self._finish(row) for row in rows]
        tiers = [c.tier for r in rollouts for c in r.calls]
        self.metrics = {
            **timing,
            "rounds": float(rounds),
            "rollouts": float(len(rollouts)),
            "calls_per_rollout": len(tiers) / len(rollouts),
            "generated_tokens": float(sum(r.num_generated for r in rollouts)),
            **{f"calls_{t}": float(tiers.count(t)) for t in (*TIERS, "live", "rejected")},
            **{f"stop_{s}": float(sum(r.stop_reason == s for r in rollouts)) for s in STOP_REASONS},
        }
        return rollouts

    # --- one row ------------------------------------------------------------------------------

    def _new_row(self, task: Task, sample: int, seed: int) -> _Row:
        messages = list(task.turns[0].messages)
        tools = [*task.tools, *task.turns[0].new_tools]
        rendered = render_prompt(
            messages, tools, self.tokenizer, enable_thinking=self.config.enable_thinking
        )
        env = self.make_env(task) if self.config.mode in ("live", "hybrid") else None
        return _Row(
            task=task,
            sample=sample,
            seed=row_seed(seed, task.id, sample),
            rendered=rendered,
            logprobs=[np.zeros(len(rendered), np.float32)],
            raw_logprobs=[np.zeros(len(rendered), np.float32)],
            prompt_length=len(rendered),
            env=env,
            message_index=len(messages),
        )

    def _sampling(self, row: _Row, tokens_left: int) -> SamplingParams:
        """Sampling for the row's next turn; at most `tokens_left` new tokens (its budget)."""
        cfg = self.config
        special = self.tokenizer.special
        return SamplingParams(
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            max_new_tokens=max(1, min(cfg.max_new_tokens, tokens_left)),
            stop_token_ids=(special.im_end, special.endoftext),
            seed=row.seed,
        )

    def _after_generation(self, row: _Row, generation: Generation, timing: dict) -> list[int]:
        """Records the turn; returns the tokens to append before the next turn ([] when done)."""
        cfg = self.config
        ids = np.asarray(generation.token_ids, np.int32)
        row.rendered = append_generated(row.rendered, ids, self.tokenizer, turn=row.message_index)
        row.logprobs.append(np.asarray(generation.logprobs, np.float32))
        row.raw_logprobs.append(np.asarray(generation.raw_logprobs, np.float32))
        row.message_index += 1

        t0 = time.perf_counter()
        parsed = parse_assistant(self.tokenizer.decode(ids.tolist()))  # decoded only to parse
        timing["parsing_s"] += time.perf_counter() - t0
        row.turns.append(parsed)
        ended = generation.stop_reason == "stop"
        if not ended:  # cut off mid-turn: nothing in it can be trusted or continued
            row.stop_reason = "max_tokens"
            return []
        if not parsed.tool_calls:
            row.final_answer = parsed.content.strip()
            row.user_turn += 1
            if row.user_turn >= len(row.task.turns):
                row.stop_reason = "answer"
                return []
            if len(row.turns) >= cfg.max_turns:
                row.stop_reason = "max_turns"
                return []
            return self._next_user_turn(row)
        if len(row.turns) >= cfg.max_turns:
            row.stop_reason = "max_turns"
            return []

        t0 = time.perf_counter()
        problems = tuple(p.kind for p in parsed.problems)
        results = []
        for call in parsed.tool_calls:
            record = self._answer(row, call.name, call.arguments, problems)
            row.calls.append(record)
            results.append(record.result)
        timing["tools_s"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        before = len(row.rendered)
        row.rendered = append_tool_results(
            row.rendered,
            results,
            self.tokenizer,
            first_turn=row.message_index,
            enable_thinking=cfg.enable_thinking,
        )
        row.message_index += len(results)
        delta = row.rendered.token_ids[before:]
        row.logprobs.append(np.zeros(len(delta), np.float32))
        row.raw_logprobs.append(np.zeros(len(delta), np.float32))
        timing["render_s"] += time.perf_counter() - t0
        return delta.tolist()

    def _next_user_turn(self, row: _Row) -> list[int]:
        """Closes the answer and opens the task's next user turn (multi-turn tasks)."""
        turn = row.task.turns[row.user_turn]
        spans: list[Span] = []
        if row.rendered.token_ids[-1] != self.tokenizer.special.im_end:
            spans.append(Span("<|im_end|>", "assistant", row.message_index - 1))
        spans.append(Span("\n", "assistant", row.message_index - 1))
        for message in turn.messages:
            role, content = message["role"], message.get("content") or ""
            spans.append(
                Span(f"<|im_start|>{role}\n{content}<|im_end|>\n", role, row.message_index)
            )
            row.message_index += 1
        spans.extend(
            generation_prompt_spans(
                row.message_index, self.config.enable_thinking, self.tokenizer.chat_variant
            )
        )
        delta = encode_spans(spans, self.tokenizer, trained_turns=set())
        if row.env is not None:
            row.env.begin_turn(row.user_turn)
        row.rendered = row.rendered.concat(delta)
        row.logprobs.append(np.zeros(len(delta), np.float32))
        row.raw_logprobs.append(np.zeros(len(delta), np.float32))
        return delta.token_ids.tolist()

    def _schema(self, task: Task, name: str) -> Mapping[str, Any] | None:
        tools = [*task.tools, *(t for turn in task.turns for t in turn.new_tools)]
        return next((tool for tool in tools if schema_name(tool) == name), None)

    def _answer(
        self, row: _Row, name: str, arguments: dict, problems: tuple[str, ...]
    ) -> CallRecord:
        text, tier, score, kind = self._result(row, name, arguments)
        text, cut = self._truncate(text)
        return CallRecord(
            row.message_index - 1,
            name,
            arguments,
            tier,
            score,
            text,
            kind,
            cut,
            problems,
            row.user_turn,
        )

    def _result(self, row: _Row, name: str, arguments: dict) -> tuple[str, str, float, str]:
        """The call's result text, tier, match score and result kind, by the loop's mode."""
        cfg = self.config
        if cfg.mode == "cache" and cfg.answer_rejections:
            rejected = self._rejection(row, name, arguments)
            if rejected is not None:
                return rejected.text, "rejected", 100.0, rejected.kind
        scope = cache_scope(row.task, cfg.cache_scope)
        if cfg.mode in ("cache", "hybrid"):
            schema = self._schema(row.task, name)
            hit = self.cache.lookup(name, arguments, scope=scope, schema=schema)
            if cfg.mode == "cache" or hit.tier == "exact":
                return hit.result, hit.tier, hit.score, "ok"
        result = row.env.execute(name, arguments)
        if cfg.mode == "hybrid" and result.ok:
            self.cache.record(name, arguments, result.text, scope=scope, source="hybrid")
        return result.text, "live", 100.0, result.kind

    def _rejection(self, row: _Row, name: str, arguments: dict) -> ToolResult | None:
        """The environment's error for a call the tools open at the row's user turn refuse (an
        unknown tool, bad arguments), built from the task's schemas alone; None: a valid call."""
        task = row.task
        opened = (tool for turn in task.turns[: row.user_turn + 1] for tool in turn.new_tools)
        visible = {schema_name(tool): tool for tool in (*task.tools, *opened)}
        check_types = environment_class(task).check_types
        checked = checked_call(visible, name, arguments, check_types=check_types)
        return checked if isinstance(checked, ToolResult) else None

    def _truncate(self, text: str) -> tuple[str, int]:
        """Cuts a tool result to the token budget at a token boundary, saying how much was cut."""
        budget = self.config.tool_result_max_tokens
        ids = self.tokenizer.encode(text)
        if len(ids) <= budget:
            return text, 0
        cut = len(ids) - budget
        return self.tokenizer.decode(ids[:budget]) + f"\n[truncated: {cut} more tokens]", cut

    def _finish(self, row: _Row) -> Rollout:
        logprobs, raw = np.concatenate(row.logprobs), np.concatenate(row.raw_logprobs)
        rendered = row.rendered
        if not len(logprobs) == len(raw) == len(rendered):
            raise AssertionError(f"{len(logprobs)} log-probs for {len(rendered)} tokens")
        generated = rendered.loss_mask > 0
        return Rollout(
            task_id=row.task.id,
            sample=row.sample,
            token_ids=rendered.token_ids,
            loss_mask=rendered.loss_mask,
            logprobs=np.where(generated, logprobs, 0.0).astype(np.float32),
            raw_logprobs=np.where(generated, raw, 0.0).astype(np.float32),
            thinking_mask=rendered.thinking_mask,
            turn_ids=rendered.turn_ids,
            prompt_length=row.prompt_length,
            turns=row.turns,
            calls=row.calls,
            final_answer=row.final_answer,
            stop_reason=row.stop_reason or "max_tokens",
            final_state=None if row.env is None else row.env.final_state(),
        )


def fidelity_report(
    tasks: Sequence[Task],
    calls_per_task: Mapping[str, Sequence[tuple[str, dict[str, Any]]]],
    cache: ToolCache,
    *,
    scope: Literal["task", "world", "none"] = "task",
    make_env: Callable[[Task], Environment] = make_environment,
) -> dict[str, Any]:
    """Replays each task's calls (in order, on a fresh live environment) against both the cache
    and the environment; reports, per cache tier, how many calls and how often the results agree
    byte for byte."""
    by_tier = {tier: {"calls": 0, "agree": 0} for tier in TIERS}
    for task in tasks:
        env = make_env(task)
        task_scope = cache_scope(task, scope)
        for name, arguments in calls_per_task.get(task.id, ()):
            live = env.execute(name, arguments).text
            hit = cache.lookup(name, arguments, scope=task_scope)
            by_tier[hit.tier]["calls"] += 1
            by_tier[hit.tier]["agree"] += int(hit.result == live)
    for counts in by_tier.values():
        counts["agreement"] = counts["agree"] / counts["calls"] if counts["calls"] else None
    return {"calls": sum(c["calls"] for c in by_tier.values()), "by_tier": by_tier}
