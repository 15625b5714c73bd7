"""Where trajectories without (or with partial) reasoning come from, and the tool cache they feed.

- `JsonlSource`: OpenAI-style conversations with tools (our trajectory JSONL, the format of public
  agent datasets); bad records are reported by file:line:field, or skipped and counted.
- `BfclSource`: BFCL multi-turn tasks turned into real trajectories by executing their ground-truth
  calls in the live BFCL environment, one call per assistant turn, each followed by the result the
  environment returned (`bfcl_trajectory`).
- `ProceduralSource`: the procedural suite's tasks solved by its reference solver.

Spelled on the command line as `--input=PATH`, `--input=bfcl:multi_turn_base` or
`--input=procedural:train:1000[:SEED]` (`source_from_spec`).

`CacheRecorder` records every (call, result) pair a source's trajectories hold into a `ToolCache`
(in batches; recording is idempotent, so a rerun records nothing twice).
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from cacherl_jax.chat.trajectory import ReadReport, Trajectory, TrajectoryError, read_jsonl

SOURCE_KINDS = ("jsonl", "bfcl", "procedural")
CACHE_SCOPES = ("none", "trajectory", "world")


class Source(abc.ABC):
    """An iterable of trajectories with a name (for the summary) and, if cheap, a length."""

    name: str = "source"

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Trajectory]: ...

    def total(self) -> int | None:
        """How many trajectories iteration yields (or about, for a JSONL file); None if unknown."""
        return None

    def report(self) -> dict[str, Any]:
        """What reading skipped, for the summary."""
        return {}


class JsonlSource(Source):
    def __init__(
        self, path: str | os.PathLike[str], *, on_error: Literal["raise", "skip"] = "raise"
    ):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):  # before the run creates its output files
            raise TrajectoryError(
                "no such file (an input is FILE.jsonl, bfcl:... or procedural:...)", path=self.path
            )
        self.on_error = on_error
        self.name = f"jsonl:{self.path}"
        self.read_report = ReadReport(path=self.path)

    def __iter__(self) -> Iterator[Trajectory]:
        return read_jsonl(self.path, on_error=self.on_error, report=self.read_report)

    def total(self) -> int | None:
        try:
            with open(self.path, "rb") as file:
                return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))
        except OSError:
            return None  # read_jsonl reports it properly

    def report(self) -> dict[str, Any]:
        return {
            "input_records_read": self.read_report.read,
            "input_records_skipped": self.read_report.skipped,
            "input_errors": [str(error) for error in self.read_report.errors[:20]],
        }


# --- BFCL --------------------------------------------------------------------------------------


def _turn_answer(calls: Sequence[Any]) -> str:
    """The assistant's closing text of a BFCL turn (BFCL has none; its checker ignores the text)."""
    if not calls:
        return "There is nothing to run for this request."
    names = list(dict.fromkeys(call.name for call in calls))
    done = names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]}"
    last = calls[-1].result.text.strip()
    last = last if len(last) <= 300 else last[:297] + "..."
    return f"Done: I ran {done}. The last result was: {last}"


def bfcl_trajectory(task: Any) -> Trajectory:
    """A BFCL task's ground truth executed live, as a trajectory.

    Each turn: its user messages, then per ground-truth call an assistant message with that call
    and a tool message with the live result (`ExecutedCall.result.text`, errors included), then a
    short closing assistant message. The task itself goes into `metadata["task"]`.
    """
    from cacherl_jax.agent.bfcl import execute_ground_truth

    executed = execute_ground_truth(task)
    by_turn: dict[int, list[Any]] = {}
    for call in executed:
        by_turn.setdefault(call.turn, []).append(call)
    messages: list[dict[str, Any]] = []
    tools = list(task.tools)
    for turn_index, turn in enumerate(task.turns):
        messages.extend(copy.deepcopy(turn.messages))
        tools.extend(turn.new_tools)
        calls = by_turn.get(turn_index, [])
        for call_index, call in enumerate(calls):
            call_id = f"call_{turn_index}_{call_index}"
            function = {"name": call.name, "arguments": copy.deepcopy(call.arguments)}
            messages.append(
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"id": call_id, "type": "function", "function": function}],
                }
            )
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call_id,
                    "name": call.name,
                    "content": call.result.text,
                }
            )
        messages.append({"role": "assistant", "content": _turn_answer(calls)})
    # Built from checked parts (the writer validates again); the task's state is shared, not
    # copied: it is large and nothing here modifies it.
    task_record = {field.name: getattr(task, field.name) for field in dataclasses.fields(task)}
    task_record["turns"] = [dataclasses.asdict(turn) for turn in task.turns]
    metadata = {
        "source": "bfcl",
        "category": task.metadata.get("category", ""),
        "task": task_record,
    }
    return Trajectory(task.id, messages, copy.deepcopy(tools), metadata)


