"""The DPO sigmoid and ORPO objectives against an independent numpy implementation of the
formulas, on the same logits from a tiny Llama with a non-trivial LoRA adapter."""

import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_LLAMA
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama
from mlx_lm.tuner.utils import linear_to_lora_layers

import mlx_lm_pref  # noqa: F401
from mlx_lm_pref.batching import collate
from mlx_lm_pref.config import PreferenceArgs
from mlx_lm_pref.data import Pair
from mlx_lm_pref.losses import log1mexp
from mlx_lm_pref.objective import METRICS, preference_loss
from mlx_lm_pref.reference import adapters_disabled


def tiny_lora_model(seed=0, nonzero_adapter=True):
    mx.random.seed(seed)
    args = llama.ModelArgs(**TINY_LLAMA)
    model = llama.Model(args)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "dropout": 0.0, "scale": 2.0})
    if nonzero_adapter:  # a trained-looking adapter, so policy != reference
        lora_b = [
            (k, mx.random.normal(v.shape) * 0.05)
            for k, v in tree_flatten(model.trainable_parameters())
            if k.endswith("lora_b")
        ]
        model.update(tree_unflatten(lora_b))
    mx.eval(model.parameters())
    return model


def random_pairs(rng, n=3):
    pairs = []
    for _ in range(n):
        p = [1] + list(rng.integers(3, 50, rng.integers(2, 6)))
        c = p + list(rng.integers(3, 50, rng.integers(1, 7)))
        r = p + list(rng.integers(3, 50, rng.integers(1, 7)))
        pairs.append(Pair(c, r, len(p)))
    return pairs


def np_logps(logits, tokens):
    """(N, L-1) log-probs of tokens[:, 1:] under logits, float64."""
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(
        -1
    )
    tgt = tokens[:, 1:]
    return np.take_along_axis(logits, tgt[..., None], -1)[..., 0] - lse


def np_log_sigmoid(x):
    return -np.logaddexp(0, -x)


def np_reference(model, tokens, spans, loss_type, beta):
    """Straight from the papers / TRL_SEMANTICS.md, in float64 numpy."""
    tokens_np = np.array(tokens)
    spans_np = np.array(spans)
    inputs = tokens[:, :-1]
    lp = np_logps(model(inputs), tokens_np)
    with adapters_disabled(model):
        ref = np_logps(model(inputs), tokens_np)
    T = lp.shape[1]
    pos = np.arange(1, T + 1)
    comp = (pos >= spans_np[:, :1]) & (pos < spans_np[:, 1:])
    B = len(tokens_np) // 2
    s, rs, n = (lp * comp).sum(1), (ref * comp).sum(1), comp.sum(1)
    if loss_type == "dpo":
        cr, rr = beta * (s[:B] - rs[:B]), beta * (s[B:] - rs[B:])
        loss = np.mean(-np_log_sigmoid(cr - rr))
        return [
            loss,
            cr.mean(),
            rr.mean(),
            (cr > rr).mean(),
            (cr - rr).mean(),
            s[:B].mean(),
            s[B:].mean(),
        ]
    a = s / n
    whole = (pos >= 1) & (pos < spans_np[:B, 1:])
    nll = -(lp[:B] * whole).sum() / whole.sum()
    log1mexp_np = lambda x: np.log(-np.expm1(x))
    log_odds = (a[:B] - a[B:]) - (log1mexp_np(a[:B]) - log1mexp_np(a[B:]))
    ratio = np_log_sigmoid(log_odds)
    loss = nll - beta * ratio.mean()
    cr, rr = beta * a[:B], beta * a[B:]
    return [
        loss,
        cr.mean(),
        rr.mean(),
        (cr > rr).mean(),
        (cr - rr).mean(),
        a[:B].mean(),
        a[B:].mean(),
        nll,
        ratio.mean(),
        log_odds.mean(),
    ]


@pytest.mark.parametrize(
    "loss_type,beta", [("dpo", 0.1), ("dpo", 0.5), ("orpo", 0.1), ("orpo", 1.0)]
)
def test_matches_numpy(loss_type, beta):
    model = tiny_lora_model()
    tokens, spans = collate(random_pairs(np.random.default_rng(0), 4), 2048)
    options = PreferenceArgs(loss_type=loss_type, beta=beta)
    loss, ntoks = preference_loss(model, tokens, spans, options.as_constants())
    ours = model._pref_metrics.tolist()
    expected = np_reference(model, tokens, spans, loss_type, beta)
    assert len(ours) == len(METRICS[loss_type]) == len(expected)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)
    assert abs(loss.item() - expected[0]) < 1e-5
    assert ntoks.item() == int(np.array(spans)[:, 1].sum())


def test_first_dpo_loss_is_ln2_with_a_fresh_adapter():
    model = tiny_lora_model(nonzero_adapter=False)  # mlx-lm initialises lora_b to zero
    tokens, spans = collate(random_pairs(np.random.default_rng(1), 4), 2048)
    loss, _ = preference_loss(
        model, tokens, spans, PreferenceArgs(loss_type="dpo").as_constants()
    )
    assert abs(loss.item() - math.log(2)) < 1e-6
    metrics = dict(zip(METRICS["dpo"], model._pref_metrics.tolist()))
    assert metrics["rewards/chosen"] == metrics["rewards/rejected"] == 0.0
    assert metrics["rewards/accuracies"] == 0.0  # strict >, as TRL


def test_dpo_gradient_reaches_only_the_policy_pass():
    """The reference pass is gradient-free: with a fresh adapter the gradient equals the one
    of the policy log-ratio term alone, which is non-zero."""
    import mlx.nn as nn

    model = tiny_lora_model(nonzero_adapter=False)
    tokens, spans = collate(random_pairs(np.random.default_rng(2), 2), 2048)
    constants = PreferenceArgs(loss_type="dpo").as_constants()
    (_, _), grads = nn.value_and_grad(model, preference_loss)(
        model, tokens, spans, constants
    )
    norms = [mx.abs(g).sum().item() for _, g in tree_flatten(grads)]
    assert any(n > 0 for n in norms)
    assert all(math.isfinite(n) for n in norms)


def test_log1mexp_is_accurate_and_has_finite_gradients():
    x = mx.array([-1e-6, -0.1, -0.69, -0.7, -5.0, -50.0])
    expected = [math.log(-math.expm1(v)) for v in x.tolist()]
    np.testing.assert_allclose(np.array(log1mexp(x)), expected, rtol=1e-5, atol=1e-12)
    g = mx.grad(lambda v: log1mexp(v).sum())(x)
    assert np.all(np.isfinite(np.array(g)))
