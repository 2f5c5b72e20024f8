"""The loss mlx-lm's training step calls for a preference batch, and its evaluation loop.

``preference_loss(model, tokens, spans, constants)`` keeps mlx-lm's loss protocol (returns
``(loss, ntoks)``) so the upstream ``mx.compile``d step runs it unchanged. One forward pass
covers chosen and rejected rows together; DPO adds a reference forward of the same batch with
the adapters off. The metrics leave the compiled step through ``model._pref_metrics`` (an
array attribute whose name starts with ``_`` is part of ``model.state``, which the step
returns, but not of the trainable parameters, so it is never trained or saved).
"""

import mlx.core as mx

from .config import ConfigError, PreferenceArgs
from .logps import sequence_logps, span_mask, token_logps
from .losses import (
    DPOTerms,
    alphapo_rewards,
    cpo_losses,
    dpo_loss,
    f_divergence_scores,
    log_sigmoid,
    orpo_odds_ratio,
)
from .reference import REFERENCE_CONTEXTS

REWARDS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)
# TRL 1.16's metric names per trainer. num_tokens is TRL's running count of trained tokens:
# the reporter sums its per-step values, and evaluation reports the count so far.
METRICS = {
    "dpo": REWARDS + ("entropy", "mean_token_accuracy", "num_tokens"),
    "orpo": REWARDS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"),
    "cpo": REWARDS + ("nll_loss",),
}


def metric_names(options: PreferenceArgs) -> tuple:
    return METRICS[options.method]


def _masked_mean(values, mask):
    mask = mask.astype(mx.float32)
    return (values * mask).sum() / mx.maximum(mask.sum(), 1.0)


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


def _mean_logits(logits, mask, B):
    """logits/chosen and logits/rejected: the vocab-mean logit averaged over ``mask``."""
    vocab_mean = logits.astype(mx.float32).mean(axis=-1)
    return [
        _masked_mean(vocab_mean[:B], mask[:B]),
        _masked_mean(vocab_mean[B:], mask[B:]),
    ]


def _dpo_logps(logps, completion, ld_alpha):
    """Summed completion log-probs; LD-DPO (Liu et al. 2024) scales the tokens past the
    shorter completion of the pair by ``ld_alpha``."""
    if ld_alpha is None:
        return (logps * completion).sum(axis=-1)
    B = logps.shape[0] // 2
    position = mx.cumsum(completion.astype(mx.int32), axis=-1)
    lengths = completion.sum(axis=-1)
    shared = mx.minimum(lengths[:B], lengths[B:])
    shared = mx.concatenate([shared, shared])[:, None]
    head = completion & (position <= shared)
    tail = completion & (position > shared)
    return (logps * head).sum(axis=-1) + ld_alpha * (logps * tail).sum(axis=-1)


