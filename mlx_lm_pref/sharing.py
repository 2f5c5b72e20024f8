"""Prompt sharing: each pair's prompt goes through the model once, both completions on its
keys and values.

A preference pair's chosen and rejected rows start with the same tokens (the prompt), and a
causal model computes exactly the same activations for them. The shared layout
(``batching.collate_shared``) runs the pair's ``P`` shared input tokens once, as a (B, P)
batch, then the chosen and rejected continuations as a (2B, C) batch that attends to the
prompt's keys and values through ``PromptCache``. A step then costs ``B*P + 2B*C`` positions
instead of ``2B*(P + C)``, and the gradient reaches the prompt through the cached keys and
values (``mx.concatenate`` is differentiable), so losses and gradients are the concatenated
forward's.

It works through the KV-cache protocol of mlx-lm's models: ``cache.offset`` for the rotary
positions (a per-row array here, so each continuation starts right after its own prompt) and
``cache.make_mask`` for the attention mask (``base.create_attention_mask`` asks the cache).
``check_prompt_sharing`` runs a small probe pair both ways on the model itself before a run
relies on it, so an architecture that handles positions or masks its own way is caught
instead of silently trained on wrong activations.
"""

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask

from .config import ConfigError
from .console import log

# Shared logits within this of the concatenated ones (relative to their largest magnitude)
# pass the probe: float32 agrees to ~1e-6, half precision to ~1e-2; a model that mishandles
# positions or the mask is off by O(1).
PROBE_TOLERANCE = {mx.float32: 1e-4, mx.float16: 3e-2, mx.bfloat16: 3e-2}


class PromptCache:
    """One layer's cache for ``shared_forward``'s two calls.

    The prompt call stores the layer's keys and values (B, heads, P, D) as they are, graph
    included; the continuation call prepends them, once for the chosen rows and once for the
    rejected ones, to its own (2B, heads, C, D), and masks each row's prompt padding.
    """

    def __init__(self, prompt_lengths: mx.array, index=None):
        self.lengths = prompt_lengths  # (B,) real prompt positions per prompt row
        # Which prompt row each continuation reads: a pair's chosen and rejected rows
        # (0..B-1 twice), or a GRPO group's G completions.
        self.index = index
        self.offset = 0
        self.keys = self.values = None

    def _rows(self, x):
        if self.index is None:
            return mx.concatenate([x, x])
        return x[self.index]

    def update_and_fetch(self, keys, values):
        if self.keys is None:
            self.keys, self.values = keys, values
            # Continuation j of a row sits at position P + j, as in the whole row.
            self.offset = self._rows(self.lengths)
            return keys, values
        return (
            mx.concatenate([self._rows(self.keys), keys], axis=2),
            mx.concatenate([self._rows(self.values), values], axis=2),
        )

    def make_mask(self, N, return_array=False, window_size=None):
        if self.keys is None:  # the prompt call: right padding needs only causality
            if window_size is None and not return_array:
                return "causal"
            return create_causal_mask(N, window_size=window_size)
        P = self.keys.shape[2]
        rows = self.offset.shape[0]
        query = mx.arange(N)[None, :, None] + self.offset[:, None, None]  # (2B, N, 1)
        key = mx.concatenate(
            [
                mx.broadcast_to(mx.arange(P), (rows, P)),
                mx.arange(N) + self.offset[:, None],
            ],
            axis=1,
        )[:, None]
        # Prompt keys up to the row's own prompt length; own keys causally.
        valid = mx.arange(P + N) < P
        valid = (valid & (key < self.offset[:, None, None])) | (~valid & (key <= query))
        if window_size is not None:
            valid = valid & (query < key + window_size)
        return valid[:, None]  # (2B, 1, N, P + N)


def shared_forward(forward, layers, prompts, prompt_lengths, continuations, index=None):
    """Outputs of ``forward(inputs, cache=cache)`` (the model, or its hidden states) for a pair
    batch in the shared layout.

    Args:
        forward: the model, or ``partial(head.hidden_states, model)``.
        layers: the model's layers (one cache each).
        prompts: (B, P) int, each pair's shared input tokens, right-padded.
        prompt_lengths: (B,) int, the real length of each prompt row.
        continuations: (2B, C) int, chosen rows then rejected rows: the tokens that follow
            the pair's shared inputs, right-padded; or (N, C) rows of ``index``'s prompts.
        index: None for pairs; else (N,) int, the prompt row of each continuation (a GRPO
            group's completions share one prompt row).

    Returns:
        ``(prompt outputs (B, P, ...), outputs (2B, C, ...))``: what the concatenated
        forward computes at those positions of the whole rows. Unused prompt outputs cost
        nothing: the graph is lazy, so the output layer never runs on the prompt unless they
        are read.
    """
    cache = [PromptCache(prompt_lengths, index) for _ in layers]
    prompt_outputs = forward(prompts, cache=cache)
    return prompt_outputs, forward(continuations, cache=cache)


