"""The SFT data pipeline: rendered conversations -> fixed-shape packed batches, deterministically,
at a position that can be saved and restored exactly.

Each example (`example_from_rendered`) is shifted for next-token prediction (`tokens[t]` predicts
`targets[t] = token_ids[t + 1]`, trained iff that target token is a trained token), truncated to
or skipped beyond `seq_len`, and dropped if no trained target is left. Examples are identified by
their index in the `examples` sequence (`example_id`; `render_examples` keeps trajectory order,
so it is also the trajectory's index).

Packing. Our own packer, not grain's: per epoch, examples are taken in the epoch's order and each
goes into the first row of the current global batch of `batch_size` rows with room for it (first
fit over the batch's rows); the first example that fits no row closes the batch (its rows are
padded) and opens the next. An example is never split or reordered across batches, and an
epoch's last batch is closed at the epoch's end, so every example is in exactly one row per
epoch. We measured row fill 0.83 with 8 rows per batch (0.74 with 1 row, 0.89 with 32) on
lengths uniform in 100..360 with seq_len 512. grain's `FirstFitPackIterDataset` does the same
first fit but restores by re-reading from the last batch boundary, has no truncate/skip counters
and lets hosts fall out of step; our plan makes a position two integers and keeps hosts in
lockstep.

Plain text (`text_examples`, the pretraining format): a document is its tokens followed by
`<|endoftext|>`, none of them thinking; every target is trained, or, when the record gives a
`train_span` (character offsets `[start, end)`), only the tokens that reach into that span.

Epochs and hosts. Epoch `e` visits the examples in `permutation(seed, e)` (or in order without
`shuffle`). Packing needs only lengths, so every host plans the same global batches (a cheap
pass over lengths) and host `p` of `P` yields rows `[p * R, (p + 1) * R)` of each, with
`R = batch_size // P`. The trainer's `jax.make_array_from_process_local_data` puts process `p`'s
rows in the `p`-th contiguous block of the batch axis when the mesh's devices are in process
order (as `jax.devices()` lists them), so the global array, and therefore training, is the same
for any number of hosts, and a run can resume on a different host count. A host whose rows are
all empty (an epoch's last batch may have few) yields padding (loss mask 0). Hosts always agree
on the epoch, a finite run ends on the same step everywhere, and the counters are global.

Batches (per host, `B = R` rows of `T = seq_len` tokens):

    tokens_BxT         int32  inputs (pad_id on padding)
    targets_BxT        int32  next tokens (pad_id on padding)
    loss_mask_BxT      int8   1 where the target is trained
    thinking_mask_BxT  int8   1 where the target is a thinking token
    segment_ids_BxT    int32  0 padding, 1..k the examples packed in the row
    positions_BxT      int32  0.. within each example (0 on padding)
    example_ids_BxT    int32  index of the token's example in `examples` (-1 on padding)
    stats              dict of Python ints, global over all hosts, cumulative over the run up
                       to and including this step: `epoch` (of this batch), `examples` (packed),
                       `truncated`, `skipped_too_long`, `skipped_no_target`, `skipped` (the sum).
                       Pop it before sending the batch to devices.

State (`get_state`) is `{"version", "epoch", "batch", "fingerprint"}`: the next batch to yield
plus what determines the order (config, example lengths), which `set_state` checks, so a state
cannot silently be restored into a different pipeline. `num_epochs`, `pad_id` and the host count
are not in the fingerprint: a run can be resumed with more epochs or on other hosts. Version 1
states (whose order depended on the host count) are refused.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import grain
import numpy as np

from cacherl_jax.chat.template import Rendered, render
from cacherl_jax.chat.tokenizer import Tokenizer
from cacherl_jax.chat.trajectory import Trajectory

EXAMPLE_KEYS = ("token_ids", "loss_mask", "thinking_mask")
BATCH_KEYS = (
    "tokens_BxT",
    "targets_BxT",
    "loss_mask_BxT",
    "thinking_mask_BxT",
    "segment_ids_BxT",
    "positions_BxT",
    "example_ids_BxT",
)
COUNTERS = ("examples", "truncated", "skipped_too_long", "skipped_no_target")
STATE_VERSION = 2  # 1: each host packed its own slice, so the order depended on the host count

# What happens to an example (after shifting), decided once from its length and mask. The two
# skip statuses equal the index of their counter in COUNTERS.
_KEPT, _TRUNCATED, _TOO_LONG, _NO_TARGET = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How examples become batches; everything but `num_epochs` and `pad_id` fixes the order."""

    seq_len: int
    batch_size: int  # global batch (rows per step across all hosts)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None = repeat forever, each epoch reshuffled
    overflow: Literal["truncate", "skip"] = "truncate"
    pad_id: int = 0

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(
                f"seq_len must be at least 2 (one input and one target), got {self.seq_len}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be None (forever) or >= 1, got {self.num_epochs}")
        if self.overflow not in ("truncate", "skip"):
            raise ValueError(f"overflow must be 'truncate' or 'skip', got {self.overflow!r}")


