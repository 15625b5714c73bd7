"""A generic synthetic corpus for pretraining the tiny model: the miniature of the text a real
base model has read, so that "base" can copy values and look up keys before it ever sees a tool.

Plain-text documents, deterministic in a seed, each short (under ~250 tokens). Kinds:

    repeat       a span of words or a list, then the same span again
    lookup       `key: value` lines or a JSON object, a question about one key and its answer
    prose_json   prose describing a record, then the record as JSON
    json_prose   a JSON record, then prose stating its values
    json_copy    a value copied from one JSON object into another
    arithmetic   a * b, a / b rounded, a + b with decimals

Values are decimals, 3-letter uppercase codes, lowercase made-up names, ISO dates and words from
a generic list. Nothing here names the procedural suite's tools, tasks or system prompt, nor the
chat markup or the tool-call format: the base learns skills, not the tasks.

Every document is a `Document(kind, prompt, answer, rest)` with `text = prompt + answer + rest`:
`answer` is the span a model that can copy (or look up, or compute) predicts from `prompt`, which
is what the build script's probe measures.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

KINDS = ("repeat", "lookup", "prose_json", "json_prose", "json_copy", "arithmetic")
# Kinds whose answer is copied or looked up from the prompt (the probe's headline number).
COPY_KINDS = ("repeat", "lookup", "prose_json", "json_prose", "json_copy")

WORDS = (
    "river", "stone", "cloud", "window", "garden", "bridge", "forest", "mirror", "ladder", "pocket",
    "wheel", "carpet", "button", "feather", "island", "kettle", "meadow", "needle", "orange",
    "pillow", "rabbit", "saddle", "tunnel", "valley", "wagon", "anchor", "basket", "castle",
    "dragon", "engine", "falcon", "guitar", "harbor", "jacket", "lemon", "marble", "nest",
    "ocean", "pepper", "quilt", "rocket", "silver", "tiger", "violet", "walnut", "yellow",
    "zebra", "copper", "desert", "globe", "honey", "iron", "jungle", "koala", "lantern", "mango",
    "north", "olive", "planet", "ribbon", "summer", "thunder", "velvet", "winter", "amber",
    "cotton", "dust", "frost", "grain", "hill", "ink", "jade", "lake", "moss", "oak", "pine",
    "salt", "tide", "wool", "bell", "coin", "drum", "flute", "horn", "kite", "mask", "rope",
)  # fmt: skip
FIELDS = (
    "code", "name", "weight", "size", "count", "level", "score", "owner", "color", "origin",
    "length", "height", "depth", "speed", "ratio", "label", "group", "city", "tag", "mark",
)  # fmt: skip
THINGS = (
    "parcel", "crate", "sample", "ticket", "record", "entry", "bottle", "package", "order",
    "panel", "token", "device", "sensor", "bundle", "shelf", "tray",
)  # fmt: skip
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclasses.dataclass(frozen=True)
class Document:
    kind: str
    prompt: str
    answer: str
    rest: str = ""

    @property
    def text(self) -> str:
        return self.prompt + self.answer + self.rest


# --- values ------------------------------------------------------------------------------------


def _decimal(rng: random.Random) -> float:
    """A number with one to three decimals, up to a few hundred."""
    places = rng.choice((1, 2, 2, 3))
    return round(rng.uniform(0.1, rng.choice((10, 100, 500))), places)


def _code(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(3))


def _name(rng: random.Random) -> str:
    syllables = rng.randint(2, 3)
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def _date(rng: random.Random) -> str:
    day = datetime.date(2020, 1, 1) + datetime.timedelta(days=rng.randrange(3650))
    return day.isoformat()


def _value(rng: random.Random) -> str | float | int:
    """A random value of a random type, as a JSON value."""
    pick = rng.randrange(6)
    if pick == 0:
        return _decimal(rng)
    if pick == 1:
        return rng.randint(2, 999)
    if pick == 2:
        return _code(rng)
    if pick == 3:
        return _name(rng)
    if pick == 4:
        return _date(rng)
    return rng.choice(WORDS)


def _show(value: str | float | int) -> str:
    """A value as prose writes it: strings bare, numbers as JSON prints them."""
    return value if isinstance(value, str) else json.dumps(value)


def _record(rng: random.Random, size: int) -> dict[str, str | float | int]:
    return {field: _value(rng) for field in rng.sample(FIELDS, size)}


# --- the kinds ---------------------------------------------------------------------------------


def _repeat(rng: random.Random) -> Document:
    items = [str(_value(rng)) for _ in range(rng.randint(2, 6))]
    if rng.random() < 0.5:
        span = " ".join(
            rng.choice(WORDS) if rng.random() < 0.6 else _show(_value(rng)) for _ in items
        )
        intro = rng.choice(
            (
                "Say it twice: {s}. Again: ",
                "The phrase is {s}. Once more, the phrase is ",
                "Write {s} and then repeat it: ",
                "Copy this line.\n{s}\n",
            )
        )
        return Document("repeat", intro.format(s=span), span, rng.choice((".", "", "\n")))
    sep = rng.choice((", ", "; ", "\n- "))
    listed = sep.join(items)
    intro = rng.choice(
        (
            "List: {l}.\nThe same list again: ",
            "Items: {l}.\nRepeated: ",
            "Here are the entries: {l}.\nCopied in order: ",
        )
    )
    return Document("repeat", intro.format(l=listed), listed, ".")


def _lookup(rng: random.Random) -> Document:
    record = _record(rng, rng.randint(3, 7))
    key = rng.choice(list(record))
    answer = _show(record[key])
    if rng.random() < 0.5:
        table = "\n".join(f"{k}: {_show(v)}" for k, v in record.items())
    else:
        table = json.dumps(record)
    question = rng.choice(
        (
            "Q: What is the {k}?\nA: ",
            "The {k} is ",
            "Question: which value has {k}?\nAnswer: ",
            "Look up {k}: ",
        )
    )
    return Document("lookup", f"{table}\n{question.format(k=key)}", answer, "\n")


def _prose(thing: str, code: str, record: dict[str, str | float | int]) -> str:
    facts = [f"its {field} is {_show(value)}" for field, value in record.items()]
    return f"The {thing} {code} is described as follows: " + ", ".join(facts) + "."


def _prose_json(rng: random.Random) -> Document:
    thing, code = rng.choice(THINGS), _code(rng)
    record = _record(rng, rng.randint(2, 5))
    full = {"id": code, **record}
    prompt = _prose(thing, code, record) + "\nAs JSON: "
    return Document("prose_json", prompt, json.dumps(full), "\n")


def _json_prose(rng: random.Random) -> Document:
    thing, code = rng.choice(THINGS), _code(rng)
    record = _record(rng, rng.randint(2, 5))
    prompt = json.dumps({"id": code, **record}) + f"\nIn words: the {thing} {code} has "
    facts = [f"{field} {_show(value)}" for field, value in record.items()]
    return Document("json_prose", prompt, ", ".join(facts), ".\n")


def _json_copy(rng: random.Random) -> Document:
    source = _record(rng, rng.randint(2, 5))
    field = rng.choice(list(source))
    target_field = rng.choice([f for f in FIELDS if f not in source] or [field])
    extra = {f: _value(rng) for f in rng.sample(FIELDS, 2) if f not in source and f != target_field}
    intro = rng.choice(
        (
            "Copy the {f} of the first object into the second as {t}.\n",
            "The second object takes {f} from the first, under {t}.\n",
            "",
        )
    )
    head = json.dumps({**extra, target_field: "VALUE"}).split('"VALUE"')[0]
    prompt = intro.format(f=field, t=target_field) + json.dumps(source) + "\n" + head
    answer = json.dumps(source[field])
    return Document("json_copy", prompt, answer, "}\n")


def _arithmetic(rng: random.Random) -> Document:
    a, b = _decimal(rng), rng.choice((_decimal(rng), rng.randint(2, 20)))
    op = rng.randrange(3)
    if op == 0:
        expression, result = f"{_show(a)} * {_show(b)}", round(a * b, 2)
    elif op == 1:
        expression, result = f"{_show(a)} / {_show(b)}", round(a / b, 2)
    else:
        expression, result = f"{_show(a)} + {_show(b)}", round(a + b, 3)
    form = rng.choice(("{e} = ", "Compute {e}, rounded to two places: ", "{e} makes "))
    return Document("arithmetic", form.format(e=expression), json.dumps(result), "\n")


_MAKERS: dict[str, Callable[[random.Random], Document]] = {
    "repeat": _repeat,
    "lookup": _lookup,
    "prose_json": _prose_json,
    "json_prose": _json_prose,
    "json_copy": _json_copy,
    "arithmetic": _arithmetic,
}


# --- the corpus --------------------------------------------------------------------------------


def generate_documents(
    n: int, seed: int = 0, *, split: str = "train", kinds: Iterable[str] = KINDS
) -> list[Document]:
    """`n` documents, kinds taken in turn; document `i` depends only on (split, seed, i), and the
    `split` name keeps held-out documents (e.g. the probe's "probe" split) apart from training."""
    kinds = tuple(kinds)
    unknown = [kind for kind in kinds if kind not in _MAKERS]
    if unknown or not kinds:
        raise ValueError(f"unknown document kinds {unknown} (choose from {', '.join(KINDS)})")
    return [
        _MAKERS[kinds[i % len(kinds)]](random.Random(f"pretrain/{split}/{seed}/{i}"))
        for i in range(n)
    ]


def write_corpus(
    path: str | Path, documents: Iterable[Document], *, answers_only: bool = False
) -> Path:
    """The documents as JSONL of `{"text": ...}` (the SFT trainer's `data.format = "text"`);
    `answers_only` adds each document's answer as its `train_span`, so that only the answer's
    tokens are trained (the copy, lookup or sum), not the random values before it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for document in documents:
            record = {"text": document.text}
            if answers_only:
                start = len(document.prompt)
                record["train_span"] = [start, start + len(document.answer)]
            f.write(json.dumps(record) + "\n")
    return path
