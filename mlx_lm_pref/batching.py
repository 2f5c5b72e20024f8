"""Preference batches: chosen rows then rejected rows, one (2B, L) array.

Both iterators yield one-element tuples ``(PreferenceBatch,)`` (mlx-lm calls
``loss(model, *batch)``, so a preference loss gets ``loss(model, batch)`` and can tell the
batch by its type). A ``PreferenceBatch`` holds data only:
- ``tokens``: (2B, L) int32, rows ``[0, B)`` are the chosen sequences and ``[B, 2B)`` the
  rejected ones of the same pairs, right-padded with 0;
- ``spans``: (2B, 2) int32, ``[completion start, sequence end)`` per row, in token indices
  (chosen and rejected rows each carry their own start);
- ``reference``: (2B,) float32 reference log-probs of each row (``reference: precomputed``),
  else None.

Training (``iterate_preference_batches``) follows mlx-lm's ``iterate_batches``: pairs sorted by
length and cut into full batches (so chosen and rejected lengths stay close; the remainder is
left out), batches shuffled, each rank taking every ``size``-th pair of a batch (a pair never
splits across ranks).

Evaluation (``iterate_eval_batches``) follows TRL's evaluation loop instead: consecutive pairs
in dataset order, the last batch smaller when the pairs do not divide into batches.

KTO batches (``data.Example`` rows) use the same layout: rows ``[0, B)`` are the rows
themselves and ``[B, 2B)`` their KL rows (the same prompt, another row's completion), so
prompt sharing runs each prompt once for both; without a KL term (``apo_zero_unpaired``) the
batch holds the B rows alone. ``labels`` (B,) float32 marks the desirable rows (1) and the
undesirable ones (0). Training batches are TRL's: consecutive chunks of ``batch_size`` rows
in dataset order, the last one smaller when the rows do not divide into batches, in that
order every epoch (TRL's sequential sampler, which its KL rows require: a batch's KL rows
take the completions of the same batch); with several ranks, rank ``r`` takes the ``r``-th
consecutive share of a chunk, each row with its KL row (``data.kl_rotation`` within the
whole batch: ``kl_chunk``).

Either way the width is padded to one plus a multiple of 32 (at most ``max_seq_length``) to
bound recompilation; padding never reaches a loss or a metric.

With prompt sharing (``sharing``) a batch comes in the shared layout instead: ``tokens`` is
a ``SharedTokens`` ``(prompts, prompt_lengths, continuations)``:
- ``prompts``: (B, 1 + Wp) int32, per pair its first ``P + 1`` tokens, right-padded, where
  the first ``P + 1`` tokens of its chosen and rejected rows are the same and ``P`` is at
  most the earlier completion start minus one;
- ``prompt_lengths``: (B,) int32, ``P`` per pair;
- ``continuations``: (2B, 1 + Wc) int32, rows ``[0, B)`` chosen and ``[B, 2B)`` rejected:
  each row from its token ``P`` on, right-padded;
and ``spans`` count in continuation tokens (``[start - P, end - P)``). Token ``P`` ends the
prompt rows and starts the continuations, so the model reads inputs ``prompts[:, :-1]`` and
``continuations[:, :-1]`` and every target of the whole rows is predicted exactly once.
``prompt_sharing: auto`` picks this layout for a batch when it computes fewer positions
(``SHARE_BELOW``). The iterators take the layout as an argument (``prompt_sharing``,
default ``false``): ``train()`` binds it to the run's decision (``sharing`` checks the model
first).
"""

import math
from typing import NamedTuple, Optional, Union

import mlx.core as mx
import numpy as np
from mlx_lm.tuner.datasets import CacheDataset

from .data import Example, PreferenceDataset


class SharedTokens(NamedTuple):
    """The shared layout's tokens (see the module docstring)."""

    prompts: mx.array  # (B, 1 + Wp)
    prompt_lengths: mx.array  # (B,)
    continuations: mx.array  # (2B, 1 + Wc)


