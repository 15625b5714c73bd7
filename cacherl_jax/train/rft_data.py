"""What a round keeps and how it writes it: the selection of sampled rollouts and their
conversion to SFT trajectories.

- `select` picks, from one round's scored rollouts, those that ended with an answer, reached
  `FilterConfig.reward_threshold` (and succeeded, if required), each token sequence once
  (`token_key`), best reward first, at most `max_per_task` per task, and that round-trip (unless
  `keep_nonroundtrip`).
- `rollout_messages` / `rollout_tools` turn a rollout back into the OpenAI-style messages and
  tools it was sampled from; `roundtrip_mismatch` says whether rendering them with
  `cacherl_jax.chat.render` gives exactly the sampled token ids and loss mask (None) or where
  they first differ (why this matters: `cacherl_jax.train.rft`).
- `rollout_record` makes the accepted rollout's `Trajectory` (metadata: source="rft", round,
  task, reward, tier, success, roundtrip, tokens_sha1); `merge_data` writes base trajectories
  then accepted ones, each token sequence once.

Pure host-side code: no model, no devices.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from cacherl_jax.agent.environment import Task
from cacherl_jax.agent.loop import Rollout
from cacherl_jax.chat import Tokenizer, render
from cacherl_jax.chat.trajectory import Trajectory, load_jsonl, write_jsonl
from cacherl_jax.rl.scoring import TaskResult

SOURCE = "rft"


# --- selection ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """Which sampled rollouts become SFT data."""

    reward_threshold: float
    require_success: bool = False
    max_per_task: int = 0  # 0: no cap
    keep_nonroundtrip: bool = False

    @classmethod
    def from_config(cls, rft: ml_collections.ConfigDict) -> FilterConfig:
        return cls(
            reward_threshold=rft.reward_threshold,
            require_success=rft.require_success,
            max_per_task=rft.max_per_task,
            keep_nonroundtrip=rft.keep_nonroundtrip,
        )


def token_key(token_ids: Sequence[int] | np.ndarray) -> str:
    """A digest of a token sequence: equal keys, equal rollouts (for deduplication)."""
    return hashlib.sha1(np.asarray(token_ids, np.int32).tobytes()).hexdigest()


def select(
    rollouts: Sequence[Rollout],
    results: Sequence[TaskResult],
    config: FilterConfig,
    roundtrips: Callable[[int], bool],
    seen: set[str] | None = None,
) -> tuple[list[int], Counter]:
    """(indices of the rollouts to keep, counts of why the others were not).

    A rollout is a candidate when it ended with an answer (a cut-off conversation is no
    demonstration), its reward reaches the threshold and, if asked, it succeeded. Per task,
    candidates go best reward first (then sample index); a token sequence already in `seen` is a
    duplicate; `roundtrips(i)` is asked only of the rest, until the task has `max_per_task`.
    `seen` is updated, so successive batches of one round share it.
    """
    seen = set() if seen is None else seen
    counts: Counter = Counter()
    by_task: dict[str, list[int]] = {}
    for index, (rollout, result) in enumerate(zip(rollouts, results, strict=True)):
        if rollout.task_id != result.task_id or rollout.sample != result.sample:
            raise ValueError(f"result {index} is not rollout {index}'s")
        counts["sampled"] += 1
        if rollout.stop_reason != "answer":
            continue
        counts["finished"] += 1
        if result.reward.total < config.reward_threshold:
            continue
        counts["above_threshold"] += 1
        if config.require_success and not result.success:
            continue
        counts["candidates"] += 1
        by_task.setdefault(rollout.task_id, []).append(index)

    kept: list[int] = []
    for indices in by_task.values():
        indices.sort(key=lambda i: (-results[i].reward.total, rollouts[i].sample))
        taken = 0
        for index in indices:
            key = token_key(rollouts[index].token_ids)
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            if config.max_per_task and taken >= config.max_per_task:
                counts["over_cap"] += 1
                continue
            exact = roundtrips(index)
            counts["roundtrip" if exact else "not_roundtrip"] += 1
            if not exact and not config.keep_nonroundtrip:
                continue
            counts["accepted_not_roundtrip"] += int(not exact)
            kept.append(index)
            taken += 1
    counts["accepted"] = len(kept)
    return sorted(kept), counts


# --- rollouts as trajectories -------------------------------------------------------------------


def rollout_tools(task: Task) -> list[dict[str, Any]]:
    """The tools the rollout's prompt offered (as `CacheAgentLoop` renders them)."""
    return copy.deepcopy([*task.tools, *task.turns[0].new_tools])


