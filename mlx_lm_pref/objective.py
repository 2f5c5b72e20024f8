"""The loss mlx-lm's training step calls for a preference batch.

``PreferenceLoss(options)`` is mlx-lm's loss protocol bound to a run's options:
``loss(model, batch)`` returns ``(loss, ntoks)`` for a ``PreferenceBatch``, so the upstream
``mx.compile``d step runs it unchanged (the options are Python constants of the trace). One
forward pass covers chosen and rejected rows together (in the shared layout, each prompt
once: see ``sharing``); DPO adds a reference forward of the same batch with the adapters off.

Each objective returns its metrics by name, each as ``(numerator, denominator)`` of this
rank's share of the batch: the batch's value is the numerators summed over the ranks divided
by the denominators summed over the ranks (``metrics``), which is how TRL reduces each one
(per-pair means gathered over processes, token means as gathered sums over gathered counts).

The compiled step returns only ``(loss, ntoks)``, so the metrics need a channel of their own:
``model._pref_metrics``, the (K, 2) numerators and denominators in ``metric_names`` order. An
array attribute whose name starts with ``_`` is part of ``model.state``, which the step
declares as its outputs, but not of the trainable parameters, so it leaves the compiled graph
without being trained or saved. It is the one piece of per-run state on the model;
everything else lives in ``run.PreferenceRun``. ``PreferenceLoss.metrics`` returns the
metrics directly, for evaluation.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from . import grpo
from .batching import PreferenceBatch
from .config import PreferenceArgs
from .forward import Forward, run_model
from .logps import TokenStats, sequence_logps, span_mask
from .losses import (
    DPOTerms,
    alphapo_rewards,
    cpo_losses,
    dpo_loss,
    f_divergence_scores,
    kto_losses,
    log_sigmoid,
    orpo_odds_ratio,
)
from .metrics import pack_metrics
from .reference import InitialAdapter, reference_context

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
# TRL 1.16's metric names per trainer, in the order the reports show them. num_tokens is
# TRL's running count of trained tokens: the reporter sums its per-step values, and
# evaluation reports the count so far. A metric whose denominator is 0 in a batch (KTO's
# label-conditional ones, for a batch without that label) is not logged for it, as TRL.
METRICS = {
    "dpo": REWARDS + ("entropy", "mean_token_accuracy", "num_tokens"),
    "orpo": REWARDS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"),
    "cpo": REWARDS + ("nll_loss",),
    "kto": ("loss", "kl") + REWARDS[1:3] + REWARDS[4:] + ("entropy", "num_tokens"),
}


def metric_names(options: PreferenceArgs) -> tuple:
    if options.generates:  # the loss's, then the sampling's (rewards by function)
        return grpo.metric_names(options)
    return METRICS[options.method]


def _sum_count(values, mask, prompt=None):
    """``(sum of values over mask, count)``, with a prompt part ``(values, mask)`` of the
    shared layout counted in too: a token mean as its numerator and denominator."""
    mask = mask.astype(mx.float32)
    total, count = (values * mask).sum(), mask.sum()
    if prompt is not None:
        extra, more = _sum_count(*prompt)
        total, count = total + extra, count + more
    return total, count


def _masked_mean(values, mask, prompt=None):
    """Mean of ``values`` over ``mask`` (and the prompt part, see ``_sum_count``)."""
    total, count = _sum_count(values, mask, prompt)
    return total / mx.maximum(count, 1.0)


def _per_rank(value):
    """A value TRL averages over processes (a per-process scalar, gathered and averaged)."""
    return value, mx.array(1.0)


def _over_pairs(values):
    """A per-pair (per-row) value TRL averages over the pairs of every process."""
    return values.sum(), mx.array(float(values.shape[0]))


def _reward_metrics(
    loss, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps
) -> dict:
    """The metrics every paired objective logs; ``loss`` is averaged over pairs."""
    pairs = float(chosen_rewards.shape[0])
    return {
        "loss": (loss * pairs, mx.array(pairs)),
        "rewards/chosen": _over_pairs(chosen_rewards),
        "rewards/rejected": _over_pairs(rejected_rewards),
        "rewards/accuracies": _over_pairs(
            (chosen_rewards > rejected_rewards).astype(mx.float32)
        ),
        "rewards/margins": _over_pairs(chosen_rewards - rejected_rewards),
        "logps/chosen": _over_pairs(chosen_logps),
        "logps/rejected": _over_pairs(rejected_logps),
    }


def _mean_logits(vocab_mean, mask, B, prompt=None, reduce=_sum_count) -> dict:
    """logits/chosen and logits/rejected: the vocab-mean logit over ``mask``, and over the
    prompt positions of the shared layout too when given as ``(vocab_mean, mask)`` (both
    rows of a pair have them). ``reduce``: ``_sum_count`` for TRL's DPO (token sums over
    token counts across processes), ``_rank_mean`` for ORPO and CPO (per-process means).
    """
    return {
        "logits/chosen": reduce(vocab_mean[:B], mask[:B], prompt),
        "logits/rejected": reduce(vocab_mean[B:], mask[B:], prompt),
    }


def _rank_mean(values, mask, prompt=None):
    return _per_rank(_masked_mean(values, mask, prompt))


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


def sequence_logps_dpo(model, batch: PreferenceBatch, options: PreferenceArgs):
    """(2B,) summed (LD-weighted) completion log-probs of ``model`` as it is, gradient-free
    (KTO: the rows then their KL rows): what a live reference computes, for precomputing
    it."""
    f = run_model(model, batch, options)
    completion = span_mask(batch.spans, f.targets.shape[1])
    return _dpo_logps(f.stats(grad=False).logps, completion, options.ld_alpha)


def _reference_logps(
    model, batch, completion, o: PreferenceArgs, initial, policy, after
):
    """Per-sequence reference log-probs, gradient-free, from the same model, on the frozen
    layers of the ``policy`` pass (``frozen``); with tiles, after the policy's: ``after``.
    """
    if o.reference == "precomputed":
        if batch.reference is None:  # a script's own batches, not the run's
            raise ValueError(
                "reference precomputed: this batch carries no reference log-probs (they "
                "are computed when train() starts; see mlx_lm_pref.precompute)."
            )
        return mx.stop_gradient(batch.reference)
    if o.reference == "none":
        return mx.zeros((completion.shape[0],))
    with reference_context(model, o.reference, initial):
        f = run_model(model, batch, o, below=policy)
        ref_logps = f.stats(grad=False, after=after).logps
    return mx.stop_gradient(_dpo_logps(ref_logps, completion, o.ld_alpha))


def _wpo_weights(stats: TokenStats, completion, B):
    """WPO, Zhou et al. 2024, eq. 2: exp of the mean aligned log-prob, chosen x rejected."""
    aligned = mx.stop_gradient(stats.logps) - stats.log_sum_sq
    aligned, count = sequence_logps(aligned, completion)
    weights = mx.exp(aligned / mx.maximum(count, 1.0))
    return weights[:B] * weights[B:]


def dpo_objective(model, batch, o: PreferenceArgs, initial=None, grad=True):
    """The DPO loss family (TRL's ``loss_type`` list) against the reference ``o.reference``.

    Completions never reach into a shared prompt, so only the rows' logits are read (and
    the output layer never runs on shared prompt positions). A batch of one pair is scored
    by every loss, aot's sorting included (TRL computes a ragged last evaluation batch).
    """
    B = batch.pairs
    f = run_model(model, batch, o)
    completion = span_mask(batch.spans, f.targets.shape[1])
    want = {"entropy", "top1", "vocab_mean"} | (
        {"log_sum_sq"} if o.use_weighting else set()
    )
    stats = f.stats(frozenset(want), grad)
    logps = stats.logps
    policy = _dpo_logps(logps, completion, o.ld_alpha)
    ref = _reference_logps(model, batch, completion, o, initial, f, after=[logps])
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
    pair_weights = _wpo_weights(stats, completion, B) if o.use_weighting else None
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
    metrics = _reward_metrics(
        loss,
        o.beta * terms.chosen_logratios,
        o.beta * terms.rejected_logratios,
        policy[:B],
        policy[B:],
    )
    metrics.update(_mean_logits(stats.vocab_mean, completion, B))
    # entropy over every completion token, the argmax accuracy on chosen ones
    metrics["entropy"] = _sum_count(stats.entropy, completion)
    metrics["mean_token_accuracy"] = _sum_count(stats.top1[:B], completion[:B])
    metrics["num_tokens"] = (batch.num_tokens().astype(mx.float32), mx.array(1.0))
    return loss, metrics


def _whole_sequence(spans, num_targets, B):
    """The chosen rows from their first predicted token (index 1) to their end."""
    return span_mask(
        mx.concatenate([mx.ones_like(spans[:B, :1]), spans[:B, 1:]], 1), num_targets
    )


def _prompt_parts(f: Forward, want, grad):
    """The shared prompt's ``TokenStats`` and mask, or (None, None) in the concatenated
    layout."""
    stats = f.prompt_stats(frozenset(want), grad)
    return (None, None) if stats is None else (stats, f.prompt_mask())


def orpo_objective(model, batch, o: PreferenceArgs, initial=None, grad=True):
    """ORPO as TRL: NLL over the whole chosen sequence (prompt included, pads excluded) plus
    the odds-ratio term on mean completion log-probs."""
    B, spans = batch.pairs, batch.spans
    f = run_model(model, batch, o)
    completion = span_mask(spans, f.targets.shape[1])
    stats = f.stats(frozenset({"vocab_mean"}), grad)
    prompt, prompt_mask = _prompt_parts(f, {"vocab_mean"}, grad)
    logps = stats.logps
    sums, counts = sequence_logps(logps, completion)
    means = sums / mx.maximum(counts, 1.0)
    whole = _whole_sequence(spans, f.targets.shape[1], B)
    prompt_nll = None if prompt is None else (prompt.logps, prompt_mask)
    nll = -_masked_mean(logps[:B], whole, prompt_nll)
    or_losses, log_odds = orpo_odds_ratio(means[:B], means[B:], o.beta)
    loss = nll + or_losses.mean()
    metrics = _reward_metrics(
        loss, o.beta * means[:B], o.beta * means[B:], means[:B], means[B:]
    )
    prompt_means = None if prompt is None else (prompt.vocab_mean, prompt_mask)
    real = _real_positions(spans, f.targets)
    metrics.update(_mean_logits(stats.vocab_mean, real, B, prompt_means, _rank_mean))
    metrics["nll_loss"] = _per_rank(nll)
    metrics["log_odds_ratio"] = _over_pairs(log_sigmoid(log_odds))
    metrics["log_odds_chosen"] = _per_rank(log_odds.mean())
    return loss, metrics


def _real_positions(spans, targets):
    """Every input position of a row that holds a real token (not padding)."""
    return mx.arange(targets.shape[1])[None] < (spans[:, 1:2] - 1)


def cpo_objective(model, batch, o: PreferenceArgs, initial=None, grad=True):
    """CPO / SimPO / AlphaPO as TRL's CPOTrainer: reference-free, plus cpo_alpha x NLL on
    the chosen completions."""
    B, spans = batch.pairs, batch.spans
    f = run_model(model, batch, o)
    completion = span_mask(spans, f.targets.shape[1])
    stats = f.stats(frozenset({"vocab_mean"}), grad)
    logps = stats.logps
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
    prompt = f.prompt_vocab_mean()  # CPO reads no prompt log-prob
    prompt_means = None if prompt is None else (prompt, f.prompt_mask())
    real = _real_positions(spans, f.targets)
    metrics.update(_mean_logits(stats.vocab_mean, real, B, prompt_means, _rank_mean))
    metrics["nll_loss"] = _per_rank(nll)
    return loss, metrics


def _across_ranks(sums: dict) -> dict:
    """Named sums, each summed over the ranks of a distributed run (TRL gathers KTO's KL
    estimate and reward sums across processes); as they are in a single process."""
    if mx.distributed.init().size() == 1:
        return sums
    total = mx.distributed.all_sum(mx.stack(list(sums.values())))
    return dict(zip(sums, total))


def kto_objective(model, batch, o: PreferenceArgs, initial=None, grad=True):
    """KTO / unpaired APO-zero as TRL's ``KTOTrainer._compute_loss``: each row's log-ratio
    against the reference, the KL estimate from the KL rows (policy side without gradient),
    its metrics summed over the rows of every rank and divided by the counts of each label.
    """
    B = batch.pairs
    f = run_model(model, batch, o)
    completion = span_mask(batch.spans, f.targets.shape[1])
    stats = f.stats(frozenset({"entropy", "vocab_mean"}), grad)
    policy = (stats.logps * completion).sum(axis=-1)  # (2B,), or (B,) without KL rows
    ref = _reference_logps(model, batch, completion, o, initial, f, [stats.logps])
    chosen = batch.labels
    rejected = 1 - chosen
    logratios = policy[:B] - ref[:B]
    rewards = mx.stop_gradient(o.beta * logratios)
    kl_rows = policy[B:] - ref[B:] if o.kl_term else mx.zeros((1,))
    # What the loss itself needs of the whole batch (the KL estimate, the row count) and
    # the reward margin, which TRL takes between the label means of the whole batch.
    whole = _across_ranks(
        {
            "kl": mx.stop_gradient(kl_rows.sum()),
            "kl_rows": mx.array(float(kl_rows.shape[0])),
            "chosen_rewards": (rewards * chosen).sum(),
            "chosen": chosen.sum(),
            "rejected_rewards": (rewards * rejected).sum(),
            "rejected": rejected.sum(),
        }
    )
    kl = mx.maximum(whole["kl"] / whole["kl_rows"], 0.0) if o.kl_term else mx.array(0.0)
    losses = kto_losses(
        logratios,
        chosen,
        kl,
        o.loss_type[0],
        o.beta,
        o.desirable_weight,
        o.undesirable_weight,
    )
    # TRL's mean over the batch's rows, whatever share of them each rank holds: mlx-lm
    # averages the ranks' gradients, so each rank's loss is ranks x its rows' sum / rows.
    ranks = mx.distributed.init().size()
    loss = ranks * losses.sum() / (whole["chosen"] + whole["rejected"])
    both = (whole["chosen"] > 0) & (whole["rejected"] > 0)
    margin = whole["chosen_rewards"] / mx.maximum(whole["chosen"], 1.0)
    margin = margin - whole["rejected_rewards"] / mx.maximum(whole["rejected"], 1.0)
    rows = completion[:B].astype(mx.float32)
    metrics = {
        "loss": (losses.sum(), mx.array(float(B))),
        "kl": _per_rank(kl),
        # label-conditional: a batch without that label has a denominator of 0
        "rewards/chosen": ((rewards * chosen).sum(), chosen.sum()),
        "rewards/rejected": ((rewards * rejected).sum(), rejected.sum()),
        "rewards/margins": (mx.where(both, margin, 0.0), both.astype(mx.float32)),
        "logps/chosen": ((policy[:B] * chosen).sum(), chosen.sum()),
        "logps/rejected": ((policy[:B] * rejected).sum(), rejected.sum()),
        "logits/chosen": _sum_count(stats.vocab_mean[:B], rows * chosen[:, None]),
        "logits/rejected": _sum_count(stats.vocab_mean[:B], rows * rejected[:, None]),
        "entropy": _sum_count(stats.entropy[:B], rows),
        "num_tokens": (batch.row_tokens().astype(mx.float32), mx.array(1.0)),
    }
    return loss, metrics


OBJECTIVES = {
    "dpo": dpo_objective,
    "orpo": orpo_objective,
    "cpo": cpo_objective,
    "kto": kto_objective,
    "grpo": grpo.rl_objective,
    "rloo": grpo.rl_objective,
}


def preference_loss(
    model, batch: PreferenceBatch, options: PreferenceArgs, initial=None, grad=True
):
    """The loss, token count and metrics of one preference batch.

    Args:
        batch: a ``PreferenceBatch`` (either layout, see ``batching``).
        options: the run's options (``reference`` resolved: see ``reference``).
        initial: the step-0 adapter (``reference: initial_adapter``).
        grad: False where nothing differentiates the loss (evaluation).

    Returns:
        ``(loss, ntoks, metrics)``: the scalar float32 loss, the number of real tokens in
        the batch (int32) and ``{name: (numerator, denominator)}`` for every name of
        ``metric_names(options)``, gradient-free (see the module docstring).
    """
    loss, metrics = OBJECTIVES[options.method](model, batch, options, initial, grad)
    metrics = {k: tuple(mx.stop_gradient(v) for v in nd) for k, nd in metrics.items()}
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
        model[METRICS_ATTRIBUTE] = pack_metrics(self.metric_names, metrics)
        return loss, ntoks

    def metrics(self, model, batch: PreferenceBatch, grad=True):
        """``(loss, ntoks, metrics)`` (see ``preference_loss``), without touching the
        model; evaluation passes ``grad=False``."""
        return preference_loss(model, batch, self.options, self.initial, grad)
