"""`cacherl cache build|stats|lookup`: the tool cache on the command line.

`register_cli(commands)` adds the `cache` command to `cacherl`'s subparsers; each subcommand sets
`run` to a function of the parsed arguments that raises a `UserError` (`ToolCacheError`,
`TrajectoryError`) for bad input, which the caller turns into one line on stderr and exit code 2.
`main` does the same on its own: `python -m cacherl_jax.agent.cache_cli stats --db cache.db`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


def _build(args: argparse.Namespace) -> None:
    from cacherl_jax.agent.tool_cache import ToolCache, build_from_trajectories

    with ToolCache(args.db) as cache:
        report = build_from_trajectories(
            cache,
            args.trajectories,
            scope=args.scope,
            scope_per_trajectory=args.scope_per_trajectory,
        )
        total = len(cache)
    records = report.records
    print(
        f"{args.db}: {records.recorded:,} new entries from {report.calls:,} answered calls in "
        f"{report.trajectories:,} trajectories ({records.already_present:,} already present, "
        f"{records.conflicting:,} with a different result than the stored one; "
        f"{report.unanswered_calls:,} unanswered calls, {report.orphan_results:,} orphan results; "
        f"{report.tool_schemas:,} new tool schemas); {total:,} entries in all"
    )


def _stats(args: argparse.Namespace) -> None:
    from cacherl_jax.agent.tool_cache import ToolCache

    with ToolCache(args.db, create=False) as cache:
        summary = cache.summary(top=args.top)
    if args.json:
        print(json.dumps(summary))
        return
    print(
        f"{summary['path']}: {summary['entries']:,} entries, {summary['tools']:,} tools, "
        f"{summary['scopes']:,} scopes, {summary['tool_schemas']:,} tool schemas "
        f"(schema version {summary['schema_version']})"
    )
    if summary["top_tools"]:
        print(f"{'entries':>10}  tool")
        for row in summary["top_tools"]:
            print(f"{row['entries']:>10,}  {row['tool']}")


def _lookup(args: argparse.Namespace) -> None:
    from cacherl_jax.agent.tool_cache import (
        ToolCache,
        ToolCacheConfig,
        ToolCacheError,
        canonical_arguments,
    )

    try:
        arguments = json.loads(args.arguments)
    except json.JSONDecodeError as exc:
        raise ToolCacheError(f"--arguments is not valid JSON: {exc.msg}") from None
    if not isinstance(arguments, dict):
        raise ToolCacheError(f"--arguments must be a JSON object, got {type(arguments).__name__}")
    try:
        canonical_arguments(arguments)
    except TypeError as exc:
        raise ToolCacheError(f"--arguments: {exc}") from None
    settings: dict[str, Any] = {"scope_mode": "scoped" if args.scope is not None else "global"}
    if args.threshold is not None:
        settings["fuzzy_threshold"] = args.threshold
    try:
        config = ToolCacheConfig(path=args.db, **settings)
    except ValueError as exc:
        raise ToolCacheError(str(exc)) from None
    with ToolCache(config, create=False) as cache:
        hit = cache.lookup(args.tool, arguments, scope=args.scope)
    entry: dict[str, Any] | None = None
    if hit.entry is not None:
        entry = {
            "rowid": hit.entry.rowid,
            "scope": hit.entry.scope,
            "tool": hit.entry.tool,
            "arguments": hit.entry.arguments,
            "source": hit.entry.source,
        }
    if args.json:
        print(
            json.dumps({"tier": hit.tier, "score": hit.score, "result": hit.result, "entry": entry})
        )
        return
    where = "no recorded entry" if entry is None else (
        f"entry #{entry['rowid']} {hit.entry.canonical_args} (scope {entry['scope']!r})"
    )  # fmt: skip
    print(f"tier: {hit.tier}  score: {hit.score:.2f}  {where}")
    print(hit.result)


def register_cli(commands: Any) -> None:
    """Adds `cache build|stats|lookup` to an argparse subparsers object (`cacherl`'s commands).
    Imports nothing heavy: the cache module loads when a subcommand runs."""
    cache = commands.add_parser(
        "cache",
        help="the three-tier tool cache: build it from trajectories, inspect it, query it",
        description="The tool cache answers tool calls during RL rollouts from recorded results: "
        "exact (canonically equal arguments), fuzzy (same argument names, similar values) or "
        "best_effort (the nearest entry below the threshold, or a 'no recorded result' response).",
    )
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")

    build = cache_commands.add_parser(
        "build",
        help="record every answered tool call of trajectories JSONL files",
        description="Record the tool calls of trajectories (assistant tool_calls paired with the "
        "tool messages that answer them, by tool_call_id or in order) and their tool schemas. "
        "Calls already in the cache keep their first result.",
    )
    build.add_argument("--trajectories", nargs="+", required=True, metavar="FILE")
    build.add_argument("--db", required=True, metavar="PATH", help="cache file (created if new)")
    scope = build.add_mutually_exclusive_group()
    scope.add_argument("--scope", help="scope stored with every entry (default: none, global)")
    scope.add_argument(
        "--scope-per-trajectory",
        action="store_true",
        help="store each call under its trajectory's id, for tools whose results depend on state",
    )
    build.set_defaults(run=_build)

    stats = cache_commands.add_parser(
        "stats", help="entries, tools and scopes in a cache file, and the largest tools"
    )
    stats.add_argument("--db", required=True, metavar="PATH")
    stats.add_argument("--top", type=int, default=10, help="how many tools to list")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(run=_stats)

    lookup = cache_commands.add_parser(
        "lookup",
        help="answer one call from the cache and print its tier, score and result",
    )
    lookup.add_argument("--db", required=True, metavar="PATH")
    lookup.add_argument("--tool", required=True)
    lookup.add_argument("--arguments", default="{}", metavar="JSON", help="a JSON object")
    lookup.add_argument("--scope", help="look only at entries of this scope (default: all entries)")
    lookup.add_argument(
        "--threshold", type=float, help="lowest fuzzy score, 0-100 (default: ToolCacheConfig's, 80)"
    )
    lookup.add_argument("--json", action="store_true", help="print one JSON object")
    lookup.set_defaults(run=_lookup)


def main(argv: Sequence[str] | None = None) -> int:
    """`cacherl cache ...` on its own (what cacherl's main does for this command)."""
    from cacherl_jax.errors import UserError

    parser = argparse.ArgumentParser(prog="cacherl")
    register_cli(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except UserError as err:
        print(f"cacherl {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
