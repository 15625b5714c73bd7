"""Tool cache at scale: lookup latency per tier, against a linear rapidfuzz scan, memory, and
rollout throughput with the cache against live tools.

    .venv/bin/python experiments/bench_cache.py [--entries 1000000] [--tools 1000] [--zipf 1.0]

Builds a cache of `--entries` synthetic calls over `--tools` tools whose call counts follow a Zipf
law (with s=1 and 1,000 tools the top tool holds ~13% of all entries), with 1-4 arguments per
tool (free text, ids, names, enums, dates, integers, decimals; some tools with an optional
argument) and JSON results of 100-300 characters. Phase 1 generates the calls and stores them
with one `record_many` (executemany in one transaction). Phase 2 runs in a fresh process so its
memory is the cache's alone: it opens the file (index built from the database), builds the
fuzzy indexes, then times lookups of four query sets drawn like the entries (so Zipf-weighted):

- rewritten: stored arguments with keys shuffled, integers written as floats, extra whitespace
  (all exact hits);
- perturbed: one argument changed a little (a one-character edit, or a number moved by 1-5%);
- fresh: a known tool with freshly drawn arguments (best-effort, or fuzzy when the tool already
  holds a similar call, as large tools often do);
- unseen: tools that were never recorded.

Every query is distinct; `--warmup` more per set run first, untimed (allocator, CPU caches, the
code paths), so the timed lookups are warm but each one meets its own entries. Each timed pass
starts after a `gc.collect()`, so that a collection owed to the set-up (this script's own lists)
does not land inside it; collections the lookups cause are counted. Latency is
reported per query set and per tier answered (`tier best_effort` counts nearest-entry answers,
`tier unseen_tool` the "no recorded result" ones), as wall time and as this thread's CPU time:
on a shared machine the wall p99 is mostly time spent waiting for a core.

The anchor is how a plain JSON-file cache answers a fuzzy call: rapidfuzz `fuzz.ratio` of the
call's canonical arguments JSON against every entry of the tool, as one `process.extractOne` (the
fast way to scan; a `score_cutoff` does not speed it up, and a cache must find the nearest entry
below the threshold too). The speedup (`ratio`) is the mean scan time over the mean lookup time on
the same perturbed queries (total time for the same work), in `--rounds` rounds of
lookups-then-scans (the first reuses the perturbed set's timings): the median round's, so that a
slow spell of a shared machine meets both sides. We also check how often the index's answer has
the exhaustive best score (every block scored whole).

Phase 3, rollout throughput: procedural tasks' reference solutions replayed through
`CacheAgentLoop` (a scripted policy emits each reference assistant turn's tokens, so no model
runs), once answering every call from a tool cache built from those references and once live,
from the tasks' environments made to sleep `--live-delay` (100 ms) per call as a real tool would.
Both runs do the same rollouts: rollouts/s of each and their ratio.

Prints a table, then, last, one JSON object: `ratio` is the speedup over the scan, `floors` says
which of the regression guards hold (set for 1M entries: exact p99 <= 30 us, fuzzy p99 <= 5 ms,
ratio >= 50, RSS <= 2 GB).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import random
import statistics
import string
import sys
import tempfile
import time

import numpy as np
from rapidfuzz import fuzz, process

from cacherl_jax.agent import tool_cache
from cacherl_jax.agent.tool_cache import (
    ToolCache,
    ToolCacheConfig,
    ToolRecord,
    build_from_trajectories,
    limits,
)

ARGUMENT_KINDS = ("text", "id", "entity", "enum", "date", "int", "float")
HIGH_CARDINALITY = ("text", "id", "float")  # every tool leads with one, so big tools stay unique


def _vocabulary(rng: random.Random, count: int, syllables: int) -> list[str]:
    parts = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]
    words = {"".join(rng.choices(parts, k=rng.randint(1, syllables))) for _ in range(count * 2)}
    return sorted(words)[:count]


class _Generator:
    """Tool schemas and argument values; deterministic for a seed."""

    def __init__(self, tools: int, seed: int):
        self.rng = random.Random(seed)
        self.words = _vocabulary(self.rng, 5000, 4)
        self.entities = [w.capitalize() + " " + v.capitalize() for w, v in zip(
            self.rng.sample(self.words, 2000), self.rng.sample(self.words, 2000), strict=True
        )]  # fmt: skip
        self.tools = [self._schema(index) for index in range(tools)]

    def _schema(self, index: int) -> dict:
        rng = self.rng
        count = rng.choices([1, 2, 3, 4], weights=[2, 4, 3, 2])[0]
        kinds = [rng.choice(HIGH_CARDINALITY), *rng.choices(ARGUMENT_KINDS, k=count - 1)]
        names = rng.sample(
            ["query", "name", "id", "city", "user", "amount", "date", "limit", "unit", "status",
             "path", "item", "count", "price", "title", "label", "target", "mode"], count,
        )  # fmt: skip
        enums = {name: rng.sample(self.words, rng.randint(3, 8)) for name in names}
        optional = names[-1] if count >= 2 and rng.random() < 0.25 else None
        verb, noun = rng.choice(["get", "find", "list", "create", "update"]), rng.choice(self.words)
        return {"name": f"{verb}_{noun}_{index}", "args": list(zip(names, kinds, strict=True)),
                "enums": enums, "optional": optional}  # fmt: skip

    def value(self, name: str, kind: str, enums: dict) -> object:
        rng = self.rng
        if kind == "text":
            return " ".join(rng.choices(self.words, k=rng.randint(2, 6)))
        if kind == "id":
            return f"{name[:3].upper()}-{rng.randint(0, 999_999):06d}"
        if kind == "entity":
            return rng.choice(self.entities)
        if kind == "enum":
            return rng.choice(enums[name])
        if kind == "date":
            return f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        if kind == "int":
            return rng.randint(0, 10_000)
        return round(rng.uniform(0, 10_000), 2)

    def arguments(self, tool: dict) -> dict:
        arguments = {}
        for name, kind in tool["args"]:
            if name == tool["optional"] and self.rng.random() < 0.4:
                continue
            arguments[name] = self.value(name, kind, tool["enums"])
        return arguments

    def result(self, tool: dict, arguments: dict) -> str:
        rng = self.rng
        items = [rng.choice(self.words) for _ in range(rng.randint(1, 8))]
        data = {"status": "ok", "tool": tool["name"], "request": arguments, "items": items,
                "score": round(rng.random(), 4), "note": " ".join(rng.choices(self.words, k=6))}  # fmt: skip
        return json.dumps(data)

    def perturb(self, tool: dict, arguments: dict) -> dict | None:
        """One argument changed a little: a one-character edit or a number moved 1-5%."""
        rng = self.rng
        kinds = dict(tool["args"])
        names = [n for n in arguments if kinds[n] in ("text", "id", "entity", "int", "float")]
        if not names:
            return None
        name = rng.choice(names)
        value = arguments[name]
        out = dict(arguments)
        if isinstance(value, str):
            position = rng.randrange(len(value))
            edit = rng.choice(["substitute", "insert", "delete"])
            letter = rng.choice(string.ascii_lowercase)
            if edit == "substitute":
                value = value[:position] + letter + value[position + 1 :]
            elif edit == "insert":
                value = value[:position] + letter + value[position:]
            else:
                value = value[:position] + value[position + 1 :]
        else:
            value = round(value * (1 + rng.choice([-1, 1]) * rng.uniform(0.01, 0.05)), 2)
            value = value if value != arguments[name] else value + 1
        out[name] = value
        return out


def _reformatted(rng: random.Random, arguments: dict) -> dict:
    """Canonically the same call written differently: key order, 1 -> 1.0, spaces."""
    items = list(arguments.items())
    rng.shuffle(items)
    out = {}
    for name, value in items:
        if isinstance(value, int):
            value = float(value)
        elif isinstance(value, str):
            value = "  " + value.replace(" ", "   ") + " "
        out[name] = value
    return out


def build(args: argparse.Namespace, db_path: str, queries_path: str) -> dict:
    generator = _Generator(args.tools, args.seed)
    rng = np.random.default_rng(args.seed)
    weights = 1.0 / np.arange(1, args.tools + 1) ** args.zipf
    counts = rng.multinomial(args.entries, weights / weights.sum())

    start = time.perf_counter()
    records = []
    for tool, count in zip(generator.tools, counts.tolist(), strict=True):
        for _ in range(count):
            arguments = generator.arguments(tool)
            records.append(ToolRecord(tool["name"], arguments, generator.result(tool, arguments)))
    generate_s = time.perf_counter() - start

    # Queries drawn like the entries: each samples one stored call. The first `warmup` of each
    # set are run untimed.
    wanted = args.warmup + args.queries
    picks = generator.rng.sample(range(len(records)), min(len(records), 3 * wanted))
    by_name = {tool["name"]: tool for tool in generator.tools}
    queries: dict[str, list] = {"rewritten": [], "perturbed": [], "fresh": [], "unseen": []}
    for index in picks:
        record = records[index]
        tool = by_name[record.tool]
        if len(queries["rewritten"]) < wanted:
            queries["rewritten"].append(
                [record.tool, _reformatted(generator.rng, record.arguments)]
            )
        perturbed = generator.perturb(tool, record.arguments)
        if perturbed is not None and len(queries["perturbed"]) < wanted:
            queries["perturbed"].append([record.tool, perturbed, record.arguments])
        if len(queries["fresh"]) < wanted:
            queries["fresh"].append([record.tool, generator.arguments(tool)])
    for index in range(wanted):
        queries["unseen"].append([f"never_recorded_{index}", {"query": f"anything {index}"}])
    with open(queries_path, "w") as file:
        json.dump(queries, file)

    start = time.perf_counter()
    with ToolCache(ToolCacheConfig(db_path)) as cache:
        report = cache.record_many(records)
    insert_s = time.perf_counter() - start
    return {
        "generate_s": generate_s,
        "insert_s": insert_s,
        "records": report.records,
        "entries": report.recorded,
        "top_tool_entries": int(counts.max()),
        "db_mb": os.path.getsize(db_path) / 2**20,
    }


def _rss_gb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in GiB."""
    fields = {}
    with open("/proc/self/status") as file:
        for line in file:
            name, _, value = line.partition(":")
            fields[name] = value
    return int(fields["VmRSS"].split()[0]) / 2**20, int(fields["VmHWM"].split()[0]) / 2**20


