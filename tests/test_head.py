"""The output layer in tiles (``mlx_lm_pref.head``): the same losses, metrics and gradients
as the whole logits for every objective in both batch layouts and every kind of output
layer, frozen or training; float64-close on a 262k vocabulary, the whole logits too; a
fraction of the memory; and the models it cannot serve keep the whole logits."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import random_batch, shared_layout, tiny_lora_model
from mlx.utils import tree_flatten

import mlx_lm_pref  # noqa: F401
from mlx_lm_pref.batching import PreferenceBatch
from mlx_lm_pref.config import ConfigError, PreferenceArgs
from mlx_lm_pref.head import (
    Head,
    chunkable,
    head_for,
    hidden_states,
    output_layer,
    resolve_head_chunks,
    tiled_token_stats,
)
from mlx_lm_pref.logps import logits_token_stats
from mlx_lm_pref.metrics import average_metrics
from mlx_lm_pref.objective import PreferenceLoss

pytestmark = pytest.mark.numerics

OBJECTIVES = [
    dict(loss_type="dpo"),
    dict(loss_type="dpo", use_weighting=True, ld_alpha=0.5),
    dict(loss_type="ipo,sft", loss_weights="1.0,0.5"),
    dict(loss_type="orpo"),
    dict(loss_type="simpo"),
    dict(loss_type="cpo", cpo_loss_type="hinge"),
]


def output_layers():
    """Tied embedding, untied lm_head, 4-bit lm_head (with a bias too), a bf16 model."""

    def quantized():
        model = tiny_lora_model(vocab_size=1000, tie_word_embeddings=False)
        model.lm_head = nn.QuantizedLinear.from_linear(model.lm_head, group_size=32)
        return model

    def quantized_with_bias():  # phi-2's and GPT-J's lm_head has a bias
        model = tiny_lora_model(vocab_size=1000, tie_word_embeddings=False)
        mx.random.seed(3)
        biased = nn.Linear(*model.lm_head.weight.shape[::-1], bias=True)
        biased.bias = mx.random.normal(biased.bias.shape)
        model.lm_head = nn.QuantizedLinear.from_linear(biased, group_size=32)
        model.lm_head.freeze()
        return model

    return {
        "tied": lambda: tiny_lora_model(vocab_size=1000),
        "lm_head": lambda: tiny_lora_model(vocab_size=1000, tie_word_embeddings=False),
        "q4": quantized,
        "q4+bias": quantized_with_bias,
        "bf16": lambda: _cast(tiny_lora_model(vocab_size=1000), mx.bfloat16),
    }


def _cast(model, dtype):
    model.set_dtype(dtype)
    return model


@pytest.mark.parametrize("kind", list(output_layers()))
@pytest.mark.parametrize("layout", ["rows", "shared"])
@pytest.mark.parametrize(
    "case", OBJECTIVES, ids=lambda c: "-".join(map(str, c.values()))
)
def test_tiles_give_the_whole_logits_numbers_and_gradients(case, layout, kind):
    model = output_layers()[kind]()
    assert chunkable(model) is None
    batch = random_batch(3)
    batch = batch if layout == "rows" else shared_layout(batch)
    results = []
    for chunk in ("0", "64"):  # 1000 rows: 15 whole tiles and a partial one
        loss = PreferenceLoss(PreferenceArgs(**case, head_chunk_size=chunk))
        (value, ntoks), grads = nn.value_and_grad(model, loss)(model, batch)
        values = average_metrics(loss.metric_names, np.array(model._pref_metrics)[None])
        results.append((value, ntoks, values, dict(tree_flatten(grads))))
    (a, n, ma, ga), (b, m, mb, gb) = results
    # bf16: the same logits (the target's rounded as the tiles' are), so the same values
    # to float32 noise (measured <= 7.2e-6); gradients in bf16 a rounding step (2^-7)
    # apart, measured <= 1.4e-2 of the largest.
    tol = 1e-5
    assert n.item() == m.item()
    assert abs(a.item() - b.item()) <= tol * max(1.0, abs(a.item()))
    assert mb.keys() == ma.keys()
    for name in ma:
        assert mb[name] == pytest.approx(ma[name], rel=tol, abs=tol), name
    scale = max(mx.abs(g).max().item() for g in ga.values())
    assert scale > 0
    grad_tol = 2e-2 if kind == "bf16" else tol
    for name, g in ga.items():
        assert mx.abs(g - gb[name]).max().item() <= grad_tol * scale, name


def float64_stats(h, weight, targets, bias=None):
    """Per position, in float64, of the logits h @ weight.T (+ bias): the target's
    log-prob, the entropy, log sum p^2, the vocab-mean logit, and the softmax p."""
    z = np.asarray(h, np.float64) @ np.asarray(weight, np.float64).T
    if bias is not None:
        z = z + np.asarray(bias, np.float64)
    m = z.max(-1, keepdims=True)
    lse = (np.log(np.exp(z - m).sum(-1, keepdims=True)) + m)[:, 0]
    p = np.exp(z - lse[:, None])
    return dict(
        logps=np.take_along_axis(z, targets[:, None], -1)[:, 0] - lse,
        entropy=lse - (p * z).sum(-1),
        log_sum_sq=np.log((p * p).sum(-1)),
        vocab_mean=z.mean(-1),
        p=p,
    )


def gemma_sized_head(positions, bias=False, seed=0):
    """A 262,145-row output layer (Gemma 3's vocabulary, its image token included) of
    hidden size 32, logits of a few nats of spread, hidden states and targets."""
    rng = np.random.default_rng(seed)
    V, H = 262_145, 32
    layer = nn.Linear(H, V, bias=bias)
    layer.weight = mx.array((rng.standard_normal((V, H)) * 0.5).astype(np.float32))
    if bias:
        layer.bias = mx.array(rng.standard_normal(V).astype(np.float32))
    h = mx.array(rng.standard_normal((positions, H)).astype(np.float32))
    return layer, h, mx.array(rng.integers(0, V, positions))


EXTRAS = frozenset({"entropy", "log_sum_sq", "vocab_mean"})


@pytest.mark.parametrize("path", ["tiles", "tiles, output layer training", "logits"])
def test_every_path_is_float64_close_on_a_262k_vocabulary(path):
    """Per-sequence log-prob sums and the per-token metrics within 1e-4 of float64 on
    Gemma 3's vocabulary, whichever way the output layer runs: in tiles (with a frozen
    output layer, and with one that trains, as in a ``--test``-only run where nothing is
    frozen), or whole (``head_chunk_size: 0``, or a layer the tiles cannot serve). One
    float32 reduction over the whole vocabulary is off by ~5e-4 per token (sequential
    summation on mlx's CPU), the entropy by as much relative (measured)."""
    rows, T = 4, 24
    layer, h, targets = gemma_sized_head(rows * T)
    want = float64_stats(h, layer.weight, np.array(targets))
    if path == "logits":
        stats = logits_token_stats(layer(h)[None], targets[None], EXTRAS, grad=True)
    elif path == "tiles":  # a reference or evaluation pass: no gradient
        layer.freeze()
        stats = tiled_token_stats(h, targets, Head(layer), EXTRAS, grad=False)
    else:
        stats = tiled_token_stats(h, targets, Head(layer), EXTRAS, grad=True)
    sums = np.array(stats.logps).reshape(rows, T).sum(-1)
    assert np.abs(sums - want["logps"].reshape(rows, T).sum(-1)).max() < 1e-4
    for name in EXTRAS:
        got = np.array(getattr(stats, name)).reshape(-1)
        assert np.abs(got - want[name]).max() < 1e-4 * np.abs(want[name]).max(), name


@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
def test_a_training_output_layer_gets_float64_gradients_through_tiles(bias):
    """The gradients of a weighted sum of token log-probs with respect to the hidden
    states and to the output layer's weight and bias, through the tiles, against float64:
    within 1e-5 of each gradient's largest entry on a 262k vocabulary. The whole float32
    logits' softmax, normalised by one sequential float32 sum, is off by ~5e-4 of it."""
    N = 32
    layer, h, targets = gemma_sized_head(N, bias=bias)
    c = mx.array(np.random.default_rng(1).standard_normal(N).astype(np.float32))

    def loss(params, h):
        layer.update(params)
        return (tiled_token_stats(h, targets, Head(layer)).logps * c).sum()

    params = layer.trainable_parameters()
    grads, grad_h = mx.grad(loss, argnums=(0, 1))(params, h)
    layer.update(params)
    want = float64_stats(h, layer.weight, np.array(targets), layer.get("bias"))
    # d sum_n c_n (z_n[target] - lse_n) / d z = c (onehot - p)
    dz = -np.asarray(c, np.float64)[:, None] * want["p"]
    dz[np.arange(N), np.array(targets)] += np.asarray(c, np.float64)
    expected = {
        "weight": dz.T @ np.asarray(h, np.float64),
        "h": dz @ np.asarray(layer.weight, np.float64),
    }
    if bias:
        expected["bias"] = dz.sum(0)
    got = {**grads, "h": grad_h}
    assert set(got) == set(expected)
    for name, value in expected.items():
        error = np.abs(np.array(got[name]) - value).max()
        assert error <= 1e-5 * np.abs(value).max(), name


@pytest.mark.parametrize("trains", [None, "tied"])
def test_tiles_need_a_fraction_of_the_memory(trains):
    """DPO's step (policy with its gradient, reference, metrics) on 2 pairs of 128 tokens
    with a 131,072-entry vocabulary: the whole float32 logits alone are 256 MB. Also where
    the output layer trains (its gradient, 16 MB here, comes tile by tile): the tied
    embedding (an untied lm_head takes the same path)."""
    model = tiny_lora_model(vocab_size=131072, tie_word_embeddings=trains == "tied")
    if trains:
        output_layer(model).unfreeze()
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(3, 131072, (4, 129)).astype(np.int32))
    spans = mx.array([[64, 129]] * 4, dtype=mx.int32)
    batch = PreferenceBatch(tokens, spans)
    peaks = {}
    for chunk in ("0", "auto"):
        loss = PreferenceLoss(PreferenceArgs(loss_type="dpo", head_chunk_size=chunk))
        step = nn.value_and_grad(model, loss)
        mx.eval(step(model, batch))  # warm: nothing of the first call stays
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(step(model, batch))
        peaks[chunk] = mx.get_peak_memory() - base
    # The whole path holds at least the logits and their gradient; above that its peak
    # depends on the machine's evaluation order (543 MB in CI, 810 MB on a 2-core box),
    # so the tiles are measured against that floor, not against the whole path's peak.
    whole = 2 * tokens.size * 131072 * 4
    assert peaks["0"] >= whole, peaks
    assert peaks["auto"] < 0.35 * whole, peaks  # 140 MB, tied 168 MB: under a third


