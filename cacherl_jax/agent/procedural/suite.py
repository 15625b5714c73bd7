"""Generating procedural tasks, with train / validation / test splits that share every entity
name but hold out value combinations, request templates and worlds.

- Value combinations: the values a request names (a currency pair, an event and an offset, a
  link file and a destination). Each kind's combinations are split once, by a fixed shuffle:
  10% are test-only, 10% validation-only, the rest train. Kinds with the same combination set
  (rate and convert: currency pairs) split it the same way. A kind with fewer than 3
  combinations (shop.buy_all_special names no value) is held out by template and world only.
- Templates: of each kind's paraphrases the last two are held out, one for validation, one for
  test. Validation and test tasks use theirs with probability `held_out_template_rate`, a
  training template otherwise (metadata["template_held_out"] tells which, to report both).
- Worlds: drawn per task from a seed derived from (split, seed, index), so no world repeats
  across splits (metadata["world_id"] is a hash of the world, to check).

Every entity token (currency codes, event, file and item names) occurs in training: a tiny model
cannot emit a token it was never trained to emit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Sequence
from typing import Any

from cacherl_jax.agent.environment import Task, Turn
from cacherl_jax.agent.procedural.domain import Domain, TaskKind
from cacherl_jax.agent.procedural.environment import DOMAINS
from cacherl_jax.agent.procedural.solver import run_solver

SPLITS = ("train", "validation", "test")
HELD_OUT_COMBO_FRACTION = 0.1
SYSTEM_PROMPT = "Use the tools, then answer in a few words."


def all_kinds() -> dict[str, tuple[Domain, TaskKind]]:
    """Every task kind by name, with its domain."""
    return {kind.name: (domain, kind) for domain in DOMAINS.values() for kind in domain.kinds}


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


@functools.cache
def _split_combos(combos: tuple[tuple[Any, ...], ...]) -> dict[str, tuple[tuple[Any, ...], ...]]:
    if len(combos) < 3:
        return dict.fromkeys(SPLITS, combos)
    order = list(combos)
    random.Random(_fingerprint([list(combo) for combo in combos])).shuffle(order)
    held_out = max(1, round(HELD_OUT_COMBO_FRACTION * len(order)))
    return {
        "test": tuple(order[:held_out]),
        "validation": tuple(order[held_out : 2 * held_out]),
        "train": tuple(order[2 * held_out :]),
    }


def combos_for(kind: TaskKind, split: str) -> tuple[tuple[Any, ...], ...]:
    """The value combinations `split` draws from for `kind`."""
    _check_split(split)
    return _split_combos(kind.combos)[split]


def templates_for(kind: TaskKind, split: str) -> tuple[list[int], list[int]]:
    """(training template indices, the split's held-out template indices)."""
    _check_split(split)
    count = len(kind.templates)
    held_out = {"train": [], "validation": [count - 2], "test": [count - 1]}[split]
    return list(range(count - 2)), held_out


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")


def quoted(values: dict[str, Any]) -> dict[str, Any]:
    """The request's values as its text shows them: strings in double quotes, as in a call's JSON.
    Under a byte-level BPE with Qwen3's pre-tokenizer an unquoted word carries its leading space
    (" EUR") while the same value in JSON does not ("EUR" after the quote), so a model would have
    to learn, value by value, which token to write for the one it read; quoted, both are the same
    tokens and the call copies them."""
    return {key: f'"{value}"' if isinstance(value, str) else value for key, value in values.items()}


def make_task(
    kind_name: str,
    split: str,
    rng: random.Random,
    *,
    task_id: str,
    held_out_template_rate: float = 0.5,
    system_prompt: str | None = SYSTEM_PROMPT,
    tools: str = "kind",
    describe_tools: bool = False,
) -> Task:
    """One task of a kind for a split, with its reference calls, answer and final state.

    `tools="kind"` offers the tools the kind's solution uses, `"domain"` all of the domain's
    (every tool schema costs ~45 tokens in the prompt, ~10 more with `describe_tools`).
    """
    if tools not in ("kind", "domain"):
        raise ValueError(f"tools must be 'kind' or 'domain', got {tools!r}")
    kinds = all_kinds()
    if kind_name not in kinds:
        raise ValueError(f"unknown task kind {kind_name!r} (one of {', '.join(kinds)})")
    domain, kind = kinds[kind_name]
    combo = rng.choice(combos_for(kind, split))
    train_templates, held_out_templates = templates_for(kind, split)
    use_held_out = bool(held_out_templates) and rng.random() < held_out_template_rate
    template = rng.choice(held_out_templates if use_held_out else train_templates)
    values, world = kind.setup(rng, combo)

    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": kind.templates[template].format(**quoted(values))})
    task = Task(
        id=task_id,
        split=split,
        environment={"kind": "procedural", "domain": domain.name},
        tools=[tool.schema(describe=describe_tools) for tool in domain.tools],
        turns=[Turn(messages)],
        initial_state=world,
        metadata={
            "source": "procedural",
            "domain": domain.name,
            "kind": kind.name,
            "template": template,
            "template_held_out": use_held_out,
            "combo": list(combo),
            "values": values,
            "world_id": _fingerprint(world),
        },
    )
    run = run_solver(task, kind, values, reasoning=False)
    task.turns[0].reference_calls = run.calls
    if tools == "kind":
        used = {call.name for call in run.calls}
        task.tools = [tool for tool in task.tools if tool["function"]["name"] in used]
    task.expected_answer = run.solution.answer
    task.expected_state = run.final_state
    task.metadata["num_calls"] = len(run.calls)
    return task


def generate_tasks(
    split: str,
    n: int,
    seed: int = 0,
    *,
    domains: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    held_out_template_rate: float = 0.5,
    system_prompt: str | None = SYSTEM_PROMPT,
    tools: str = "kind",
    describe_tools: bool = False,
) -> list[Task]:
    """`n` tasks of `split`, kinds taken in turn (balanced), deterministic in (split, n, seed).

    Task `i` depends only on (split, seed, i), so a longer list extends a shorter one.
    """
    _check_split(split)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if not 0.0 <= held_out_template_rate <= 1.0:
        raise ValueError(f"held_out_template_rate must be in [0, 1], got {held_out_template_rate}")
    available = all_kinds()
    if domains is not None:
        unknown = [name for name in domains if name not in DOMAINS]
        if unknown:
            raise ValueError(
                f"unknown procedural domain {unknown[0]!r} (one of {', '.join(DOMAINS)})"
            )
    chosen = list(kinds) if kinds is not None else list(available)
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise ValueError(f"unknown task kind {unknown[0]!r} (one of {', '.join(available)})")
    if domains is not None:
        chosen = [name for name in chosen if available[name][0].name in domains]
    if not chosen:
        raise ValueError("no task kind left after filtering by domains and kinds")
    return [
        make_task(
            chosen[index % len(chosen)],
            split,
            random.Random(f"procedural/{split}/{seed}/{index}"),
            task_id=f"{split}-{seed}-{index:06d}",
            held_out_template_rate=held_out_template_rate,
            system_prompt=system_prompt,
            tools=tools,
            describe_tools=describe_tools,
        )
        for index in range(n)
    ]
