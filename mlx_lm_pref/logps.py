"""Per-token and per-sequence log-probs from logits, in float32, with span masks.

Conventions (shared with mlx-lm's ``default_loss``): a batch row holds token ids ``x[0..L)``;
the model reads ``inputs = x[:, :-1]`` and predicts ``targets = x[:, 1:]``, so target column
``j`` is token ``j + 1``. A span ``[start, end)`` is given in token indices.
"""

from typing import NamedTuple, Optional

import mlx.core as mx


class TokenStats(NamedTuple):
    """Per position, float32: ``logps`` log pi(target | prefix), with a gradient; the others,
    metrics without one, only when asked for (``WANTS``)."""

    logps: mx.array
    entropy: Optional[mx.array] = None
    top1: Optional[mx.array] = None  # 1.0 where the target is the argmax
    vocab_mean: Optional[mx.array] = None
    log_sum_sq: Optional[mx.array] = None  # log sum_v p_v^2 (WPO)


WANTS = frozenset({"entropy", "top1", "vocab_mean", "log_sum_sq"})


def fused_cross_entropy() -> bool:
    """Whether mlx's fused cross-entropy kernel runs here: on Metal and CUDA, from mlx 0.32.2
    (on the CPU ``mx.fast.cross_entropy`` falls back to the unfused ops, reducing in the
    logits' dtype; before 0.32.2 it does not exist).
    """
    return mx.default_device() == mx.gpu and hasattr(mx.fast, "cross_entropy")


def token_logps(logits: mx.array, targets: mx.array, lse=None) -> mx.array:
    """log pi(target | prefix) for every position.

    Args:
        logits: (N, T, V), any float dtype.
        targets: (N, T) token ids.
        lse: (N, T) float32 ``logsumexp(logits)`` when the caller has it already.

    Returns:
        (N, T) float32 log-probs: logit[target] - logsumexp(logits); on a GPU without
        ``lse``, from mlx's fused kernel (float32 accumulation), as mlx-lm's SFT loss.
    """
    if lse is None and fused_cross_entropy():
        return -mx.fast.cross_entropy(logits, targets)
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return picked - (mx.logsumexp(logits, axis=-1) if lse is None else lse)


def token_entropy(logits: mx.array, lse: mx.array) -> mx.array:
    """Entropy of the next-token distribution at every position, -sum p log p, written as
    ``lse - sum p * logit`` so that it reuses the log-probs' logsumexp.

    Args:
        logits: (N, T, V), any float dtype.
        lse: (N, T) float32 ``logsumexp(logits)``.

    Returns:
        (N, T) float32.
    """
    logits = logits.astype(mx.float32)
    return lse - (mx.exp(logits - lse[..., None]) * logits).sum(axis=-1)


def logits_token_stats(logits, targets, want=frozenset(), grad=True) -> TokenStats:
    """``TokenStats`` from the whole logits (N, T, V) (see ``head`` for the tiled way)."""
    if not grad:
        logits = mx.stop_gradient(logits)
    lse = None
    if want & {"entropy", "log_sum_sq"}:  # reused by both: one full-vocabulary pass
        lse = mx.logsumexp(logits.astype(mx.float32), axis=-1)
    stats = {"logps": token_logps(logits, targets, lse)}
    metrics = mx.stop_gradient(logits)
    if "entropy" in want:
        stats["entropy"] = token_entropy(metrics, mx.stop_gradient(lse))
    if "top1" in want:
        stats["top1"] = (mx.argmax(metrics, axis=-1) == targets).astype(mx.float32)
    if "vocab_mean" in want:
        stats["vocab_mean"] = metrics.astype(mx.float32).mean(axis=-1)
    if "log_sum_sq" in want:
        double = mx.logsumexp(2 * metrics.astype(mx.float32), axis=-1)
        stats["log_sum_sq"] = double - 2 * mx.stop_gradient(lse)
    return TokenStats(**stats)


def span_mask(spans: mx.array, num_targets: int) -> mx.array:
    """Mask over target columns for token spans.

    Args:
        spans: (N, 2) int, ``[start, end)`` in token indices, ``start >= 1``.
        num_targets: T, the number of target columns (L - 1).

    Returns:
        (N, T) bool, True where target column j holds a token with start <= j + 1 < end.
    """
    token = mx.arange(1, num_targets + 1)
    return (token >= spans[:, 0:1]) & (token < spans[:, 1:2])


def sequence_logps(logps: mx.array, mask: mx.array) -> tuple:
    """Masked sum of token log-probs per row, and the number of tokens summed.

    Args:
        logps: (N, T) float32 token log-probs.
        mask: (N, T) bool.

    Returns:
        ``(sums, counts)``, each (N,) float32.
    """
    mask = mask.astype(mx.float32)
    return (logps * mask).sum(axis=-1), mask.sum(axis=-1)