def _timed(cache: ToolCache, queries: list) -> tuple[np.ndarray, np.ndarray, list]:
    """Wall and CPU (this thread) seconds per lookup, and the hits. The CPU time leaves out the
    time this process waited for a core, which on a shared machine dominates the wall p99. The
    wall clock is read inside the CPU clock: `thread_time` is a ~1 us system call, `perf_counter`
    ~0.07 us."""
    gc.collect()  # a collection pending from the set-up is not the lookups' cost
    seconds, cpu_seconds, hits = [], [], []
    for query in queries:
        cpu_start = time.thread_time()
        start = time.perf_counter()
        hit = cache.lookup(query[0], query[1])
        end = time.perf_counter()
        cpu_seconds.append(time.thread_time() - cpu_start)
        seconds.append(end - start)
        hits.append(hit)
    return np.array(seconds), np.array(cpu_seconds), hits


def _scan_times(compared: list, by_tool: dict[str, tuple[str, ...]]) -> tuple[list, list]:
    """Wall and CPU seconds of the anchor's scan (`extractOne` over the tool's keys) per call."""
    gc.collect()
    seconds, cpu_seconds = [], []
    for tool, arguments, _ in compared:
        query_key = tool_cache.canonical_key(arguments)
        cpu_start = time.thread_time()
        start = time.perf_counter()
        process.extractOne(query_key, by_tool[tool], scorer=fuzz.ratio)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.thread_time() - cpu_start)
    return seconds, cpu_seconds


