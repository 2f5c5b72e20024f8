"""Every path scores as training does: a ragged one-pair validation batch under aot, the
reference without dropout and without bf16 round-off in DoRA's norm, the guard telling a
skipped update from a non-finite metric, evaluation without gradients."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from helpers import lora, random_batch, read_metrics, tiny_lora_model, write_data
from mlx.utils import tree_flatten

import mlx_lm_pref  # noqa: F401
from mlx_lm_pref.config import PreferenceArgs
from mlx_lm_pref.metrics import metric_values, pack_metrics
from mlx_lm_pref.objective import METRICS_ATTRIBUTE, PreferenceLoss, sequence_logps_dpo
from mlx_lm_pref.reference import (
    InitialAdapter,
    adapter_layers,
    adapters_disabled,
    reference_context,
)
from mlx_lm_pref.safety import UPDATE_ATTRIBUTE, RunGuard


def test_aot_scores_a_one_pair_validation_batch(tiny_model, tmp_path):
    """17 validation pairs in batches of 2: the last holds one pair, which TRL computes
    (sorting one log-ratio changes nothing: aot is then sigmoid DPO). It used to raise
    inside the loss at the first validation."""
    data = write_data(tmp_path / "data", n_train=16, n_valid=17)
    out = tmp_path / "out"
    proc = lora(tiny_model, data, out, "--train", "--loss-type", "aot",
                "--batch-size", "2", "--iters", "2", "--num-layers", "2",
                "--steps-per-eval", "2", "--val-batches", "-1")  # fmt: skip
    assert "Traceback" not in proc.stderr
    val = [m for m in read_metrics(out) if m["split"] == "val"]
    assert [m["iteration"] for m in val] == [0, 1]  # mlx-lm logs it - 1
    assert all(np.isfinite(m["loss"]) for m in val)


def test_aot_on_one_pair_is_sigmoid_dpo():
    model = tiny_lora_model()
    batch = random_batch(3, pairs=1)
    aot, _, _ = PreferenceLoss(PreferenceArgs(loss_type="aot")).metrics(model, batch)
    dpo, _, _ = PreferenceLoss(PreferenceArgs(loss_type="dpo")).metrics(model, batch)
    assert aot.item() == pytest.approx(dpo.item(), abs=1e-6)


def dropout_model():
    mx.random.seed(0)
    model = tiny_lora_model(nonzero_adapter=False)
    for layer in adapter_layers(model):  # a trained adapter with LoRA dropout
        layer.dropout = nn.Dropout(0.5)
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
    return model


@pytest.mark.parametrize("strategy", ["initial_adapter", "adapters_off"])
def test_the_reference_runs_without_dropout(strategy):
    """In training mode (as every step runs) the reference is the same function at every
    step and equals the precomputed one (scored in evaluation mode); before, the
    initial-adapter reference drew a new dropout mask each time."""
    model = dropout_model()
    batch = random_batch(1)
    options = PreferenceArgs(loss_type="dpo", reference=strategy)
    initial = InitialAdapter(model)
    model.eval()
    with reference_context(model, strategy, initial):
        expected = np.array(sequence_logps_dpo(model, batch, options))
    model.train()
    for _ in range(3):
        with reference_context(model, strategy, initial):
            got = np.array(sequence_logps_dpo(model, batch, options))
        np.testing.assert_array_equal(got, expected)
    assert model.training  # and training mode comes back
    # the policy still trains with dropout: two passes differ
    a = np.array(sequence_logps_dpo(model, batch, options))
    assert not np.array_equal(a, np.array(sequence_logps_dpo(model, batch, options)))


def test_dora_reference_is_the_base_model_in_bf16():
    """DoRA on the embedding and on linear layers of a bf16 model: with the adapters off,
    each layer's rescaling m / ||W + 0 * BA|| is exactly 1. Its denominator is a float32
    norm (a bf16 weight plus the float32 adapter product), so m must be one too: a bf16
    norm left m / d up to 2.3e-3 from 1, and the reference was not the base model."""
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear

    mx.random.seed(1)
    model = tiny_lora_model(nonzero_adapter=False, vocab_size=500)
    model.set_dtype(mx.bfloat16)
    model.model.embed_tokens = DoRAEmbedding.from_base(
        (
            model.model.embed_tokens.embedding
            if hasattr(model.model.embed_tokens, "embedding")
            else model.model.embed_tokens
        ),
        r=4,
        scale=10.0,
    )
    layer = model.model.layers[-1].self_attn.q_proj
    model.model.layers[-1].self_attn.q_proj = DoRALinear.from_base(
        layer.linear if hasattr(layer, "linear") else layer, r=4, scale=10.0
    )
    dora = [
        m for m in adapter_layers(model) if isinstance(m, (DoRAEmbedding, DoRALinear))
    ]
    assert len(dora) == 2
    for layer in dora:  # trained: lora_b and m moved
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
        layer.m = layer.m * 1.1
    with adapters_disabled(model):
        for layer in dora:
            if isinstance(layer, DoRALinear):
                w = layer._dequantized_weight()
                product = (layer.scale * layer.lora_b.T) @ layer.lora_a.T
            else:
                w = layer.embedding.weight
                product = (layer.scale * layer.lora_a) @ layer.lora_b
            assert w.dtype == mx.bfloat16
            d = mx.linalg.norm(w + product, axis=1)  # as the layer computes it
            assert mx.abs(layer.m / d - 1).max().item() < 1e-6, type(layer).__name__
        tokens = mx.array([[1, 5, 9, 33, 200, 7, 42]])
        assert bool(mx.all(mx.isfinite(model(tokens))))


def compiled_step(model, optimizer, loss):
    """mlx-lm's training step, reduced: value_and_grad, update, in one compiled graph."""
    state = [model.state, optimizer.state]
    value_and_grad = nn.value_and_grad(model, loss)

    def step(batch):
        (value, _), grads = value_and_grad(model, batch)
        optimizer.update(model, grads)
        return value

    return mx.compile(step, inputs=state, outputs=state)