def example_from_rendered(rendered: Rendered) -> dict[str, np.ndarray]:
    """The arrays of a rendered conversation the pipeline trains on."""
    return {
        "token_ids": np.asarray(rendered.token_ids, np.int32),
        "loss_mask": np.asarray(rendered.loss_mask, np.int8),
        "thinking_mask": np.asarray(rendered.thinking_mask, np.int8),
    }


def render_examples(
    trajectories: Iterable[Trajectory | Mapping[str, Any]],
    tokenizer: Tokenizer,
    **render_kwargs: Any,
) -> list[dict[str, np.ndarray]]:
    """One example per trajectory, in order (so an example_id is the trajectory's index).

    `render_kwargs` go to `render` (`train_on`, `train_thinking`, `enable_thinking`, ...).
    """
    examples = []
    for trajectory in trajectories:
        if isinstance(trajectory, Mapping):
            messages, tools = trajectory["messages"], trajectory.get("tools")
        else:
            messages, tools = trajectory.messages, trajectory.tools
        examples.append(example_from_rendered(render(messages, tools, tokenizer, **render_kwargs)))
    return examples


def load_text_records(path: str | Path) -> tuple[list[str], list[tuple[int, int] | None]]:
    """The `text` of every record of a JSONL file of `{"text": ..., "train_span": [start, end]}`
    objects (blank lines skipped; `train_span` optional, None where absent); a record without a
    string `text`, or with a span that is not two offsets within it, is an error naming its line."""
    texts, spans = [], []
    with Path(path).open() as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err})") from err
            if not isinstance(record, Mapping) or not isinstance(record.get("text"), str):
                raise ValueError(f'{where}: expected an object with a string "text"')
            texts.append(record["text"])
            spans.append(_train_span(record, where))
    return texts, spans


def _train_span(record: Mapping[str, Any], where: str) -> tuple[int, int] | None:
    span = record.get("train_span")
    if span is None:
        return None
    valid = (
        isinstance(span, list)
        and len(span) == 2
        and all(isinstance(offset, int) and not isinstance(offset, bool) for offset in span)
        and 0 <= span[0] < span[1] <= len(record["text"])
    )
    if not valid:
        raise ValueError(
            f'{where}: "train_span" must be [start, end] with 0 <= start < end <= '
            f"len(text) ({len(record['text'])}), got {span!r}"
        )
    return span[0], span[1]


def text_examples(
    texts: Iterable[str],
    tokenizer: Tokenizer,
    spans: Iterable[tuple[int, int] | None] | None = None,
) -> list[dict[str, np.ndarray]]:
    """One example per text, in order: its tokens and `<|endoftext|>`. Every target is trained,
    or, for a text with a span (`spans`, one per text), only the tokens whose characters reach
    into it (the end of the document is then not trained)."""
    texts = list(texts)
    spans = [None] * len(texts) if spans is None else list(spans)
    examples = []
    for text, span in zip(texts, spans, strict=True):
        text_ids = tokenizer.encode(text)
        token_ids = np.asarray([*text_ids, tokenizer.special.endoftext], np.int32)
        if span is None:
            loss_mask = np.ones(len(token_ids), np.int8)
        else:
            loss_mask = np.append(_span_mask(text, text_ids, tokenizer, span), np.int8(0))
        examples.append(
            {
                "token_ids": token_ids,
                "loss_mask": loss_mask,
                "thinking_mask": np.zeros(len(token_ids), np.int8),
            }
        )
    return examples


