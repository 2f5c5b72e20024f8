"""The frozen layers below the first adapter: computed once, for the policy and the reference.

With LoRA on the top K of a model's L layers, the L - K layers below the first adapted one
compute the same thing in the policy pass and in the reference pass (no adapter there: the
same weights on the same input). The reference pass (adapters off, or the step-0 adapter)
therefore takes the policy pass's output of layer ``start - 1`` (``start``: the first
adapted layer) and runs only the layers from ``start`` up: with mlx-lm's default 16 LoRA
layers on a 30-layer model, 14 of its 30 layers are not recomputed.

mlx-lm's models cannot be entered at a layer index (their ``__call__`` embeds, builds the
masks and loops over ``self.layers``), so the layers below ``start`` are swapped for
stand-ins for the duration of a call: the policy pass *records* what layer ``start - 1``
returns (``recording``); in the reference pass (``entered_at``) layers ``0..start-2`` return
their input unchanged and layer ``start - 1`` returns the recorded output, so the model's own
``__call__`` still builds its masks and every layer from ``start`` sees exactly the policy's
input. No gradient flows into the recorded states (nothing below ``start`` trains). A stand-in
given a KV cache advances it as its layer would (the mask of prompt sharing's continuation
call is built from the first layer's cache: ``sharing.PromptCache``).

``frozen_layers_problem`` runs a probe both ways on the model before a run relies on it, so
an architecture whose layers cannot be entered this way (per-layer inputs, layers returning
tuples, a ``layers`` list the forward does not read) keeps today's whole reference pass.
"""

from contextlib import contextmanager
from typing import Optional

import mlx.core as mx

from .console import log
from .head import text_model
from .reference import ADAPTER_LAYERS, adapters_disabled, evaluation_mode
from .sharing import PROBE_TOLERANCE, padded, probe_pairs, shared_forward


def _is_adapter(module) -> bool:
    return isinstance(module, ADAPTER_LAYERS)


def _adapted(module) -> bool:
    return any(_is_adapter(m) for _, m in module.named_modules())


def first_adapted_layer(model) -> int:
    """The index in ``model.layers`` of the first layer holding an adapter: the number of
    frozen layers the policy and the reference share. 0 (nothing shared) without layers or
    adapters (full fine-tuning), or with an adapter outside the layers other than on the
    output layer (the embedding's)."""
    layers = getattr(model, "layers", None)
    if not layers:
        return 0
    start = next((i for i, layer in enumerate(layers) if _adapted(layer)), len(layers))
    inside = {
        id(m) for layer in layers for _, m in layer.named_modules() if _is_adapter(m)
    }
    # an untied output layer comes after every layer; a tied one is the embedding too
    head = text_model(model).get("lm_head")
    adapters = [m for _, m in model.named_modules() if _is_adapter(m)]
    before = [m for m in adapters if id(m) not in inside and m is not head]
    return 0 if before or not adapters else start


