"""The loss mlx-lm's training step calls for a preference batch, and its evaluation loop.

``preference_loss(model, tokens, spans, constants)`` keeps mlx-lm's loss protocol (returns
``(loss, ntoks)``) so the upstream ``mx.compile``d step runs it unchanged. One forward pass
covers chosen and rejected rows together (in the shared layout, each prompt once: see
``sharing``); DPO adds a reference forward of the same batch with the adapters off. The
metrics leave the compiled step through ``model._pref_metrics`` (an
array attribute whose name starts with ``_`` is part of ``model.state``, which the step
returns, but not of the trainable parameters, so it is never trained or saved).
"""

from typing import NamedTuple, Optional

import mlx.core as mx

from .config import ConfigError, PreferenceArgs
from .logps import sequence_logps, span_mask, token_entropy, token_logps
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
from .sharing import CHECKPOINTING, checkpointed, shared_forward

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


class Forward(NamedTuple):
    """One forward pass over a preference batch, in either layout (see ``batching``).

    ``logits`` (2B, T, V) and ``targets`` (2B, T) cover the rows the spans count in: whole
    rows, or in the shared layout the continuations. The shared layout adds each pair's
    prompt once: ``prompt_logits`` (B, Tp, V), ``prompt_targets`` (B, Tp), and
    ``prompt_lengths`` (B,) real positions; the concatenated layout leaves them None.
    """

    logits: mx.array
    targets: mx.array
    prompt_logits: Optional[mx.array] = None
    prompt_targets: Optional[mx.array] = None
    prompt_lengths: Optional[mx.array] = None

    def prompt_mask(self):
        """(B, Tp) bool, the real prompt positions; their targets are the tokens 1..P that
        chosen and rejected rows share."""
        columns = mx.arange(self.prompt_targets.shape[1])[None]
        return columns < self.prompt_lengths[:, None]


def run_model(model, tokens) -> Forward:
    if isinstance(tokens, (tuple, list)):
        if not getattr(model, "_pref_prompt_sharing", False):
            raise ConfigError(
                "This batch shares its prompts (prompt_sharing), but the model was not "
                "checked for it: call mlx_lm_pref.sharing.resolve_prompt_sharing(model, "
                "options) first (train() does), or set prompt_sharing false."
            )
        if checkpointed(model):
            raise ConfigError(
                f"prompt_sharing: {CHECKPOINTING}. Set prompt_sharing false."
            )
        prompts, lengths, rows = tokens
        prompt_logits, logits = shared_forward(
            model, prompts[:, :-1], lengths, rows[:, :-1]
        )
        return Forward(logits, rows[:, 1:], prompt_logits, prompts[:, 1:], lengths)
    return Forward(model(tokens[:, :-1]), tokens[:, 1:])


def _sum_count(values, mask):
    mask = mask.astype(mx.float32)
    return (values * mask).sum(), mask.sum()


def _masked_mean(values, mask, prompt=None):
    """Mean of ``values`` over ``mask``, with a prompt part ``(values, mask)`` of the shared
    layout counted in too."""
    total, count = _sum_count(values, mask)
    if prompt is not None:
        extra, more = _sum_count(*prompt)
        total, count = total + extra, count + more
    return total / mx.maximum(count, 1.0)


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


def _vocab_mean(logits):
    return mx.stop_gradient(logits).astype(mx.float32).mean(axis=-1)