def _span_mask(
    text: str, text_ids: list[int], tokenizer: Tokenizer, span: tuple[int, int]
) -> np.ndarray:
    """1 for each token of `text_ids` whose characters overlap `span` (offsets into `text`)."""
    lengths = np.asarray([len(tokenizer.decode([token_id])) for token_id in text_ids], np.int64)
    ends = np.cumsum(lengths)
    if not len(ends) or ends[-1] != len(text):
        raise ValueError(
            "a train_span needs tokens that decode to whole characters; "
            f"this text's do not: {text[:60]!r}"
        )
    starts = ends - lengths
    return ((starts < span[1]) & (ends > span[0])).astype(np.int8)


def epoch_order(num_examples: int, epoch: int, *, seed: int, shuffle: bool) -> np.ndarray:
    """The example ids of one epoch, in visiting order (all hosts together)."""
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _checked_arrays(examples: Sequence[Mapping[str, Any]]) -> list[tuple[np.ndarray, ...]]:
    arrays = []
    for index, example in enumerate(examples):
        if not isinstance(example, Mapping):
            raise ValueError(
                f"examples[{index}] is a {type(example).__name__}, expected a dict with keys "
                f"{', '.join(EXAMPLE_KEYS)} (see example_from_rendered)"
            )
        missing = [key for key in EXAMPLE_KEYS if key not in example]
        if missing:
            raise ValueError(f"examples[{index}] has no {', '.join(missing)}")
        row = tuple(np.asarray(example[key]) for key in EXAMPLE_KEYS)
        for key, array in zip(EXAMPLE_KEYS, row, strict=True):
            if array.ndim != 1:
                raise ValueError(f"examples[{index}][{key!r}] must be 1-D, has shape {array.shape}")
            if array.size and not np.issubdtype(array.dtype, np.integer):
                raise ValueError(
                    f"examples[{index}][{key!r}] must hold integers, has {array.dtype}"
                )
        if not len(row[0]) == len(row[1]) == len(row[2]):
            raise ValueError(
                f"examples[{index}]: token_ids, loss_mask and thinking_mask have different "
                f"lengths {len(row[0])}, {len(row[1])}, {len(row[2])}"
            )
        arrays.append(row)
    return arrays


def _classify(
    arrays: Sequence[tuple[np.ndarray, ...]], seq_len: int, overflow: str
) -> tuple[np.ndarray, np.ndarray]:
    """(packed length, status) per example; the length counts shifted positions."""
    lengths = np.zeros(len(arrays), np.int64)
    status = np.zeros(len(arrays), np.int8)
    for index, (token_ids, loss_mask, _) in enumerate(arrays):
        shifted = max(len(token_ids) - 1, 0)
        if shifted > seq_len and overflow == "skip":
            status[index] = _TOO_LONG
            continue
        length = min(shifted, seq_len)
        if not np.any(loss_mask[1 : length + 1]):
            status[index] = _NO_TARGET
            continue
        lengths[index] = length
        status[index] = _TRUNCATED if shifted > seq_len else _KEPT
    return lengths, status


@dataclasses.dataclass
class _EpochPlan:
    """The epoch's global batches (batch -> row -> example ids) and the counters after each."""

    rows: list[list[list[int]]]  # a batch may have fewer than batch_size rows: the rest is padding
    counts_NxC: np.ndarray  # [num_batches, len(COUNTERS)], cumulative over the epoch

    @property
    def num_batches(self) -> int:
        return len(self.counts_NxC)


def _pack_epoch(
    ids: np.ndarray, lengths: Sequence[int], status: Sequence[int], rows: int, seq_len: int
) -> tuple[list[list[list[int]]], list[list[int]]]:
    """First fit over the rows of the current batch; the counters after each closed batch."""
    batches: list[list[list[int]]] = []
    counts_after: list[list[int]] = []
    counts = [0] * len(COUNTERS)
    batch: list[list[int]] = []
    free: list[int] = []
    for example_id in ids.tolist():
        kind = status[example_id]
        if kind >= _TOO_LONG:
            counts[kind] += 1  # skip statuses double as their counter's index
            continue
        length = lengths[example_id]
        row = next((r for r, room in enumerate(free) if room >= length), None)
        if row is None and len(batch) == rows:
            batches.append(batch)
            counts_after.append(list(counts))
            batch, free = [], []
        if row is None:
            batch.append([])
            free.append(seq_len)
            row = len(batch) - 1
        batch[row].append(example_id)
        free[row] -= length
        counts[0] += 1
        counts[1] += kind == _TRUNCATED
    if batch:
        batches.append(batch)
        counts_after.append(list(counts))
    if counts_after:
        counts_after[-1] = counts  # skips after the last placed example count in the last batch
    else:
        counts_after.append(counts)  # nothing packed: counted in the epoch's first batch
    return batches, counts_after