def measure(args: argparse.Namespace, db_path: str, queries_path: str) -> dict:
    """Phase 2, in a fresh process: load, index, time the query sets, then ours against the
    anchor's scan side by side."""
    with open(queries_path) as file:
        queries = json.load(file)
    start = time.perf_counter()
    cache = ToolCache(ToolCacheConfig(db_path), create=False)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    cache.build_indexes()
    index_s = time.perf_counter() - start
    rss_gb, peak_gb = _rss_gb()
    by_set, by_tier = _time_sets(cache, queries, args.warmup)
    perturbed = queries["perturbed"][args.warmup :]
    return {
        "load_s": load_s,
        "index_s": index_s,
        "rss_gb": rss_gb,
        "peak_rss_gb": peak_gb,
        "sets": {
            name: {
                "seconds": result["seconds"].tolist(),
                "cpu_seconds": result["cpu_seconds"].tolist(),
                "tiers": {tier: result["tiers"].count(tier) for tier in by_tier},
            }
            for name, result in by_set.items()
        },
        "tiers": {
            tier: {"seconds": wall, "cpu_seconds": cpu} for tier, (wall, cpu) in by_tier.items()
        },
        **_accuracy(cache, perturbed, by_set["perturbed"]["hits"], args.exhaustive_queries),
        **_against_the_scan(cache, perturbed[: args.scan_queries], by_set["perturbed"], args),
    }


