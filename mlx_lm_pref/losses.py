"""Preference losses as pure functions of per-sequence log-probs.

Every per-pair input is a (B,) float32 array; every loss returns (B,) per-pair values so the
caller decides how to reduce. Names and formulas are TRL 1.16's
(``trl/trainer/dpo_trainer.py`` ``_compute_loss``, ``trl/experimental/orpo``,
``trl/experimental/cpo``, ``trl/trainer/kto_trainer.py``); each function cites its paper.
"""

import math
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

log_sigmoid = nn.log_sigmoid
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32


@dataclass
class DPOTerms:
    """What the DPO losses are functions of, for one batch of B pairs (all (B,) float32).

    ``*_scores`` are the log-ratios after the f-divergence map (equal to the log-ratios for
    reverse KL, standard DPO); ``*_lengths`` count completion tokens; ``sft_nll`` is the
    token-mean NLL of all chosen completion tokens of the batch (a scalar).
    """

    policy_chosen: mx.array
    policy_rejected: mx.array
    ref_chosen: mx.array
    ref_rejected: mx.array
    chosen_scores: mx.array
    rejected_scores: mx.array
    chosen_lengths: mx.array
    rejected_lengths: mx.array
    sft_nll: mx.array

    @property
    def chosen_logratios(self):
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self):
        return self.policy_rejected - self.ref_rejected

    @property
    def delta(self):
        return self.chosen_scores - self.rejected_scores


