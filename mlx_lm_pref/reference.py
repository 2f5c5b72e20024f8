"""The DPO reference model, without a second copy of the weights.

Strategies (``reference`` option): ``adapters_off`` (the base model), ``initial_adapter`` (the
adapter as it was at step 0, for DPO after SFT), ``none`` (reference log-probs 0, TRL 0.x's
``reference_free``); ``auto`` picks per situation when training starts (``resolve_reference``).

``adapters_disabled(model)`` sets ``scale = 0`` on every adapter layer mlx-lm creates, so the
same forward pass computes the base model; the previous scales come back in ``finally``.
``scale`` is a Python float read at trace time, so inside mlx-lm's compiled step the reference
forward lands in the same graph as the policy forward.

DoRA layers need more than a zero scale: their output is rescaled by ``m / ||W + scale*BA||``
and the learned magnitude ``m`` moves away from ``||W||`` during training. For the reference
pass ``m`` is swapped for the base weight's own row norms, which makes the rescaling exactly 1.
"""

from contextlib import contextmanager
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

from .config import ConfigError

ADAPTER_LAYERS = (
    LoRALinear,
    LoRASwitchLinear,
    LoRAEmbedding,
    DoRALinear,
    DoRAEmbedding,
)
# Leaf names of the parameters mlx-lm's adapter layers train.
ADAPTER_PARAMETERS = {"lora_a", "lora_b", "m"}


def adapter_layers(model: nn.Module) -> list:
    return [m for _, m in model.named_modules() if isinstance(m, ADAPTER_LAYERS)]


