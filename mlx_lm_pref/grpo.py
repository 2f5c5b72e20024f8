"""GRPO and RLOO as TRL 1.16's ``GRPOTrainer`` and ``RLOOTrainer``: advantages from rewards,
and the clipped policy-gradient loss of a ``RolloutBatch``.

Advantages (computed once per generation batch, over the completions of every rank, as TRL
gathers the rewards; numpy, float64):
- GRPO (``group_advantages``), ``multi_objective_aggregation: sum_then_normalize``: r = the
  rewards' weighted ``nansum`` (NaN where every function returned None), A = (r - mean of
  its group) / (std + 1e-4), the std of the group or of the batch (``scale_rewards``; none:
  not divided); ``normalize_then_sum`` (GDPO): each function's rewards group-normalised,
  then summed with the weights and normalised over the batch.
- RLOO (``rloo_advantages``): r clipped to ``reward_clip_range``, minus beta x the
  completion's KL to the reference (summed over tokens, at sampling time), A = r - the mean
  of the other G - 1 rewards of its group; optionally normalised over the batch.
Stds are unbiased (``torch.std``'s), and NaN advantages become 0.

Loss (per token t of completion i, ``_compute_loss``): with r = exp(logp - logp_old) (per
token, or GSPO's per-sequence mean of the log-ratio), clipped policy term
-min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) (``delta`` caps r; cispo:
-stop_gradient(min(r, epsilon_high)) A logp), times the top-entropy mask, plus beta x k3 KL
exp(ref - logp) - (ref - logp) - 1 (times r: ``use_bias_correction_kl``, TRL's default);
reduced as ``loss_type`` says. RLOO: the same clip on
the sequence's summed log-ratio, averaged over sequences. ``logp_old`` is the sampling-time
log-prob when the model moved since sampling (``num_iterations`` > 1, or a generation batch
trained over several optimizer steps), else the log-prob itself, without gradient (ratio 1).
Log-probs are of the logits divided by ``temperature``, as TRL's. GRPO's reference log-probs
come from the step itself, a pass from the first adapted layer on the policy pass's frozen
layers (``frozen``); RLOO's, which its rewards hold, from the sampling time.
"""

import warnings
from functools import lru_cache
from typing import NamedTuple, Optional, Union

import mlx.core as mx
import numpy as np

from .batching import SharedTokens
from .forward import run_model
from .logps import span_mask
from .reference import reference_context
from .rewards import check_reward_funcs

STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)
LENGTHS = (
    "num_tokens",
    "completions/mean_length",
    "completions/min_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "completions/mean_terminated_length",
    "completions/min_terminated_length",
    "completions/max_terminated_length",
)


@lru_cache(maxsize=None)
def reward_functions(options) -> tuple:
    """``((name, callable), ...)``: the run's reward functions, loaded once."""
    return tuple(check_reward_funcs(options.reward_funcs, options))


def rollout_metric_names(options) -> tuple:
    """The metrics TRL logs when it samples and scores a generation batch, in its order."""
    names = LENGTHS
    for name, _ in reward_functions(options):
        names += (f"rewards/{name}/mean", f"rewards/{name}/std")
    names += ("reward", "reward_std", "frac_reward_zero_std")
    return names + (("kl",) if options.method == "rloo" and options.beta else ())


def metric_names(options) -> tuple:
    """Every metric of a GRPO or RLOO step: the loss's, then the sampling's."""
    return loss_metric_names(options) + rollout_metric_names(options)


