"""The loss mlx-lm's training step calls for a preference batch.

``PreferenceLoss(options)`` is mlx-lm's loss protocol bound to a run's options:
``loss(model, batch)`` returns ``(loss, ntoks)`` for a ``PreferenceBatch``, so the upstream
``mx.compile``d step runs it unchanged (the options are Python constants of the trace). One
forward pass covers chosen and rejected rows together (in the shared layout, each prompt
once: see ``sharing``); DPO adds a reference forward of the same batch with the adapters off.

The compiled step returns only ``(loss, ntoks)``, so the metrics need a channel of their own:
``model._pref_metrics``. An array attribute whose name starts with ``_`` is part of
``model.state``, which the step declares as its outputs, but not of the trainable parameters,
so it leaves the compiled graph without being trained or saved. It is the one piece of
per-run state on the model; everything else lives in ``run.PreferenceRun``.
``PreferenceLoss.metrics`` returns the metrics directly, for evaluation.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

import mlx.core as mx

from .batching import PreferenceBatch
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
from .reference import InitialAdapter, reference_context
from .sharing import CHECKPOINTING, checkpointed, shared_forward

# The metrics channel out of the compiled step (see the module docstring).
METRICS_ATTRIBUTE = "_pref_metrics"

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


def run_model(model, batch: PreferenceBatch) -> Forward:
    if not batch.shared:
        return Forward(model(batch.tokens[:, :-1]), batch.tokens[:, 1:])
    if checkpointed(model):
        raise ConfigError(f"prompt_sharing: {CHECKPOINTING}. Set prompt_sharing false.")
    prompts, lengths, rows = batch.tokens
    prompt_logits, logits = shared_forward(
        model, prompts[:, :-1], lengths, rows[:, :-1]
    )
    return Forward(logits, rows[:, 1:], prompt_logits, prompts[:, 1:], lengths)


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


def sequence_logps_dpo(model, batch: PreferenceBatch, ld_alpha=None):
    """(2B,) summed (LD-weighted) completion log-probs of ``model`` as it is, gradient-free:
    what a live reference computes, for precomputing it."""
    f = run_model(model, batch)
    completion = span_mask(batch.spans, f.targets.shape[1])
    logps = token_logps(mx.stop_gradient(f.logits), f.targets)
    return _dpo_logps(logps, completion, ld_alpha)


def _reference_logps(model, batch, completion, o: PreferenceArgs, initial):
    """Per-sequence reference log-probs, gradient-free, from the same model."""
    if o.reference == "precomputed":
        if batch.reference is None:
            raise ConfigError(
                "reference precomputed: this batch carries no reference log-probs (they "
                "are computed when train() starts; see mlx_lm_pref.precompute)."
            )
        return mx.stop_gradient(batch.reference)
    if o.reference == "none":
        return mx.zeros((completion.shape[0],))
    with reference_context(model, o.reference, initial):
        f = run_model(model, batch)
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


def dpo_objective(model, batch, o: PreferenceArgs, initial=None):
    """The DPO loss family (TRL's ``loss_type`` list) against the reference ``o.reference``.

    Completions never reach into a shared prompt, so only the rows' logits are read (and
    the output layer never runs on shared prompt positions)."""
    B = batch.pairs
    if set(o.loss_type) & {"aot", "aot_unpaired"} and B < 2:
        raise ConfigError(
            "loss_type aot/aot_unpaired sorts log-ratios across the pairs of a batch, and "
            "this batch holds 1 pair (per rank): use batch_size >= 2 pairs per rank."
        )
    f = run_model(model, batch)
    completion = span_mask(batch.spans, f.targets.shape[1])
    lse = mx.logsumexp(f.logits.astype(mx.float32), axis=-1)
    logps = token_logps(f.logits, f.targets, lse)
    policy = _dpo_logps(logps, completion, o.ld_alpha)
    ref = _reference_logps(model, batch, completion, o, initial)
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
    metrics += [batch.num_tokens().astype(mx.float32)]
    return loss, metrics


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


def orpo_objective(model, batch, o: PreferenceArgs, initial=None):
    """ORPO as TRL: NLL over the whole chosen sequence (prompt included, pads excluded) plus
    the odds-ratio term on mean completion log-probs."""
    B, spans = batch.pairs, batch.spans
    f = run_model(model, batch)
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


def cpo_objective(model, batch, o: PreferenceArgs, initial=None):
    """CPO / SimPO / AlphaPO as TRL's CPOTrainer: reference-free, plus cpo_alpha x NLL on
    the chosen completions."""
    B, spans = batch.pairs, batch.spans
    f = run_model(model, batch)
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


def preference_loss(
    model, batch: PreferenceBatch, options: PreferenceArgs, initial=None
):
    """The loss, token count and metrics of one preference batch.

    Args:
        batch: a ``PreferenceBatch`` (either layout, see ``batching``).
        options: the run's options (``reference`` resolved: see ``reference``).
        initial: the step-0 adapter (``reference: initial_adapter``).

    Returns:
        ``(loss, ntoks, metrics)``: the scalar float32 loss, the number of real tokens in
        the batch (int32) and the (K,) float32 metrics named by ``metric_names(options)``.
    """
    loss, metrics = OBJECTIVES[options.method](model, batch, options, initial)
    metrics = mx.stop_gradient(mx.stack(metrics))
    return loss, batch.num_tokens().astype(mx.int32), metrics


@dataclass(frozen=True)
class PreferenceLoss:
    """mlx-lm's loss protocol for preference batches, bound to a run's options:
    ``loss(model, batch)`` returns ``(loss, ntoks)`` and leaves the metrics in
    ``model._pref_metrics`` (the compiled step's one extra output)."""

    options: PreferenceArgs
    initial: Optional[InitialAdapter] = None

    @property
    def metric_names(self) -> tuple:
        return metric_names(self.options)

    def __call__(self, model, batch: PreferenceBatch):
        loss, ntoks, metrics = self.metrics(model, batch)
        model[METRICS_ATTRIBUTE] = metrics
        return loss, ntoks

    def metrics(self, model, batch: PreferenceBatch):
        """``(loss, ntoks, metrics)``, without touching the model (evaluation)."""
        return preference_loss(model, batch, self.options, self.initial)
