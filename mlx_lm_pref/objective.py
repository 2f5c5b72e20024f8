"""The loss mlx-lm's training step calls for a preference batch, and its evaluation loop.

``preference_loss(model, tokens, spans, constants)`` keeps mlx-lm's loss protocol (returns
``(loss, ntoks)``) so the upstream ``mx.compile``d step runs it unchanged. One forward pass
covers chosen and rejected rows together; DPO adds a reference forward of the same batch with
the adapters off. The metrics leave the compiled step through ``model._pref_metrics`` (an
array attribute whose name starts with ``_`` is part of ``model.state``, which the step
returns, but not of the trainable parameters, so it is never trained or saved).
"""

import mlx.core as mx
import mlx.nn as nn

from .config import PreferenceArgs
from .logps import sequence_logps, span_mask, token_logps
from .losses import dpo_sigmoid, orpo_odds_ratio
from .reference import adapters_disabled

REWARD_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
METRICS = {
    "dpo": REWARD_METRICS,
    "orpo": REWARD_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"),
}


def metric_names(options: PreferenceArgs) -> tuple:
    return METRICS[options.loss_type]


def _reward_metrics(
    loss, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps
):
    return [
        loss,
        chosen_rewards.mean(),
        rejected_rewards.mean(),
        (chosen_rewards > rejected_rewards).astype(mx.float32).mean(),
        (chosen_rewards - rejected_rewards).mean(),
        chosen_logps.mean(),
        rejected_logps.mean(),
    ]


def dpo_objective(model, inputs, targets, completion, beta):
    """DPO sigmoid on summed completion log-probs; reference = adapters off."""
    sums, _ = sequence_logps(token_logps(model(inputs), targets), completion)
    with adapters_disabled(model):
        ref_logits = mx.stop_gradient(model(inputs))
    ref_sums, _ = sequence_logps(token_logps(ref_logits, targets), completion)
    ref_sums = mx.stop_gradient(ref_sums)
    B = sums.shape[0] // 2
    losses, chosen_rewards, rejected_rewards = dpo_sigmoid(
        sums[:B], sums[B:], ref_sums[:B], ref_sums[B:], beta
    )
    loss = losses.mean()
    metrics = _reward_metrics(
        loss, chosen_rewards, rejected_rewards, sums[:B], sums[B:]
    )
    return loss, metrics


def orpo_objective(model, inputs, targets, completion, spans, beta):
    """ORPO as TRL: NLL over the whole chosen sequence (prompt included, pads excluded) plus
    the odds-ratio term on mean completion log-probs."""
    logps = token_logps(model(inputs), targets)
    sums, counts = sequence_logps(logps, completion)
    means = sums / mx.maximum(counts, 1.0)
    B = sums.shape[0] // 2
    whole = span_mask(
        mx.concatenate([mx.ones_like(spans[:B, :1]), spans[:B, 1:]], 1),
        targets.shape[1],
    )
    nll_sum, nll_count = sequence_logps(logps[:B], whole)
    nll = -nll_sum.sum() / nll_count.sum()
    or_losses, log_odds = orpo_odds_ratio(means[:B], means[B:], beta)
    loss = nll + or_losses.mean()
    metrics = _reward_metrics(
        loss, beta * means[:B], beta * means[B:], means[:B], means[B:]
    )
    metrics += [nll, nn.log_sigmoid(log_odds).mean(), log_odds.mean()]
    return loss, metrics


def preference_loss(model, tokens, spans, constants):
    """mlx-lm's loss protocol for a preference batch (see ``batching``).

    Args:
        tokens: (2B, L) chosen rows then rejected rows.
        spans: (2B, 2) completion ``[start, end)`` per row.
        constants: ``PreferenceArgs.as_constants()``.

    Returns:
        ``(loss, ntoks)``: the scalar float32 loss and the number of real tokens in the batch.
    """
    options = PreferenceArgs(*constants)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    completion = span_mask(spans, targets.shape[1])
    if options.loss_type == "dpo":
        loss, metrics = dpo_objective(model, inputs, targets, completion, options.beta)
    elif options.loss_type == "orpo":
        loss, metrics = orpo_objective(
            model, inputs, targets, completion, spans, options.beta
        )
    else:
        raise ValueError(f"No preference loss for loss_type {options.loss_type!r}.")
    _publish(model, mx.stop_gradient(mx.stack(metrics)))
    return loss, spans[:, 1].sum()


def _publish(model, metrics):
    model._pref_metrics = metrics
    # Training reports average the metrics over the steps since the last report (as TRL
    # logs them); the running sum, with a step count as its last entry, stays on device.
    if model.training and "_pref_train_sum" in model:
        model._pref_train_sum = model._pref_train_sum + mx.concatenate(
            [metrics, mx.ones((1,))]
        )


def init_metric_state(model, options):
    k = len(metric_names(options))
    model._pref_metrics = mx.zeros((k,))
    model._pref_train_sum = mx.zeros((k + 1,))


def clear_metric_state(model):
    for key in ("_pref_metrics", "_pref_train_sum"):
        model.pop(key, None)


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
    max_seq_length=2048,
    loss=None,
    iterate_batches=None,
    clear_cache_threshold: int = 0,
    progress_callback=None,
):
    """mlx-lm's ``evaluate`` for preference data: per-pair means of every metric."""
    from .batching import iterate_preference_batches, preference_dataset_of

    loss = loss or preference_loss
    iterate_batches = iterate_batches or iterate_preference_batches
    names = metric_names(preference_dataset_of(dataset).options)
    model.eval()
    sums = mx.zeros((len(names),))
    pairs = mx.array(0.0)
    batches = iterate_batches(
        dataset=dataset,
        batch_size=batch_size,
        max_seq_length=max_seq_length,
        comm_group=mx.distributed.init(),
    )
    for n, batch in enumerate(batches):
        if n == num_batches:
            break
        loss(model, *batch)
        b = batch[0].shape[0] // 2
        sums = sums + model._pref_metrics * b
        pairs = pairs + b
        mx.eval(sums, pairs)
        if clear_cache_threshold and mx.get_cache_memory() > clear_cache_threshold:
            mx.clear_cache()
        if progress_callback is not None:
            progress_callback()
    sums = mx.distributed.all_sum(sums, stream=mx.cpu)
    pairs = mx.distributed.all_sum(pairs, stream=mx.cpu)
    return EvalResult(dict(zip(names, (sums / pairs).tolist())))