def _time_sets(cache: ToolCache, queries: dict[str, list], warmup: int) -> tuple[dict, dict]:
    """Each query set timed after `warmup` untimed queries (allocator, CPU caches, code paths):
    per set its timings, hits and tiers; per tier answered its (wall, CPU) timings."""
    for name in list(queries):
        _timed(cache, queries[name][:warmup])
    by_set, by_tier = {}, {tier: ([], []) for tier in (*tool_cache.TIERS, "unseen_tool")}
    for name, query_set in queries.items():
        seconds, cpu_seconds, hits = _timed(cache, query_set[warmup:])
        tiers = [hit.tier if hit.entry is not None else "unseen_tool" for hit in hits]
        by_set[name] = {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "hits": hits,
            "tiers": tiers,
        }
        for tier, wall, cpu in zip(tiers, seconds, cpu_seconds, strict=True):
            by_tier[tier][0].append(wall)
            by_tier[tier][1].append(cpu)
    return by_set, by_tier


def _accuracy(cache: ToolCache, perturbed: list, hits: list, exhaustive_queries: int) -> dict:
    """How often a perturbed call is answered by the call it came from, and how often the index
    finds the true nearest entry (the same queries with every block scored whole)."""
    source_found = statistics.mean(
        hit.entry is not None and hit.entry.arguments == tool_cache.canonical_value(query[2])
        for hit, query in zip(hits, perturbed, strict=True)
    )
    saved = limits.FULL_SCORE_MAX_ENTRIES
    limits.FULL_SCORE_MAX_ENTRIES = 1 << 62
    exhaustive = [cache.lookup(q[0], q[1]).score for q in perturbed[:exhaustive_queries]]
    limits.FULL_SCORE_MAX_ENTRIES = saved
    best_found = statistics.mean(
        abs(hit.score - best) < 1e-9 for hit, best in zip(hits, exhaustive, strict=False)
    )
    return {"fuzzy_source_found": source_found, "fuzzy_best_found": best_found}