def test_models_it_cannot_serve_keep_the_whole_logits(capsys):
    from mlx_lm.models import gemma2

    # a soft cap on the logits (Gemma 2): the probe sees the output is not the layer's
    args = gemma2.ModelArgs(
        model_type="gemma2", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
        vocab_size=40000, final_logit_softcapping=30.0, query_pre_attn_scalar=8,
    )  # fmt: skip
    capped = gemma2.Model(args)
    capped.freeze()  # as mlx_lm.lora leaves it (LoRA trains only adapters)
    assert "soft cap" in chunkable(capped)
    options = resolve_head_chunks(capped, PreferenceArgs(loss_type="dpo"))
    assert options.head_chunk_size == "0" and "tiles off" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="head_chunk_size 1024: the output layer"):
        resolve_head_chunks(
            capped, PreferenceArgs(loss_type="dpo", head_chunk_size=1024)
        )
    # a tiny vocabulary: auto keeps the whole logits, a size given tiles
    small = tiny_lora_model()
    assert head_for(small, "auto") == (None, None)
    assert head_for(small, "64")[1] == 64
    assert head_for(tiny_lora_model(vocab_size=40000), "auto")[0] is not None


def training_output_layers():
    """Output layers that train (a ``--test``-only run freezes nothing; full fine-tuning or
    a script may unfreeze them): tied, untied, untied with a bias, a bf16 model."""

    def untied(bias=False, dtype=None):
        model = tiny_lora_model(vocab_size=1000, tie_word_embeddings=False)
        if bias:  # phi-2's and GPT-J's lm_head has a bias
            mx.random.seed(3)
            model.lm_head = nn.Linear(*model.lm_head.weight.shape[::-1], bias=True)
            model.lm_head.bias = mx.random.normal(model.lm_head.bias.shape)
        return _cast(model, dtype) if dtype else model

    return {
        "tied": lambda: tiny_lora_model(vocab_size=1000),
        "lm_head": untied,
        "lm_head+bias": lambda: untied(bias=True),
        "bf16": lambda: untied(dtype=mx.bfloat16),
    }


