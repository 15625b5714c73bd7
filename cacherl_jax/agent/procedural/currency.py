"""Currency: exchange rates and conversion arithmetic; the world is a value per currency."""

from __future__ import annotations

import itertools
import random
from typing import Any

from cacherl_jax.agent.procedural.domain import (
    Caller,
    Domain,
    Solution,
    TaskKind,
    Tool,
    Values,
    World,
    number,
    require,
)

CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "SEK", "NOK")


def get_rate(world: World, base: str, quote: str) -> dict[str, Any]:
    values = world["values"]
    for code in (base, quote):
        require(code in values, f"unknown currency {code!r}")
    return {"rate": round(values[base] / values[quote], 3)}


def convert(world: World, amount: float, rate: float) -> dict[str, Any]:
    return {"amount": round(amount * rate, 2)}


TOOLS = (
    Tool(
        "get_rate",
        "Rate from base to quote currency.",
        {"base": "string", "quote": "string"},
        get_rate,
    ),
    Tool(
        "convert", "Multiply an amount by a rate.", {"amount": "number", "rate": "number"}, convert
    ),
)


def _world(rng: random.Random) -> World:
    # Values in a narrow band keep every rate between 0.25 and 4: short numbers to copy.
    return {"values": {code: round(rng.uniform(0.5, 2.0), 3) for code in CURRENCIES}}


def _setup_pair(rng: random.Random, combo: tuple[Any, ...]) -> tuple[Values, World]:
    base, quote = combo
    return {"base": base, "quote": quote, "amount": rng.randint(10, 500)}, _world(rng)


def _setup_chain(rng: random.Random, combo: tuple[Any, ...]) -> tuple[Values, World]:
    a, b, c = combo
    return {"a": a, "b": b, "c": c, "amount": rng.randint(10, 500)}, _world(rng)


def _solve_rate(values: Values, call: Caller) -> Solution:
    base, quote = values["base"], values["quote"]
    rate = call(
        "get_rate", {"base": base, "quote": quote}, f"I look up the {base} to {quote} rate."
    )["rate"]
    return Solution(number(rate), "That is the rate.")


def _solve_convert(values: Values, call: Caller) -> Solution:
    base, quote, amount = values["base"], values["quote"], values["amount"]
    rate = call("get_rate", {"base": base, "quote": quote}, f"I need the {base} to {quote} rate.")[
        "rate"
    ]
    result = call("convert", {"amount": amount, "rate": rate}, "Now I convert the amount.")[
        "amount"
    ]
    return Solution(f"{number(result)} {quote}", f"That is the amount in {quote}.")


def _solve_chain(values: Values, call: Caller) -> Solution:
    a, b, c, amount = values["a"], values["b"], values["c"], values["amount"]
    rate_ab = call("get_rate", {"base": a, "quote": b}, f"I need the {a} to {b} rate.")["rate"]
    in_b = call("convert", {"amount": amount, "rate": rate_ab}, f"I convert to {b}.")["amount"]
    rate_bc = call("get_rate", {"base": b, "quote": c}, f"Now the {b} to {c} rate.")["rate"]
    in_c = call("convert", {"amount": in_b, "rate": rate_bc}, f"I convert to {c}.")["amount"]
    return Solution(f"{number(in_c)} {c}", f"That is the amount in {c}.")


PAIRS = tuple(itertools.permutations(CURRENCIES, 2))

DOMAIN = Domain(
    "currency",
    TOOLS,
    (
        TaskKind(
            "currency.rate",
            (
                "What is the exchange rate from {base} to {quote}?",
                "How many {quote} do I get for one {base}?",
                "Give me the {base} to {quote} rate.",
                "Look up the rate for {base} to {quote}.",
                "I need the current {base} to {quote} exchange rate.",
                "Tell me what one {base} is worth in {quote}.",
            ),
            PAIRS,
            _setup_pair,
            _solve_rate,
        ),
        TaskKind(
            "currency.convert",
            (
                "Convert {amount} {base} to {quote}.",
                "How much is {amount} {base} in {quote}?",
                "I have {amount} {base}. What is that in {quote}?",
                "Change {amount} {base} into {quote} for me.",
                "What do {amount} {base} come to in {quote}?",
                "Please express {amount} {base} in {quote}.",
            ),
            PAIRS,
            _setup_pair,
            _solve_convert,
        ),
        TaskKind(
            "currency.convert_twice",
            (
                "Convert {amount} {a} to {b}, then convert that to {c}.",
                "Change {amount} {a} into {b} and the result into {c}.",
                "I have {amount} {a}. Exchange it to {b}, then to {c}. How much {c} is it?",
                "First turn {amount} {a} into {b}, then turn the {b} into {c}.",
                "Swap {amount} {a} for {b}, then swap that for {c}.",
                "Take {amount} {a}, convert it to {b} and then to {c}.",
            ),
            tuple(itertools.permutations(CURRENCIES, 3)),
            _setup_chain,
            _solve_chain,
        ),
    ),
)