def _base_magnitude(layer) -> mx.array:
    """Row norms of the base weight, computed as mlx-lm computes the initial ``m``."""
    if isinstance(layer, DoRALinear):
        w = layer._dequantized_weight()
    else:
        w = layer.embedding.weight
    # In float32, as the layers' own denominators are (a bf16 weight plus the float32
    # adapter product): a bf16 norm leaves m / d up to 2e-3 from 1.
    return mx.stop_gradient(mx.linalg.norm(w.astype(mx.float32), axis=1))


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run the enclosed forward passes as the base model (every adapter contributes 0).

    Restores each layer's exact previous ``scale`` (and DoRA ``m``) even if the block raises.
    """
    saved = []
    try:
        for layer in adapter_layers(model):
            saved.append((layer, layer.scale, getattr(layer, "m", None)))
            layer.scale = 0.0
            if isinstance(layer, (DoRALinear, DoRAEmbedding)):
                layer.m = _base_magnitude(layer)
        yield model
    finally:
        for layer, scale, m in reversed(saved):
            layer.scale = scale
            if m is not None:
                layer.m = m


def _trained(layer) -> bool:
    return bool(mx.any(layer.lora_b != 0).item())


def resolve_reference(model: nn.Module, strategy: str) -> str:
    """``auto``: precomputed under full fine-tuning; the initial adapter when training
    starts from adapter weights that were already trained (``--resume-adapter-file``: DPO
    after SFT); else the base model."""
    if strategy != "auto":
        return strategy
    layers = adapter_layers(model)
    if not layers:  # full fine-tuning: nothing to switch off
        return "precomputed"
    return "initial_adapter" if any(_trained(l) for l in layers) else "adapters_off"


class InitialAdapter:
    """The adapter tensors of step 0, for the ``initial_adapter`` reference.

    mlx arrays are immutable and the optimizer replaces them, so the current ones are the
    snapshot: no copy, and the base weights are never duplicated. Each is held through an
    evaluated ``stop_gradient`` of it, a new array on the same buffer: mlx-lm's compiled step
    swaps the parameters it was given for its own tracers, and would refuse the very arrays
    it swapped out if the reference pass used them. The snapshot lives as long as the run
    that took it (nothing is left on the model's layers).
    """

    def __init__(self, model: nn.Module, saved: Optional[dict] = None):
        """The adapter tensors ``model`` holds now, or those of ``saved`` (``arrays()``'s
        names, from a checkpoint: the step 0 of the run it continues)."""
        names = {id(m): name for name, m in model.named_modules()}
        if saved is not None:
            wanted = {
                f"{names[id(layer)]}.{k}"
                for layer in adapter_layers(model)
                for k in ADAPTER_PARAMETERS
                if k in layer
            }
            if wanted - set(saved):
                raise ConfigError(
                    f"the reference adapter has no {sorted(wanted - set(saved))[0]}: it "
                    "was trained with other layers (num_layers, lora_parameters.keys)."
                )
        self.tensors = [
            (
                layer,
                {
                    k: mx.stop_gradient(
                        saved[f"{names[id(layer)]}.{k}"] if saved else layer[k]
                    )
                    for k in ADAPTER_PARAMETERS
                    if k in layer
                },
            )
            for layer in adapter_layers(model)
        ]
        mx.eval([t for _, tensors in self.tensors for t in tensors.values()])

    def arrays(self, model: nn.Module) -> dict:
        """``{"<layer path>.<name>": tensor}``, as a checkpoint stores them."""
        names = {id(m): name for name, m in model.named_modules()}
        return {
            f"{names[id(layer)]}.{k}": v
            for layer, tensors in self.tensors
            for k, v in tensors.items()
        }

    @contextmanager
    def swapped_in(self, model: nn.Module):
        """Run the enclosed forward passes with the step-0 adapter tensors."""
        if {id(l) for l, _ in self.tensors} != {id(l) for l in adapter_layers(model)}:
            raise ValueError(
                "reference initial_adapter: this snapshot was taken of another model's "
                "adapter layers."
            )
        saved = []
        try:
            for layer, tensors in self.tensors:
                saved.append((layer, {k: layer[k] for k in tensors}))
                for k, v in tensors.items():
                    layer[k] = v
            yield model
        finally:
            for layer, current in reversed(saved):
                for k, v in current.items():
                    layer[k] = v


@contextmanager
def evaluation_mode(model: nn.Module):
    """The enclosed forward passes without dropout (TRL's ``disable_dropout``, on by
    default): a reference that is the same function at every step."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def reference_context(model: nn.Module, strategy: str, initial=None):
    """The model as the reference ``strategy`` sees it, for the enclosed forward passes, in
    evaluation mode (dropout off).

    ``auto`` outside a training run (a script scoring a batch itself) means the base model.
    """
    if strategy in ("auto", "adapters_off"):
        with adapters_disabled(model), evaluation_mode(model):
            yield model
    elif strategy == "initial_adapter":
        if initial is None:
            raise ValueError(
                "reference initial_adapter: no step-0 adapter was kept for this model "
                "(train() keeps it when training starts)."
            )
        with initial.swapped_in(model), evaluation_mode(model):
            yield model
    else:
        raise ValueError(f"reference {strategy!r} has no live forward pass.")


LIVE_REFERENCES = ("adapters_off", "initial_adapter")


def check_reference(model: nn.Module, options) -> None:
    """Refuse setups where the chosen reference would be missing or would drift."""
    if not options.needs_reference or options.reference not in LIVE_REFERENCES:
        return
    if not adapter_layers(model):
        raise ConfigError(
            f"loss_type {options.loss_type!r} uses the base model as its reference by "
            "switching the LoRA adapters off, but this model has no adapter layers "
            "(full fine-tuning). Use --fine-tune-type lora (or dora), "
            "--reference none, or a reference-free loss: --loss-type orpo."
        )
    drifting = [
        name
        for name, _ in tree_flatten(model.trainable_parameters())
        if name.rsplit(".", 1)[-1] not in ADAPTER_PARAMETERS
    ]
    if drifting:
        shown = ", ".join(drifting[:3]) + (" ..." if len(drifting) > 3 else "")
        raise ConfigError(
            f"reference {options.reference!r} computes the reference by switching the "
            f"adapters off, but {len(drifting)} trainable parameters are not adapter "
            f"weights ({shown}); the reference would move with the policy. Freeze them "
            "(model.freeze() before adding LoRA layers) or train them with a "
            "reference-free loss (--loss-type orpo)."
        )