@pytest.mark.parametrize("kind", list(training_output_layers()))
@pytest.mark.parametrize("layout", ["rows", "shared"])
@pytest.mark.parametrize(
    "case",
    [dict(loss_type="dpo", use_weighting=True), dict(loss_type="orpo")],
    ids=["dpo-wpo", "orpo"],
)
def test_an_output_layer_that_trains_gets_its_gradient_through_tiles(
    case, layout, kind
):
    """The output layer's weight (and bias) get the whole logits' gradients from the tiles;
    a tied embedding its input and output gradients added up; the rest of the model the
    same gradients as with the whole logits."""
    model = training_output_layers()[kind]()
    output_layer(model).unfreeze()
    names = ["bias", "weight"] if kind == "lm_head+bias" else ["weight"]
    batch = random_batch(4)
    batch = batch if layout == "rows" else shared_layout(batch)
    grads = []
    for chunk in ("0", "64"):
        loss = PreferenceLoss(PreferenceArgs(**case, head_chunk_size=chunk))
        grads.append(
            dict(tree_flatten(nn.value_and_grad(model, loss)(model, batch)[1]))
        )
    whole, tiled = grads
    prefix = "model.embed_tokens." if kind == "tied" else "lm_head."
    assert {f"{prefix}{name}" for name in names} <= set(tiled)
    scale = max(mx.abs(g).max().item() for g in whole.values())
    # bf16: gradients a rounding step (2^-7) apart, as in the test above
    tol = 2e-2 if kind == "bf16" else 1e-5
    for name, g in whole.items():
        assert mx.abs(g - tiled[name]).max().item() <= tol * scale, name
        if name.startswith(prefix):
            assert mx.abs(g).max().item() > 0, name