def poisoned_loss(names):
    """A finite loss whose gradient is NaN (d sqrt(x) / dx at 0), and finite metrics."""

    def loss(model, batch):
        w = next(v for k, v in tree_flatten(model.trainable_parameters()))
        value = mx.sqrt(mx.abs(w).sum() * 0.0) + 1.0
        model[METRICS_ATTRIBUTE] = pack_metrics(
            names, {n: (mx.array(1.0), mx.array(1.0)) for n in names}
        )
        return value, mx.array(1)

    return loss


def test_skip_counts_a_finite_loss_with_a_non_finite_gradient(tmp_path):
    """The guard reads whether the update was dropped, not whether the metrics were
    finite: a finite loss with a NaN gradient is a skipped update."""
    model = tiny_lora_model()
    names = ("loss",)
    guard = RunGuard(model, names, tmp_path / "adapters.safetensors", skip=True)
    optimizer = optim.SGD(learning_rate=0.1)
    stop = guard.start(optimizer)
    before = dict(tree_flatten(model.trainable_parameters()))
    step = compiled_step(model, optimizer, poisoned_loss(names))
    for batch in guard.watch(iter([1, 2])):
        assert np.isfinite(step(batch).item())
    guard.settle()
    stop()
    assert guard.skipped == [1, 2]
    for k, v in tree_flatten(model.trainable_parameters()):
        assert mx.array_equal(v, before[k]), k
    assert guard.take_steps().shape[0] == 0  # nothing to average
    assert METRICS_ATTRIBUTE not in model and UPDATE_ATTRIBUTE not in model


def test_stop_names_a_non_finite_gradient_under_a_finite_loss(tmp_path):
    from mlx_lm_pref.safety import NonFiniteError

    model = tiny_lora_model()
    guard = RunGuard(model, ("loss",), tmp_path / "adapters.safetensors")
    optimizer = optim.SGD(learning_rate=0.1)
    stop = guard.start(optimizer)
    step = compiled_step(model, optimizer, poisoned_loss(("loss",)))
    with pytest.raises(NonFiniteError, match="iteration 1: a gradient is not finite"):
        for batch in guard.watch(iter([1, 2])):
            step(batch)
    stop()


def test_a_non_finite_metric_with_a_finite_gradient_is_not_a_skipped_update(tmp_path):
    model = tiny_lora_model()
    guard = RunGuard(model, ("loss",), tmp_path / "adapters.safetensors", skip=True)
    guard.start(optimizer=optim.SGD(learning_rate=0.1))
    guard.iteration = 1
    model[METRICS_ATTRIBUTE] = mx.array([[float("nan"), 1.0]])
    guard.settle()
    assert guard.skipped == []  # the update was applied
    assert guard.take_steps().shape[0] == 0  # but the step is not averaged


def test_evaluation_asks_for_no_gradient():
    """``grad=False`` scores as training does (the tiles' forward without the custom
    gradient)."""
    model = tiny_lora_model(vocab_size=5000)
    batch = random_batch(2)
    loss = PreferenceLoss(PreferenceArgs(loss_type="dpo", reference="adapters_off"))
    train = metric_values(loss.metrics(model, batch)[2])
    evaluation = metric_values(loss.metrics(model, batch, grad=False)[2])
    for name, value in train.items():
        assert evaluation[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
