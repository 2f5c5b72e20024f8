"""The output layer in tiles: token log-probs and TRL's token metrics without the logits.

A preference step needs, per position, the log-prob of its target and a few summaries of the
next-token distribution: the entropy, the vocab-mean logit, whether the target is the argmax
and, for WPO, log sum p^2. With a real vocabulary (128k-262k entries) the (rows, positions,
vocabulary) logits, cast to float32 and exponentiated, are most of a step's memory. Here the
output layer runs over tiles of vocabulary rows instead, each reduced at once into running
per-position sums (an online log-sum-exp, Milakov & Gimelshein 2018), and the tiles are
chained (``mx.depends``) so that one is reduced before the next is computed: no array wider
than a tile ever exists.

Gradient: d lse / d h = softmax(z) @ W, which the forward pass accumulates tile by tile (q);
the custom VJP gives h the gradient g * q without recomputing a tile (as Liger-Kernel takes
its input gradient in the forward pass). Where the output layer trains (full fine-tuning, a script's
own unfreezing, and every weight in mlx-lm's ``--test``-only runs, which freeze nothing), its
weight and bias are primal inputs of the same VJP: d lse / d W[tile] = (g p[tile])^T h and
d lse / d b[tile] = sum_n g p[tile], tile by tile in the backward pass, which recomputes each
tile's logits (the per-row cotangent g is unknown in the forward pass; TRL 1.16's
``_ChunkedLogProbFunction`` recomputes them too), chained as the forward's tiles. The target's
logit is a gathered dot product with the layer's own (traced) weight, differentiated as
usual, so tied embeddings add up their input-embedding and output-layer gradients. A
quantized layer whose arrays train is left to the whole logits (``head_for``).

Precision: sums over a tile's vocabulary rows go through ``logps.blocked_sum`` (blocks of 64
entries, then blocks of the block sums). One float32 reduction over a 262k-wide axis is off
by ~5e-4 per token on mlx's CPU backend (sequential summation); tiles of blocks are off by
~1e-6 (measured against float64, see tests/test_head.py).
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .compat import quantization, result_dtype
from .config import ConfigError
from .console import log
from .logps import BLOCK, TokenStats, blocked_sum

F32 = mx.float32
# A tile holds about this many float32 logits (positions x vocabulary rows, 16 MiB), and its
# float32 weight rows (vocabulary rows x hidden) at most as many; never fewer than MIN_TILE
# rows (a batch of more than 4,096 positions has tiles of MIN_TILE rows, so larger ones).
TILE_ELEMENTS = 1 << 22
MIN_TILE, MAX_TILE = 1024, 16384
# Below this vocabulary the whole logits are as fast (measured: tiles 0-9% faster from 4096
# entries on, up to 20% slower on 512; benchmarks/RESULTS.md): no tiles.
MIN_VOCABULARY = 4096


class Head:
    """The output layer's weights: logits = x @ W.T (+ b), W of shape (V, H), plain or
    quantized (mlx's ``quantized_matmul`` on slices of rows). ``arrays`` (name -> array)
    stand in for the layer's own (``using``)."""

    def __init__(self, layer, arrays=None):
        self.layer = layer
        self.arrays = dict(arrays or {})
        self.quantized = isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        self.vocab = layer["weight"].shape[0]

    def _get(self, name):
        """The array ``name`` (None where the layer has none: an embedding's bias)."""
        return self.arrays[name] if name in self.arrays else self.layer.get(name)

    @property
    def weight(self):
        return self._get("weight")

    @property
    def bias(self):
        return self._get("bias")

    def using(self, arrays) -> "Head":
        """This head computing with ``arrays`` (name -> array) instead of the layer's own:
        a custom function's primal inputs, which its VJP gives a gradient."""
        return Head(self.layer, {**self.arrays, **arrays})

    def dtype(self, x):
        """The dtype of the logits of x, before the float32 cast: the model's."""
        w = self._get("scales") if self.quantized else self.weight
        return result_dtype(x.dtype, w.dtype)  # x @ w.T's promotion

    @property
    def trains(self) -> bool:
        """Whether the layer has trainable parameters."""
        return bool(tree_flatten(self.layer.trainable_parameters()))

    def trainable(self) -> dict:
        """The layer's weight and bias that train (name -> array): the tiles' VJP gives
        them their gradient. Empty for a quantized layer (its weight never trains; one
        whose scales or bias train keeps the whole logits: ``head_for``)."""
        if self.quantized:
            return {}
        trains = dict(tree_flatten(self.layer.trainable_parameters()))
        return {name: self._get(name) for name in ("weight", "bias") if name in trains}

    def _q(self):
        return quantization(self.layer)

    def logits(self, x, start=0, stop=None):
        """(N, stop - start) float32 logits of vocabulary rows [start, stop)."""
        w = self.weight[start:stop]
        if self.quantized:
            biases = self._get("biases")
            z = mx.quantized_matmul(
                x,
                w,
                scales=self._get("scales")[start:stop],
                biases=None if biases is None else biases[start:stop],
                transpose=True,
                **self._q(),
            )
        else:
            z = x @ w.T
        if self.bias is not None:
            z = z + self.bias[start:stop]
        return z.astype(F32)

    def _weight(self, index):
        """The float32 weight rows ``W[index]`` (dequantized for a quantized layer)."""
        w = self.weight[index]
        if self.quantized:
            biases = self._get("biases")
            w = mx.dequantize(
                w,
                scales=self._get("scales")[index],
                biases=None if biases is None else biases[index],
                **self._q(),
            )
        return w.astype(F32)

    def rows(self, ids):
        """(N, H) float32 weight rows of ``ids`` and (N,) their bias (or 0)."""
        bias = self.bias[ids].astype(F32) if self.bias is not None else 0.0
        return self._weight(ids), bias

    def transposed(self, g, start, stop):
        """g @ W[start:stop] in float32: (N, stop - start) -> (N, H)."""
        return g @ self._weight(slice(start, stop))


def text_model(model):
    """The language model of ``model``: itself, or the ``language_model`` it wraps (mlx-lm's
    Gemma 3, Llama 4, Mistral 3, Qwen2-VL... call it and return its output)."""
    return model["language_model"] if "language_model" in model else model


def output_layer(model):
    """The module ``model``'s forward ends with, or None: its ``lm_head``, or the input
    embedding used as the output layer (tied weights)."""
    model = text_model(model)
    if "lm_head" in model:
        return model["lm_head"]
    inner = model.get("model") if hasattr(model, "get") else None
    return getattr(inner, "embed_tokens", None)


def hidden_states(model, inputs, cache=None):
    """What ``model`` feeds its output layer: ``model.model(inputs, cache=cache)``."""
    return text_model(model).model(inputs, cache=cache)


PLAIN = (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding)


def chunkable(model) -> Optional[str]:
    """None if ``model(x)`` is ``Head(output_layer(model)).logits(hidden_states(model, x))``
    (a probe checks it), else why not (a sentence)."""
    layer = output_layer(model)
    if (
        layer is None
        or not isinstance(layer, PLAIN)
        or "model" not in text_model(model)
    ):
        return f"{type(model).__name__} has no plain output layer (lm_head or tied)"
    probe = mx.array([[1, 2, 3, 4]]) % max(Head(layer).vocab, 1)
    was_training = model.training
    model.eval()
    try:
        whole = model(probe).astype(F32)
        tiled = Head(layer).logits(hidden_states(model, probe)[0])
    except Exception as e:  # an architecture whose inner model takes other arguments
        return f"its inner model cannot be called alone ({e})"
    finally:
        model.train(was_training)
    error = mx.abs(whole[0] - tiled).max().item()
    if not error <= 1e-3 * max(mx.abs(whole).max().item(), 1.0):
        return "its output is not the output layer's alone (a soft cap or a scale)"
    return None


def tile_size(positions: int, vocab: int, hidden: int) -> int:
    """Vocabulary rows per tile: about TILE_ELEMENTS logits and weight entries, a multiple
    of BLOCK."""
    tile = max(MIN_TILE, min(MAX_TILE, TILE_ELEMENTS // max(positions, hidden, 1)))
    return min(tile - tile % BLOCK, vocab)


def _tile_pass(h, targets, head, tile, want, with_q, after=None):
    """One chained pass over the vocabulary tiles: ``(lse, q, extras)`` per row of h
    (N, H); q (N, H) = softmax @ W when ``with_q``. ``after``: arrays the first tile waits
    for (another pass's results: two passes in flight would hold twice the tiles)."""
    N, V = h.shape[0], head.vocab
    m = mx.full((N,), -float("inf"), F32)
    s = mx.zeros((N,), F32)
    q = mx.zeros(h.shape, F32) if with_q else None
    sx = mx.zeros((N,), F32) if "entropy" in want else None
    if "top1" in want:
        best, best_id = mx.full((N,), -float("inf"), F32), mx.zeros((N,), mx.int32)
    if "log_sum_sq" in want:
        m2, s2 = mx.full((N,), -float("inf"), F32), mx.zeros((N,), F32)
    x = h if after is None else mx.depends(h, after)
    for start in range(0, V, tile):
        stop = min(start + tile, V)
        if start:  # this tile after every use of the last one: one tile alive at a time
            running = [s, q, sx] + ([best_id] if "top1" in want else [])
            running += [s2] if "log_sum_sq" in want else []
            x = mx.depends(h, [v for v in running if v is not None])
        z = head.logits(x, start, stop)
        zmax = z.max(-1)
        new = mx.maximum(m, zmax)
        rescale = mx.exp(m - new)
        e = mx.exp(z - new[:, None])
        s = s * rescale + blocked_sum(e)
        if with_q:
            q = q * rescale[:, None] + head.transposed(e, start, stop)
        if sx is not None:
            sx = sx * rescale + blocked_sum(e * z)
        if "top1" in want:  # strict >: the first maximum wins, as argmax
            better = zmax > best
            best_id = mx.where(
                better, mx.argmax(z, -1).astype(mx.int32) + start, best_id
            )
            best = mx.maximum(best, zmax)
        if "log_sum_sq" in want:
            new2 = mx.maximum(m2, 2 * zmax)
            s2 = s2 * mx.exp(m2 - new2) + blocked_sum(mx.exp(2 * z - new2[:, None]))
            m2 = new2
        m = new
    lse = m + mx.log(s)
    extras = {}
    if sx is not None:
        extras["entropy"] = lse - sx / s
    if "top1" in want:
        extras["top1"] = (best_id == targets).astype(F32)
    if "log_sum_sq" in want:
        extras["log_sum_sq"] = m2 + mx.log(s2) - 2 * lse
    return lse, (q / s[:, None] if with_q else None), extras


def _layer_gradients(h, g, lse, head, tile, names):
    """The gradient of sum_n g_n lse_n with respect to the layer's arrays ``names``
    (``weight``, ``bias``), tile by tile: for p = exp(z - lse) the tile's softmax entries
    (N, tile), from its logits z recomputed from h (N, H), W[tile] gets (g p)^T h
    (tile, H) and b[tile] gets sum_n g_n p (tile,). Chained as the forward pass's tiles.

    Returns:
        the gradients, in ``names``' order, each of its array's shape and dtype.
    """
    dtypes = {name: getattr(head, name).dtype for name in names}
    parts = {name: [] for name in names}
    x, h32 = h, h.astype(F32)
    for start in range(0, head.vocab, tile):
        stop = min(start + tile, head.vocab)
        if start:  # as in _tile_pass: this tile after the last one's gradient
            x = mx.depends(h, [parts[name][-1] for name in names])
        gp = g[:, None] * mx.exp(head.logits(x, start, stop) - lse[:, None])
        if "weight" in parts:
            parts["weight"].append((gp.T @ h32).astype(dtypes["weight"]))
        if "bias" in parts:
            parts["bias"].append(gp.sum(0).astype(dtypes["bias"]))
    return [mx.concatenate(parts[name]) for name in names]


def _lse_with_gradient(head, targets, tile, want, names):
    """``lse(h, *arrays)``: ``_tile_pass``'s ``(lse, q, *extras in sorted order)`` of h
    (N, H), through ``head`` computing with ``arrays``, the layer's arrays ``names``
    (``Head.trainable``). Its VJP: d lse / d h = q, from the forward pass; the arrays'
    gradients from ``_layer_gradients``."""

    @mx.custom_function
    def lse(h, *arrays):
        bound = head.using(dict(zip(names, arrays)))
        value, q, extras = _tile_pass(h, targets, bound, tile, want, with_q=True)
        return (value, q, *(extras[k] for k in sorted(extras)))

    @lse.vjp
    def lse_vjp(primals, cotangents, outputs):
        # one primal (h alone) comes bare, several as a tuple
        h, *arrays = primals if names else (primals,)
        g, value, q = cotangents[0], outputs[0], outputs[1]
        dh = (g[:, None] * q).astype(h.dtype)
        if not names:
            return dh
        bound = head.using(dict(zip(names, arrays)))
        return (dh, *_layer_gradients(h, g, value, bound, tile, names))

    return lse


def tiled_token_stats(
    h, targets, head, want=frozenset(), grad=True, tile=None, after=None
):
    """``TokenStats`` of hidden states h (..., H) and targets (...) through ``head``.

    ``want`` names the extras (``WANTS``); only ``logps`` carries a gradient (with
    ``grad``: to h, and to the layer's weight and bias where they train), the extras are
    metrics. ``tile``: vocabulary rows per tile (``tile_size`` if None); ``after``: arrays
    the tiles wait for (see ``_tile_pass``).
    """
    shape = targets.shape
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    tile = tile or tile_size(h.shape[0], head.vocab, h.shape[1])
    wanted = want - {"vocab_mean"}
    if grad:
        trainable = head.trainable()
        names = sorted(trainable)
        lse = _lse_with_gradient(head, targets, tile, wanted, names)
        value, _, *rest = lse(h, *(trainable[name] for name in names))
        extras = dict(zip(sorted(wanted), rest))
    else:
        h = mx.stop_gradient(h)
        value, _, extras = _tile_pass(h, targets, head, tile, wanted, False, after)
    rows, bias = head.rows(targets)
    target_logits = (h.astype(F32) * rows).sum(-1) + bias
    if head.dtype(h) != F32:  # rounded as the tiles' logits are (and the whole logits)
        target_logits = target_logits.astype(head.dtype(h)).astype(F32)
    logps = target_logits - value
    stats = {"logps": logps if grad else mx.stop_gradient(logps)}
    stats.update({k: mx.stop_gradient(v) for k, v in extras.items()})
    if "vocab_mean" in want:
        stats["vocab_mean"] = vocab_mean(h, head)
    return TokenStats(**{k: v.reshape(shape) for k, v in stats.items()})


def vocab_mean(h, head) -> mx.array:
    """The vocab-mean logit of hidden states h (..., H), without a gradient: linear in h,
    h . mean(W) (+ mean b), so no tile is computed."""
    total, tile = 0.0, tile_size(1, head.vocab, h.shape[-1])
    for start in range(0, head.vocab, tile):  # the mean row, tile by tile
        stop = min(start + tile, head.vocab)
        total = total + head.transposed(mx.ones((1, stop - start), F32), start, stop)[0]
    mean = mx.stop_gradient(h).astype(F32) @ (total / head.vocab)
    if head.bias is not None:
        mean = mean + head.bias.astype(F32).mean()
    return mx.stop_gradient(mean)


def head_for(model, chunk_size: str):
    """``(Head, tile)`` to run ``model``'s output layer in tiles (tile None: sized per
    batch), or ``(None, None)`` for the whole logits: ``head_chunk_size`` ``0``, or
    ``auto`` on a small vocabulary or an output layer of another kind, or a quantized
    output layer whose arrays train (``chunkable`` checks a model before a run relies on
    it)."""
    if chunk_size == "0":
        return None, None
    layer = output_layer(model)
    if not isinstance(layer, PLAIN):
        return None, None
    head = Head(layer)
    if head.quantized and head.trains:  # the tiles differentiate plain weights only
        return None, None
    if chunk_size == "auto":
        return (head, None) if head.vocab >= MIN_VOCABULARY else (None, None)
    return head, int(chunk_size)


def resolve_head_chunks(model, options):
    """Check ``model`` once for the tiled output layer unless it is off; ``auto`` falls back
    to the whole logits (saying so, where tiles would have applied), a tile size given
    refuses. Returns the options to train or evaluate with."""
    if options.head_chunk_size == "0":
        return options
    problem = chunkable(model)
    if problem is None:
        return options
    if options.head_chunk_size != "auto":
        raise ConfigError(
            f"head_chunk_size {options.head_chunk_size}: the output layer cannot run in "
            f"tiles: {problem}. Set head_chunk_size auto or 0."
        )
    layer = output_layer(model)
    vocab = layer["weight"].shape[0] if layer is not None and "weight" in layer else 0
    if vocab == 0 or vocab >= MIN_VOCABULARY:  # unless tiles would not apply anyway
        log(f"output layer in tiles off: {problem}; the logits are computed whole")
    return options.replace(head_chunk_size="0")