def test_a_quantized_output_layer_that_trains_keeps_the_whole_logits():
    """The tiles differentiate a plain weight and bias only."""
    model = output_layers()["q4"]()
    assert head_for(model, "64")[0] is not None
    model.lm_head.unfreeze()
    assert head_for(model, "64") == (None, None)


def test_hidden_states_feed_the_output_layer():
    model = tiny_lora_model(vocab_size=1000, tie_word_embeddings=False)
    x = mx.array([[1, 5, 9, 3]])
    whole = model(x)[0]
    tiled = Head(output_layer(model)).logits(hidden_states(model, x)[0], 100, 300)
    assert mx.abs(whole[:, 100:300] - tiled).max().item() < 1e-5


@pytest.mark.parametrize("value", ["1.5", "-1", "32", True, "big"])
def test_head_chunk_size_values(value):
    with pytest.raises(ConfigError, match="head_chunk_size must be auto, 0"):
        PreferenceArgs(head_chunk_size=value)
    assert PreferenceArgs(head_chunk_size=4096).head_chunk_size == "4096"
    assert math.isfinite(float(PreferenceArgs(head_chunk_size="0").head_chunk_size))


def test_a_wrapped_language_model_tiles():
    """mlx-lm's Gemma 3 (and Llama 4, Mistral 3, ...) wraps its text model in
    ``language_model``: its output layer is found there, the probe passes, and the tiles
    give the whole logits' log-probs."""
    from mlx_lm.models import gemma3

    text = dict(
        hidden_size=32, num_hidden_layers=2, intermediate_size=64, head_dim=8,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
        query_pre_attn_scalar=8, sliding_window_pattern=2, model_type="gemma3_text",
    )  # fmt: skip
    mx.random.seed(0)
    model = gemma3.Model(
        gemma3.ModelArgs(model_type="gemma3", text_config=text, vocab_size=5000)
    )
    model.freeze()
    assert chunkable(model) is None
    options = resolve_head_chunks(model, PreferenceArgs(loss_type="dpo"))
    head, _ = head_for(model, options.head_chunk_size)
    assert head is not None and head.vocab == 5000
    x = mx.array([[1, 5, 9, 3, 7, 2]])
    targets = mx.array([[5, 9, 3, 7, 2, 11]])
    whole = nn.log_softmax(model(x).astype(mx.float32))
    expected = mx.take_along_axis(whole, targets[..., None], -1)[..., 0]
    tiled = tiled_token_stats(hidden_states(model, x), targets, head, tile=1024)
    assert mx.abs(tiled.logps - expected).max().item() < 1e-5


def test_tiles_bound_the_weight_rows_too():
    """A tile's float32 weight rows (rows x hidden) stay within TILE_ELEMENTS as its logits
    (positions x rows) do: a short batch on a wide model gets narrower tiles."""
    from mlx_lm_pref.head import MAX_TILE, MIN_TILE, tile_size

    assert tile_size(16, 262144, 256) == MAX_TILE  # few positions, narrow model
    assert tile_size(16, 262144, 4096) == MIN_TILE  # few positions, wide model
    assert tile_size(2048, 151936, 1024) == 2048
    assert tile_size(16384, 151936, 1024) == MIN_TILE  # never fewer rows
    assert tile_size(16, 1000, 32) == 1000
