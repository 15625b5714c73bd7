"""Calendar: events with dates, date arithmetic, weekdays and scheduling (stateful)."""

from __future__ import annotations

import datetime
import itertools
import random
from typing import Any

from cacherl_jax.agent.environment import ToolError
from cacherl_jax.agent.procedural.domain import (
    Caller,
    Domain,
    Solution,
    TaskKind,
    Tool,
    Values,
    World,
    require,
)

EVENTS = (
    "dentist", "launch", "review", "meeting", "party", "exam",
    "trip", "concert", "interview", "wedding", "deadline", "checkup",
)  # fmt: skip
DAY_OFFSETS = tuple(range(2, 31))  # from 2: templates say "{days} days"
FIRST_DAY = datetime.date(2025, 1, 1)


def _parse_date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise ToolError(f"bad date {text!r}, expected YYYY-MM-DD") from None


def find_event(world: World, name: str) -> dict[str, Any]:
    require(name in world["events"], f"no event named {name!r}")
    return {"date": world["events"][name]}


def add_days(world: World, date: str, days: int) -> dict[str, Any]:
    return {"date": (_parse_date(date) + datetime.timedelta(days=days)).isoformat()}


def weekday(world: World, date: str) -> dict[str, Any]:
    return {"weekday": _parse_date(date).strftime("%A")}


def schedule(world: World, name: str, date: str) -> dict[str, Any]:
    require(name not in world["events"], f"event {name!r} already exists")
    world["events"][name] = _parse_date(date).isoformat()
    return {"scheduled": name, "date": world["events"][name]}


TOOLS = (
    Tool("find_event", "Date of an event.", {"name": "string"}, find_event),
    Tool("add_days", "Date plus some days.", {"date": "string", "days": "integer"}, add_days),
    Tool("weekday", "Weekday of a date.", {"date": "string"}, weekday),
    Tool("schedule", "Add an event on a date.", {"name": "string", "date": "string"}, schedule),
)


def _world(rng: random.Random, present: tuple[str, ...], absent: tuple[str, ...] = ()) -> World:
    others = [event for event in EVENTS if event not in present and event not in absent]
    names = list(present) + rng.sample(others, rng.randint(3, 5))
    rng.shuffle(names)
    dates = {
        name: (FIRST_DAY + datetime.timedelta(days=rng.randrange(730))).isoformat()
        for name in names
    }
    return {"events": dates}


def _setup_event(rng: random.Random, combo: tuple[Any, ...]) -> tuple[Values, World]:
    return {"event": combo[0]}, _world(rng, combo[:1])


def _setup_shift(rng: random.Random, combo: tuple[Any, ...]) -> tuple[Values, World]:
    event, days = combo
    return {"event": event, "days": days}, _world(rng, (event,))


def _setup_schedule(rng: random.Random, combo: tuple[Any, ...]) -> tuple[Values, World]:
    event, new, days = combo
    return {"event": event, "new": new, "days": days}, _world(rng, (event,), absent=(new,))


def _find(values: Values, call: Caller, why: str) -> str:
    return call("find_event", {"name": values["event"]}, why)["date"]


def _solve_date(values: Values, call: Caller) -> Solution:
    date = _find(values, call, f"I look up the {values['event']}.")
    return Solution(date, "That is the date.")


def _solve_weekday(values: Values, call: Caller) -> Solution:
    date = _find(values, call, f"I need the date of the {values['event']}.")
    day = call("weekday", {"date": date}, "Now its weekday.")["weekday"]
    return Solution(day, "That is the weekday.")


def _solve_shift(values: Values, call: Caller) -> Solution:
    days = values["days"]
    date = _find(values, call, f"I need the date of the {values['event']}.")
    later = call("add_days", {"date": date, "days": days}, f"Now I add {days} days.")["date"]
    return Solution(later, "That is the new date.")


def _solve_schedule(values: Values, call: Caller) -> Solution:
    days, new = values["days"], values["new"]
    date = _find(values, call, f"I need the date of the {values['event']}.")
    later = call("add_days", {"date": date, "days": days}, f"I add {days} days.")["date"]
    call("schedule", {"name": new, "date": later}, f"Now I schedule the {new}.")
    return Solution(f"{new} on {later}", f"The {new} is scheduled.")


DOMAIN = Domain(
    "calendar",
    TOOLS,
    (
        TaskKind(
            "calendar.date",
            (
                "When is the {event}?",
                "What date is my {event}?",
                "Look up the date of the {event}.",
                "On which day is the {event} scheduled?",
                "Find the {event} in my calendar and tell me the date.",
                "I forgot when my {event} is. What's the date?",
            ),
            tuple((event,) for event in EVENTS),
            _setup_event,
            _solve_date,
        ),
        TaskKind(
            "calendar.weekday",
            (
                "What weekday is the {event}?",
                "Which day of the week is my {event} on?",
                "Tell me the weekday of the {event}.",
                "On what day of the week does the {event} fall?",
                "Find the {event} and tell me its weekday.",
                "The {event}: which weekday is it?",
            ),
            tuple((event,) for event in EVENTS),
            _setup_event,
            _solve_weekday,
        ),
        TaskKind(
            "calendar.shift",
            (
                "What is the date {days} days after the {event}?",
                "Which date is {days} days after my {event}?",
                "Add {days} days to the date of the {event}.",
                "Give me the date {days} days past the {event}.",
                "Count {days} days on from the {event}. What date is that?",
                "The {event} plus {days} days lands on what date?",
            ),
            tuple(itertools.product(EVENTS, DAY_OFFSETS)),
            _setup_shift,
            _solve_shift,
        ),
        TaskKind(
            "calendar.schedule",
            (
                "Schedule the {new} {days} days after the {event}.",
                "Put the {new} in my calendar {days} days after the {event}.",
                "Add the {new} {days} days after my {event}.",
                "Book the {new} for {days} days after the {event}.",
                "Plan the {new} {days} days later than the {event}.",
                "Create the {new} event {days} days after the {event}.",
            ),
            tuple(
                (event, new, days)
                for event, new in itertools.permutations(EVENTS, 2)
                for days in DAY_OFFSETS
            ),
            _setup_schedule,
            _solve_schedule,
        ),
    ),
)
