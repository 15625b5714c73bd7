"""SFT data pipeline: shifting, packing token by token, epochs, hosts, overflow, exact resume."""

import itertools
import json

import grain
import numpy as np
import pytest

from cacherl_jax.chat import load_tokenizer, render
from cacherl_jax.chat.trajectory import Trajectory
from cacherl_jax.data.pipeline import (
    BATCH_KEYS,
    PipelineConfig,
    example_from_rendered,
    get_state,
    make_dataset,
    render_examples,
    set_state,
)


def make_example(num_tokens, *, base=0, trained=None, thinking=None):
    """Distinct token ids (base + 1..n); trained/thinking: token indices with mask 1 (default: all)."""
    loss_mask = np.ones(num_tokens, np.int8) if trained is None else np.zeros(num_tokens, np.int8)
    if trained is not None:
        loss_mask[list(trained)] = 1
    thinking_mask = np.zeros(num_tokens, np.int8)
    if thinking is not None:
        thinking_mask[list(thinking)] = 1
    return {
        "token_ids": np.arange(base + 1, base + num_tokens + 1, dtype=np.int32),
        "loss_mask": loss_mask,
        "thinking_mask": thinking_mask,
    }


def random_examples(count, low, high, seed=0):
    """Examples of random lengths, each with a random prompt prefix left out of the loss."""
    rng = np.random.default_rng(seed)
    examples = []
    for index in range(count):
        n = int(rng.integers(low, high + 1))
        prompt = int(rng.integers(1, n))
        examples.append(make_example(n, base=1000 * index, trained=range(prompt, n)))
    return examples


def take(iterator, count):
    return list(itertools.islice(iterator, count))


