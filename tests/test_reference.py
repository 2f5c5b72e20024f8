"""The adapters-off reference: exact base-model outputs, scales restored, refusals."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import TINY_LLAMA
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers

import mlx_lm_pref  # noqa: F401
from mlx_lm_pref.config import PreferenceArgs
from mlx_lm_pref.reference import (
    InitialAdapter,
    adapter_layers,
    adapters_disabled,
    check_reference,
    resolve_reference,
)

DPO = PreferenceArgs(loss_type="dpo", reference="adapters_off")


def base_and_adapted(dora=False, keys=None):
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**TINY_LLAMA))
    mx.eval(model.parameters())
    tokens = mx.array([[1, 5, 9, 13, 7, 21, 3]])
    base_logits = model(tokens)
    model.freeze()
    params = {"rank": 4, "dropout": 0.0, "scale": 3.0}
    if keys:
        params["keys"] = keys
    linear_to_lora_layers(model, 2, params, use_dora=dora)
    # Move every adapter tensor, DoRA's magnitude included, as training would.
    moved = [
        (k, v + 0.1 * mx.random.normal(v.shape))
        for k, v in tree_flatten(model.trainable_parameters())
    ]
    model.update(tree_unflatten(moved))
    return model, tokens, base_logits


@pytest.mark.parametrize("dora", [False, True])
def test_adapters_off_gives_the_base_model(dora):
    model, tokens, base_logits = base_and_adapted(dora=dora)
    adapted = model(tokens)
    assert mx.abs(adapted - base_logits).max().item() > 1e-2  # the adapter matters
    with adapters_disabled(model):
        reference = model(tokens)
    np.testing.assert_allclose(np.array(reference), np.array(base_logits), atol=1e-5)
    # and everything is back afterwards
    np.testing.assert_allclose(np.array(model(tokens)), np.array(adapted), atol=1e-6)


def test_embedding_adapters_are_switched_off_too():
    model, tokens, base_logits = base_and_adapted(keys=["self_attn.q_proj"])
    model.model.embed_tokens = LoRAEmbedding.from_base(
        model.model.embed_tokens, r=4, scale=2.0
    )
    model.model.embed_tokens.lora_b = mx.random.normal(
        model.model.embed_tokens.lora_b.shape
    )
    with adapters_disabled(model):
        reference = model(tokens)
    np.testing.assert_allclose(np.array(reference), np.array(base_logits), atol=1e-5)


def test_scales_restored_after_an_exception():
    layers = [
        LoRALinear.from_base(nn.Linear(8, 8), r=2, scale=3.5),
        LoRASwitchLinear.from_base(SwitchLinear(8, 8, 4), r=2, scale=7.25),
        LoRAEmbedding.from_base(nn.Embedding(10, 8), r=2, scale=1.5),
        DoRALinear.from_base(nn.Linear(8, 8), r=2, scale=2.5),
        DoRAEmbedding.from_base(nn.Embedding(10, 8), r=2, scale=4.0),
    ]
    model = nn.Sequential(*layers)
    before = [(l.scale, np.array(getattr(l, "m", mx.zeros(1)))) for l in layers]
    assert len(adapter_layers(model)) == 5
    with pytest.raises(RuntimeError, match="boom"):
        with adapters_disabled(model):
            assert all(l.scale == 0.0 for l in layers)
            raise RuntimeError("boom")
    for l, (scale, m) in zip(layers, before):
        assert l.scale == scale
        np.testing.assert_array_equal(np.array(getattr(l, "m", mx.zeros(1))), m)


def test_full_fine_tuning_with_dpo_is_refused():
    model = llama.Model(llama.ModelArgs(**TINY_LLAMA))
    with pytest.raises(ValueError, match="no adapter layers.*--fine-tune-type lora"):
        check_reference(model, DPO)
    check_reference(model, PreferenceArgs(loss_type="orpo"))  # reference-free: fine


def test_trainable_non_adapter_weights_are_refused():
    model, _, _ = base_and_adapted()
    check_reference(model, DPO)
    model.model.norm.unfreeze()
    with pytest.raises(ValueError, match="model.norm.weight.*reference would move"):
        check_reference(model, DPO)


@pytest.mark.parametrize("dora", [False, True])
def test_initial_adapter_reference_is_the_adapter_at_step_0(dora):
    model, tokens, base_logits = base_and_adapted(dora=dora)
    at_start = model(tokens)
    initial = InitialAdapter(model)
    # training moves the adapter (the optimizer replaces the arrays)
    moved = [(k, v + 0.2) for k, v in tree_flatten(model.trainable_parameters())]
    model.update(tree_unflatten(moved))
    now = model(tokens)
    assert mx.abs(now - at_start).max().item() > 1e-2
    with initial.swapped_in(model):
        reference = model(tokens)
    np.testing.assert_allclose(np.array(reference), np.array(at_start), atol=1e-6)
    np.testing.assert_allclose(np.array(model(tokens)), np.array(now), atol=1e-6)
    # the snapshot is the run's, not the model's: nothing stays on the layers
    assert not [k for k, _ in tree_flatten(model.state) if "initial" in k]


def test_auto_reference_follows_the_adapter_state():
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**TINY_LLAMA))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "dropout": 0.0, "scale": 3.0})
    assert resolve_reference(model, "auto") == "adapters_off"  # fresh: lora_b == 0
    model, _, _ = base_and_adapted()  # trained adapter weights (e.g. resumed after SFT)
    assert resolve_reference(model, "auto") == "initial_adapter"
    assert resolve_reference(model, "adapters_off") == "adapters_off"  # explicit wins