def _against_the_scan(
    cache: ToolCache, compared: list, timed: dict, args: argparse.Namespace
) -> dict:
    """Our lookups of the first perturbed calls (timed above, warm like the scans) against the
    anchor: a plain JSON-file cache, every entry's canonical arguments JSON grouped by tool and
    scanned. More rounds of the same lookups and scans follow one another, so that a slow spell of
    a shared machine meets both sides: the speedup is the median round's."""
    by_tool: dict[str, list[str]] = {}
    for _, _, tool, key, _, _ in cache._entries:
        by_tool.setdefault(tool, []).append(key)
    by_tool = {tool: tuple(keys) for tool, keys in by_tool.items()}  # not walked by the gc
    ours = timed["seconds"][: len(compared)]
    ours_cpu = timed["cpu_seconds"][: len(compared)]
    scan, scan_cpu = _scan_times(compared, by_tool)
    top_tool = max(by_tool, key=lambda tool: len(by_tool[tool]))
    on_top = [i for i, query in enumerate(compared) if query[0] == top_tool]

    rounds = [(np.mean(scan) / np.mean(ours), np.mean(scan_cpu) / np.mean(ours_cpu))]
    for _ in range(args.rounds - 1):
        again, again_cpu, _ = _timed(cache, [query[:2] for query in compared])
        scan_again, scan_again_cpu = _scan_times(compared, by_tool)
        rounds.append(
            (np.mean(scan_again) / np.mean(again), np.mean(scan_again_cpu) / np.mean(again_cpu))
        )
    top_tool_speedup = (
        float(np.mean([scan[i] for i in on_top]) / np.mean([ours[i] for i in on_top]))
        if on_top
        else float("nan")
    )
    return {
        "scan_mean_ms": 1e3 * float(np.mean(scan)),
        "scan_p99_ms": 1e3 * float(np.percentile(scan, 99)),
        "scan_cpu_mean_ms": 1e3 * float(np.mean(scan_cpu)),
        "compared_mean_us": 1e6 * float(np.mean(ours)),
        "compared_cpu_mean_us": 1e6 * float(np.mean(ours_cpu)),
        "speedup_vs_scan": float(np.median([wall for wall, _ in rounds])),
        "cpu_speedup_vs_scan": float(np.median([cpu for _, cpu in rounds])),
        "speedup_rounds": [round(float(wall), 1) for wall, _ in rounds],
        "top_tool_queries": len(on_top),
        "top_tool_speedup": top_tool_speedup,
    }


def _measure_child(args, db_path, queries_path, queue) -> None:
    queue.put(measure(args, db_path, queries_path))


# --- phase 3: rollout throughput ------------------------------------------------------------------


class _ReplayState:
    def __init__(self, lengths: list[int]):
        self.length = max(lengths)  # KV-cache slots used, shared by the batch as in the sampler


class _ReplayPolicy:
    """Stands in for the sampler: each round, every active row emits its next scripted assistant
    turn (the reference solution's own tokens), so a rollout costs only the loop's own work and
    its tool calls."""

    def __init__(self, scripts: list[list[np.ndarray]]):
        self.scripts = scripts
        self.turns = [0] * len(scripts)
        self.lengths = [0] * len(scripts)

    def _emit(self, active: list[bool]) -> list:
        from cacherl_jax.sampling.sampler import Generation

        out = []
        for row, is_active in enumerate(active):
            ids = self.scripts[row][self.turns[row]] if is_active else np.zeros(0, np.int32)
            logprobs = np.zeros(len(ids), np.float32)
            out.append(Generation(ids, logprobs, logprobs, "stop" if is_active else "inactive"))
            if is_active:
                self.turns[row] += 1
                self.lengths[row] += len(ids)
        return out

    def start(self, prompts, sampling, *, max_len):
        self.lengths = [len(prompt) for prompt in prompts]
        generations = self._emit([True] * len(prompts))
        return _ReplayState(self.lengths), generations

    def resume(self, state, new_tokens, sampling):
        for row, tokens in enumerate(new_tokens):
            self.lengths[row] += len(tokens)
        generations = self._emit([bool(tokens) for tokens in new_tokens])
        return _ReplayState(self.lengths), generations


class _SlowTools:
    """A task's live environment whose every call first sleeps `delay` seconds (a real tool's
    latency: an API round trip, a database, a sandbox)."""

    def __init__(self, environment, delay: float):
        self.environment = environment
        self.delay = delay

    def execute(self, name, arguments):
        time.sleep(self.delay)
        return self.environment.execute(name, arguments)

    def __getattr__(self, name):
        return getattr(self.environment, name)


