"""The in-memory index of a tool cache: every entry in load order (`EntryStore`) and, per
(partition, tool), an exact dict from canonical key to entry and the fuzzy search's blocks, one
per set of argument names (`ToolIndex`)."""

from __future__ import annotations

import array
import dataclasses
import json
from collections.abc import Iterator

from cacherl_jax.agent.tool_cache.block import Block

CHUNK_BITS = 12  # entries per chunk of an EntryStore: 4096
CHUNK_MASK = (1 << CHUNK_BITS) - 1


class EntryStore:
    """Every entry as a (rowid, scope, tool, key, result, source) tuple, in tuples of 4096.

    The garbage collector stops tracking a tuple once it holds only untracked objects (strings,
    ints, such tuples), so its full collections skip the stored entries. As five parallel lists
    they would cost every full collection five million pointer visits at 1M entries, inside
    whichever lookup triggered it."""

    __slots__ = ("chunks", "tail")

    def __init__(self):
        self.chunks: list[tuple[tuple, ...]] = []
        self.tail: list[tuple] = []

    def __len__(self) -> int:
        return (len(self.chunks) << CHUNK_BITS) + len(self.tail)

    def __getitem__(self, index: int) -> tuple:
        chunk = index >> CHUNK_BITS
        if chunk < len(self.chunks):
            return self.chunks[chunk][index & CHUNK_MASK]
        return self.tail[index & CHUNK_MASK]

    def __iter__(self) -> Iterator[tuple]:
        for chunk in self.chunks:
            yield from chunk
        yield from self.tail

    def append(self, entry: tuple) -> None:
        self.tail.append(entry)
        if len(self.tail) > CHUNK_MASK:
            self.chunks.append(tuple(self.tail))
            self.tail = []


@dataclasses.dataclass
class ToolIndex:
    """The entries of one tool in one partition: exact keys at once, blocks on first need."""

    exact: dict[str, int] = dataclasses.field(default_factory=dict)  # key -> entry index
    blocks: dict[tuple[str, ...], Block] = dataclasses.field(default_factory=dict)
    # Entries not yet in a block: blocks are filled on the tool's first non-exact lookup, so
    # opening a large cache only builds the exact index.
    pending: array.array = dataclasses.field(default_factory=lambda: array.array("q"))

    def add(self, key: str, entry_index: int) -> None:
        """Indexes an entry, unless an earlier one has the same key (the first one answers)."""
        if key not in self.exact:
            self.exact[key] = entry_index
            self.pending.append(entry_index)

    def index_pending(self, entries: EntryStore) -> None:
        """Adds the pending entries to the blocks of their argument names."""
        for entry_index in self.pending:
            arguments = json.loads(entries[entry_index][3])
            names = tuple(arguments)  # stored with sorted keys
            block = self.blocks.get(names)
            if block is None:
                block = self.blocks[names] = Block(names)
            block.add(arguments, entry_index)
        self.pending = array.array("q")

    def build_indexes(self, entries: EntryStore) -> None:
        """Fills the blocks and builds all their search indexes now."""
        self.index_pending(entries)
        for block in self.blocks.values():
            block.build_indexes()
