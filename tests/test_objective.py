"""Every objective (the DPO loss family, ORPO, CPO/SimPO/AlphaPO) and every metric against an
independent float64 numpy implementation written from TRL_SEMANTICS / the papers, on the
same logits of a tiny Llama with a non-trivial LoRA adapter."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import TILED, random_batch, shared_layout, tiny_lora_model
from mlx.utils import tree_flatten

import mlx_lm_pref  # noqa: F401
from mlx_lm_pref.config import DPO_LOSSES, PreferenceArgs
from mlx_lm_pref.losses import log1mexp
from mlx_lm_pref.metrics import average_metrics, metric_values
from mlx_lm_pref.objective import METRICS, PreferenceLoss
from mlx_lm_pref.reference import adapters_disabled

# Numbers compared at float32-noise tolerances: run with and without OpenBLAS (.ci/run).
pytestmark = pytest.mark.numerics


# ---- the independent reference, float64 numpy ----


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - (np.log(np.exp(logits - m).sum(-1, keepdims=True)) + m)


def logsig(x):
    return -np.logaddexp(0, -x)


def sig(x):
    return 1 / (1 + np.exp(-x))


def forward(model, tokens, spans):
    tokens, spans = np.array(tokens), np.array(spans)
    logits = np.array(model(mx.array(tokens[:, :-1])), np.float64)
    lsm = log_softmax(logits)
    lp = np.take_along_axis(lsm, tokens[:, 1:, None], -1)[..., 0]
    pos = np.arange(1, tokens.shape[1])
    comp = (pos >= spans[:, :1]) & (pos < spans[:, 1:])
    return logits, lsm, lp, comp


def rewards_and_logits(loss, cr, rr, lp_c, lp_r, vocab_mean, mask):
    """The metrics every trainer reports: TRL's rewards, logps and logits/* (vocab-mean logit
    averaged over ``mask``)."""
    B = len(cr)
    return {
        "loss": loss,
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/accuracies": (cr > rr).mean(),
        "rewards/margins": (cr - rr).mean(),
        "logps/chosen": lp_c.mean(),
        "logps/rejected": lp_r.mean(),
        "logits/chosen": vocab_mean[:B][mask[:B]].mean(),
        "logits/rejected": vocab_mean[B:][mask[B:]].mean(),
    }


def dpo_reference(model, tokens, spans, o: PreferenceArgs):
    logits, lsm, lp, comp = forward(model, tokens, spans)
    with adapters_disabled(model):
        _, _, ref_lp, _ = forward(model, tokens, spans)
    B = len(comp) // 2
    n = comp.sum(1)
    if o.ld_alpha is None:
        s, rs = (lp * comp).sum(1), (ref_lp * comp).sum(1)
    else:  # LD-DPO: tokens past the shorter completion count ld_alpha
        shared = np.minimum(n[:B], n[B:])
        shared = np.concatenate([shared, shared])[:, None]
        k = np.cumsum(comp, 1)
        w = np.where(k <= shared, 1.0, o.ld_alpha) * comp
        s, rs = (lp * w).sum(1), (ref_lp * w).sum(1)
    dc, dr = s[:B] - rs[:B], s[B:] - rs[B:]
    f = {
        "reverse_kl": lambda d: d,
        "forward_kl": lambda d: 1 - np.exp(-d),
        "js_divergence": lambda d: np.log(2) + logsig(d),
        "alpha_divergence": lambda d: (np.exp((o.f_alpha_divergence_coef - 1) * d) - 1)
        / (o.f_alpha_divergence_coef - 1),
    }[o.f_divergence_type]
    sc, sr = f(dc), f(dr)
    b, eps = o.beta, o.label_smoothing
    delta = sc - sr
    sft = -(lp[:B] * comp[:B]).sum() / comp[:B].sum()
    formulas = {
        "sigmoid": lambda: -logsig(b * delta),
        "cdpo": lambda: -(1 - eps) * logsig(b * delta) - eps * logsig(-b * delta),
        "hinge": lambda: np.maximum(0, 1 - b * delta),
        "ipo": lambda: (sc / n[:B] - sr / n[B:] - 1 / (2 * b)) ** 2,
        "exo_pair": lambda: sig(b * delta) * (logsig(b * delta) - np.log(1 - eps))
        + sig(-b * delta) * (logsig(-b * delta) - np.log(eps)),
        "nca_pair": lambda: -logsig(b * dc)
        - 0.5 * logsig(-b * dc)
        - 0.5 * logsig(-b * dr),
        "robust": lambda: (-(1 - eps) * logsig(b * delta) + eps * logsig(-b * delta))
        / (1 - 2 * eps),
        "bco_pair": lambda: -logsig(b * dc) - logsig(-b * dr),
        "sppo_hard": lambda: (dc - 1 / (2 * b)) ** 2 + (dr + 1 / (2 * b)) ** 2,
        "aot": lambda: aot(np.sort(s[:B] - s[B:]) - np.sort(rs[:B] - rs[B:])),
        "aot_unpaired": lambda: aot(np.sort(dc) - np.sort(dr)),
        "apo_zero": lambda: (1 - sig(b * dc)) + sig(b * dr),
        "apo_down": lambda: sig(b * dc) + (1 - sig(b * (dc - dr))),
        "discopop": lambda: (1 - sig(b * delta / o.discopop_tau)) * -logsig(b * delta)
        + sig(b * delta / o.discopop_tau) * np.exp(-b * delta),
        "sft": lambda: np.full(B, sft),
        "sigmoid_norm": lambda: -logsig(b * (sc / n[:B] - sr / n[B:])),
    }
    aot = lambda d: -(1 - eps) * logsig(b * d) - eps * logsig(-b * d)  # noqa: E731
    pair_w = 1.0
    if o.use_weighting:  # WPO: exp(mean(log p - log sum p^2)) per sequence
        lss = np.log((np.exp(lsm) ** 2).sum(-1))
        mean = ((lp - lss) * comp).sum(1) / n
        pair_w = np.exp(mean[:B]) * np.exp(mean[B:])
    loss = sum(
        w * np.mean(formulas[t]() * pair_w) for t, w in zip(o.loss_type, o.weights)
    )
    cr, rr = b * dc, b * dr
    vocab_mean = logits.mean(-1)
    p = np.exp(lsm)
    entropy = -(p * lsm).sum(-1)
    top1 = logits[:B].argmax(-1) == np.array(tokens)[:B, 1:]
    return {
        **rewards_and_logits(loss, cr, rr, s[:B], s[B:], vocab_mean, comp),
        "entropy": entropy[comp].mean(),
        "mean_token_accuracy": top1[comp[:B]].mean(),
        "num_tokens": np.array(spans)[:, 1].sum(),
    }


def _real(spans, width):
    return np.arange(width)[None] < (np.array(spans)[:, 1:] - 1)


def orpo_reference(model, tokens, spans, o):
    logits, _, lp, comp = forward(model, tokens, spans)
    B = len(comp) // 2
    a = (lp * comp).sum(1) / comp.sum(1)
    pos = np.arange(1, lp.shape[1] + 1)
    whole = (pos >= 1) & (pos < np.array(spans)[:B, 1:])
    nll = -(lp[:B] * whole).sum() / whole.sum()
    l1 = lambda x: np.log(-np.expm1(x))  # noqa: E731
    log_odds = (a[:B] - a[B:]) - (l1(a[:B]) - l1(a[B:]))
    ratio = logsig(log_odds)
    cr, rr = o.beta * a[:B], o.beta * a[B:]
    real = _real(spans, lp.shape[1])
    vm = logits.mean(-1)
    return {
        **rewards_and_logits(
            nll - o.beta * ratio.mean(), cr, rr, a[:B], a[B:], vm, real
        ),
        "nll_loss": nll,
        "log_odds_ratio": ratio.mean(),
        "log_odds_chosen": log_odds.mean(),
    }


def cpo_reference(model, tokens, spans, o):
    logits, _, lp, comp = forward(model, tokens, spans)
    B = len(comp) // 2
    s = (lp * comp).sum(1)
    if o.cpo_loss_type in ("ipo", "simpo"):
        s = s / comp.sum(1)
    r = (1 - np.exp(-o.alpha * s)) / o.alpha if o.alpha else s
    z, b, eps = r[:B] - r[B:], o.beta, o.label_smoothing
    smooth = lambda x: -(1 - eps) * logsig(b * x) - eps * logsig(-b * x)  # noqa: E731
    losses = {
        "sigmoid": lambda: smooth(z),
        "simpo": lambda: smooth(z - o.simpo_gamma / b),
        "hinge": lambda: np.maximum(0, 1 - b * z),
        "ipo": lambda: (z - 1 / (2 * b)) ** 2,
    }[o.cpo_loss_type]()
    nll = -(lp[:B] * comp[:B]).sum() / comp[:B].sum() if o.cpo_alpha else 0.0
    cr, rr = b * r[:B], b * r[B:]
    real = _real(spans, lp.shape[1])
    vm = logits.mean(-1)
    loss = losses.mean() + o.cpo_alpha * nll
    return {**rewards_and_logits(loss, cr, rr, s[:B], s[B:], vm, real), "nll_loss": nll}


REFERENCES = {"dpo": dpo_reference, "orpo": orpo_reference, "cpo": cpo_reference}

CASES = [
    dict(
        loss_type=name,
        label_smoothing=(
            0.1
            if name in ("exo_pair", "robust", "aot", "aot_unpaired", "cdpo")
            else 0.0
        ),
    )
    for name in DPO_LOSSES
    if name
    != "sft"  # alone, loss_type sft is mlx-lm's SFT; TRL's sft term is tested in lists
] + [
    dict(loss_type="dpo", beta=0.5),
    dict(loss_type="sigmoid,sft", loss_weights="1.0,0.5"),
    dict(loss_type="dpo", rpo_alpha=0.3),
    dict(loss_type="sigmoid,hinge,ipo", loss_weights="0.5,0.25,1.0"),
    dict(loss_type="dpo", f_divergence_type="forward_kl"),
    dict(loss_type="dpo", f_divergence_type="js_divergence"),
    dict(
        loss_type="dpo",
        f_divergence_type="alpha_divergence",
        f_alpha_divergence_coef=0.3,
    ),
    dict(loss_type="ipo", f_divergence_type="forward_kl"),
    dict(loss_type="dpo", ld_alpha=0.5),
    dict(loss_type="dpo", use_weighting=True),
    dict(loss_type="orpo"),
    dict(loss_type="orpo", beta=1.0),
    dict(loss_type="cpo"),
    dict(loss_type="cpo", cpo_loss_type="hinge"),
    dict(loss_type="cpo", cpo_loss_type="ipo"),
    dict(loss_type="cpo", label_smoothing=0.1),
    dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0),
    dict(loss_type="simpo", cpo_alpha=0.0),
    dict(loss_type="alphapo", alpha=0.2),
    dict(loss_type="cpo", alpha=-0.1),
]


@pytest.mark.parametrize("head", ["logits", "tiles"])
@pytest.mark.parametrize("layout", ["rows", "shared"])
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values())
)
def test_matches_numpy(case, layout, head):
    """Every metric of every objective, in both batch layouts (whole rows; each prompt
    once with prompt sharing) and both ways of running the output layer (the whole logits;
    tiles of vocabulary rows), against float64 numpy on the whole rows' logits."""
    if head == "tiles":
        model = tiny_lora_model(vocab_size=TILED["vocab"])
        case = {**case, "head_chunk_size": TILED["head_chunk_size"]}
    else:
        model = tiny_lora_model()
    rows = random_batch()
    tokens, spans = rows.tokens, rows.spans
    options = PreferenceArgs(**case)
    batch = rows if layout == "rows" else shared_layout(rows)
    loss, ntoks, metrics = PreferenceLoss(options).metrics(model, batch)
    ours = metric_values(metrics)
    expected = REFERENCES[options.method](model, tokens, spans, options)
    assert set(ours) == set(expected)
    for name in expected:
        assert ours[name] == pytest.approx(expected[name], abs=1e-5, rel=1e-5), name
    assert loss.item() == pytest.approx(expected["loss"], abs=1e-5, rel=1e-5)
    assert ntoks.item() == int(np.array(spans)[:, 1].sum())