def rollout_throughput(args: argparse.Namespace, workdir: str) -> dict:
    """The same rollouts (procedural tasks' reference solutions, `--group-size` per task) through
    `CacheAgentLoop`, answered from the tool cache and live: rollouts/s of each."""
    from cacherl_jax.agent.factory import make_environment
    from cacherl_jax.agent.loop import CacheAgentLoop, LoopConfig
    from cacherl_jax.agent.procedural import (
        generate_tasks,
        reference_trajectory,
        write_trajectories,
    )
    from cacherl_jax.chat.template import render, render_text
    from cacherl_jax.chat.tokenizer import train_tokenizer

    tasks = generate_tasks("train", args.rollout_tasks, seed=args.seed)
    references = [reference_trajectory(task) for task in tasks]
    texts = [render_text(r.messages, r.tools) for r in references]
    tokenizer = train_tokenizer(texts, 1024, os.path.join(workdir, "tokenizer"), from_files=False)
    scripts = []  # per task, its assistant turns' tokens as the model would generate them
    for reference in references:
        rendered = render(reference.messages, reference.tools, tokenizer)
        generated = rendered.loss_mask > 0
        turns = sorted(set(rendered.turn_ids[generated].tolist()))
        scripts.append([rendered.token_ids[generated & (rendered.turn_ids == t)] for t in turns])
    trajectories = os.path.join(workdir, "rollout_tasks.jsonl")
    write_trajectories(trajectories, tasks)
    cache = ToolCache(ToolCacheConfig(os.path.join(workdir, "rollouts.db"), scope_mode="scoped"))
    build_from_trajectories(cache, [trajectories], scope_per_trajectory=True)

    def run(mode: str) -> tuple[float, dict, list]:
        config = LoopConfig(group_size=args.group_size, mode=mode, max_len=2048)
        policy = _ReplayPolicy([turns for turns in scripts for _ in range(args.group_size)])
        loop = CacheAgentLoop(
            policy,
            tokenizer,
            cache if mode == "cache" else None,
            config,
            make_env=lambda task: _SlowTools(make_environment(task), args.live_delay),
        )
        start = time.perf_counter()
        rollouts = loop.run(tasks, seed=args.seed)
        return time.perf_counter() - start, loop.metrics, rollouts

    run("cache")  # warm-up: imports, tokenizer caches
    results = {}
    for mode in ("cache", "live"):
        seconds, metrics, rollouts = run(mode)
        answered = sum(r.stop_reason == "answer" for r in rollouts)
        results[mode] = {
            "seconds": seconds,
            "rollouts": len(rollouts),
            "calls": sum(len(r.calls) for r in rollouts),
            "answered": answered,
            "tools_s": metrics["tools_s"],
            "rounds": int(metrics["rounds"]),
            "tiers": {t: int(metrics.get(f"calls_{t}", 0)) for t in (*tool_cache.TIERS, "live")},
        }
    cache.close()
    return results


