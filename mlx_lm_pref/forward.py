"""One forward pass over a training batch, in either layout, up to what the objectives read.

``run_model`` runs the model over a ``PreferenceBatch`` (pairs, KTO rows) or a
``grpo.RolloutBatch`` (sampled completions): whole rows, or the shared layout where each
prompt runs once for every row that continues it (``sharing``). With the output layer in
tiles (``head``) it stops at the hidden states and the objectives run the layer tile by tile;
else it returns the logits. ``temperature`` divides the logits (GRPO's and RLOO's log-probs
are the sampling distribution's, as TRL's): with tiles, the hidden states, which is the same
for a layer without a bias (one with a bias gets the whole logits).
"""

from contextlib import nullcontext
from functools import partial
from typing import NamedTuple, Optional

import mlx.core as mx

from .frozen import entered_at, first_adapted_layer, recording
from .head import Head, head_for, hidden_states, tiled_token_stats, vocab_mean
from .logps import TokenStats, logits_token_stats
from .sharing import shared_forward


class Forward(NamedTuple):
    """One forward pass over a preference batch, in either layout (see ``batching``).

    ``rows`` cover the rows the spans count in (whole rows, or in the shared layout the
    continuations) with ``targets`` (2B, T): the hidden states (2B, T, H) when ``head`` is
    set (the output layer then runs in tiles, ``head``), else the logits (2B, T, V). The
    shared layout adds each pair's prompt once: ``prompt`` (B, Tp, H or V),
    ``prompt_targets`` (B, Tp) and ``prompt_lengths`` (B,) real positions; the
    concatenated layout leaves them None.
    """

    rows: mx.array
    targets: mx.array
    head: Optional[Head] = None
    tile: Optional[int] = None
    prompt: Optional[mx.array] = None
    prompt_targets: Optional[mx.array] = None
    prompt_lengths: Optional[mx.array] = None
    # What the last frozen layer returned, one array per model call (``frozen``): the
    # reference pass over the same batch starts there; empty where nothing is shared.
    frozen: tuple = ()
    start: int = 0

    def _stats(self, x, targets, want, grad, after=None) -> TokenStats:
        if self.head is None:
            return logits_token_stats(x, targets, want, grad)
        return tiled_token_stats(x, targets, self.head, want, grad, self.tile, after)

    def stats(self, want=frozenset(), grad=True, after=None) -> TokenStats:
        """The rows' ``TokenStats`` (2B, T); with tiles, computed ``after`` those arrays."""
        return self._stats(self.rows, self.targets, want, grad, after)

    def prompt_stats(self, want=frozenset(), grad=True) -> Optional[TokenStats]:
        """The shared prompt's ``TokenStats`` (B, Tp), None in the concatenated layout."""
        if self.prompt is None:
            return None
        return self._stats(self.prompt, self.prompt_targets, want, grad)

    def prompt_vocab_mean(self) -> Optional[mx.array]:
        """The shared prompt's vocab-mean logits (B, Tp), without a gradient; None in the
        concatenated layout. With tiles, h . mean(W): no tile at all."""
        if self.prompt is None:
            return None
        if self.head is None:
            return mx.stop_gradient(self.prompt).astype(mx.float32).mean(axis=-1)
        return vocab_mean(mx.stop_gradient(self.prompt), self.head)

    def prompt_mask(self):
        """(B, Tp) bool, the real prompt positions; their targets are the tokens 1..P that
        chosen and rejected rows share."""
        columns = mx.arange(self.prompt_targets.shape[1])[None]
        return columns < self.prompt_lengths[:, None]


def _scaled(forward, scale):
    return lambda inputs, cache=None: forward(inputs, cache=cache) * scale


def run_model(model, batch, options, temperature=1.0, below=None) -> Forward:
    """The forward pass of ``batch``; with ``options.head_chunk_size`` resolved to tiles,
    up to the hidden states (the objectives run the output layer). ``temperature``
    divides the logits. ``below``: the policy's ``Forward`` of the same batch, whose frozen
    layers this pass (the reference's) takes instead of running them (``frozen``)."""
    head, tile = head_for(model, options.head_chunk_size)
    if head is not None and temperature != 1.0 and head.bias is not None:
        head = tile = None
    body = model if head is None else partial(hidden_states, model)
    if temperature != 1.0:
        body = _scaled(body, 1.0 / temperature)
    start, outputs = 0, []
    if below is not None and below.frozen:
        frozen_layers = entered_at(model, below.start, below.frozen)
    elif options.share_frozen_layers != "false" and options.live_reference:
        start = first_adapted_layer(model)
        frozen_layers = recording(model, start, outputs)
    else:
        frozen_layers = nullcontext()
    with frozen_layers:
        f = _forward(model, body, batch, head, tile)
    return f._replace(frozen=tuple(outputs), start=start)


def _forward(model, body, batch, head, tile) -> Forward:
    if not batch.shared:
        return Forward(body(batch.tokens[:, :-1]), batch.tokens[:, 1:], head, tile)
    prompts, lengths, rows = batch.tokens
    groups = getattr(batch, "groups", None)  # a rollout's prompt of each row
    prompt, continuations = shared_forward(
        body, model.layers, prompts[:, :-1], lengths, rows[:, :-1], groups
    )
    return Forward(
        continuations, rows[:, 1:], head, tile, prompt, prompts[:, 1:], lengths
    )
