"""Preference batches: chosen rows then rejected rows, one (2B, L) array.

Yields ``(tokens, spans, options)``:
- ``tokens``: (2B, L) int32, rows ``[0, B)`` are the chosen sequences and ``[B, 2B)`` the
  rejected ones of the same pairs, right-padded with 0;
- ``spans``: (2B, 2) int32, ``[completion start, sequence end)`` per row, in token indices;
- ``options``: ``PreferenceArgs.as_constants()``, compile-time constants for the loss.

Ordering, padding and the split across ranks follow mlx-lm's ``iterate_batches``: pairs sorted
by length and cut into batches (so chosen and rejected lengths stay close), batches shuffled,
each rank taking every ``size``-th pair of a batch (a pair never splits across ranks), width
padded to one plus a multiple of 32 to bound recompilation.
"""

import mlx.core as mx
import numpy as np
from mlx_lm.tuner.datasets import CacheDataset

from .data import PreferenceDataset

PAD_TO = 32


def preference_dataset_of(dataset):
    """The PreferenceDataset behind ``dataset`` (possibly wrapped in CacheDataset), or None."""
    if isinstance(dataset, CacheDataset):
        dataset = dataset._data
    return dataset if isinstance(dataset, PreferenceDataset) else None


def iterate_preference_batches(
    dataset,
    batch_size,
    max_seq_length,
    loop=False,
    seed=None,
    comm_group=None,
):
    pairs = preference_dataset_of(dataset)
    if len(pairs) < batch_size:
        raise ValueError(
            f"{pairs.source}: has {len(pairs)} pairs, fewer than batch_size={batch_size}."
        )
    offset, step = (comm_group.rank(), comm_group.size()) if comm_group else (0, 1)
    if batch_size % step != 0:
        raise ValueError("The batch size must be divisible by the number of workers")

    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]))
    batch_idx = [
        order[i + offset : i + offset + batch_size : step]
        for i in range(0, len(order) - batch_size + 1, batch_size)
    ]
    constants = pairs.options.as_constants()
    if seed is not None:
        np.random.seed(seed)
    while True:
        for i in np.random.permutation(len(batch_idx)):
            batch = [pairs[j] for j in batch_idx[i]]
            yield (*collate(batch, max_seq_length, pairs.source), constants)
        if not loop:
            break


def collate(batch, max_seq_length, source="data"):
    rows = [p.chosen for p in batch] + [p.rejected for p in batch]
    starts = [p.prompt_length for p in batch] * 2
    longest = max(len(r) for r in rows)
    width = min(1 + PAD_TO * ((longest + PAD_TO - 1) // PAD_TO), max_seq_length)
    tokens = np.zeros((len(rows), width), np.int32)
    spans = np.zeros((len(rows), 2), np.int32)
    for k, (row, start) in enumerate(zip(rows, starts)):
        end = min(len(row), width)
        if end <= max(start, 1):
            raise ValueError(
                f"{source}: a completion is empty after truncation to "
                f"max_seq_length={max_seq_length} (prompt {start} tokens, sequence "
                f"{len(row)}). Raise max_seq_length or shorten the prompts."
            )
        tokens[k, :end] = row[:end]
        # Token 0 has no prefix to predict it from, so a completion can start at 1 at
        # the earliest (a prompt-less row without BOS loses its first token, as in TRL).
        spans[k] = (max(start, 1), end)
    return mx.array(tokens), mx.array(spans)