def _percentile_us(seconds: list[float], q: float) -> float:
    return 1e6 * float(np.percentile(seconds, q)) if seconds else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--tools", type=int, default=1000)
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of calls per tool")
    parser.add_argument("--queries", type=int, default=5000, help="timed queries per set")
    parser.add_argument("--warmup", type=int, default=500, help="untimed queries per set first")
    parser.add_argument("--scan-queries", type=int, default=1000, help="perturbed queries scanned")
    parser.add_argument("--exhaustive-queries", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="lookup-then-scan rounds timed")
    parser.add_argument("--rollout-tasks", type=int, default=32, help="0: no rollout phase")
    parser.add_argument("--group-size", type=int, default=2, help="rollouts per task")
    parser.add_argument("--live-delay", type=float, default=0.1, help="seconds per live call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="where the database goes (default: a temporary dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        db_path = os.path.join(workdir, "cache.db")
        queries_path = os.path.join(workdir, "queries.json")
        built = build(args, db_path, queries_path)
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=_measure_child, args=(args, db_path, queries_path, queue))
        child.start()
        measured = queue.get()
        child.join()
        _print_table(args, built, measured)
        rollouts = rollout_throughput(args, workdir) if args.rollout_tasks else None
    if rollouts is not None:
        _print_rollouts(args, rollouts)
    print(json.dumps(_summary(args, built, measured, rollouts)))


def _print_table(args: argparse.Namespace, built: dict, measured: dict) -> None:
    """The human-readable report: set-up, latency per query set and tier, the anchor's scan."""
    print(
        f"{built['entries']:,} entries over {args.tools} tools (Zipf s={args.zipf}, top tool "
        f"{built['top_tool_entries']:,}); generate {built['generate_s']:.1f} s, insert "
        f"{built['insert_s']:.1f} s, open (exact index) {measured['load_s']:.1f} s, fuzzy "
        f"indexes {measured['index_s']:.1f} s; database {built['db_mb']:.0f} MB; RSS "
        f"{measured['rss_gb']:.2f} GiB"
    )
    header = (
        f"{'':<22} {'n':>5} {'p50 us':>8} {'p99 us':>8} {'cpu p50':>8} {'cpu p99':>8} {'per s':>8}"
    )
    print(header + "   answered as")
    rows = [(f"set {name}", result) for name, result in measured["sets"].items()]
    rows += [(f"tier {tier}", result) for tier, result in measured["tiers"].items()]
    for label, result in rows:
        wall, cpu = result["seconds"], result["cpu_seconds"]
        answered = ", ".join(f"{t} {n}" for t, n in result.get("tiers", {}).items() if n)
        print(
            f"{label:<22} {len(wall):>5} {_percentile_us(wall, 50):>8.1f} "
            f"{_percentile_us(wall, 99):>8.1f} {_percentile_us(cpu, 50):>8.1f} "
            f"{_percentile_us(cpu, 99):>8.1f} {len(wall) / max(sum(wall), 1e-12):>8,.0f}   {answered}"
        )
    scan_mean_us, scan_p99_us = 1e3 * measured["scan_mean_ms"], 1e3 * measured["scan_p99_ms"]
    print(
        f"{'anchor: rapidfuzz scan':<22} {args.scan_queries:>5} {scan_mean_us:>8.0f} "
        f"{scan_p99_us:>8.0f} {'':>8} {'':>8} {1e3 / measured['scan_mean_ms']:>8,.0f}"
        "   (mean, not p50)"
    )
    print(
        f"first {args.scan_queries} perturbed calls: lookup mean "
        f"{measured['compared_mean_us']:.1f} us (CPU {measured['compared_cpu_mean_us']:.1f}), "
        f"scan mean {measured['scan_mean_ms']:.2f} ms (CPU {measured['scan_cpu_mean_ms']:.2f}): "
        f"{measured['speedup_vs_scan']:.1f}x faster than the scan (median of rounds "
        f"{', '.join(f'{r:.0f}x' for r in measured['speedup_rounds'])}; CPU time "
        f"{measured['cpu_speedup_vs_scan']:.1f}x; {measured['top_tool_speedup']:.1f}x on the top "
        f"tool's {measured['top_tool_queries']} queries); answer = the perturbed call's source "
        f"{100 * measured['fuzzy_source_found']:.1f}%, = the exhaustive best score "
        f"{100 * measured['fuzzy_best_found']:.1f}%"
    )


def _print_rollouts(args: argparse.Namespace, rollouts: dict) -> None:
    cached, live = rollouts["cache"], rollouts["live"]
    print(
        f"rollouts ({args.rollout_tasks} procedural tasks x {args.group_size}, reference "
        f"solutions replayed, {cached['calls']} tool calls, {cached['rounds']} rounds): "
        f"cache {cached['rollouts'] / cached['seconds']:,.1f}/s ({cached['seconds']:.2f} s, "
        f"tools {cached['tools_s']:.3f} s, {cached['tiers']}), live at "
        f"{1e3 * args.live_delay:.0f} ms/call {live['rollouts'] / live['seconds']:,.2f}/s "
        f"({live['seconds']:.1f} s, tools {live['tools_s']:.1f} s): "
        f"{live['seconds'] / cached['seconds']:,.0f}x"
    )


# The regression guards of issue 25, at 1M entries: (summary key, bound, "max" or "min").
FLOORS = {
    "exact p99 <= 30 us": ("exact_p99_us", 30.0, "max"),
    "fuzzy p99 <= 5 ms": ("fuzzy_p99_ms", 5.0, "max"),
    ">= 50x the scan": ("ratio", 50.0, "min"),
    "RSS <= 2 GB": ("rss_gb", 2.0, "max"),
}


def _summary(args: argparse.Namespace, built: dict, measured: dict, rollouts: dict | None) -> dict:
    """The JSON summary; `ratio` is the speedup over the anchor's scan, `floors` which
    regression guards hold (they are set for 1M entries)."""
    tiers = measured["tiers"]
    summary = {
        "entries": built["entries"],
        "tools": args.tools,
        "zipf": args.zipf,
        "top_tool_entries": built["top_tool_entries"],
        "exact_p50_us": _percentile_us(tiers["exact"]["seconds"], 50),
        "exact_p99_us": _percentile_us(tiers["exact"]["seconds"], 99),
        "exact_cpu_p99_us": _percentile_us(tiers["exact"]["cpu_seconds"], 99),
        "fuzzy_p50_ms": _percentile_us(tiers["fuzzy"]["seconds"], 50) / 1e3,
        "fuzzy_p99_ms": _percentile_us(tiers["fuzzy"]["seconds"], 99) / 1e3,
        "fuzzy_cpu_p99_ms": _percentile_us(tiers["fuzzy"]["cpu_seconds"], 99) / 1e3,
        "best_effort_p50_ms": _percentile_us(tiers["best_effort"]["seconds"], 50) / 1e3,
        "best_effort_p99_ms": _percentile_us(tiers["best_effort"]["seconds"], 99) / 1e3,
        "unseen_tool_p99_us": _percentile_us(tiers["unseen_tool"]["seconds"], 99),
        "perturbed_lookups_per_s": len(measured["sets"]["perturbed"]["seconds"])
        / sum(measured["sets"]["perturbed"]["seconds"]),
        "scan_mean_ms": measured["scan_mean_ms"],
        "compared_lookup_mean_us": measured["compared_mean_us"],
        "ratio": measured["speedup_vs_scan"],
        "speedup_rounds": measured["speedup_rounds"],
        "cpu_ratio": measured["cpu_speedup_vs_scan"],
        "top_tool_ratio": measured["top_tool_speedup"],
        "fuzzy_best_found": measured["fuzzy_best_found"],
        "rss_gb": measured["rss_gb"],
        "insert_s": built["insert_s"],
        "load_s": measured["load_s"],
        "index_s": measured["index_s"],
    }
    for tier in ("exact", "fuzzy", "best_effort"):
        seconds = tiers[tier]["seconds"]
        summary[f"{tier}_lookups_per_s"] = len(seconds) / sum(seconds) if seconds else 0.0
    if rollouts is not None:
        cached, live = rollouts["cache"], rollouts["live"]
        summary["rollouts_per_s_cache"] = cached["rollouts"] / cached["seconds"]
        summary["rollouts_per_s_live"] = live["rollouts"] / live["seconds"]
        summary["throughput_ratio"] = live["seconds"] / cached["seconds"]
        summary["rollout_calls"] = cached["calls"]
    summary = {key: round(v, 4) if isinstance(v, float) else v for key, v in summary.items()}
    summary["floors"] = {
        name: summary[key] <= bound if side == "max" else summary[key] >= bound
        for name, (key, bound, side) in FLOORS.items()
    }
    return summary


if __name__ == "__main__":
    sys.exit(main())