class _PackedBatchIterator(grain.DatasetIterator):
    """Yields planned batches; its position is (epoch, batch within the epoch)."""

    def __init__(self, dataset: _PackedBatchDataset):
        super().__init__()
        self._dataset = dataset
        self._epoch = 0
        self._batch = 0
        self._plan: tuple[int, _EpochPlan] | None = None

    def _epoch_plan(self, epoch: int) -> _EpochPlan:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, self._dataset.plan_epoch(epoch))
        return self._plan[1]

    def __next__(self) -> dict[str, Any]:
        num_epochs = self._dataset.config.num_epochs
        while True:
            if num_epochs is not None and self._epoch >= num_epochs:
                raise StopIteration
            plan = self._epoch_plan(self._epoch)
            if self._batch < plan.num_batches:
                break
            self._epoch, self._batch = self._epoch + 1, 0
        batch = self._dataset.make_batch(plan, self._epoch, self._batch)
        self._batch += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batch": self._batch,
            "fingerprint": dict(self._dataset.fingerprint),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        version = state.get("version") if isinstance(state, Mapping) else None
        if version == 1:
            raise ValueError(
                "the data pipeline state is of version 1, whose batches depended on the number "
                f"of hosts; this pipeline (version {STATE_VERSION}) packs other batches and cannot "
                "continue that run: start it again in a fresh workdir"
            )
        if version != STATE_VERSION:
            raise ValueError(
                f"not a data pipeline state of version {STATE_VERSION} (got version {version!r})"
            )
        saved, ours = state.get("fingerprint") or {}, self._dataset.fingerprint
        for key, value in ours.items():
            if saved.get(key) != value:
                raise ValueError(
                    f"the state was saved by a different pipeline: {key}={saved.get(key)!r} "
                    f"there, {key}={value!r} here; it would not continue the same data order"
                )
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or batch < 0:
            raise ValueError(
                f"state position must be non-negative, got epoch {epoch} batch {batch}"
            )
        self._epoch, self._batch = epoch, batch


