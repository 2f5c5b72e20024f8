"""mlx-lm's ``evaluate`` for preference data, averaged as TRL's ``evaluate()``.

Each metric is the mean of its per-batch values (KTO's label-conditional ones over the batches
that hold that label); the loss is weighted by pairs (rows). Distributed, the i-th batch of
every rank is part of the same global batch i (see ``batching.iterate_eval_batches``): the
ranks' numerators and denominators are summed per batch index into that global batch's
value before the mean over batches, so every metric comes out as in a single process,
ragged last batch included. Nothing here asks for a gradient.
"""

import mlx.core as mx
import numpy as np

from .batching import iterate_eval_batches
from .metrics import average_metrics, pack_metrics


class EvalResult(float):
    """The evaluation loss as mlx-lm expects it (a float), carrying every metric along."""

    def __new__(cls, metrics: dict):
        result = super().__new__(cls, metrics["loss"])
        result.metrics = metrics
        return result


def evaluate_preference(
    model,
    dataset,
    batch_size,
    num_batches,
    loss,
    max_seq_length=2048,
    iterate_batches=iterate_eval_batches,
    clear_cache_threshold: int = 0,
    progress_callback=None,
) -> EvalResult:
    """The metrics of ``loss`` (a ``PreferenceLoss``) over ``dataset``, as TRL averages them.

    ``num_tokens`` is 0 here: it is a training count, which the caller fills in.
    """
    names = loss.metric_names
    model.eval()
    rows = []  # per batch: the (K, 2) numerators and denominators of this rank's share
    batch_iter = iterate_batches(
        dataset=dataset,
        batch_size=batch_size,
        max_seq_length=max_seq_length,
        comm_group=mx.distributed.init(),
    )
    for n, (batch,) in enumerate(batch_iter):
        if n == num_batches:
            break
        _, _, metrics = loss.metrics(model, batch, grad=False)
        rows.append(pack_metrics(names, metrics))
        mx.eval(rows[-1])
        if clear_cache_threshold and mx.get_cache_memory() > clear_cache_threshold:
            mx.clear_cache()
        if progress_callback is not None:
            progress_callback()
    # A rank may hold one batch fewer (a ragged last batch): pad with zeros, which add
    # nothing to that batch's sums.
    count = int(mx.distributed.all_max(mx.array([len(rows)]), stream=mx.cpu).item())
    if count == 0:  # nothing evaluated (num_batches 0): NaN, as mlx-lm's evaluate
        return EvalResult({name: float("nan") for name in names})
    rows += [mx.zeros((len(names), 2))] * (count - len(rows))
    totals = mx.distributed.all_sum(mx.stack(rows), stream=mx.cpu)
    metrics = average_metrics(names, np.array(totals), pooled=("loss",))
    if "num_tokens" in metrics:
        metrics["num_tokens"] = 0.0
    return EvalResult(metrics)