def test_first_dpo_loss_is_ln2_with_a_fresh_adapter():
    model = tiny_lora_model(nonzero_adapter=False)  # mlx-lm initialises lora_b to zero
    loss, _ = PreferenceLoss(PreferenceArgs(loss_type="dpo"))(model, random_batch(1))
    assert abs(loss.item() - math.log(2)) < 1e-6
    metrics = average_metrics(METRICS["dpo"], np.array(model._pref_metrics)[None])
    assert metrics["rewards/chosen"] == metrics["rewards/rejected"] == 0.0
    assert metrics["rewards/accuracies"] == 0.0  # strict >, as TRL


@pytest.mark.parametrize("loss_type", ["dpo", "orpo", "simpo", "ipo"])
def test_gradients_are_finite_and_reach_the_adapter(loss_type):
    model = tiny_lora_model(nonzero_adapter=False)
    loss = PreferenceLoss(PreferenceArgs(loss_type=loss_type))
    _, grads = nn.value_and_grad(model, loss)(model, random_batch(2, pairs=2))
    norms = [mx.abs(g).sum().item() for _, g in tree_flatten(grads)]
    assert any(n > 0 for n in norms)
    assert all(math.isfinite(n) for n in norms)


@pytest.mark.parametrize(
    "case,message",
    [
        (dict(loss_type="exo_pair"), "needs label_smoothing > 0"),
        (
            dict(loss_type="robust", label_smoothing=0.5),
            r"label_smoothing must be in \[0, 0.5\)",
        ),
        (
            dict(loss_type="sigmoid,sft", loss_weights="1.0"),
            "give one weight per loss type",
        ),
        (
            dict(loss_type="bco_pair", f_divergence_type="forward_kl"),
            "only defined for",
        ),
        (dict(loss_type="aot", use_weighting=True), "cannot be combined with aot"),
        (dict(loss_type="orpo,sigmoid"), "cannot be combined"),
        (dict(loss_type="dpo", ld_alpha=1.5), r"ld_alpha must be in \[0, 1\]"),
        (
            dict(loss_type="ktoo"),
            "Unknown loss_type 'ktoo'. Valid values: sft, dpo, orpo",
        ),
        (dict(loss_type="kto,sigmoid"), "cannot be combined"),
        (dict(loss_type="sigmoid,apo_zero_unpaired"), "trains on unpaired rows"),
        (dict(loss_type="kto", ld_alpha=0.5), "ld_alpha is a DPO option"),
        (dict(loss_type="kto", label_smoothing=0.1), "label_smoothing is a DPO"),
        (dict(loss_type="kto", truncation_mode="keep_end"), "from the right only"),
        (dict(loss_type="kto", rpo_alpha=1.0), "rpo_alpha applies to DPO"),
        (dict(loss_type="kto", desirable_weight=-1), "desirable_weight must be >= 0"),
        (
            dict(loss_type="kto", desirable_weight=0, undesirable_weight=0),
            "nothing to train",
        ),
        (dict(loss_type="cpo", cpo_loss_type="sppo"), "Unknown cpo_loss_type"),
    ],
)
def test_unsupported_combinations_are_refused(case, message):
    with pytest.raises(ValueError, match=message):
        PreferenceArgs(**case)