def assert_batches_equal(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.keys() == want.keys()
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert got["stats"] == want["stats"]


def spans(batch):
    """{example_id: (row, start, stop)}; fails if an example is not one contiguous span."""
    found = {}
    for row, ids in enumerate(batch["example_ids_BxT"]):
        for example_id in np.unique(ids[ids >= 0]):
            where = np.flatnonzero(ids == example_id)
            assert where[-1] - where[0] + 1 == len(where), f"example {example_id} split in a row"
            assert example_id not in found, f"example {example_id} in two rows of a batch"
            found[int(example_id)] = (row, int(where[0]), int(where[-1]) + 1)
    return found


def epochs_of(batches):
    by_epoch = {}
    for batch in batches:
        by_epoch.setdefault(batch["stats"]["epoch"], []).append(batch)
    return by_epoch


# --- shifting and packing, token by token -----------------------------------------------------


def test_single_example_is_shifted_token_by_token():
    example = make_example(6, base=10, trained=[3, 4, 5], thinking=[3, 4])
    config = PipelineConfig(seq_len=8, batch_size=1, shuffle=False, num_epochs=1, pad_id=99)
    (batch,) = list(make_dataset([example], config))
    assert batch["tokens_BxT"].tolist() == [[11, 12, 13, 14, 15, 99, 99, 99]]
    assert batch["targets_BxT"].tolist() == [[12, 13, 14, 15, 16, 99, 99, 99]]
    # The target at t is trained iff token t + 1 is: tokens 3, 4, 5 -> positions 2, 3, 4.
    assert batch["loss_mask_BxT"].tolist() == [[0, 0, 1, 1, 1, 0, 0, 0]]
    assert batch["thinking_mask_BxT"].tolist() == [[0, 0, 1, 1, 0, 0, 0, 0]]
    assert batch["segment_ids_BxT"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    assert batch["positions_BxT"].tolist() == [[0, 1, 2, 3, 4, 0, 0, 0]]
    assert batch["example_ids_BxT"].tolist() == [[0, 0, 0, 0, 0, -1, -1, -1]]
    dtypes = {key: batch[key].dtype for key in BATCH_KEYS}
    assert dtypes == {
        "tokens_BxT": np.int32,
        "targets_BxT": np.int32,
        "loss_mask_BxT": np.int8,
        "thinking_mask_BxT": np.int8,
        "segment_ids_BxT": np.int32,
        "positions_BxT": np.int32,
        "example_ids_BxT": np.int32,
    }


# Shifted lengths 3, 4, 2, 5, 1, 7 into rows of 8, two rows per batch, first fit:
# batch 0: row 0 = ex0 (3) + ex1 (4) + ex4 (1), row 1 = ex2 (2) + ex3 (5); ex5 (7) fits neither,
# so it opens batch 1 (row 0), whose row 1 is all padding.
HAND_LENGTHS = [4, 5, 3, 6, 2, 8]


def hand_examples():
    return [make_example(n, base=100 * i) for i, n in enumerate(HAND_LENGTHS)]


def test_hand_made_packing_token_by_token():
    config = PipelineConfig(seq_len=8, batch_size=2, shuffle=False, num_epochs=1, pad_id=0)
    batch0, batch1 = list(make_dataset(hand_examples(), config))
    assert batch0["segment_ids_BxT"].tolist() == [
        [1, 1, 1, 2, 2, 2, 2, 3],
        [1, 1, 2, 2, 2, 2, 2, 0],
    ]
    assert batch0["positions_BxT"].tolist() == [
        [0, 1, 2, 0, 1, 2, 3, 0],
        [0, 1, 0, 1, 2, 3, 4, 0],
    ]
    assert batch0["example_ids_BxT"].tolist() == [
        [0, 0, 0, 1, 1, 1, 1, 4],
        [2, 2, 3, 3, 3, 3, 3, -1],
    ]
    assert batch0["tokens_BxT"].tolist() == [
        [1, 2, 3, 101, 102, 103, 104, 401],
        [201, 202, 301, 302, 303, 304, 305, 0],
    ]
    assert batch0["targets_BxT"].tolist() == [
        [2, 3, 4, 102, 103, 104, 105, 402],
        [202, 203, 302, 303, 304, 305, 306, 0],
    ]
    assert batch0["loss_mask_BxT"].tolist() == [[1] * 8, [1] * 7 + [0]]
    assert batch1["segment_ids_BxT"].tolist() == [[1] * 7 + [0], [0] * 8]
    assert batch1["positions_BxT"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0], [0] * 8]
    assert batch1["example_ids_BxT"].tolist() == [[5] * 7 + [-1], [-1] * 8]
    assert batch1["tokens_BxT"].tolist() == [[501, 502, 503, 504, 505, 506, 507, 0], [0] * 8]
    assert batch1["targets_BxT"].tolist() == [[502, 503, 504, 505, 506, 507, 508, 0], [0] * 8]
    assert batch0["stats"] == {
        "epoch": 0,
        "examples": 5,
        "truncated": 0,
        "skipped_too_long": 0,
        "skipped_no_target": 0,
        "skipped": 0,
    }
    assert batch1["stats"]["examples"] == 6


def test_padding_has_pad_id_and_zero_masks():
    config = PipelineConfig(seq_len=32, batch_size=4, seed=3, num_epochs=2, pad_id=151643)
    batches = list(make_dataset(random_examples(40, 2, 20), config))
    total_padding = 0
    for batch in batches:
        padding = batch["segment_ids_BxT"] == 0
        total_padding += padding.sum()
        assert np.all(batch["tokens_BxT"][padding] == 151643)
        assert np.all(batch["targets_BxT"][padding] == 151643)
        assert np.all(batch["loss_mask_BxT"][padding] == 0)
        assert np.all(batch["thinking_mask_BxT"][padding] == 0)
        assert np.all(batch["positions_BxT"][padding] == 0)
        assert np.all(batch["example_ids_BxT"][padding] == -1)
        assert np.all(batch["example_ids_BxT"][~padding] >= 0)
        assert np.all(batch["tokens_BxT"][~padding] != 151643)
    assert total_padding > 0


def test_every_example_exactly_once_per_epoch_never_split():
    examples = random_examples(150, 3, 40)
    config = PipelineConfig(seq_len=48, batch_size=4, seed=1, num_epochs=3)
    by_epoch = epochs_of(list(make_dataset(examples, config)))
    assert sorted(by_epoch) == [0, 1, 2]
    for batches in by_epoch.values():
        seen = []
        for batch in batches:
            for example_id, (row, start, stop) in spans(batch).items():
                seen.append(example_id)
                token_ids = examples[example_id]["token_ids"]
                assert stop - start == len(token_ids) - 1
                np.testing.assert_array_equal(batch["tokens_BxT"][row, start:stop], token_ids[:-1])
                np.testing.assert_array_equal(batch["targets_BxT"][row, start:stop], token_ids[1:])
                np.testing.assert_array_equal(
                    batch["positions_BxT"][row, start:stop], np.arange(stop - start)
                )
                segment = batch["segment_ids_BxT"][row, start:stop]
                assert len(set(segment.tolist())) == 1 and segment[0] > 0
        assert sorted(seen) == list(range(len(examples)))


def test_row_fill_on_realistic_lengths():
    rng = np.random.default_rng(0)
    examples = [make_example(int(n) + 1) for n in rng.integers(100, 361, size=1500)]
    config = PipelineConfig(seq_len=512, batch_size=8, num_epochs=1)
    batches = list(make_dataset(examples, config))
    fill = np.mean([np.mean(batch["segment_ids_BxT"] > 0) for batch in batches])
    assert fill > 0.8, fill  # measured 0.83; one row per batch (next fit) gives 0.74


# --- order: seeds, epochs, resume -------------------------------------------------------------


def first_seen_order(batches):
    order = []
    for batch in batches:
        ids = batch["example_ids_BxT"]
        order.extend(int(i) for i in dict.fromkeys(ids[ids >= 0].tolist()))
    return order


def test_seed_decides_order():
    examples = random_examples(60, 3, 30)

    def batches(seed):
        config = PipelineConfig(seq_len=64, batch_size=2, seed=seed, num_epochs=1)
        return list(make_dataset(examples, config))

    assert_batches_equal(batches(5), batches(5))
    assert first_seen_order(batches(5)) != first_seen_order(batches(6))
    assert sorted(first_seen_order(batches(5))) == sorted(first_seen_order(batches(6)))


def test_epochs_are_reshuffled_unless_shuffle_is_off():
    examples = random_examples(50, 3, 30)
    config = PipelineConfig(seq_len=64, batch_size=2, seed=0, num_epochs=2)
    by_epoch = epochs_of(list(make_dataset(examples, config)))
    first, second = (first_seen_order(by_epoch[e]) for e in (0, 1))
    assert first != second
    assert sorted(first) == sorted(second) == list(range(50))

    config = PipelineConfig(seq_len=64, batch_size=2, shuffle=False, num_epochs=2)
    by_epoch = epochs_of(list(make_dataset(examples, config)))
    assert_batches_equal(
        [b | {"stats": None} for b in by_epoch[0]], [b | {"stats": None} for b in by_epoch[1]]
    )
    # In order: each batch holds the next examples (first fit may reorder them within a batch).
    assert [i for b in by_epoch[0] for i in sorted(spans(b))] == list(range(50))


def test_forever_repeats_past_the_first_epoch():
    config = PipelineConfig(seq_len=8, batch_size=2, shuffle=False)
    batches = take(iter(make_dataset(hand_examples(), config)), 7)
    assert [b["stats"]["epoch"] for b in batches] == [0, 0, 1, 1, 2, 2, 3]
    assert [b["stats"]["examples"] for b in batches] == [5, 6, 11, 12, 17, 18, 23]


def test_resume_from_saved_state_continues_exactly():
    examples = random_examples(30, 3, 30)  # about 8 batches an epoch: resumes cross epochs
    config = PipelineConfig(seq_len=40, batch_size=2, seed=7)
    dataset = make_dataset(examples, config)
    iterator = iter(dataset)
    reference, states = [], []
    for _ in range(30):
        states.append(get_state(iterator))
        reference.append(next(iterator))
    assert len(epochs_of(reference)) >= 3
    for k in (0, 1, 5, 8, 13, 24):
        state = json.loads(json.dumps(states[k]))  # what a checkpoint stores
        fresh = iter(make_dataset(examples, config))
        set_state(fresh, state)
        assert_batches_equal(take(fresh, 6), reference[k : k + 6])
    # Restoring into an iterator that has already moved on works as well.
    set_state(iterator, states[3])
    assert_batches_equal(take(iterator, 2), reference[3:5])


def test_state_is_a_json_copy():
    config = PipelineConfig(seq_len=40, batch_size=2, seed=7)
    iterator = iter(make_dataset(random_examples(30, 3, 30), config))
    take(iterator, 2)
    state = get_state(iterator)
    json.dumps(state)
    before = json.dumps(state, sort_keys=True)
    take(iterator, 3)
    assert json.dumps(state, sort_keys=True) == before
    assert get_state(iterator) != state


def test_resume_through_grain_thread_prefetch():
    examples = random_examples(30, 3, 30)
    config = PipelineConfig(seq_len=40, batch_size=2, seed=2)

    def prefetched():
        dataset = make_dataset(examples, config)
        return iter(grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=4))

    iterator = prefetched()
    take(iterator, 5)
    state = get_state(iterator)
    expected = take(iterator, 4)
    fresh = prefetched()
    set_state(fresh, state)
    assert_batches_equal(take(fresh, 4), expected)


