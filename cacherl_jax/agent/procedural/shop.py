"""Shop: prices, stock, today's special and purchases that change stock and balance."""

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

# Countable items (requests name them quoted: "{quantity} of {item}").
ITEMS = (
    "apple", "pear", "pen", "cup", "lamp", "book",
    "plate", "candle", "card", "brush", "towel", "spoon",
)  # fmt: skip
QUANTITIES = tuple(range(2, 7))


def _item(world: World, item: str) -> dict[str, Any]:
    require(item in world["items"], f"no item named {item!r}")
    return world["items"][item]


def get_price(world: World, item: str) -> dict[str, Any]:
    return {"price": _item(world, item)["price"]}


def get_stock(world: World, item: str) -> dict[str, Any]:
    return {"stock": _item(world, item)["stock"]}


def get_special(world: World) -> dict[str, Any]:
    return {"item": world["special"]}


def buy(world: World, item: str, quantity: int) -> dict[str, Any]:
    entry = _item(world, item)
    require(quantity >= 1, "quantity must be at least 1")
    require(quantity <= entry["stock"], f"only {entry['stock']} {item} in stock")
    total = round(entry["price"] * quantity, 2)
    require(
        total <= world["balance"],
        f"total {number(total)} exceeds balance {number(world['balance'])}",
    )
    entry["stock"] -= quantity
    world["balance"] = round(world["balance"] - total, 2)
    return {"total": total, "balance": world["balance"]}


TOOLS = (
    Tool("get_price", "Price of an item.", {"item": "string"}, get_price),
    Tool("get_stock", "Units of an item in stock.", {"item": "string"}, get_stock),
    Tool("get_special", "Today's special item.", {}, get_special),
    Tool("buy", "Buy units of an item.", {"item": "string", "quantity": "integer"}, buy),
)


def _world(rng: random.Random) -> World:
    # At most 12 units at 9.9 each: the balance (at least 150) always covers a purchase.
    items = {
        item: {"price": round(rng.uniform(0.5, 9.9), 1), "stock": rng.randint(6, 12)}
        for item in ITEMS
    }
    return {
        "items": items,
        "balance": round(rng.uniform(150, 300), 1),
        "special": rng.choice(ITEMS),
    }


def _setup_item(rng: random.Random, combo: tuple[Any, ...]) -> tuple[Values, World]:
    return {"item": combo[0]}, _world(rng)


def _setup_item_quantity(rng: random.Random, combo: tuple[Any, ...]) -> tuple[Values, World]:
    item, quantity = combo
    return {"item": item, "quantity": quantity}, _world(rng)


def _setup_quantity(rng: random.Random, combo: tuple[Any, ...]) -> tuple[Values, World]:
    return {"quantity": combo[0]}, _world(rng)


def _setup_nothing(rng: random.Random, combo: tuple[Any, ...]) -> tuple[Values, World]:
    return {}, _world(rng)


def _buy(call: Caller, item: str, quantity: int, why: str) -> Solution:
    receipt = call("buy", {"item": item, "quantity": quantity}, why)
    balance = number(receipt["balance"])
    return Solution(f"{balance} left", "That is my balance.")


def _special(call: Caller) -> str:
    return call("get_special", {}, "I need today's special.")["item"]


def _solve_price(values: Values, call: Caller) -> Solution:
    price = number(
        call("get_price", {"item": values["item"]}, f"I look up the {values['item']} price.")[
            "price"
        ]
    )
    return Solution(price, "That is the price.")


def _solve_buy(values: Values, call: Caller) -> Solution:
    item, quantity = values["item"], values["quantity"]
    return _buy(call, item, quantity, f"I buy {quantity} {item}s.")


def _solve_buy_special(values: Values, call: Caller) -> Solution:
    item, quantity = _special(call), values["quantity"]
    return _buy(call, item, quantity, f"I buy {quantity} {item}s.")


def _solve_buy_all(values: Values, call: Caller) -> Solution:
    item = values["item"]
    stock = call("get_stock", {"item": item}, f"I check the {item} stock.")["stock"]
    return _buy(call, item, stock, f"I buy all {item}s.")


def _solve_buy_all_special(values: Values, call: Caller) -> Solution:
    item = _special(call)
    stock = call("get_stock", {"item": item}, f"I check the {item} stock.")["stock"]
    return _buy(call, item, stock, f"I buy all {item}s.")


DOMAIN = Domain(
    "shop",
    TOOLS,
    (
        TaskKind(
            "shop.price",
            (
                "What is the price of a {item}?",
                "How much is one {item}?",
                "Check the price of the {item} for me.",
                "Tell me what a {item} costs.",
                "Look up the {item} price.",
                "What does the shop charge for a {item}?",
            ),
            tuple((item,) for item in ITEMS),
            _setup_item,
            _solve_price,
        ),
        TaskKind(
            "shop.buy",
            (
                "Buy {quantity} of {item}.",
                "Please purchase {quantity} of {item} for me.",
                "I want {quantity} of {item}. Buy them and tell me my balance.",
                "Get me {quantity} of {item} from the shop.",
                "Order {quantity} of {item}, please.",
                "Purchase {quantity} of {item} and say what is left.",
            ),
            tuple(itertools.product(ITEMS, QUANTITIES)),
            _setup_item_quantity,
            _solve_buy,
        ),
        TaskKind(
            "shop.buy_special",
            (
                "Buy {quantity} of today's special.",
                "Get me {quantity} units of the special of the day.",
                "Find today's special and buy {quantity} of it.",
                "I'd like {quantity} of whatever is on special today.",
                "Purchase {quantity} units of today's special item.",
                "Order {quantity} of the daily special for me.",
            ),
            tuple((quantity,) for quantity in QUANTITIES),
            _setup_quantity,
            _solve_buy_special,
        ),
        TaskKind(
            "shop.buy_all",
            (
                "Buy all the {item} in stock.",
                "Purchase every {item} the shop has.",
                "I want all remaining {item}. Buy it.",
                "Check the {item} stock and buy all of it.",
                "Clear out the {item}: buy every one.",
                "Get me the whole stock of {item}.",
            ),
            tuple((item,) for item in ITEMS),
            _setup_item,
            _solve_buy_all,
        ),
        TaskKind(
            # One combination only (the request names no value): held out by template and world.
            "shop.buy_all_special",
            (
                "Buy all units of today's special.",
                "Purchase the whole stock of the special of the day.",
                "Find today's special and buy every unit in stock.",
                "I want all of today's special item. Buy it out.",
                "Clear out today's special: buy all of it.",
                "Get me every unit of the daily special.",
            ),
            ((),),
            _setup_nothing,
            _solve_buy_all_special,
        ),
    ),
)
