"""Files: a flat folder of short text files, some of which hold another file's name (links)."""

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
    require,
)

FILES = tuple(
    f"{stem}.txt"
    for stem in (
        "notes", "plan", "todo", "index", "draft", "memo",
        "report", "list", "log", "ideas", "budget", "recipe",
    )
)  # fmt: skip
COLORS = ("red", "blue", "green", "gold", "gray", "pink")
NOUNS = ("lamp", "fox", "boat", "tree", "key", "star")


def read_file(world: World, name: str) -> dict[str, Any]:
    require(name in world["files"], f"no file named {name!r}")
    return {"content": world["files"][name]}


def write_file(world: World, name: str, content: str) -> dict[str, Any]:
    world["files"][name] = content
    return {"written": name}


TOOLS = (
    Tool("read_file", "Read a file.", {"name": "string"}, read_file),
    Tool(
        "write_file", "Write text to a file.", {"name": "string", "content": "string"}, write_file
    ),
)


def _phrase(rng: random.Random) -> str:
    return f"{rng.choice(COLORS)} {rng.choice(NOUNS)} {rng.randint(10, 99)}"


def _world(rng: random.Random, chain: tuple[str, ...], absent: tuple[str, ...] = ()) -> World:
    """Files `chain[0] -> chain[1] -> ...` (each holds the next one's name, the last a phrase),
    plus unrelated files, some of them links too; none of the `absent` names exists."""
    taken = set(chain) | set(absent)
    others = rng.sample([name for name in FILES if name not in taken], rng.randint(2, 4))
    files = dict(itertools.pairwise(chain))
    files[chain[-1]] = _phrase(rng)
    for name in others:
        files[name] = _phrase(rng) if rng.random() < 0.7 else rng.choice(chain)
    order = list(files)
    rng.shuffle(order)
    return {"files": {name: files[name] for name in order}}


def _link_targets(
    rng: random.Random, start: str, hops: int, absent: tuple[str, ...]
) -> tuple[str, ...]:
    """`start` and the `hops` files its links lead to: world values, not part of the request."""
    candidates = [name for name in FILES if name != start and name not in absent]
    return (start, *rng.sample(candidates, hops))


def _setup_read(rng: random.Random, combo: tuple[Any, ...]) -> tuple[Values, World]:
    return {"file": combo[0]}, _world(rng, combo)


def _setup_follow(rng: random.Random, combo: tuple[Any, ...]) -> tuple[Values, World]:
    return {"link": combo[0]}, _world(rng, _link_targets(rng, combo[0], 1, ()))


def _setup_copy(hops: int):
    def setup(rng: random.Random, combo: tuple[Any, ...]) -> tuple[Values, World]:
        link, destination = combo
        chain = _link_targets(rng, link, hops, (destination,))
        return {"link": link, "dest": destination}, _world(rng, chain, absent=(destination,))

    return setup


def _read(call: Caller, name: str, why: str) -> str:
    return call("read_file", {"name": name}, why)["content"]


def _solve_read(values: Values, call: Caller) -> Solution:
    content = _read(call, values["file"], f"I read {values['file']}.")
    return Solution(content, "That is its content.")


def _solve_follow(values: Values, call: Caller) -> Solution:
    target = _read(call, values["link"], f"{values['link']} names a file.")
    content = _read(call, target, f"I read {target}.")
    return Solution(content, "That is its content.")


def _solve_copy(values: Values, call: Caller) -> Solution:
    target = _read(call, values["link"], f"{values['link']} names a file.")
    content = _read(call, target, f"I read {target}.")
    call(
        "write_file",
        {"name": values["dest"], "content": content},
        f"I write it to {values['dest']}.",
    )
    return Solution(content, "The file is copied.")


def _solve_copy_deep(values: Values, call: Caller) -> Solution:
    middle = _read(call, values["link"], f"{values['link']} names a file.")
    target = _read(call, middle, f"I read {middle}.")
    content = _read(call, target, f"I read {target}.")
    call(
        "write_file",
        {"name": values["dest"], "content": content},
        f"I write it to {values['dest']}.",
    )
    return Solution(content, "The file is copied.")


LINK_DESTINATION_PAIRS = tuple(itertools.permutations(FILES, 2))

DOMAIN = Domain(
    "files",
    TOOLS,
    (
        TaskKind(
            "files.read",
            (
                "What does {file} say?",
                "Read {file} for me.",
                "Show me the content of {file}.",
                "What is written in {file}?",
                "Open {file} and tell me what it contains.",
                "I need the text inside {file}.",
            ),
            tuple((name,) for name in FILES),
            _setup_read,
            _solve_read,
        ),
        TaskKind(
            "files.follow",
            (
                "{link} names another file. What does that file say?",
                "Read the file that {link} points to.",
                "Follow the link in {link} and tell me what the linked file says.",
                "{link} holds a file name. Show me that file's content.",
                "Open the file mentioned in {link} and read it to me.",
                "Which text is in the file that {link} refers to?",
            ),
            tuple((name,) for name in FILES),
            _setup_follow,
            _solve_follow,
        ),
        TaskKind(
            "files.copy",
            (
                "Copy the file that {link} points to into {dest}.",
                "{link} names a file. Save its content as {dest}.",
                "Write the content of the file named in {link} to {dest}.",
                "Follow {link} and copy that file to {dest}.",
                "Duplicate the file {link} refers to as {dest}.",
                "Put a copy of the file linked in {link} into {dest}.",
            ),
            LINK_DESTINATION_PAIRS,
            _setup_copy(1),
            _solve_copy,
        ),
        TaskKind(
            "files.copy_deep",
            (
                "{link} links to a file that links to another. Copy the last one to {dest}.",
                "Follow the links from {link} twice and copy the file you reach to {dest}.",
                "{link} names a file that names another file. Save that second file as {dest}.",
                "Go two links deep from {link} and write what you find to {dest}.",
                "Start at {link}, follow two links, and copy the final file into {dest}.",
                "Copy the file two links away from {link} to {dest}.",
            ),
            LINK_DESTINATION_PAIRS,
            _setup_copy(2),
            _solve_copy_deep,
        ),
    ),
)
