"""The DPO reference model, without a second copy of the weights.

``adapters_disabled(model)`` sets ``scale = 0`` on every adapter layer mlx-lm creates, so the
same forward pass computes the base model; the previous scales come back in ``finally``.
``scale`` is a Python float read at trace time, so inside mlx-lm's compiled step the reference
forward lands in the same graph as the policy forward.

DoRA layers need more than a zero scale: their output is rescaled by ``m / ||W + scale*BA||``
and the learned magnitude ``m`` moves away from ``||W||`` during training. For the reference
pass ``m`` is swapped for the base weight's own row norms, which makes the rescaling exactly 1.
"""

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

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
        w = layer._dequantized_weight().astype(mx.float32)
    else:
        w = layer.embedding.weight
    return mx.stop_gradient(mx.linalg.norm(w, axis=1))


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


def check_reference(model: nn.Module, options) -> None:
    """Refuse setups where switching adapters off would not give a fixed reference."""
    if not options.needs_reference:
        return
    if not adapter_layers(model):
        raise ValueError(
            f"loss_type {options.loss_type!r} uses the base model as its reference by "
            "switching the LoRA adapters off, but this model has no adapter layers "
            "(full fine-tuning). Use --fine-tune-type lora (or dora), or a "
            "reference-free loss: --loss-type orpo."
        )
    drifting = [
        name
        for name, _ in tree_flatten(model.trainable_parameters())
        if name.rsplit(".", 1)[-1] not in ADAPTER_PARAMETERS
    ]
    if drifting:
        shown = ", ".join(drifting[:3]) + (" ..." if len(drifting) > 3 else "")
        raise ValueError(
            f"reference {options.reference!r} computes the reference by switching the "
            f"adapters off, but {len(drifting)} trainable parameters are not adapter "
            f"weights ({shown}); the reference would move with the policy. Freeze them "
            "(model.freeze() before adding LoRA layers) or train them with a "
            "reference-free loss (--loss-type orpo)."
        )
