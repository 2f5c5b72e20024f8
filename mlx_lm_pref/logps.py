"""Per-token and per-sequence log-probs from logits, in float32, with span masks.

Conventions (shared with mlx-lm's ``default_loss``): a batch row holds token ids ``x[0..L)``;
the model reads ``inputs = x[:, :-1]`` and predicts ``targets = x[:, 1:]``, so target column
``j`` is token ``j + 1``. A span ``[start, end)`` is given in token indices.

Reductions over the vocabulary (``blocked_sum``, ``logsumexp``) go in blocks: one float32 sum
over a 262k-wide axis on mlx's CPU (sequential) drops the low-probability tail (the
log-sum-exp off by ~5e-4 per token, the entropy by up to ~1% on Gemma 3's vocabulary); blocks
of 64 entries, then blocks of the blocks' results, stay within ~1e-6 of float64
(tests/test_head.py, tests/test_eval_exact.py).
"""

from typing import NamedTuple, Optional

import mlx.core as mx

from .compat import has_fused_cross_entropy

F32 = mx.float32
BLOCK = 64  # entries per float32 reduction over the vocabulary


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
    return mx.default_device() == mx.gpu and has_fused_cross_entropy()


def _in_blocks(x: mx.array, reduce) -> mx.array:
    """``reduce`` (``mx.sum``, ``mx.logsumexp``) over the last axis, (..., n) -> (...): over
    blocks of BLOCK entries, then over the blocks' results the same way, so that no float32
    reduction has more than BLOCK terms (a 262k axis: three levels)."""
    n = x.shape[-1]
    if n <= BLOCK:
        return reduce(x, axis=-1)
    whole = n - n % BLOCK
    parts = reduce(x[..., :whole].reshape(*x.shape[:-1], -1, BLOCK), axis=-1)
    if n % BLOCK:
        rest = reduce(x[..., whole:], axis=-1, keepdims=True)
        parts = mx.concatenate([parts, rest], axis=-1)
    return _in_blocks(parts, reduce)


def blocked_sum(x: mx.array) -> mx.array:
    """Sum over the last axis, (..., n) -> (...), in blocks (``_in_blocks``)."""
    return _in_blocks(x, mx.sum)


@mx.custom_function
def logsumexp(x: mx.array) -> mx.array:
    """log sum exp over the last axis, (..., n) -> (...): ``mx.logsumexp`` over blocks of
    BLOCK entries, then over the blocks' values the same way."""
    return _in_blocks(x, mx.logsumexp)


@logsumexp.vjp
def _logsumexp_vjp(x, cotangent, lse):
    # The softmax, as mx.logsumexp's own VJP, in one pass. Differentiating the blocks
    # instead pads the slices' gradients to the whole width and adds them up: measured,
    # log-probs forward and backward 14% slower on 1,000 entries, 38% on 262,145.
    return cotangent[..., None] * mx.exp(x - lse[..., None])


def vocabulary_stats(logits: mx.array, lse: mx.array, want=frozenset()) -> dict:
    """The metrics of ``want`` that sum over the vocabulary, without a gradient, each a
    ``blocked_sum``.

    Args:
        logits: (..., V), any float dtype.
        lse: (...) float32 ``logsumexp(logits)``.

    Returns:
        a dict of (...) float32 arrays, as asked: ``entropy`` (-sum p log p),
        ``log_sum_sq`` (log sum p^2), ``vocab_mean`` (the mean logit).
    """
    z = mx.stop_gradient(logits).astype(F32)
    stats = {}
    if want & {"entropy", "log_sum_sq"}:
        log_p = z - mx.stop_gradient(lse)[..., None]
        p = mx.exp(log_p)
        if "entropy" in want:  # terms >= 0: nothing cancels, unlike lse - sum p z
            stats["entropy"] = -blocked_sum(p * log_p)
        if "log_sum_sq" in want:
            stats["log_sum_sq"] = mx.log(blocked_sum(p * p))
    if "vocab_mean" in want:
        stats["vocab_mean"] = blocked_sum(z) / z.shape[-1]
    return stats


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
    logits = logits.astype(F32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return picked - (logsumexp(logits) if lse is None else lse)


def logits_token_stats(logits, targets, want=frozenset(), grad=True) -> TokenStats:
    """``TokenStats`` from the whole logits (N, T, V) (see ``head`` for the tiled way)."""
    if not grad:
        logits = mx.stop_gradient(logits)
    lse = None
    if want & {"entropy", "log_sum_sq"}:  # reused by both and the log-probs
        lse = logsumexp(logits.astype(F32))
    stats = vocabulary_stats(logits, lse, want)
    stats["logps"] = token_logps(logits, targets, lse)
    if "top1" in want:
        top = mx.argmax(mx.stop_gradient(logits), axis=-1)
        stats["top1"] = (top == targets).astype(F32)
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