def _mean_logits(f: Forward, mask, B, with_prompt=False):
    """logits/chosen and logits/rejected: the vocab-mean logit averaged over ``mask``, and
    with ``with_prompt`` over the prompt positions of the shared layout too (which both
    rows of a pair have)."""
    vocab_mean = _vocab_mean(f.logits)
    prompt = None
    if with_prompt and f.prompt_logits is not None:
        prompt = (_vocab_mean(f.prompt_logits), f.prompt_mask())
    return [
        _masked_mean(vocab_mean[:B], mask[:B], prompt),
        _masked_mean(vocab_mean[B:], mask[B:], prompt),
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
    f = run_model(model, tokens)
    completion = span_mask(spans, f.targets.shape[1])
    logps = token_logps(mx.stop_gradient(f.logits), f.targets)
    return _dpo_logps(logps, completion, ld_alpha)


def _reference_logps(model, tokens, completion, o: PreferenceArgs, precomputed):
    """Per-sequence reference log-probs, gradient-free, from the same model."""
    if o.reference == "precomputed":
        if precomputed is None:
            raise ConfigError(
                "reference precomputed: this batch carries no reference log-probs (they "
                "are computed when train() starts; see mlx_lm_pref.precompute)."
            )
        return mx.stop_gradient(precomputed)
    if o.reference == "none":
        return mx.zeros((completion.shape[0],))
    # auto outside train() (a script scoring a batch itself) means the base model.
    strategy = "adapters_off" if o.reference == "auto" else o.reference
    with REFERENCE_CONTEXTS[strategy](model):
        f = run_model(model, tokens)
    ref_logps = token_logps(mx.stop_gradient(f.logits), f.targets)
    return mx.stop_gradient(_dpo_logps(ref_logps, completion, o.ld_alpha))


def _wpo_weights(logits, lse, logps, completion, B):
    """WPO, Zhou et al. 2024, eq. 2: exp of the mean aligned log-prob, chosen x rejected."""
    logits = mx.stop_gradient(logits.astype(mx.float32))
    lse = mx.stop_gradient(lse)
    log_sum_sq = mx.logsumexp(2 * logits, axis=-1) - 2 * lse
    aligned, count = sequence_logps(mx.stop_gradient(logps) - log_sum_sq, completion)
    weights = mx.exp(aligned / mx.maximum(count, 1.0))
    return weights[:B] * weights[B:]


def dpo_objective(model, tokens, spans, o: PreferenceArgs, reference=None):
    """The DPO loss family (TRL's ``loss_type`` list) against the adapters-off reference.

    Completions never reach into a shared prompt, so only the rows' logits are read (and
    the output layer never runs on shared prompt positions)."""
    B = spans.shape[0] // 2
    if set(o.loss_type) & {"aot", "aot_unpaired"} and B < 2:
        raise ConfigError(
            "loss_type aot/aot_unpaired sorts log-ratios across the pairs of a batch, and "
            "this batch holds 1 pair (per rank): use batch_size >= 2 pairs per rank."
        )
    f = run_model(model, tokens)
    completion = span_mask(spans, f.targets.shape[1])
    lse = mx.logsumexp(f.logits.astype(mx.float32), axis=-1)
    logps = token_logps(f.logits, f.targets, lse)
    policy = _dpo_logps(logps, completion, o.ld_alpha)
    ref = _reference_logps(model, tokens, completion, o, reference)
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
        _wpo_weights(f.logits, lse, logps, completion, B) if o.use_weighting else None
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
    metrics += _mean_logits(f, completion, B)
    metrics += _dpo_token_metrics(f, lse, completion, B)
    metrics += [_num_tokens(tokens, spans)]
    return loss, metrics


def _num_tokens(tokens, spans):
    """The batch's real tokens (both rows of every pair, prompts included)."""
    total = spans[:, 1].sum()
    if isinstance(tokens, (tuple, list)):  # the continuations' spans start after P
        total = total + 2 * tokens[1].sum()
    return total.astype(mx.float32)


def _dpo_token_metrics(f: Forward, lse, completion, B):
    """entropy over every completion token, and the argmax accuracy on chosen ones."""
    logits = mx.stop_gradient(f.logits)
    entropy = token_entropy(logits, mx.stop_gradient(lse))
    top1 = (mx.argmax(logits[:B], axis=-1) == f.targets[:B]).astype(mx.float32)
    return [_masked_mean(entropy, completion), _masked_mean(top1, completion[:B])]


def _whole_sequence(spans, num_targets, B):
    """The chosen rows from their first predicted token (index 1) to their end."""
    return span_mask(
        mx.concatenate([mx.ones_like(spans[:B, :1]), spans[:B, 1:]], 1), num_targets
    )


def _prompt_logps(f: Forward):
    """The shared prompt's (token log-probs, mask), or None in the concatenated layout."""
    if f.prompt_logits is None:
        return None
    return token_logps(f.prompt_logits, f.prompt_targets), f.prompt_mask()


def orpo_objective(model, tokens, spans, o: PreferenceArgs):
    """ORPO as TRL: NLL over the whole chosen sequence (prompt included, pads excluded) plus
    the odds-ratio term on mean completion log-probs."""
    B = spans.shape[0] // 2
    f = run_model(model, tokens)
    completion = span_mask(spans, f.targets.shape[1])
    logps = token_logps(f.logits, f.targets)
    sums, counts = sequence_logps(logps, completion)
    means = sums / mx.maximum(counts, 1.0)
    whole = _whole_sequence(spans, f.targets.shape[1], B)
    nll = -_masked_mean(logps[:B], whole, _prompt_logps(f))
    or_losses, log_odds = orpo_odds_ratio(means[:B], means[B:], o.beta)
    loss = nll + or_losses.mean()
    metrics = _reward_metrics(
        loss, o.beta * means[:B], o.beta * means[B:], means[:B], means[B:]
    )
    metrics += _mean_logits(f, _real_positions(spans, f.targets), B, with_prompt=True)
    metrics += [nll, log_sigmoid(log_odds).mean(), log_odds.mean()]
    return loss, metrics


def _real_positions(spans, targets):
    """Every input position of a row that holds a real token (not padding)."""
    return mx.arange(targets.shape[1])[None] < (spans[:, 1:2] - 1)


def cpo_objective(model, tokens, spans, o: PreferenceArgs):
    """CPO / SimPO / AlphaPO as TRL's CPOTrainer: reference-free, plus cpo_alpha x NLL on
    the chosen completions."""
    B = spans.shape[0] // 2
    f = run_model(model, tokens)
    completion = span_mask(spans, f.targets.shape[1])
    logps = token_logps(f.logits, f.targets)
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
    metrics += _mean_logits(f, _real_positions(spans, f.targets), B, with_prompt=True)
    metrics += [nll]
    return loss, metrics


OBJECTIVES = {"dpo": dpo_objective, "orpo": orpo_objective, "cpo": cpo_objective}


def preference_loss(model, tokens, spans, constants, reference=None):
    """mlx-lm's loss protocol for a preference batch (see ``batching``).

    Args:
        tokens: (2B, L) chosen rows then rejected rows, or the shared layout's
            ``(prompts, prompt_lengths, continuations)`` (see ``batching``).
        spans: (2B, 2) completion ``[start, end)`` per row.
        constants: ``PreferenceArgs.as_constants()``.
        reference: (2B,) precomputed reference log-probs (``reference: precomputed``).

    Returns:
        ``(loss, ntoks)``: the scalar float32 loss and the number of real tokens in the batch.
    """
    options = PreferenceArgs.from_constants(constants)
    objective = OBJECTIVES[options.method]
    if options.method == "dpo":
        loss, metrics = objective(model, tokens, spans, options, reference)
    else:
        loss, metrics = objective(model, tokens, spans, options)
    _publish(model, mx.stop_gradient(mx.stack(metrics)))
    return loss, _num_tokens(tokens, spans).astype(mx.int32)


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
        b = batch[1].shape[0] // 2
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