class PreferenceBatch(NamedTuple):
    """One batch of B preference pairs (or KTO rows), in either layout (see the module
    docstring)."""

    tokens: Union[mx.array, SharedTokens]
    spans: mx.array  # (2B, 2); KTO without a KL term (B, 2)
    reference: Optional[mx.array] = None  # (2B,), or (B,)
    labels: Optional[mx.array] = None  # KTO: (B,) float32, 1 desirable, 0 undesirable

    @property
    def pairs(self) -> int:
        """B: the pairs, or the KTO rows."""
        if self.labels is not None:
            return self.labels.shape[0]
        return self.spans.shape[0] // 2

    @property
    def shared(self) -> bool:
        return isinstance(self.tokens, SharedTokens)

    def num_tokens(self) -> mx.array:
        """The real tokens of the batch (both rows of every pair, prompts included)."""
        total = self.spans[:, 1].sum()
        if self.shared:  # the continuations' spans start after P
            total = total + 2 * self.tokens.prompt_lengths.sum()
        return total

    def row_tokens(self) -> mx.array:
        """KTO: the real tokens of the B rows, not their KL rows (TRL's ``num_tokens``)."""
        total = self.spans[: self.pairs, 1].sum()
        if self.shared:
            total = total + self.tokens.prompt_lengths.sum()
        return total


PAD_TO = 32
# auto shares the prompt when the shared layout computes at most this share of the
# concatenated layout's positions (it adds a second model call and a cache concatenation).
SHARE_BELOW = 0.9


def preference_dataset_of(dataset):
    """The PreferenceDataset behind ``dataset`` (possibly wrapped in CacheDataset), or None."""
    if isinstance(dataset, CacheDataset):
        dataset = dataset._data
    return dataset if isinstance(dataset, PreferenceDataset) else None


def _ranks(comm_group, batch_size):
    offset, step = (comm_group.rank(), comm_group.size()) if comm_group else (0, 1)
    if batch_size % step != 0:
        raise ValueError("The batch size must be divisible by the number of workers")
    return offset, step


def iterate_preference_batches(
    dataset,
    batch_size,
    max_seq_length,
    loop=False,
    seed=None,
    comm_group=None,
    prompt_sharing="false",
    skip=0,
):
    """mlx-lm's ``iterate_batches`` for preference data (``skip``: leave out the first
    batches, their epochs' orders still drawn: a resumed run's place)."""
    pairs = preference_dataset_of(dataset)
    if len(pairs) < batch_size:
        raise ValueError(
            f"{pairs.source}: has {len(pairs)} {pairs.unit}, fewer than "
            f"batch_size={batch_size}."
        )
    offset, step = _ranks(comm_group, batch_size)
    kto = pairs.options.method == "kto"
    if kto:
        pairs = pairs.with_kl(kl_chunk(batch_size))
        batch_idx = _kto_batches(len(pairs), batch_size, offset, step)
    else:
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]))
        batch_idx = [
            order[i + offset : i + offset + batch_size : step]
            for i in range(0, len(order) - batch_size + 1, batch_size)
        ]
    if seed is not None:
        np.random.seed(seed)
    while True:
        # KTO: TRL's sequential sampler, the same order every epoch
        epoch = range(len(batch_idx)) if kto else np.random.permutation(len(batch_idx))
        for i in epoch:
            if skip:
                skip -= 1
                continue
            batch = [pairs[j] for j in batch_idx[i]]
            yield (make_batch(batch, max_seq_length, pairs.source, prompt_sharing),)
        if not loop:
            break


def kl_chunk(batch_size) -> int:
    """The chunk KTO's KL rows rotate within, for training, evaluation and precomputing
    alike: the batch. TRL rotates within each device's batch; rotating within the whole
    batch gives N ranks the numbers of one process (the ranks' KL rows then come from
    the same batch's completions, as one process's do)."""
    return batch_size


def _kto_batches(n, batch_size, offset, step):
    """KTO's training batches as TRL's sequential sampler and ``DataLoader`` cut them:
    chunks of ``batch_size`` consecutive rows, the last one holding the remainder. Rank
    ``offset`` of ``step`` takes its consecutive share of each chunk (in a ragged chunk the
    first ``size mod step`` ranks one row more); a last chunk of fewer rows than ranks is
    left out, as a rank without a row could not take the step with the others."""
    batches = []
    for first in range(0, n, batch_size):
        size = min(batch_size, n - first)
        if size < step:
            break
        share, extra = divmod(size, step)
        start = first + offset * share + min(offset, extra)
        batches.append(list(range(start, start + share + (offset < extra))))
    return batches