def test_log1mexp_is_accurate_and_has_finite_gradients():
    x = mx.array([-1e-6, -0.1, -0.69, -0.7, -5.0, -50.0])
    expected = [math.log(-math.expm1(v)) for v in x.tolist()]
    np.testing.assert_allclose(np.array(log1mexp(x)), expected, rtol=1e-5, atol=1e-12)
    g = mx.grad(lambda v: log1mexp(v).sum())(x)
    assert np.all(np.isfinite(np.array(g)))


@pytest.mark.skipif(
    not hasattr(mx.fast, "cross_entropy"), reason="mlx < 0.32.2 has no fused kernel"
)
@pytest.mark.parametrize("loss_type", ["orpo", "simpo", "dpo"])
def test_fused_cross_entropy_path_gives_the_same_numbers(loss_type, monkeypatch):
    """On a GPU the log-probs come from mlx's fused cross-entropy (as mlx-lm's SFT loss);
    its CPU fallback runs the same formula, so forcing that path here checks it."""
    import mlx_lm_pref.logps as logps

    model = tiny_lora_model()
    batch = random_batch()
    loss_and_grad = nn.value_and_grad(
        model, PreferenceLoss(PreferenceArgs(loss_type=loss_type))
    )
    (loss, _), grads = loss_and_grad(model, batch)
    metrics = model._pref_metrics
    monkeypatch.setattr(logps, "fused_cross_entropy", lambda: True)
    (fused, _), fused_grads = loss_and_grad(model, batch)
    assert abs(loss.item() - fused.item()) < 1e-6
    assert np.allclose(metrics, model._pref_metrics, atol=1e-6)
    for (_, g), (_, h) in zip(tree_flatten(grads), tree_flatten(fused_grads)):
        assert mx.abs(g - h).max().item() < 1e-6
