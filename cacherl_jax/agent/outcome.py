"""What a finished rollout tells the reward: its parsed turns, its calls and their cache tiers.

The agent loop builds these (`Rollout.outcome()`) and `cacherl_jax.rl.rewards` reads them, so
they live with the loop, one layer below the rewards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from cacherl_jax.chat.parse import ParsedAssistant

# Worst last: a rollout is as trustworthy as its least exact tool result. Live results and
# rollouts without calls count as exact.
TIERS = ("exact", "fuzzy", "best_effort")
# "live": run on the task's environment; "rejected": refused before any tool ran, with the
# environment's own error (`LoopConfig.answer_rejections`): both show what live tools show.
_TIER_RANK = {"live": 0, "rejected": 0, "exact": 0, "fuzzy": 1, "best_effort": 2}


def worst_tier(tiers: Iterable[str]) -> str:
    """The least exact of the tiers ("live" and "rejected" count as "exact"; none: "exact")."""
    return TIERS[max((_TIER_RANK[t] for t in tiers), default=0)]


@dataclasses.dataclass(frozen=True)
class CallOutcome:
    """One tool call the rollout made: what was called and which cache tier answered it."""

    name: str
    arguments: Mapping[str, Any] | None  # None when the call's JSON did not parse
    tier: str = "exact"  # "exact" | "fuzzy" | "best_effort" | "live" | "rejected"


@dataclasses.dataclass(frozen=True)
class RolloutOutcome:
    """What the reward needs to know about a finished rollout."""

    turns: tuple[ParsedAssistant, ...]  # every assistant turn, parsed
    calls: tuple[CallOutcome, ...]  # every call the model emitted, in order
    final_answer: str | None  # the content of the last turn, if it made no calls
    final_state: Mapping[str, Any] | None = None  # only when tools ran live

    @property
    def worst_tier(self) -> str:
        return worst_tier(call.tier for call in self.calls)