def eval_batch_count(dataset, batch_size) -> int:
    """How many batches ``iterate_eval_batches`` cuts ``dataset`` into (on every rank
    together): ``ceil(len / batch_size)``."""
    return math.ceil(len(preference_dataset_of(dataset)) / batch_size)


def iterate_eval_batches(
    dataset,
    batch_size,
    max_seq_length,
    comm_group=None,
    prompt_sharing="false",
    **_,
):
    """Batches in TRL's evaluation order: pairs ``[k*B, (k+1)*B)`` in dataset order for
    k = 0, 1, ..., the last batch holding the remainder when ``B`` does not divide the
    number of pairs (TRL's ``DataLoader`` keeps it; nothing is sorted, shuffled or left out).

    With a ``comm_group`` of size ``S > 1``, each batch's pairs are split across ranks as in
    training: rank ``r`` takes pairs ``r, r + S, ...`` of the batch (``B`` must divide by
    ``S``), so every full batch gives each rank ``B / S`` pairs. In a ragged last batch of
    ``n < B`` pairs the ranks ``r < n mod S`` take one pair more than the others, and a rank
    with ``r >= n`` has no pair of it and yields no batch for it: a rank then yields one batch
    fewer than ``eval_batch_count``. The i-th batch a rank yields is always part of global
    batch i, so per-batch metrics are combined across ranks by summing pair-weighted
    values (and pair counts) per batch index, with zeros for a batch a rank did not get.

    KTO batches are not split: every rank yields every batch whole (its KL estimate and
    label-conditional metrics are of the whole batch; the sums across ranks then count each
    row once per rank, which the ratios cancel).

    Extra keyword arguments of mlx-lm's iterator protocol (``loop``, ``seed``) are ignored.
    """
    pairs = preference_dataset_of(dataset)
    offset, step = _ranks(comm_group, batch_size)
    if pairs.options.method == "kto":
        # The KL estimate and the label-conditional metrics are of a whole batch: every
        # rank evaluates every batch whole.
        pairs = pairs.with_kl(kl_chunk(batch_size))
        offset, step = 0, 1
    for first in range(0, len(pairs), batch_size):
        chunk = range(first, min(first + batch_size, len(pairs)))
        batch = [pairs[j] for j in chunk[offset::step]]
        if not batch:
            continue
        yield (make_batch(batch, max_seq_length, pairs.source, prompt_sharing),)


def make_batch(batch, max_seq_length, source="data", prompt_sharing="false"):
    """A ``PreferenceBatch`` of ``batch`` (a list of ``Pair``, or of ``Example``), in the
    layout ``prompt_sharing`` asks for, with the precomputed reference log-probs if any.
    """
    collate_batch = collate
    kto = isinstance(batch[0], Example)
    halves = not kto or batch[0].kl_sequence is not None
    if prompt_sharing != "false" and halves:
        ratio = shared_positions(batch, max_seq_length, source)
        if ratio is not None and (prompt_sharing == "true" or ratio <= SHARE_BELOW):
            collate_batch = collate_shared
    tokens, spans = collate_batch(batch, max_seq_length, source)
    labels = mx.array([e.label for e in batch], mx.float32) if kto else None
    if batch[0].reference is None:
        return PreferenceBatch(tokens, spans, labels=labels)
    reference = [p.reference[0] for p in batch]
    if halves:
        reference += [p.reference[1] for p in batch]
    return PreferenceBatch(tokens, spans, mx.array(reference, dtype=mx.float32), labels)