class _Recorder:
    """Layer ``start - 1`` during the policy pass: its outputs, one per model call."""

    def __init__(self, layer, outputs: list):
        self.layer, self.outputs = layer, outputs

    def __call__(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        self.outputs.append(out)
        return out

    def __getattr__(self, name):  # a model's loop may read its layers' attributes
        return getattr(self.layer, name)


class _StandIn:
    """A frozen layer in the reference pass: its input unchanged, or (the last one) the next
    recorded output. A KV cache it is given advances as the layer's own would."""

    def __init__(self, layer, outputs=None):
        self.layer, self.outputs = layer, outputs

    def __call__(self, x, *args, **kwargs):
        for cache in (*args, *kwargs.values()):
            if hasattr(cache, "update_and_fetch"):
                # keys and values of the right length, never computed: only their
                # shape reaches a mask
                blank = mx.zeros((x.shape[0], 1, x.shape[1], 1), x.dtype)
                cache.update_and_fetch(blank, blank)
        if self.outputs is None:
            return x
        return mx.stop_gradient(next(self.outputs))

    def __getattr__(self, name):
        return getattr(self.layer, name)


def _layer_list(model):
    """The list ``model``'s forward reads its layers from, and the index in it of
    ``model.layers[0]``: many of mlx-lm's models return a fresh slice of their inner
    model's list as ``layers`` (``PipelineMixin.pipeline_layers``)."""
    layers = model.layers
    inner = getattr(getattr(text_model(model), "model", None), "layers", None)
    if isinstance(inner, list) and layers:
        for i, layer in enumerate(inner):
            if layer is layers[0]:
                return inner, i
    return layers, 0


@contextmanager
def _swapped(model, stand_ins: dict):
    """``model.layers[i]`` is ``stand_ins[i]`` in the enclosed calls."""
    layers, first = _layer_list(model)
    saved = {first + i: layers[first + i] for i in stand_ins}
    try:
        for i, stand_in in stand_ins.items():
            layers[first + i] = stand_in
        yield
    finally:
        for i, layer in saved.items():
            layers[i] = layer


@contextmanager
def recording(model, start: int, outputs: list):
    """The enclosed calls of ``model`` append layer ``start - 1``'s output to ``outputs``."""
    if start <= 0:
        yield
        return
    with _swapped(model, {start - 1: _Recorder(model.layers[start - 1], outputs)}):
        yield


@contextmanager
def entered_at(model, start: int, outputs):
    """The enclosed calls of ``model`` skip layers ``0..start-1``: the k-th call takes
    ``outputs[k]`` (``recording``'s) as layer ``start - 1``'s output."""
    layers = model.layers
    replay = iter(outputs)
    stand_ins = {i: _StandIn(layers[i]) for i in range(start - 1)}
    stand_ins[start - 1] = _StandIn(layers[start - 1], replay)
    with _swapped(model, stand_ins):
        yield


def _both_ways(model, start, run):
    """``run(forward)``'s outputs (a list) as the reference computes them whole and
    entered at ``start`` from a policy pass; the largest difference relative to the
    largest entry, and the whole outputs."""
    body = lambda inputs, cache=None: model(inputs, cache=cache)  # noqa: E731
    outputs = []
    with recording(model, start, outputs):
        mx.eval(run(body))
    if not outputs:
        raise LookupError("its forward pass does not call the layers in model.layers")
    with adapters_disabled(model):
        whole = run(body)
        with entered_at(model, start, outputs):
            entered = run(body)
    error = max(mx.abs(a - b).max().item() for a, b in zip(whole, entered))
    scale = max(max(mx.abs(a).max().item() for a in whole), 1.0)
    return error / scale, whole[0]


def frozen_layers_problem(model, shared: bool) -> Optional[str]:
    """None if the reference pass entered at the first adapted layer reproduces the whole
    one on a probe batch (whole rows, and with ``shared`` the shared-prompt layout), else
    why not (a sentence)."""
    start = first_adapted_layer(model)
    vocab_size = getattr(getattr(model, "args", None), "vocab_size", 24)
    prompts, lengths, continuations, rows = probe_pairs(vocab_size)
    prompts, lengths = padded(prompts), mx.array(lengths)
    continuations, rows = padded(continuations), padded(rows)
    runs = [lambda body: [body(rows)]]
    if shared:
        runs.append(
            lambda body: list(
                shared_forward(body, model.layers, prompts, lengths, continuations)
            )
        )
    try:
        with evaluation_mode(model):
            for run in runs:
                error, whole = _both_ways(model, start, run)
                if not error <= PROBE_TOLERANCE.get(whole.dtype, 3e-2):
                    return (
                        f"entered at layer {start} its reference pass differs from the "
                        f"whole one by {error:.2g} (relative) on a probe batch"
                    )
    except Exception as e:  # layers that cannot stand in for one another
        return f"its layers cannot be entered at an index ({type(e).__name__}: {e})"
    return None


def resolve_frozen_layers(model, options):
    """Check ``model`` for sharing its frozen layers with the reference pass unless that is
    off or cannot apply (no live reference pass, an adapter in the first layer); ``auto``
    turns it off where the probe fails, saying so. Returns the options to train or
    evaluate with."""
    if options.share_frozen_layers == "false" or not options.live_reference:
        return options
    if first_adapted_layer(model) == 0:
        return options
    problem = frozen_layers_problem(model, options.prompt_sharing != "false")
    if problem is None:
        return options
    name = getattr(model, "model_type", type(model).__name__)
    log(f"frozen layers not shared with the reference: {name}: {problem}")
    return options.replace(share_frozen_layers="false")


def log_frozen_layers(model, options) -> None:
    """Say how many layers the reference pass takes from the policy's, where it does."""
    start = first_adapted_layer(model)
    if options.share_frozen_layers != "false" and options.live_reference and start:
        log(
            f"reference pass from layer {start} of {len(model.layers)}: the {start} "
            "frozen layers below the first adapter are the policy pass's"
        )