def probe_pairs(vocab_size):
    """Two pairs with prompts of 6 and 3 inputs and continuations of 1 to 4 tokens (chosen,
    then rejected): ``(prompts, lengths, continuations, rows)``, the token lists (the whole
    rows too) and the prompts' lengths."""
    ids = [(7 * i + 3) % vocab_size for i in range(24)]
    prompts, lengths = [ids[:6], ids[6:9]], [6, 3]
    continuations = [ids[9:12], ids[12:16], ids[16:18], ids[18:19]]
    rows = [prompts[k % 2] + c for k, c in enumerate(continuations)]
    return prompts, lengths, continuations, rows


def padded(sequences, width=10):
    return mx.array([s + [0] * (width - len(s)) for s in sequences])


def _probe(model, vocab_size):
    """The probe pairs run as whole rows and shared; the largest logit difference over the
    real positions, relative to the largest logit, and the whole rows' logits."""
    prompts, lengths, continuations, rows = probe_pairs(vocab_size)
    whole = model(padded(rows))
    prompt_logits, logits = shared_forward(
        model, model.layers, padded(prompts), mx.array(lengths), padded(continuations)
    )
    error = 0.0
    for k, c in enumerate(continuations):
        P = lengths[k % 2]
        for got, want in (
            (prompt_logits[k % 2, :P], whole[k, :P]),
            (logits[k, : len(c)], whole[k, P : P + len(c)]),
        ):
            error = max(error, mx.abs(got - want).max().item())
    return error / max(mx.abs(whole).max().item(), 1.0), whole


CHECKPOINTING = (
    "gradient checkpointing (grad_checkpoint) recomputes each layer without the prompt's "
    "cached keys and values, so the gradient through them would be lost"
)


def checkpointed(model) -> bool:
    """Whether mlx-lm's ``grad_checkpoint`` wrapped the model's layers (it replaces the
    layer class's ``__call__``)."""
    call = type(model.layers[0]).__call__ if getattr(model, "layers", None) else None
    return getattr(call, "__qualname__", "").startswith("grad_checkpoint")


def prompt_sharing_problem(model, grad_checkpoint=False):
    """None if ``shared_forward`` reproduces ``model``'s own forward on a probe pair and its
    gradients can flow through the cache, else why not (a sentence)."""
    if not hasattr(model, "layers"):
        return f"{type(model).__name__} does not expose its layers"
    if grad_checkpoint or checkpointed(model):
        return CHECKPOINTING
    vocab_size = getattr(getattr(model, "args", None), "vocab_size", 24)
    was_training = model.training
    model.eval()  # no dropout: both forwards must see the same weights
    try:
        error, reference = _probe(model, vocab_size)
    except Exception as e:  # an architecture whose attention cannot take this cache
        return f"its forward pass does not accept the shared-prompt cache ({e})"
    finally:
        model.train(was_training)
    tolerance = PROBE_TOLERANCE.get(reference.dtype, 3e-2)
    if not error <= tolerance:
        return (
            f"the shared-prompt forward differs from its own by {error:.2g} (relative) on "
            "a probe pair"
        )
    return None


def resolve_prompt_sharing(model, options, grad_checkpoint=False):
    """Check ``model`` for prompt sharing unless it is off; ``auto`` turns it off (and says
    so) where the probe fails or the layers will be checkpointed, ``true`` refuses.
    Returns the options to train or evaluate with."""
    if options.prompt_sharing == "false":
        return options
    problem = prompt_sharing_problem(model, grad_checkpoint)
    if problem is None:
        return options
    name = getattr(model, "model_type", type(model).__name__)
    if options.prompt_sharing == "true":
        raise ConfigError(
            f"prompt_sharing true: {name} cannot share prompts: {problem}. "
            "Set prompt_sharing false (or auto)."
        )
    log(f"prompt sharing off: {name}: {problem}")
    return options.replace(prompt_sharing="false")