def _padded(length):
    """One plus a multiple of PAD_TO, at least ``length``."""
    return 1 + PAD_TO * ((length - 1 + PAD_TO - 1) // PAD_TO)


def _width(rows, max_seq_length):
    """The whole-row layout's width."""
    return min(_padded(max(len(r) for r in rows)), max_seq_length)


def _shared_widths(rows, lengths):
    """The shared layout's prompt and continuation widths."""
    B = len(rows) // 2
    tails = (len(r) - lengths[k % B] for k, r in enumerate(rows))
    return _padded(max(lengths) + 1), _padded(max(tails))


def _rows(batch, max_seq_length, source="data"):
    """The chosen rows then the rejected rows (KTO: the rows then their KL rows), cut to
    ``max_seq_length``, and where each row's completion starts."""
    if isinstance(batch[0], Example):
        rows = [e.sequence[:max_seq_length] for e in batch]
        starts = [e.start for e in batch]
        if batch[0].kl_sequence is not None:
            rows += [e.kl_sequence[:max_seq_length] for e in batch]
            starts += starts
    else:
        rows = [p.chosen[:max_seq_length] for p in batch]
        rows += [p.rejected[:max_seq_length] for p in batch]
        starts = [p.chosen_start for p in batch] + [p.rejected_start for p in batch]
    # Token 0 has no prefix to predict it from, so a completion can start at 1 at the
    # earliest (a prompt-less row without BOS loses its first token, as in TRL).
    starts = [max(start, 1) for start in starts]
    for row, start in zip(rows, starts):
        if len(row) <= start:
            raise ValueError(
                f"{source}: a completion is empty after truncation to "
                f"max_seq_length={max_seq_length} (prompt {start} tokens, sequence "
                f"{len(row)}). Raise max_seq_length or shorten the prompts."
            )
    return rows, starts


def collate(batch, max_seq_length, source="data"):
    rows, starts = _rows(batch, max_seq_length, source)
    tokens = np.zeros((len(rows), _width(rows, max_seq_length)), np.int32)
    spans = np.zeros((len(rows), 2), np.int32)
    for k, (row, start) in enumerate(zip(rows, starts)):
        tokens[k, : len(row)] = row
        spans[k] = (start, len(row))
    return mx.array(tokens), mx.array(spans)


def _shared_prompt(chosen, rejected, chosen_start, rejected_start) -> int:
    """``P``: how many leading input tokens the pair's rows share, leaving the token before
    either completion to the continuations (so its logits, which predict the first
    completion token, are computed per row)."""
    limit = min(chosen_start, rejected_start, len(chosen), len(rejected))
    same = 0
    while same < limit and chosen[same] == rejected[same]:
        same += 1
    return max(same - 1, 0)


def _prompt_lengths(rows, starts):
    B = len(rows) // 2
    return [
        _shared_prompt(rows[k], rows[B + k], starts[k], starts[B + k]) for k in range(B)
    ]


def shared_positions(batch, max_seq_length, source="data") -> float:
    """Positions the shared layout computes, as a share of the concatenated layout's; None
    when no pair has a prompt to share."""
    B = len(batch)
    rows, starts = _rows(batch, max_seq_length, source)
    lengths = _prompt_lengths(rows, starts)
    if max(lengths) == 0:
        return None
    prompt, continuation = _shared_widths(rows, lengths)
    return (B * (prompt - 1) + 2 * B * (continuation - 1)) / (
        2 * B * (_width(rows, max_seq_length) - 1)
    )


def collate_shared(batch, max_seq_length, source="data"):
    """The shared layout (see the module docstring): ``((prompts, prompt_lengths,
    continuations), spans)``."""
    B = len(batch)
    rows, starts = _rows(batch, max_seq_length, source)
    lengths = _prompt_lengths(rows, starts)
    prompt_width, continuation_width = _shared_widths(rows, lengths)
    prompts = np.zeros((B, prompt_width), np.int32)
    for k, P in enumerate(lengths):
        prompts[k, : P + 1] = rows[k][: P + 1]
    continuations = np.zeros((2 * B, continuation_width), np.int32)
    spans = np.zeros((2 * B, 2), np.int32)
    for k, (row, start) in enumerate(zip(rows, starts)):
        P = lengths[k % B]
        continuations[k, : len(row) - P] = row[P:]
        spans[k] = (start - P, len(row) - P)
    tokens = SharedTokens(
        mx.array(prompts), mx.array(lengths, dtype=mx.int32), mx.array(continuations)
    )
    return tokens, mx.array(spans)