def sequence_logps_dpo(model, tokens, spans, ld_alpha=None):
    """(2B,) summed (LD-weighted) completion log-probs of ``model`` as it is, gradient-free:
    what a live reference computes, for precomputing it."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    completion = span_mask(spans, targets.shape[1])
    logits = mx.stop_gradient(model(inputs))
    return _dpo_logps(token_logps(logits, targets), completion, ld_alpha)


def _reference_logps(
    model, inputs, targets, completion, o: PreferenceArgs, precomputed
):
    """Per-sequence reference log-probs, gradient-free, from the same model."""
    if o.reference == "precomputed":
        if precomputed is None:
            raise ConfigError(
                "reference precomputed: this batch carries no reference log-probs (they "
                "are computed when train() starts; see mlx_lm_pref.precompute)."
            )
        return mx.stop_gradient(precomputed)
    if o.reference == "none":
        return mx.zeros((inputs.shape[0],))
    # auto outside train() (a script scoring a batch itself) means the base model.
    strategy = "adapters_off" if o.reference == "auto" else o.reference
    with REFERENCE_CONTEXTS[strategy](model):
        ref_logits = mx.stop_gradient(model(inputs))
    ref_logps = token_logps(ref_logits, targets)
    return mx.stop_gradient(_dpo_logps(ref_logps, completion, o.ld_alpha))


def _wpo_weights(logits, logps, completion, B):
    """WPO, Zhou et al. 2024, eq. 2: exp of the mean aligned log-prob, chosen x rejected."""
    logits = mx.stop_gradient(logits.astype(mx.float32))
    lse = mx.logsumexp(logits, axis=-1)
    log_sum_sq = mx.logsumexp(2 * logits, axis=-1) - 2 * lse
    aligned, count = sequence_logps(mx.stop_gradient(logps) - log_sum_sq, completion)
    weights = mx.exp(aligned / mx.maximum(count, 1.0))
    return weights[:B] * weights[B:]


def dpo_objective(model, inputs, targets, spans, o: PreferenceArgs, reference=None):
    """The DPO loss family (TRL's ``loss_type`` list) against the adapters-off reference."""
    B = inputs.shape[0] // 2
    if set(o.loss_type) & {"aot", "aot_unpaired"} and B < 2:
        raise ConfigError(
            "loss_type aot/aot_unpaired sorts log-ratios across the pairs of a batch, and "
            "this batch holds 1 pair (per rank): use batch_size >= 2 pairs per rank."
        )
    completion = span_mask(spans, targets.shape[1])
    logits = model(inputs)
    logps = token_logps(logits, targets)
    policy = _dpo_logps(logps, completion, o.ld_alpha)
    ref = _reference_logps(model, inputs, targets, completion, o, reference)
    lengths = completion.sum(axis=-1).astype(mx.float32)
    scores = f_divergence_scores(
        policy - ref, o.f_divergence_type, o.f_alpha_divergence_coef
    )
    terms = DPOTerms(
        policy_chosen=policy[:B],
        policy_rejected=policy[B:],
        ref_chosen=ref[:B],
        ref_rejected=ref[B:],
        chosen_scores=scores[:B],
        rejected_scores=scores[B:],
        chosen_lengths=lengths[:B],
        rejected_lengths=lengths[B:],
        sft_nll=-_masked_mean(logps[:B], completion[:B]),
    )
    pair_weights = (
        _wpo_weights(logits, logps, completion, B) if o.use_weighting else None
    )
    loss = dpo_loss(
        terms,
        o.loss_type,
        o.weights,
        o.beta,
        o.label_smoothing,
        o.discopop_tau,
        pair_weights,
    )
    # TRL's rewards use the plain log-ratios whatever the loss or divergence.
    chosen_rewards = o.beta * terms.chosen_logratios
    rejected_rewards = o.beta * terms.rejected_logratios
    metrics = _reward_metrics(
        loss, chosen_rewards, rejected_rewards, policy[:B], policy[B:]
    )
    metrics += _mean_logits(mx.stop_gradient(logits), completion, B)
    metrics += _dpo_token_metrics(mx.stop_gradient(logits), targets, completion, B)
    metrics += [spans[:, 1].sum().astype(mx.float32)]
    return loss, metrics


def _dpo_token_metrics(logits, targets, completion, B):
    """entropy over every completion token, and the argmax accuracy on chosen ones."""
    logits = logits.astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    entropy = -(mx.exp(logp) * logp).sum(axis=-1)
    top1 = (mx.argmax(logits[:B], axis=-1) == targets[:B]).astype(mx.float32)
    return [_masked_mean(entropy, completion), _masked_mean(top1, completion[:B])]


def _whole_sequence(spans, num_targets, B):
    """The chosen rows from their first predicted token (index 1) to their end."""
    return span_mask(
        mx.concatenate([mx.ones_like(spans[:B, :1]), spans[:B, 1:]], 1), num_targets
    )


def orpo_objective(model, inputs, targets, spans, o: PreferenceArgs):
    """ORPO as TRL: NLL over the whole chosen sequence (prompt included, pads excluded) plus
    the odds-ratio term on mean completion log-probs."""
    B = inputs.shape[0] // 2
    completion = span_mask(spans, targets.shape[1])
    logits = model(inputs)
    logps = token_logps(logits, targets)
    sums, counts = sequence_logps(logps, completion)
    means = sums / mx.maximum(counts, 1.0)
    whole = _whole_sequence(spans, targets.shape[1], B)
    nll = -_masked_mean(logps[:B], whole)
    or_losses, log_odds = orpo_odds_ratio(means[:B], means[B:], o.beta)
    loss = nll + or_losses.mean()
    metrics = _reward_metrics(
        loss, o.beta * means[:B], o.beta * means[B:], means[:B], means[B:]
    )
    metrics += _mean_logits(
        mx.stop_gradient(logits), _real_positions(spans, targets), B
    )
    metrics += [nll, log_sigmoid(log_odds).mean(), log_odds.mean()]
    return loss, metrics


def _real_positions(spans, targets):
    """Every input position of a row that holds a real token (not padding)."""
    return mx.arange(targets.shape[1])[None] < (spans[:, 1:2] - 1)


def cpo_objective(model, inputs, targets, spans, o: PreferenceArgs):
    """CPO / SimPO / AlphaPO as TRL's CPOTrainer: reference-free, plus cpo_alpha x NLL on
    the chosen completions."""
    B = inputs.shape[0] // 2
    completion = span_mask(spans, targets.shape[1])
    logits = model(inputs)
    logps = token_logps(logits, targets)
    sums, counts = sequence_logps(logps, completion)
    if o.cpo_loss_type in ("ipo", "simpo"):  # length-normalised (SimPO's eq. 4)
        sums = sums / mx.maximum(counts, 1.0)
    chosen = alphapo_rewards(sums[:B], o.alpha)
    rejected = alphapo_rewards(sums[B:], o.alpha)
    losses = cpo_losses(
        chosen, rejected, o.cpo_loss_type, o.beta, o.label_smoothing, o.simpo_gamma
    )
    nll = -_masked_mean(logps[:B], completion[:B]) if o.cpo_alpha else mx.array(0.0)
    loss = losses.mean() + o.cpo_alpha * nll
    metrics = _reward_metrics(
        loss, o.beta * chosen, o.beta * rejected, sums[:B], sums[B:]
    )
    metrics += _mean_logits(
        mx.stop_gradient(logits), _real_positions(spans, targets), B
    )
    metrics += [nll]
    return loss, metrics


OBJECTIVES = {"dpo": dpo_objective, "orpo": orpo_objective, "cpo": cpo_objective}


def preference_loss(model, tokens, spans, constants, reference=None):
    """mlx-lm's loss protocol for a preference batch (see ``batching``).

    Args:
        tokens: (2B, L) chosen rows then rejected rows.
        spans: (2B, 2) completion ``[start, end)`` per row.
        constants: ``PreferenceArgs.as_constants()``.
        reference: (2B,) precomputed reference log-probs (``reference: precomputed``).

    Returns:
        ``(loss, ntoks)``: the scalar float32 loss and the number of real tokens in the batch.
    """
    options = PreferenceArgs.from_constants(constants)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    objective = OBJECTIVES[options.method]
    if options.method == "dpo":
        loss, metrics = objective(model, inputs, targets, spans, options, reference)
    else:
        loss, metrics = objective(model, inputs, targets, spans, options)
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
    """mlx-lm's ``evaluate`` for preference data, averaged as TRL's ``evaluate()``: each
    metric is the mean of its per-batch values, the loss is weighted by pairs.

    Distributed, the i-th batch of every rank is part of the same global batch i (see
    ``batching.iterate_eval_batches``): the ranks' values are combined per batch index,
    pair-weighted, into that global batch's value before the mean over batches, so a metric
    that is a mean over pairs comes out as in a single process, ragged last batch included.
    """
    from .batching import iterate_eval_batches, preference_dataset_of

    loss = loss or preference_loss
    iterate_batches = iterate_batches or iterate_eval_batches
    names = metric_names(preference_dataset_of(dataset).options)
    model.eval()
    rows = []  # per batch: the metrics times the batch's pairs, then the pairs
    batch_iter = iterate_batches(
        dataset=dataset,
        batch_size=batch_size,
        max_seq_length=max_seq_length,
        comm_group=mx.distributed.init(),
    )
    for n, batch in enumerate(batch_iter):
        if n == num_batches:
            break
        loss(model, *batch)
        b = batch[0].shape[0] // 2
        rows.append(mx.concatenate([model._pref_metrics * b, mx.array([float(b)])]))
        mx.eval(rows[-1])
        if clear_cache_threshold and mx.get_cache_memory() > clear_cache_threshold:
            mx.clear_cache()
        if progress_callback is not None:
            progress_callback()
    k = len(names)
    # A rank may hold one batch fewer (a ragged last batch): pad with zero rows.
    count = int(mx.distributed.all_max(mx.array([len(rows)]), stream=mx.cpu).item())
    if count == 0:  # nothing evaluated (num_batches 0): NaN, as mlx-lm's evaluate
        return EvalResult({name: float("nan") for name in names})
    rows += [mx.zeros((k + 1,))] * (count - len(rows))
    totals = mx.distributed.all_sum(mx.stack(rows), stream=mx.cpu)
    pairs = totals[:, k]
    per_batch = totals[:, :k] / pairs[:, None]
    values = per_batch.mean(axis=0).tolist()
    metrics = dict(zip(names, values))
    metrics["loss"] = (totals[:, 0].sum() / pairs.sum()).item()
    if "num_tokens" in metrics:  # a training count: the reporter fills it in
        metrics["num_tokens"] = 0.0
    return EvalResult(metrics)