class RolloutBatch(NamedTuple):
    """One training (or evaluation) batch of sampled completions.

    ``tokens``: whole rows (N, 1 + W) prompt then completion, right-padded; or the shared
    layout ``SharedTokens(prompts (Bp, 1 + Wp), prompt_lengths (Bp,), continuations
    (N, 1 + Wc))`` with ``groups`` (N,) the prompt row of each continuation. ``spans``
    (N, 2): each completion's [start, end) in its row's token positions. ``kept`` (N,) 1.0,
    or 0.0 for a completion left out of the loss (``mask_truncated_completions``).
    ``old_logps``: (N, T) per-token log-probs at sampling time, aligned with the targets
    (None when not needed; the reference runs in the step). ``normalizer``: dapo's and
    cispo's divisor, the completion tokens of the whole generation batch over (ranks x
    steps per generation). ``rollout``: (K, 2) the metrics of the sampling (``ROLLOUT``
    order), numerators and denominators.
    """

    tokens: Union[mx.array, SharedTokens]
    spans: mx.array
    advantages: mx.array
    kept: mx.array
    normalizer: mx.array
    rollout: mx.array
    groups: Optional[mx.array] = None
    old_logps: Optional[mx.array] = None

    @property
    def shared(self) -> bool:
        return isinstance(self.tokens, SharedTokens)

    @property
    def rows(self) -> int:
        return self.spans.shape[0]

    def num_tokens(self) -> mx.array:
        """Prompt and completion tokens of every row (a shared prompt once per row, as
        TRL counts them)."""
        total = self.spans[:, 1].sum()
        if self.shared:
            total = total + self.tokens.prompt_lengths[self.groups].sum()
        return total

    def completion_mask(self, num_targets) -> mx.array:
        """(N, T) float32: the completion tokens the loss reads."""
        mask = span_mask(self.spans, num_targets).astype(mx.float32)
        return mask * self.kept[:, None]


# ---- advantages (numpy) ----


def nanstd(x, axis=None, keepdims=False):
    """TRL's ``nanstd``: the unbiased std of the non-NaN entries (NaN below two)."""
    x = np.asarray(x, np.float64)
    count = np.sum(~np.isnan(x), axis=axis, keepdims=keepdims)
    mean = _nanmean(x, axis=axis, keepdims=True) if x.size else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        squares = np.nansum((x - mean) ** 2, axis=axis, keepdims=keepdims)
        return np.sqrt(squares / (count - 1))


