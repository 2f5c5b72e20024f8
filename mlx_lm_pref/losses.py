"""Preference losses as pure functions of per-sequence log-probs.

Every input is a (B,) float32 array, one entry per pair; every function returns per-pair
arrays so the caller decides how to reduce. Names and formulas follow TRL 1.16
(``trl/trainer/dpo_trainer.py``, ``trl/experimental/orpo/orpo_trainer.py``).
"""

import math

import mlx.core as mx
import mlx.nn as nn


def dpo_sigmoid(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    ref_chosen: mx.array,
    ref_rejected: mx.array,
    beta: float,
) -> tuple:
    """DPO, Rafailov et al. 2023, eq. 7.

    loss = -log sigma(beta * ((lp_pi(c) - lp_ref(c)) - (lp_pi(r) - lp_ref(r))))

    Args:
        policy_chosen, policy_rejected: (B,) summed completion log-probs under the policy.
        ref_chosen, ref_rejected: (B,) the same under the reference, gradient-free.
        beta: KL-penalty strength.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,); rewards are
        beta * (lp_pi - lp_ref), TRL's ``rewards/chosen`` and ``rewards/rejected``.
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -nn.log_sigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards, rejected_rewards


def log1mexp(x: mx.array) -> mx.array:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012).

    Each branch only ever sees inputs from its own range, so the branch that ``where``
    discards cannot put inf or NaN into the gradient.
    """
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
    return -beta * nn.log_sigmoid(log_odds), log_odds
