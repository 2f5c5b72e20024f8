"""Preference batches: per-side completion starts, TRL's evaluation order and the split of a
batch across ranks."""

import mlx.core as mx
import pytest
from helpers import whole_rows
from mlx_lm.tuner.datasets import CacheDataset
from mlx_lm.utils import load_tokenizer

import mlx_lm_pref  # noqa: F401
from mlx_lm_pref.batching import (
    PreferenceBatch,
    collate,
    eval_batch_count,
    iterate_eval_batches,
    iterate_preference_batches,
)
from mlx_lm_pref.config import PreferenceArgs
from mlx_lm_pref.data import Pair, PreferenceDataset

# Answer lengths out of order, so that sorting by length would change the order.
REPEATS = [5, 1, 7, 3, 2, 6, 4, 0, 8, 2]


class Group:
    """The two methods of an mlx.distributed group the iterators use."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


@pytest.fixture(scope="module")
def dataset(tiny_model):
    # ORPO keeps a start per side: "? " + "Yes" merges the space into " Yes" (chosen starts
    # one token earlier), " No." does not merge.
    rows = [
        {
            "prompt": "Is the sky nice? ",
            "chosen": "Yes" + ", the sky is nice" * n + ".",
            "rejected": " No.",
        }
        for n in REPEATS
    ]
    ds = PreferenceDataset(
        rows, load_tokenizer(tiny_model), PreferenceArgs(loss_type="orpo")
    )
    assert all(p.chosen_start == p.rejected_start - 1 for p in ds)
    return ds


def unpack(batch):
    """The pairs a batch holds, as (chosen, rejected, chosen_start, rejected_start)."""
    tokens, spans = whole_rows(batch[0])
    B = len(tokens) // 2
    return [
        (
            tokens[k, : spans[k, 1]].tolist(),
            tokens[B + k, : spans[B + k, 1]].tolist(),
            int(spans[k, 0]),
            int(spans[B + k, 0]),
        )
        for k in range(B)
    ]


def as_tuple(pair):
    return (pair.chosen, pair.rejected, pair.chosen_start, pair.rejected_start)


def test_collate_carries_each_sides_start():
    pairs = [
        Pair([1, 5, 6, 7], [1, 5, 8, 8], 2, 3),
        Pair([1, 9, 9], [1, 9, 9, 4, 4], 1),
    ]
    tokens, spans = collate(pairs, 2048)
    # rows: chosen of both pairs, then rejected of both; spans [start, end) per row
    assert spans.tolist() == [[2, 4], [1, 3], [3, 4], [1, 5]]
    assert tokens.shape == (4, 33) and tokens[3, :6].tolist() == [1, 9, 9, 4, 4, 0]
    # rejected_start defaults to chosen_start (DPO pairs share it)
    assert Pair([1], [1], 4).rejected_start == 4


def test_collate_rejects_an_empty_completion():
    with pytest.raises(ValueError, match="completion is empty"):
        collate([Pair([1, 2, 3], [1, 2], 2, 2)], 2048)


def test_eval_batches_are_consecutive_pairs_in_dataset_order(dataset):
    batches = list(iterate_eval_batches(dataset, 4, 2048))
    got = [pair for batch in batches for pair in unpack(batch)]
    assert got == [as_tuple(dataset[i]) for i in range(len(dataset))]
    # 10 pairs in batches of 4: the ragged last batch of 2 is kept
    assert [len(unpack(b)) for b in batches] == [4, 4, 2]
    assert eval_batch_count(dataset, 4) == 3
    (first,) = batches[0]  # a one-element tuple: mlx-lm calls loss(model, *batch)
    assert isinstance(first, PreferenceBatch) and first.reference is None


def test_eval_batches_accept_a_cached_dataset_and_fewer_pairs_than_a_batch(dataset):
    batches = list(iterate_eval_batches(CacheDataset(dataset), 16, 2048))
    assert len(batches) == 1 and len(unpack(batches[0])) == len(dataset)


@pytest.mark.parametrize("size", [2, 4])
def test_eval_batches_split_across_ranks(dataset, size):
    batch_size = 4
    per_rank = [
        [
            unpack(b)
            for b in iterate_eval_batches(dataset, batch_size, 2048, Group(r, size))
        ]
        for r in range(size)
    ]
    for i in range(eval_batch_count(dataset, batch_size)):
        first = i * batch_size
        expected = [
            as_tuple(dataset[j])
            for j in range(first, min(first + batch_size, len(dataset)))
        ]
        # rank r holds pairs r, r + size, ... of global batch i (none: no batch i at all)
        for r in range(size):
            share = expected[r::size]
            if share:
                assert per_rank[r][i] == share
            else:
                assert len(per_rank[r]) == i  # this rank's batches end before batch i
    # ragged last batch of 2 pairs: with 4 ranks, ranks 2 and 3 yield one batch fewer
    assert [len(b) for b in per_rank] == ([3, 3] if size == 2 else [3, 3, 2, 2])


def test_batch_size_must_divide_by_ranks(dataset):
    with pytest.raises(ValueError, match="divisible by the number of workers"):
        next(iterate_eval_batches(dataset, 3, 2048, Group(0, 2)))


def test_training_batches_are_full_length_sorted_and_shuffled(dataset):
    batches = list(iterate_preference_batches(dataset, 4, 2048, seed=0))
    # full batches only (the remainder of 2 is left out), pairs grouped by length
    assert len(batches) == 2
    by_length = sorted(range(len(dataset)), key=lambda i: len(dataset[i]))
    groups = [{tuple(map(tuple, p[:2])) for p in unpack(b)} for b in batches]
    expected = [
        {tuple(map(tuple, as_tuple(dataset[j])[:2])) for j in by_length[k : k + 4]}
        for k in (0, 4)
    ]
    assert sorted(map(sorted, groups)) == sorted(map(sorted, expected))
    for batch in batches:
        for pair in unpack(batch):
            assert pair[2] == pair[3] - 1  # per-side starts reach the spans


def test_width_padded_to_one_plus_a_multiple_of_32(dataset):
    pairs = [dataset[i] for i in range(4)]
    tokens, spans = collate(pairs, 2048)
    longest = max(len(p) for p in pairs)
    assert tokens.shape[1] == 1 + 32 * ((longest - 1 + 31) // 32) >= longest
    assert tokens.dtype == mx.int32 and spans.dtype == mx.int32
    # at most max_seq_length, the rows cut to it
    tokens, spans = collate(pairs, 20)
    assert tokens.shape[1] == 20 and spans[:, 1].max().item() == 20