def _nanmean(x, axis=None, keepdims=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN group: NaN, as TRL
        return np.nanmean(x, axis=axis, keepdims=keepdims)


def weighted_rewards(rewards_per_func, weights):
    """(N,) the weighted sum of (N, F) rewards, NaN where every function returned None."""
    r = np.asarray(rewards_per_func, np.float64)
    total = np.nansum(r * np.asarray(weights)[None], axis=1)
    total[np.isnan(r).all(axis=1)] = np.nan
    return total


def group_advantages(rewards_per_func, weights, G, scale_rewards, aggregation):
    """GRPO's advantages (N,) and ``(rewards (N,), std (N,))`` for the metrics."""
    r = np.asarray(rewards_per_func, np.float64)
    if aggregation == "sum_then_normalize":
        rewards = weighted_rewards(r, weights)
        grouped = rewards.reshape(-1, G)
        mean = np.repeat(_nanmean(grouped, axis=1), G)
        if scale_rewards == "batch":
            std = np.full_like(rewards, nanstd(rewards))
        else:
            std = np.repeat(nanstd(grouped, axis=1), G)
        advantages = rewards - mean
        if scale_rewards != "none":
            advantages = advantages / (std + STD_EPS)
    else:  # normalize_then_sum (GDPO)
        grouped = r.reshape(-1, G, r.shape[1])
        normalised = (grouped - _nanmean(grouped, axis=1, keepdims=True)) / (
            nanstd(grouped, axis=1, keepdims=True) + STD_EPS
        )
        rewards = weighted_rewards(normalised.reshape(r.shape), weights)
        std = np.full_like(rewards, nanstd(rewards))
        advantages = (rewards - _nanmean(rewards)) / (std + STD_EPS)
    return np.nan_to_num(advantages, nan=0.0), std


def rloo_advantages(rewards, G, normalize=False):
    """RLOO's advantages (N,) from the (N,) rewards (KL-penalised and clipped already):
    each minus the mean of the other scorable rewards of its group."""
    grouped = np.asarray(rewards, np.float64).reshape(-1, G)
    count = np.sum(~np.isnan(grouped), axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        baseline = (np.nansum(grouped, axis=1, keepdims=True) - grouped) / (count - 1)
    advantages = (grouped - baseline).reshape(-1)
    if normalize:
        advantages = (advantages - _nanmean(advantages)) / (
            nanstd(advantages) + STD_EPS
        )
    return np.nan_to_num(advantages, nan=0.0)


# ---- the loss (mlx) ----


def _quantile(values, mask, q):
    """torch.quantile's linear interpolation of ``values`` over the True entries of
    ``mask`` (both (N, T)), at ``q``."""
    flat = mx.where(mask, values, mx.inf).reshape(-1)
    ordered = mx.sort(flat)
    count = mask.astype(mx.float32).sum()
    position = q * mx.maximum(count - 1, 0)
    low = mx.floor(position)
    high = mx.minimum(low + 1, mx.maximum(count - 1, 0))
    a = ordered[low.astype(mx.int32)]
    b = ordered[high.astype(mx.int32)]
    return a + (position - low) * (b - a)


def entropy_mask(entropy, mask, quantile):
    """TRL's ``get_high_entropy_mask``: the completion tokens whose entropy is at least the
    ``1 - top_entropy_quantile`` quantile of the batch's."""
    live = mask > 0
    threshold = _quantile(mx.stop_gradient(entropy), live, 1 - quantile)
    return ((entropy * mask >= threshold) & live).astype(mx.float32)


def clipped_token_loss(logps, old, advantages, mask, o):
    """GRPO's per-token policy loss (N, T) and its ratio ``coef_1`` (N, T) or (N, 1)."""
    log_ratio = logps - old
    if o.importance_sampling_level == "sequence":
        count = mx.maximum(mask.sum(axis=-1), 1.0)
        log_ratio = ((log_ratio * mask).sum(axis=-1) / count)[:, None]
    coef_1 = mx.exp(log_ratio)
    A = advantages[:, None]
    if o.loss_type[0] == "cispo":
        capped = mx.stop_gradient(mx.minimum(coef_1, o.clip_high))
        return -capped * A * logps, coef_1
    coef_2 = mx.clip(coef_1, 1 - o.epsilon, 1 + o.clip_high)
    ratio = coef_1 if o.delta is None else mx.minimum(coef_1, o.delta)
    return -mx.minimum(ratio * A, coef_2 * A), coef_1


def reduce_loss(per_token, mask, loss_type, normalizer, max_completion_length):
    """TRL's reduction of the per-token loss for ``loss_type`` (one rank's rows)."""
    total = (per_token * mask).sum()
    if loss_type == "grpo":
        rows = (per_token * mask).sum(axis=-1) / mx.maximum(mask.sum(axis=-1), 1.0)
        return rows.mean()
    if loss_type == "bnpo":
        return total / mx.maximum(mask.sum(), 1.0)
    if loss_type == "dr_grpo":
        return total / (per_token.shape[0] * max_completion_length)
    return total / mx.maximum(normalizer, 1e-12)  # dapo, cispo


CLIPS = (
    "clip_ratio/low_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_mean",
    "clip_ratio/high_max",
    "clip_ratio/region_mean",
)


def loss_metric_names(o) -> tuple:
    """The metrics TRL's ``_compute_loss`` logs, in its order."""
    names = ("loss",) + (("kl",) if o.method == "grpo" and o.beta else ())
    names += ("entropy",)
    return names + (("cispo_clip_ratio",) if o.loss_type[0] == "cispo" else CLIPS)


def _extreme(values, present, largest):
    """The largest (or smallest) of ``values`` (N,) where ``present`` over every rank, as
    ``(value, 1)`` on each rank (the average over the ranks is then that value), or
    ``(0, 0)`` where no rank has one (TRL's NaN: not logged)."""
    signed = values if largest else -values
    top = mx.where(present, signed, -mx.inf).max()
    if mx.distributed.init().size() > 1:
        top = mx.distributed.all_max(top)
    found = mx.isfinite(top)
    top = mx.where(found, top if largest else -top, 0.0)
    return top, found.astype(mx.float32)


def _masked(x, mask):
    """A token mean as ``(sum, count)`` over ``mask``; per sequence when ``x`` is (N, 1)
    (GSPO's sequence-level ratio)."""
    if x.shape[1] == 1:
        return x.sum(), mx.array(float(x.shape[0]))
    return (x * mask).sum(), mask.sum()


def _per_row(x, mask):
    """Each row's mean of ``x`` over its mask, and whether it has any (TRL's
    ``masked_seq_mean``, NaN for a row without)."""
    count = mask.sum(axis=-1)
    if x.shape[1] == 1:
        return x[:, 0], count > 0
    return (x * mask).sum(axis=-1) / mx.maximum(count, 1), count > 0


def _clip_metrics(coef, A, mask, o) -> dict:
    """TRL's clip ratios: the share of tokens (or sequences) whose ratio the clip cut,
    low (A < 0) and high (A > 0), as global masked means; the lowest low and the highest
    high per-sequence share."""
    if o.loss_type[0] == "cispo":
        clipped = ((coef > o.clip_high) & (A > 0)).astype(mx.float32)
        return {"cispo_clip_ratio": _masked(clipped, mask)}
    low = ((coef < 1 - o.epsilon) & (A < 0)).astype(mx.float32)
    high = ((coef > 1 + o.clip_high) & (A > 0)).astype(mx.float32)
    return {
        "clip_ratio/low_mean": _masked(low, mask),
        "clip_ratio/low_min": _extreme(*_per_row(low, mask), largest=False),
        "clip_ratio/high_mean": _masked(high, mask),
        "clip_ratio/high_max": _extreme(*_per_row(high, mask), largest=True),
        "clip_ratio/region_mean": _masked(mx.maximum(low, high), mask),
    }


def rl_objective(model, batch: RolloutBatch, o, initial=None, grad=True):
    """GRPO's or RLOO's loss of ``batch`` and its metrics (``loss_metric_names``, then the
    sampling's ``batch.rollout``): see the module docstring."""
    sampling_names = rollout_metric_names(o)
    f = run_model(model, batch, o, o.temperature)
    mask = batch.completion_mask(f.targets.shape[1])
    stats = f.stats(frozenset({"entropy"}), grad)
    logps = stats.logps
    old = mx.stop_gradient(logps) if batch.old_logps is None else batch.old_logps
    A = batch.advantages
    metrics = {}
    if o.method == "rloo":
        log_ratio = ((logps - old) * mask).sum(axis=-1)[:, None]
        coef = mx.exp(log_ratio)
        clipped = mx.clip(coef, 1 - o.epsilon, 1 + o.clip_high)
        loss = -mx.minimum(coef * A[:, None], clipped * A[:, None]).mean()
        A = A[:, None]
    else:
        per_token, coef = clipped_token_loss(logps, old, A, mask, o)
        if o.top_entropy_quantile < 1.0:
            per_token = per_token * entropy_mask(
                stats.entropy, mask, o.top_entropy_quantile
            )
        if o.beta:  # the reference on this pass's frozen layers (``frozen``)
            with reference_context(model, o.reference, initial):
                ref = run_model(model, batch, o, o.temperature, below=f)
                ref = ref.stats(grad=False, after=[logps]).logps
            delta = mx.stop_gradient(ref) - logps
            kl = mx.exp(delta) - delta - 1
            if o.use_bias_correction_kl:  # TRL's default: the ratio weighs each token
                kl = kl * coef
            per_token = per_token + o.beta * kl
            metrics["kl"] = _masked(mx.stop_gradient(kl), mask)
        if o.delta is not None and o.loss_type[0] != "cispo":
            coef = mx.minimum(coef, o.delta)  # TRL counts clips of the capped ratio
        loss = reduce_loss(
            per_token, mask, o.loss_type[0], batch.normalizer, o.max_completion_length
        )
        A = A[:, None]
    metrics["loss"] = (loss, mx.array(1.0))
    metrics["entropy"] = _masked(stats.entropy, mask)
    metrics.update(_clip_metrics(coef, A, mask, o))
    for name, (num, den) in zip(sampling_names, batch.rollout):
        metrics[name] = (num, den)
    return loss, metrics