class BfclSource(Source):
    def __init__(
        self,
        category: str = "multi_turn_base",
        *,
        ids: Sequence[str] | None = None,
        limit: int | None = None,
    ):
        from cacherl_jax.agent.bfcl import load_tasks

        self.name = f"bfcl:{category}"
        self.tasks = load_tasks(category, ids=ids or None, limit=limit or None)

    def __iter__(self) -> Iterator[Trajectory]:
        for task in self.tasks:
            yield bfcl_trajectory(task)

    def total(self) -> int:
        return len(self.tasks)


# --- procedural --------------------------------------------------------------------------------


class ProceduralSource(Source):
    def __init__(
        self,
        split: str,
        n: int,
        seed: int = 0,
        *,
        domains: Sequence[str] = (),
        kinds: Sequence[str] = (),
        tools: str = "kind",
        solver_reasoning: bool = False,
    ):
        self.name = f"procedural:{split}:{n}:{seed}"
        self.split, self.n, self.seed = split, n, seed
        self.domains, self.kinds, self.tools = list(domains) or None, list(kinds) or None, tools
        self.solver_reasoning = solver_reasoning

    def __iter__(self) -> Iterator[Trajectory]:
        from cacherl_jax.agent.procedural import generate_tasks, reference_trajectory

        tasks = generate_tasks(
            self.split, self.n, self.seed, domains=self.domains, kinds=self.kinds, tools=self.tools
        )
        for task in tasks:
            yield reference_trajectory(task, reasoning=self.solver_reasoning)

    def total(self) -> int:
        return self.n


def source_from_spec(spec: str, config: Any = None) -> Source:
    """A source from `PATH`, `bfcl:CATEGORY` or `procedural:SPLIT:N[:SEED]`; `config` (the
    config's `input` section) supplies the other settings."""

    def setting(name: str, default: Any) -> Any:
        value = getattr(config, name, default) if config is not None else default
        return default if value is None else value

    kind, _, rest = spec.partition(":")
    if kind == "bfcl":
        ids = list(setting("bfcl_ids", ()))
        return BfclSource(rest or "multi_turn_base", ids=ids, limit=setting("limit", 0))
    if kind == "procedural":
        parts = rest.split(":")
        if len(parts) not in (2, 3) or not all(part.lstrip("-").isdigit() for part in parts[1:]):
            raise ValueError(f"procedural input is procedural:SPLIT:N[:SEED], got {spec!r}")
        return ProceduralSource(
            parts[0],
            int(parts[1]),
            int(parts[2]) if len(parts) == 3 else setting("seed", 0),
            domains=setting("domains", ()),
            kinds=setting("kinds", ()),
            tools=setting("tools", "kind"),
            solver_reasoning=setting("solver_reasoning", False),
        )
    return JsonlSource(spec, on_error=setting("on_error", "raise"))


# --- the tool cache ----------------------------------------------------------------------------


def cache_scope(trajectory: Trajectory, scope: str) -> str | None:
    """The scope a trajectory's calls are recorded under: none, its id (results depend on the
    task's state: BFCL, procedural worlds) or its procedural world (shared by tasks of one world)."""
    if scope == "none":
        return None
    if scope == "world":
        task = trajectory.metadata.get("task")
        world = (task or {}).get("metadata", {}).get("world_id") if isinstance(task, dict) else None
        return world or trajectory.id
    return trajectory.id


class CacheRecorder:
    """Records each trajectory's answered calls (and its tool schemas) into a `ToolCache`."""

    def __init__(self, cache: Any, *, scope: str = "trajectory", batch_size: int = 512):
        if scope not in CACHE_SCOPES:
            raise ValueError(f"tool_cache.scope must be one of {CACHE_SCOPES}, got {scope!r}")
        self.cache, self.scope, self.batch_size = cache, scope, batch_size
        self._batch: list[Any] = []
        self._tool_names: set[str] = set()
        self.calls = self.recorded = self.already_present = self.conflicting = 0
        self.unanswered_calls = 0

    def add(self, trajectory: Trajectory) -> None:
        from cacherl_jax.agent.tool_cache import ToolRecord, paired_calls

        new_tools = [
            tool
            for tool in trajectory.tools
            if (tool.get("function") or tool).get("name") not in self._tool_names
        ]
        if new_tools:
            self.cache.register_tools(new_tools)
            self._tool_names.update((tool.get("function") or tool)["name"] for tool in new_tools)
        pairs, unanswered, _ = paired_calls(trajectory)
        self.unanswered_calls += unanswered
        scope = cache_scope(trajectory, self.scope)
        source = f"{trajectory.metadata.get('source', 'trajectory')}:{trajectory.id}"
        for tool, arguments, result in pairs:
            self._batch.append(ToolRecord(tool, arguments, result, scope, source))
        self.calls += len(pairs)
        if len(self._batch) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self._batch:
            return
        report = self.cache.record_many(self._batch)
        self.recorded += report.recorded
        self.already_present += report.already_present
        self.conflicting += report.conflicting
        self._batch.clear()

    def report(self) -> dict[str, Any]:
        return {
            "path": self.cache.path,
            "scope": self.scope,
            "calls_seen": self.calls,
            "recorded": self.recorded,
            "already_present": self.already_present,
            "conflicting": self.conflicting,
            "unanswered_calls": self.unanswered_calls,
        }