def test_finite_epochs_stop():
    config = PipelineConfig(seq_len=8, batch_size=2, shuffle=False, num_epochs=2)
    iterator = iter(make_dataset(hand_examples(), config))
    assert len(take(iterator, 10)) == 4
    with pytest.raises(StopIteration):
        next(iterator)


# --- hosts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_hosts_rows_concatenate_to_the_one_host_batch(process_count):
    # Each epoch's last batch has empty rows (5 and 7 of 8 here): some hosts get only padding.
    examples = random_examples(90, 3, 49)
    config = PipelineConfig(seq_len=48, batch_size=8, seed=4, num_epochs=2)
    expected = list(make_dataset(examples, config))
    per_host = [
        list(make_dataset(examples, config, process_index=p, process_count=process_count))
        for p in range(process_count)
    ]
    assert sorted(epochs_of(expected)) == [0, 1]
    assert all(len(batches) == len(expected) for batches in per_host)  # lockstep
    for step, want in enumerate(expected):
        got = [batches[step] for batches in per_host]
        assert all(b["tokens_BxT"].shape == (8 // process_count, 48) for b in got)
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(
                np.concatenate([b[key] for b in got]), want[key], err_msg=f"step {step} {key}"
            )
        assert all(b["stats"] == want["stats"] for b in got)  # global counters
    assert expected[-1]["stats"]["examples"] == 180


def test_state_resumes_on_another_host_count():
    examples = random_examples(40, 3, 30)
    config = PipelineConfig(seq_len=40, batch_size=4, seed=3)
    two_hosts = [
        iter(make_dataset(examples, config, process_index=p, process_count=2)) for p in (0, 1)
    ]
    for iterator in two_hosts:
        take(iterator, 5)
    states = [get_state(iterator) for iterator in two_hosts]
    assert states[0] == states[1]  # every host saves the same position
    expected = take(iter(make_dataset(examples, config)), 9)[5:]
    one_host = iter(make_dataset(examples, config))
    set_state(one_host, states[0])
    assert_batches_equal(take(one_host, 4), expected)
    four_hosts = [
        iter(make_dataset(examples, config, process_index=p, process_count=4)) for p in range(4)
    ]
    for iterator in four_hosts:
        set_state(iterator, states[1])
    for step, want in enumerate(expected):
        got = [next(iterator) for iterator in four_hosts]
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(
                np.concatenate([b[key] for b in got]), want[key], err_msg=f"step {step} {key}"
            )


# --- overflow and counters ------------------------------------------------------------------


def overflow_examples():
    return [
        make_example(5, base=0),  # fits
        make_example(20, base=100, trained=range(2, 20)),  # 19 shifted > 10: truncated or skipped
        make_example(6, base=200, trained=[]),  # nothing trained
        make_example(16, base=300, trained=[14, 15]),  # trained only beyond seq_len
        make_example(1, base=400),  # one token: no target at all
        make_example(11, base=500),  # exactly seq_len after the shift: fits
    ]


def test_overflow_truncate_keeps_the_first_seq_len_positions():
    config = PipelineConfig(
        seq_len=10, batch_size=1, shuffle=False, num_epochs=2, overflow="truncate"
    )
    batches = list(make_dataset(overflow_examples(), config))
    first_epoch = epochs_of(batches)[0]
    found = {i: (b, span) for b in first_epoch for i, span in spans(b).items()}
    assert sorted(found) == [0, 1, 5]
    batch, (row, start, stop) = found[1]
    assert stop - start == 10
    assert batch["tokens_BxT"][row, start:stop].tolist() == list(range(101, 111))
    assert batch["targets_BxT"][row, start:stop].tolist() == list(range(102, 112))
    assert batch["loss_mask_BxT"][row, start:stop].tolist() == [0] + [1] * 9
    stats = first_epoch[-1]["stats"]
    assert (stats["truncated"], stats["skipped_too_long"], stats["skipped_no_target"]) == (1, 0, 3)
    assert stats["skipped"] == 3 and stats["examples"] == 3
    last = batches[-1]["stats"]
    assert (last["truncated"], last["skipped_no_target"], last["examples"]) == (2, 6, 6)


def test_overflow_skip_drops_long_examples_and_counts_them():
    config = PipelineConfig(seq_len=10, batch_size=1, shuffle=False, num_epochs=1, overflow="skip")
    batches = list(make_dataset(overflow_examples(), config))
    assert sorted(i for b in batches for i in spans(b)) == [0, 5]
    stats = batches[-1]["stats"]
    assert (stats["truncated"], stats["skipped_too_long"], stats["skipped_no_target"]) == (0, 2, 2)
    assert stats["skipped"] == 4 and stats["examples"] == 2


def test_counters_are_cumulative_at_each_step():
    examples = random_examples(40, 3, 30)
    examples[3]["loss_mask"][:] = 0
    examples[17]["loss_mask"][:] = 0
    config = PipelineConfig(seq_len=32, batch_size=2, seed=9, num_epochs=2)
    seen = set()
    previous = None
    for batch in make_dataset(examples, config):
        stats = batch["stats"]
        ids = batch["example_ids_BxT"]
        seen |= {(stats["epoch"], int(i)) for i in np.unique(ids[ids >= 0])}
        assert stats["examples"] == len(seen)
        if previous is not None:
            assert all(stats[k] >= previous[k] for k in stats)
        previous = stats
    assert previous["skipped_no_target"] == 4 and previous["examples"] == 76


# --- errors ---------------------------------------------------------------------------------


def test_errors_are_clear():
    examples = hand_examples()
    with pytest.raises(ValueError, match="empty"):
        make_dataset([], PipelineConfig(seq_len=8, batch_size=2))
    with pytest.raises(ValueError, match="not divisible by process_count 4"):
        make_dataset(examples, PipelineConfig(seq_len=8, batch_size=6), process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        make_dataset(
            examples, PipelineConfig(seq_len=8, batch_size=4), process_index=2, process_count=2
        )
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        PipelineConfig(seq_len=1, batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        PipelineConfig(seq_len=8, batch_size=0)
    with pytest.raises(ValueError, match="overflow"):
        PipelineConfig(seq_len=8, batch_size=1, overflow="wrap")
    bad = make_example(5) | {"loss_mask": np.ones(4, np.int8)}
    with pytest.raises(ValueError, match=r"examples\[1\].*different lengths"):
        make_dataset([examples[0], bad], PipelineConfig(seq_len=8, batch_size=1))
    with pytest.raises(ValueError, match=r"examples\[0\] has no thinking_mask"):
        make_dataset([{"token_ids": [1, 2], "loss_mask": [1, 1]}], PipelineConfig(8, 1))
    untrained = [make_example(5, trained=[]), make_example(30)]
    with pytest.raises(ValueError, match=r"1 too long.*1 no trained target"):
        make_dataset(untrained, PipelineConfig(seq_len=8, batch_size=1, overflow="skip"))


def test_state_from_another_pipeline_is_refused():
    examples = random_examples(20, 3, 20)
    iterator = iter(make_dataset(examples, PipelineConfig(seq_len=32, batch_size=2, seed=1)))
    next(iterator)
    state = get_state(iterator)
    other = iter(make_dataset(examples, PipelineConfig(seq_len=32, batch_size=2, seed=2)))
    with pytest.raises(ValueError, match="seed=1 there, seed=2 here"):
        set_state(other, state)
    same = iter(make_dataset(examples, PipelineConfig(seq_len=32, batch_size=2, seed=1)))
    with pytest.raises(ValueError, match="version 1, whose batches depended on the number of hos"):
        set_state(same, state | {"version": 1})
    with pytest.raises(ValueError, match="not a data pipeline state of version 2"):
        set_state(same, state | {"version": 7})
    set_state(same, state)  # the version this pipeline writes
    changed = iter(make_dataset(examples[:-1], PipelineConfig(seq_len=32, batch_size=2, seed=1)))
    with pytest.raises(ValueError, match="num_examples"):
        set_state(changed, state)
    # More epochs than before is allowed: the order does not depend on num_epochs.
    longer = iter(
        make_dataset(examples, PipelineConfig(seq_len=32, batch_size=2, seed=1, num_epochs=9))
    )
    set_state(longer, state)


# --- real conversations ---------------------------------------------------------------------


def trajectory():
    return Trajectory.from_dict(
        {
            "id": "t0",
            "messages": [
                {"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "What is 2 + 3?"},
                {
                    "role": "assistant",
                    "content": "",
                    "reasoning_content": "Use the calculator.",
                    "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}],
                },
                {"role": "tool", "content": "5"},
                {"role": "assistant", "content": "5.", "reasoning_content": "It said 5."},
            ],
            "tools": [{"type": "function", "function": {"name": "add", "description": "a + b"}}],
        }
    )


@pytest.fixture(scope="module")
def qwen3():
    return load_tokenizer("qwen3")


def test_render_examples_matches_render(qwen3):
    t = trajectory()
    for kwargs in ({}, {"train_on": "last", "train_thinking": False}):
        (example,) = render_examples([t], qwen3, **kwargs)
        rendered = render(t.messages, t.tools, qwen3, **kwargs)
        assert example.keys() == {"token_ids", "loss_mask", "thinking_mask"}
        np.testing.assert_array_equal(example["token_ids"], rendered.token_ids)
        np.testing.assert_array_equal(example["loss_mask"], rendered.loss_mask)
        np.testing.assert_array_equal(example["thinking_mask"], rendered.thinking_mask)
        assert example["token_ids"].dtype == np.int32 and example["loss_mask"].dtype == np.int8
        assert 0 < example["loss_mask"].sum() < len(example["loss_mask"])
    last_only, everything = (
        render_examples([t], qwen3, train_on=on)[0]["loss_mask"].sum() for on in ("last", "all")
    )
    assert last_only < everything


def test_rendered_trajectory_through_the_pipeline(qwen3):
    t = trajectory()
    rendered = render(t.messages, t.tools, qwen3)
    example = example_from_rendered(rendered)
    config = PipelineConfig(seq_len=256, batch_size=1, num_epochs=1, pad_id=qwen3.special.endoftext)
    (batch,) = list(make_dataset([example], config))
    n = len(rendered) - 1
    assert n <= 256
    np.testing.assert_array_equal(batch["tokens_BxT"][0, :n], rendered.token_ids[:-1])
    np.testing.assert_array_equal(batch["targets_BxT"][0, :n], rendered.token_ids[1:])
    np.testing.assert_array_equal(batch["loss_mask_BxT"][0, :n], rendered.loss_mask[1:])
    np.testing.assert_array_equal(batch["thinking_mask_BxT"][0, :n], rendered.thinking_mask[1:])
    # The trained targets are exactly the assistant's tokens, ending with its <|im_end|>.
    trained = batch["targets_BxT"][0][batch["loss_mask_BxT"][0] == 1]
    assert trained[-1] == qwen3.special.im_end
    assert qwen3.decode(trained.tolist()).endswith("5.<|im_end|>")