class _PackedBatchDataset(grain.IterDataset):
    """The examples, classified once; plans epochs and builds batches for `_PackedBatchIterator`."""

    def __init__(
        self,
        arrays: list[tuple[np.ndarray, ...]],
        config: PipelineConfig,
        process_index: int,
        process_count: int,
    ):
        super().__init__()
        self.arrays = arrays
        self.config = config
        self.process_index = process_index
        self.process_count = process_count
        self.rows = config.batch_size // process_count  # this host's share of each batch
        self.first_row = process_index * self.rows
        self.lengths, self.status = _classify(arrays, config.seq_len, config.overflow)
        if not np.any(self.lengths):
            reasons = {
                "too long (overflow='skip')": int(np.sum(self.status == _TOO_LONG)),
                "no trained target": int(np.sum(self.status == _NO_TARGET)),
            }
            raise ValueError(
                f"none of the {len(arrays)} examples can be trained on at seq_len "
                f"{config.seq_len}: " + ", ".join(f"{n} {why}" for why, n in reasons.items())
            )
        self.fingerprint = {
            "num_examples": len(arrays),
            "lengths_crc32": zlib.crc32(self.lengths.tobytes() + self.status.tobytes()),
            "seq_len": config.seq_len,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "shuffle": config.shuffle,
            "overflow": config.overflow,
        }
        self._lengths_list, self._status_list = self.lengths.tolist(), self.status.tolist()
        self._epoch_totals: np.ndarray | None = None

    def __iter__(self) -> _PackedBatchIterator:
        return _PackedBatchIterator(self)

    def __str__(self) -> str:
        return (
            f"PackedBatchDataset(examples={len(self.arrays)}, rows={self.rows}, "
            f"seq_len={self.config.seq_len}, host={self.process_index}/{self.process_count})"
        )

    def plan_epoch(self, epoch: int) -> _EpochPlan:
        """Packs the whole epoch into global batches (lengths only): the same plan on every host."""
        config = self.config
        order = epoch_order(len(self.arrays), epoch, seed=config.seed, shuffle=config.shuffle)
        rows, counts_after = _pack_epoch(
            order, self._lengths_list, self._status_list, config.batch_size, config.seq_len
        )
        return _EpochPlan(rows, np.array(counts_after, np.int64))

    def epoch_totals(self) -> np.ndarray:
        """Global counters of one whole epoch: the same every epoch (one visit per example)."""
        if self._epoch_totals is None:
            kept = self.status <= _TRUNCATED
            self._epoch_totals = np.array(
                [
                    kept.sum(),
                    (self.status == _TRUNCATED).sum(),
                    (self.status == _TOO_LONG).sum(),
                    (self.status == _NO_TARGET).sum(),
                ],
                np.int64,
            )
        return self._epoch_totals

    def make_batch(self, plan: _EpochPlan, epoch: int, index: int) -> dict[str, Any]:
        B, T, pad_id = self.rows, self.config.seq_len, self.config.pad_id
        tokens_BxT = np.full((B, T), pad_id, np.int32)
        targets_BxT = np.full((B, T), pad_id, np.int32)
        loss_mask_BxT = np.zeros((B, T), np.int8)
        thinking_mask_BxT = np.zeros((B, T), np.int8)
        segment_ids_BxT = np.zeros((B, T), np.int32)
        positions_BxT = np.zeros((B, T), np.int32)
        example_ids_BxT = np.full((B, T), -1, np.int32)
        # This host's block of the global batch; nothing packed at all leaves an empty batch.
        global_rows = plan.rows[index] if index < len(plan.rows) else []
        rows = global_rows[self.first_row : self.first_row + B]
        for row, example_ids in enumerate(rows):
            start = 0
            for segment, example_id in enumerate(example_ids, start=1):
                token_ids, loss_mask, thinking_mask = self.arrays[example_id]
                n = int(self.lengths[example_id])
                stop = start + n
                tokens_BxT[row, start:stop] = token_ids[:n]
                targets_BxT[row, start:stop] = token_ids[1 : n + 1]
                loss_mask_BxT[row, start:stop] = loss_mask[1 : n + 1]
                thinking_mask_BxT[row, start:stop] = thinking_mask[1 : n + 1]
                segment_ids_BxT[row, start:stop] = segment
                positions_BxT[row, start:stop] = np.arange(n)
                example_ids_BxT[row, start:stop] = example_id
                start = stop
        counts = epoch * self.epoch_totals() + plan.counts_NxC[index]
        stats = {"epoch": epoch} | {
            key: int(value) for key, value in zip(COUNTERS, counts, strict=True)
        }
        stats["skipped"] = stats["skipped_too_long"] + stats["skipped_no_target"]
        return {
            "tokens_BxT": tokens_BxT,
            "targets_BxT": targets_BxT,
            "loss_mask_BxT": loss_mask_BxT,
            "thinking_mask_BxT": thinking_mask_BxT,
            "segment_ids_BxT": segment_ids_BxT,
            "positions_BxT": positions_BxT,
            "example_ids_BxT": example_ids_BxT,
            "stats": stats,
        }


def make_dataset(
    examples: Sequence[Mapping[str, Any]],
    config: PipelineConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """This host's rows of the packed global batches: rows `[p * R, (p + 1) * R)` of each, with
    `p = process_index` and `R = config.batch_size // process_count` (see module doc)."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count), got {process_index} of {process_count}"
        )
    if config.batch_size % process_count:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by process_count {process_count}: "
            "every host must get the same number of rows"
        )
    if len(examples) == 0:
        raise ValueError("the example list is empty: nothing to train on")
    return _PackedBatchDataset(_checked_arrays(examples), config, process_index, process_count)


def get_state(iterator: grain.DatasetIterator) -> dict[str, Any]:
    """The iterator's position as plain JSON values (a copy: later steps do not change it)."""
    return json.loads(json.dumps(iterator.get_state()))


def set_state(iterator: grain.DatasetIterator, state: dict[str, Any]) -> None:
    """Moves the iterator to a position from `get_state`; the next batch is the one saved after."""
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a dict from get_state, got {type(state).__name__}")
    iterator.set_state(dict(state))