def rollout_messages(task: Task, rollout: Rollout) -> list[dict[str, Any]]:
    """The conversation of a rollout as OpenAI-style messages: the task's opening messages, each
    parsed assistant turn (reasoning, content, tool calls), the tool results the model was shown
    (after truncation) and, for multi-turn tasks, the next user turn after each answer."""
    messages = copy.deepcopy(task.turns[0].messages)
    results: dict[int, list[Any]] = {}
    for call in rollout.calls:
        results.setdefault(call.turn, []).append(call)
    user_turn, pending_user = 0, False
    for parsed in rollout.turns:
        if pending_user:
            messages.extend(copy.deepcopy(task.turns[user_turn].messages))
            pending_user = False
        index = len(messages)
        messages.append(parsed.to_message())
        if parsed.tool_calls:
            messages.extend(
                {"role": "tool", "name": call.name, "content": call.result}
                for call in results.get(index, [])
            )
        else:
            user_turn += 1
            pending_user = user_turn < len(task.turns)
    return messages


def roundtrip_mismatch(
    rollout: Rollout,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]],
    tokenizer: Tokenizer,
    *,
    enable_thinking: bool | None = None,
) -> str | None:
    """None if rendering `messages` gives exactly the rollout's token ids, with loss mask 1 on
    exactly its sampled tokens; else where the two first differ.

    The rendering closes the conversation with `\\n` after the final `<|im_end|>`, which the
    rollout (ending on the token it sampled last) does not have; nothing else may differ.
    """
    rendered = render(messages, tools, tokenizer, enable_thinking=enable_thinking)
    ids_T, mask_T = np.asarray(rollout.token_ids), np.asarray(rollout.loss_mask)
    n = len(ids_T)
    rendered_ids = rendered.token_ids
    common = min(n, len(rendered_ids))
    differ = np.flatnonzero(rendered_ids[:common] != ids_T[:common])
    if len(differ):
        at = int(differ[0])
        return (
            f"token {at} of {n}: sampled {tokenizer.decode(ids_T[at : at + 8].tolist())!r}, "
            f"rendered {tokenizer.decode(rendered_ids[at : at + 8].tolist())!r}"
        )
    if rendered_ids[n:].tolist() != tokenizer.encode("\n"):
        return f"lengths differ: {n} sampled tokens, {len(rendered_ids)} rendered"
    if not np.array_equal(rendered.loss_mask[:n], mask_T):
        at = int(np.flatnonzero(rendered.loss_mask[:n] != mask_T)[0])
        return f"loss mask differs at token {at}: sampled {mask_T[at]}, rendered {rendered.loss_mask[at]}"
    return None


def rollout_record(
    task: Task,
    rollout: Rollout,
    result: TaskResult,
    messages: list[dict[str, Any]],
    *,
    round_index: int,
    roundtrip: bool,
) -> Trajectory:
    return Trajectory(
        id=f"{SOURCE}-r{round_index}-{task.id}-s{rollout.sample}",
        messages=messages,
        tools=rollout_tools(task),
        metadata={
            "source": SOURCE,
            "round": round_index,
            "task_id": task.id,
            "sample": rollout.sample,
            "reward": result.reward.total,
            "reward_parts": result.reward.to_dict(),
            "tier": rollout.worst_tier,
            "success": result.success,
            "roundtrip": roundtrip,
            "tokens_sha1": token_key(rollout.token_ids),
            "task": task.to_dict(),
        },
    )


def merge_data(
    base_paths: Sequence[str], accepted_paths: Sequence[Path], output: Path
) -> dict[str, int]:
    """Writes the base trajectories, then the accepted ones (each token sequence once)."""
    base: list[Trajectory] = []
    for path in base_paths:
        base.extend(load_jsonl(path)[0])
    accepted, seen, duplicates = [], set(), 0
    for path in accepted_paths:
        for trajectory in load_jsonl(path)[0]:
            key = trajectory.metadata.get("tokens_sha1")
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            accepted.append(trajectory)
    write_jsonl(output, [*base, *accepted])
    return {"base": len(base), "accepted": len(accepted), "duplicates": duplicates}