def f_divergence_scores(logratios: mx.array, kind: str, alpha: float) -> mx.array:
    """f'(pi/pi_ref) for f-DPO (Wang et al. 2023, table 1), as a function of log-ratios."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1) < 1e-6):
        return logratios
    if kind == "forward_kl":  # f'(t) = 1 - 1/t; clamped like alpha_divergence below
        return 1 - mx.exp(mx.minimum(-logratios, 80.0))
    if kind == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + log_sigmoid(logratios)
    if kind == "alpha_divergence":  # f'(t) = (t^(a-1) - 1) / (a - 1)
        t = mx.minimum((alpha - 1) * logratios, 80.0)  # as TRL: keep exp finite
        return (mx.exp(t) - 1) / (alpha - 1)
    raise ValueError(f"Unknown f_divergence_type {kind!r}.")


def _smoothed_sigmoid(z, eps):
    """-(1 - eps) log sigma(z) - eps log sigma(-z): conservative DPO (Mitchell 2023)."""
    return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


# Each DPO loss: (terms, beta, eps, tau) -> (B,) per-pair loss.
def sigmoid(t, beta, eps, tau):
    """DPO, Rafailov et al. 2023, eq. 7 (TRL 1.x ignores label smoothing here)."""
    return -log_sigmoid(beta * t.delta)


def cdpo(t, beta, eps, tau):
    """cDPO: sigmoid with label smoothing, as TRL 0.x and the original DPO code."""
    return _smoothed_sigmoid(beta * t.delta, eps)


def hinge(t, beta, eps, tau):
    """SLiC-HF, Zhao et al. 2023."""
    return mx.maximum(1 - beta * t.delta, 0.0)


def ipo(t, beta, eps, tau):
    """IPO, Azar et al. 2023, eq. 17, on per-token averaged scores (as TRL)."""
    chosen = t.chosen_scores / mx.maximum(t.chosen_lengths, 1.0)
    rejected = t.rejected_scores / mx.maximum(t.rejected_lengths, 1.0)
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def exo_pair(t, beta, eps, tau):
    """EXO, Ji et al. 2024, eq. 16: KL(p_f || p_rh) over {chosen, rejected}."""
    z = beta * t.delta
    return mx.sigmoid(z) * (log_sigmoid(z) - math.log1p(-eps)) + mx.sigmoid(-z) * (
        log_sigmoid(-z) - math.log(eps)
    )


def nca_pair(t, beta, eps, tau):
    """NCA, Chen et al. 2024."""
    chosen, rejected = beta * t.chosen_logratios, beta * t.rejected_logratios
    return (
        -log_sigmoid(chosen) - 0.5 * log_sigmoid(-chosen) - 0.5 * log_sigmoid(-rejected)
    )


def robust(t, beta, eps, tau):
    """Robust DPO, Chowdhury et al. 2024, eq. 10 (unbiased under label flips)."""
    z = beta * t.delta
    return (-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps)


def bco_pair(t, beta, eps, tau):
    """BCO on pairs, Jung et al. 2024 (TRL's form, without the running reward shift)."""
    return -log_sigmoid(beta * t.chosen_logratios) - log_sigmoid(
        -beta * t.rejected_logratios
    )


def sppo_hard(t, beta, eps, tau):
    """SPPO, Wu et al. 2024, eq. 4.7 with hard win probabilities 1 and 0."""
    return (t.chosen_logratios - 0.5 / beta) ** 2 + (
        t.rejected_logratios + 0.5 / beta
    ) ** 2


def aot(t, beta, eps, tau):
    """AOT paired, Melnyk et al. 2024: sorted policy vs sorted reference log-ratios."""
    d = mx.sort(t.policy_chosen - t.policy_rejected) - mx.sort(
        t.ref_chosen - t.ref_rejected
    )
    return _smoothed_sigmoid(beta * d, eps)


def aot_unpaired(t, beta, eps, tau):
    """AOT unpaired, Melnyk et al. 2024: sorted chosen vs sorted rejected log-ratios."""
    d = mx.sort(t.chosen_logratios) - mx.sort(t.rejected_logratios)
    return _smoothed_sigmoid(beta * d, eps)


def apo_zero(t, beta, eps, tau):
    """APO-zero, D'Oosterlinck et al. 2024, eq. 7."""
    return (1 - mx.sigmoid(beta * t.chosen_logratios)) + mx.sigmoid(
        beta * t.rejected_logratios
    )


def apo_down(t, beta, eps, tau):
    """APO-down, D'Oosterlinck et al. 2024, eq. 8."""
    return mx.sigmoid(beta * t.chosen_logratios) + (
        1 - mx.sigmoid(beta * (t.chosen_logratios - t.rejected_logratios))
    )


def discopop(t, beta, eps, tau):
    """DiscoPOP, Chris Lu et al. 2024, eq. 5: log-ratio-modulated logistic/exponential."""
    z = beta * t.delta
    m = mx.sigmoid(z / tau)
    # exp(-z) * m, as one exp: no inf * 0 when z is very negative
    return -log_sigmoid(z) * (1 - m) + mx.exp(-z + log_sigmoid(z / tau))


def sft(t, beta, eps, tau):
    """The NLL of the chosen completions (RPO's term), the same value for every pair."""
    return mx.broadcast_to(t.sft_nll, t.policy_chosen.shape)


def sigmoid_norm(t, beta, eps, tau):
    """Length-normalised sigmoid DPO: scores averaged per completion token."""
    chosen = t.chosen_scores / mx.maximum(t.chosen_lengths, 1.0)
    rejected = t.rejected_scores / mx.maximum(t.rejected_lengths, 1.0)
    return -log_sigmoid(beta * (chosen - rejected))


DPO_LOSSES = {
    f.__name__: f
    for f in (
        sigmoid,
        hinge,
        ipo,
        exo_pair,
        nca_pair,
        robust,
        bco_pair,
        sppo_hard,
        aot,
        aot_unpaired,
        apo_zero,
        apo_down,
        discopop,
        sft,
        sigmoid_norm,
        cdpo,
    )
}


def dpo_loss(
    terms: DPOTerms,
    loss_types,
    loss_weights,
    beta: float,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    pair_weights: Optional[mx.array] = None,
) -> mx.array:
    """TRL's combined DPO loss: sum_k w_k * mean_pairs(l_k * pair_weights)."""
    total = mx.array(0.0)
    for name, weight in zip(loss_types, loss_weights):
        per_pair = DPO_LOSSES[name](terms, beta, label_smoothing, discopop_tau)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        total = total + weight * per_pair.mean()
    return total


def log1mexp(x: mx.array) -> mx.array:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012).

    Each branch only ever sees inputs from its own range, so the branch that ``where``
    discards cannot put inf or NaN into the gradient.
    """
    # x = 0 exactly (every completion token at p = 1 in float32) would give -inf and a NaN
    # gradient, as in TRL; the smallest float32 step below 0 changes nothing else.
    x = mx.minimum(x, -FLOAT32_TINY)
    near_zero = x > -math.log(2.0)
    x_small = mx.where(near_zero, x, -1.0)
    x_large = mx.where(near_zero, -1.0, x)
    return mx.where(near_zero, mx.log(-mx.expm1(x_small)), mx.log1p(-mx.exp(x_large)))


def orpo_odds_ratio(
    chosen_logps: mx.array, rejected_logps: mx.array, beta: float
) -> tuple:
    """ORPO's odds-ratio term, Hong et al. 2024, eqs. 4 and 7, as TRL computes it.

    log_odds = (a_c - a_r) - (log(1 - exp a_c) - log(1 - exp a_r))

    Args:
        chosen_logps, rejected_logps: (B,) *mean* completion log-probs a_c, a_r.
        beta: weight of the odds-ratio term (lambda in the paper).

    Returns:
        ``(losses, log_odds)``, each (B,); losses = -beta * log sigma(log_odds), so the
        ORPO loss is ``nll + mean(losses)``.
    """
    log_odds = (chosen_logps - rejected_logps) - (
        log1mexp(chosen_logps) - log1mexp(rejected_logps)
    )
    return -beta * log_sigmoid(log_odds), log_odds


def alphapo_rewards(logps: mx.array, alpha: float) -> mx.array:
    """AlphaPO, Gupta et al. 2025: r = (1 - p^-alpha) / alpha; log-probs when alpha = 0."""
    if alpha == 0.0:
        return logps
    return (1 - mx.exp(-alpha * logps)) / alpha


def cpo_losses(
    chosen_rewards: mx.array,
    rejected_rewards: mx.array,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> mx.array:
    """CPO (Xu et al. 2024, eq. 3) and SimPO (Meng et al. 2024, eq. 6) per-pair losses.

    Args:
        chosen_rewards, rejected_rewards: (B,) completion log-probs (summed for sigmoid and
            hinge, averaged per token for ipo and simpo) or their AlphaPO transform.
    """
    z = chosen_rewards - rejected_rewards
    if loss_type == "simpo":
        return _smoothed_sigmoid(beta * (z - simpo_gamma / beta), label_smoothing)
    if loss_type == "sigmoid":
        return _smoothed_sigmoid(beta * z, label_smoothing)
    if loss_type == "hinge":
        return mx.maximum(1 - beta * z, 0.0)
    if loss_type == "ipo":
        return (z - 1 / (2 * beta)) ** 2
    raise ValueError(f"Unknown cpo_loss_type {loss_type!r}.")


def kto_losses(
    logratios: mx.array,
    desirable: mx.array,
    kl: mx.array,
    loss_type: str,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> mx.array:
    """Per-row KTO losses, weighted, as TRL's ``KTOTrainer``.

    kto (Ethayarajh et al. 2024, eq. 7): 1 - sigma(beta (r - z0)) for a desirable row,
    1 - sigma(beta (z0 - r)) for an undesirable one, z0 the (clamped) KL estimate;
    apo_zero_unpaired (D'Oosterlinck et al. 2024, eq. 7 unpaired): 1 - sigma(beta r) and
    sigma(beta r), no KL term.

    Args:
        logratios: (B,) r = log pi(y|x) - log pi_ref(y|x), summed over completion tokens.
        desirable: (B,) float32, 1 for a desirable row, 0 for an undesirable one.
        kl: scalar z0, without gradient.

    Returns:
        (B,) ``desirable_weight`` x the desirable losses and ``undesirable_weight`` x the
        undesirable ones; TRL's loss is their mean.
    """
    if loss_type == "kto":
        good = 1 - mx.sigmoid(beta * (logratios - kl))
        bad = 1 - mx.sigmoid(beta * (kl - logratios))
    elif loss_type == "apo_zero_unpaired":
        good = 1 - mx.sigmoid(beta * logratios)
        bad = mx.sigmoid(beta * logratios)
    else:
        raise ValueError(f"Unknown KTO loss_type {loss_type!r}.")
    return mx.where(desirable > 0, desirable_weight * good, undesirable_weight * bad)
