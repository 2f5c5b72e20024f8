"""Parity with TRL 1.16's GRPOTrainer and RLOOTrainer: one step on the same tiny weights,
prompts, completions and reward functions gives the same loss, metrics and LoRA gradient.

Both sides start from the same random LoRA adapter (``trl_reference.write_lora_pair``: an
mlx-lm adapter and the same weights as a PEFT adapter). TRL's generation is replaced by fixed
completions (``trl_grpo_reference``): G = 4 per prompt, of ragged lengths, one cut at
``max_completion_length`` without EOS (truncated); two reward functions, one of them not
scoring some completions (None), one completion scored by neither (TRL's unscorable row),
one group scored flat (reward std 0). TRL runs ``_generate_and_score_completions`` and
``compute_loss`` (+ backward); we run ``Rollouts.score`` and ``PreferenceLoss`` (+
``nn.value_and_grad``), in both batch layouts (whole rows, and each prompt run once).

Cases marked ``moved``: the adapter changes between sampling and the loss (TRL:
``num_iterations=2``, so it keeps the sampling-time log-probs; ours: ``stale=True``), by the
same deterministic perturbation on both sides, so the importance ratio is not 1 and the
clip metrics, ``delta`` and cispo's cap have something to do.

References (beta > 0): TRL gives a ``PeftModel`` a frozen copy of its adapter named "ref"
(our ``reference: initial_adapter``); with that copy deleted it disables the adapters (our
``adapters_off``, the base model). Both are covered.

Every case compares: TRL's prompt ids with ours, TRL's returned loss with ours, every metric
TRL logs in ``_metrics["train"]`` with ours (and the same set of names), and the LoRA
gradient tensor by tensor. Each case builds one TRL trainer; the tiny model, its adapters
and our mlx model are shared (module fixtures). About 20 s on 2 cores.

The beta > 0 GRPO cases run with ``use_bias_correction_kl`` off (the plain k3 KL) but for
one, which keeps TRL's default (on: the ratio weighs each token's KL); one case has
``delta`` below ``1 + epsilon_high``, where TRL counts the clips of the capped ratio.
"""

from dataclasses import dataclass, field

import numpy as np
import pytest

pytestmark = pytest.mark.numerics

try:  # the reference side is optional (not in the package's dependencies)
    import mlx_lm  # noqa: F401
    import peft  # noqa: F401
    import torch
    import trl  # noqa: F401
except ImportError as e:
    pytest.skip(
        f"GRPO parity needs torch, peft, trl and mlx-lm: {e}", allow_module_level=True
    )

import trl_grpo_reference as T  # noqa: E402
import trl_reference as R  # noqa: E402

torch.set_num_threads(1)

G = 4  # completions per prompt
M = 16  # max_completion_length
MOVE = 0.3  # size of the perturbation of the adapter in "moved" cases

# Tolerances, from the float32 noise measured on these cases. Against TRL run in float64
# (the PEFT model .double()), TRL's own float32 run is off by up to 1.3e-6 relative in the
# metrics and 3.2e-5 of a tensor's largest entry in the gradient; ours by up to 3.0e-6 and
# 1.2e-5. Ours against TRL float32 (what this file compares), over every case and both
# layouts, with OpenBLAS (LD_PRELOAD) / mlx's and torch's own BLAS: loss 2.3e-6 / 1.1e-6
# relative (losses of an on-policy step with beta 0 are ~1e-8, by design: |diff| <= 2e-8),
# metrics 6.1e-7 / 8.4e-7 relative (|diff| <= 2.5e-6, on entropy ~5.4), gradient 3.6e-5 /
# 7.8e-6 of the tensor's largest entry (3.6e-5: TRL's float32 noise on the delta case) and
# 8.2e-6 / 3.8e-6 in the norm of the difference. The tolerances keep a factor of about 3
# over the worst of these.
REL = 1e-4
ABS = 1e-6  # for values near 0 (a loss of ~1e-8, clip ratios of 0)
GRAD_REL = 1e-4  # of the tensor's largest entry


@dataclass
class Case:
    """One configuration run through TRL and through us. ``options``: set the same on
    both sides (our ``PreferenceArgs``, TRL's config); ``trl_only``: TRL config options we
    have no name for; ``reference`` (beta > 0): "ref_adapter" or "base" (see the module
    docstring)."""

    id: str
    method: str  # grpo or rloo
    conversational: bool = False
    moved: float = (
        0.0  # the adapter moved between sampling and the loss, by this x delta
    )
    reference: str = "base"
    funcs: tuple = ("length_reward", "yes_reward")
    options: dict = field(default_factory=dict)  # the same name and value on both sides
    trl_only: dict = field(default_factory=dict)  # TRL options we have no name for
    flat: bool = True  # the third prompt's group scored flat (reward std 0)

    def rows(self):
        return T.prompt_rows(self.conversational, self.flat)

    @property
    def beta(self):
        return self.options.get("beta", 0.0)

    def trl_config(self):
        config = dict(self.options)
        config.setdefault("beta", 0.0)  # RLOOConfig's default is 0.05
        if "loss_type" in config and self.method == "rloo":
            config.pop("loss_type")
        if self.moved:
            config["num_iterations"] = 2
        for key in ("reward_weights", "reward_clip_range"):
            if key in config:
                config[key] = list(config[key])
        return {**config, **self.trl_only}

    def our_options(self, prompt_sharing):
        from mlx_lm_pref.config import PreferenceArgs

        options = dict(self.options)
        options.setdefault("loss_type", self.method)
        options.setdefault("beta", 0.0)
        if self.moved:
            options["num_iterations"] = 2
        reference = "auto"
        if self.beta:
            reference = (
                "initial_adapter" if self.reference == "ref_adapter" else "adapters_off"
            )
        return PreferenceArgs(
            reward_funcs=tuple(f"trl_grpo_reference:{f}" for f in self.funcs),
            num_generations=G,
            max_completion_length=M,
            reference=reference,
            prompt_sharing=prompt_sharing,
            **options,
        )


def grpo(id, loss_type, level, **kw):
    options = kw.pop("options", {})
    options = {"loss_type": loss_type, "importance_sampling_level": level, **options}
    trl_only = kw.pop("trl_only", {})
    if options.get("beta"):
        options.setdefault("use_bias_correction_kl", False)
    return Case(id=id, method="grpo", options=options, trl_only=trl_only, **kw)


# A covering set: every loss type at both importance-sampling levels, each other option
# (beta, moved adapter, reference kind, prompt format, scale_rewards,
# multi_objective_aggregation, mask_truncated_completions, temperature, reward_weights,
# delta, epsilon_high, top_entropy_quantile) on in some cases and off in others.
CASES = [
    grpo(
        "grpo-token",
        "grpo",
        "token",
        options=dict(reward_weights=(1.0, 0.5)),
    ),
    grpo(
        "grpo-sequence-moved-kl-ref",
        "grpo",
        "sequence",
        conversational=True,
        moved=-MOVE,  # +MOVE happens to clip nothing here
        reference="ref_adapter",
        options=dict(
            beta=0.04,
            scale_rewards="batch",
            mask_truncated_completions=True,
            epsilon_high=0.28,
            delta=1.5,
            reward_weights=(2.0, 1.0),
        ),
    ),
    grpo(
        "dr_grpo-token-kl-t0.7",
        "dr_grpo",
        "token",
        conversational=True,
        options=dict(beta=0.04, scale_rewards="none", temperature=0.7),
    ),
    grpo(
        "dr_grpo-sequence-moved-gdpo",
        "dr_grpo",
        "sequence",
        moved=MOVE,
        flat=False,
        options=dict(
            multi_objective_aggregation="normalize_then_sum",
            mask_truncated_completions=True,
            reward_weights=(0.3, 1.0),
        ),
    ),
    grpo(
        "dapo-token-moved-entropy",
        "dapo",
        "token",
        conversational=True,
        moved=MOVE,
        options=dict(mask_truncated_completions=True, top_entropy_quantile=0.5),
    ),
    grpo(
        "dapo-sequence-kl",
        "dapo",
        "sequence",
        options=dict(beta=0.04, scale_rewards="batch"),
    ),
    grpo(
        "bnpo-token-moved-kl-ref-gdpo-t0.7",
        "bnpo",
        "token",
        moved=MOVE,
        flat=False,
        reference="ref_adapter",
        options=dict(
            beta=0.04,
            multi_objective_aggregation="normalize_then_sum",
            temperature=0.7,
            delta=1.3,
        ),
    ),
    grpo(
        "bnpo-sequence-one-func",
        "bnpo",
        "sequence",
        conversational=True,
        funcs=("yes_reward",),
        options=dict(scale_rewards="none", mask_truncated_completions=True),
    ),
    grpo(
        "cispo-token-moved-kl-ref",
        "cispo",
        "token",
        conversational=True,
        moved=MOVE,
        reference="ref_adapter",
        options=dict(beta=0.04, epsilon_high=1.1),
    ),
    grpo(
        "cispo-sequence-moved-gdpo-t0.7",
        "cispo",
        "sequence",
        moved=MOVE,
        flat=False,
        options=dict(
            epsilon_high=1.05,
            scale_rewards="batch",
            multi_objective_aggregation="normalize_then_sum",
            mask_truncated_completions=True,
            temperature=0.7,
        ),
    ),
    grpo(
        "dapo-token-moved-kl-bias-corrected",
        "dapo",
        "token",
        moved=MOVE,
        reference="ref_adapter",
        options=dict(beta=0.04, use_bias_correction_kl=True),  # TRL's default
    ),
    grpo(
        "grpo-token-moved-delta-below-clip",
        "grpo",
        "token",
        moved=MOVE,
        options=dict(delta=1.1),  # below 1 + epsilon_high = 1.2
    ),
    Case(
        "rloo",
        "rloo",
        options=dict(reward_weights=(1.0, 0.5)),
    ),
    Case(
        "rloo-kl-normalized-t0.7",
        "rloo",
        conversational=True,
        options=dict(
            beta=0.05,
            normalize_advantages=True,
            mask_truncated_completions=True,
            temperature=0.7,
        ),
    ),
    # RLOO's KL is taken at sampling time, where TRL's "ref" copy is the policy itself (KL
    # 0): its KL cases use the base model as the reference.
    Case(
        "rloo-moved-kl-clip",
        "rloo",
        moved=MOVE,
        options=dict(beta=0.05, reward_clip_range=(-1.0, 1.0), epsilon_high=0.28),
    ),
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """(model folder, mlx adapter folder, PEFT adapter folder)."""
    out = tmp_path_factory.mktemp("grpo_parity")
    mlx_dir, peft_dir = R.write_lora_pair(tiny_model, out, seed=1)
    return tiny_model, mlx_dir, peft_dir


@pytest.fixture(scope="module")
def mlx_model(models):
    """Our model with the adapter, shared by every case (each restores its weights)."""
    from mlx_lm import load

    model, tokenizer = load(str(models[0]), adapter_path=str(models[1]))
    model.freeze()  # as mlx_lm.lora: only the adapter trains
    model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    return model, tokenizer


@pytest.fixture(scope="module")
def completions(models):
    return T.make_completions(R.load_hf_tokenizer(models[0]), G, M)


@pytest.fixture(scope="module")
def delta(mlx_model):
    from mlx.utils import tree_flatten

    shapes = {
        k: tuple(v.shape) for k, v in tree_flatten(mlx_model[0].trainable_parameters())
    }
    return T.perturbation(shapes, 1.0)


# --------------------------------------------------------------------------- the two sides

_RESULTS = {}


def _trl(case, models, completions, delta):
    model_path, _, peft_dir = models
    rows = case.rows()
    trainer = T.make_trainer(
        case.method,
        model_path,
        peft_dir,
        rows,
        completions,
        G,
        M,
        reward_funcs=case.funcs,
        reference=case.reference,
        **case.trl_config(),
    )
    moved = {k: case.moved * v for k, v in delta.items()} if case.moved else None
    return T.trl_step(trainer, rows, G, moved)


def _ours(case, mlx_model, completions, delta, prompt_sharing):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_lm_pref.grpo import reward_functions
    from mlx_lm_pref.objective import PreferenceLoss
    from mlx_lm_pref.prompts import PromptDataset
    from mlx_lm_pref.reference import InitialAdapter
    from mlx_lm_pref.rollout import Rollouts

    model, tokenizer = mlx_model
    saved = tree_flatten(model.trainable_parameters())
    try:
        options = case.our_options(prompt_sharing)
        initial = (
            InitialAdapter(model) if options.reference == "initial_adapter" else None
        )
        dataset = PromptDataset(case.rows(), tokenizer, options)
        prompts = [dataset[i] for i in range(len(dataset))]
        rollouts = Rollouts(
            model,
            options,
            reward_functions(options),
            initial=initial,
            tokenizer=tokenizer,
        )
        (batch,) = rollouts.score(
            prompts, completions, steps=1, stale=bool(case.moved), training=True
        )
        assert batch.shared == (prompt_sharing == "true")
        if case.moved:
            moved = [(k, v + mx.array(case.moved * delta[k])) for k, v in saved]
            model.update(tree_unflatten(moved))
        loss_fn = PreferenceLoss(options, initial)
        _, _, metrics = loss_fn.metrics(model, batch)
        value, grads = nn.value_and_grad(model, lambda b: loss_fn(model, b)[0])(batch)
        mx.eval(value, grads, metrics)
        values = {
            k: float(n) / float(d) for k, (n, d) in metrics.items() if float(d) != 0
        }
        return {
            "loss": float(value),
            "metrics": values,
            "grads": {k: np.array(v, np.float64) for k, v in tree_flatten(grads)},
            "prompt_ids": [p.ids for p in prompts],
        }
    finally:
        model.update(tree_unflatten(saved))


def _both(case, models, mlx_model, completions, delta):
    if case.id not in _RESULTS:
        _RESULTS[case.id] = {
            "trl": _trl(case, models, completions, delta),
            **{
                f"ours/{sharing}": _ours(case, mlx_model, completions, delta, sharing)
                for sharing in ("false", "true")
            },
        }
    return _RESULTS[case.id]


def _rel(a, b):
    return abs(a - b) / max(abs(b), ABS / REL)


def _table(ours, theirs):
    lines = [f"{'metric':<34}{'ours':>15}{'TRL':>15}{'rel diff':>11}"]
    for k in sorted(set(ours) | set(theirs)):
        a, b = ours.get(k), theirs.get(k)
        d = _rel(a, b) if a is not None and b is not None else None
        cells = [f"{x:>15.8g}" if x is not None else f"{'-':>15}" for x in (a, b)]
        flag = "  <--" if d is None or abs(a - b) > REL * abs(b) + ABS else ""
        cells.append(f"{d:>11.2e}" if d is not None else f"{'-':>11}")
        lines.append(f"{k:<34}{''.join(cells)}{flag}")
    return "\n".join(lines)


def _params():
    """The cases as parameters."""
    return [pytest.param(case, id=case.id) for case in CASES]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", _params())
def test_prompt_ids_match_trl(case, models, mlx_model, completions, delta):
    results = _both(case, models, mlx_model, completions, delta)
    for sharing in ("false", "true"):
        assert results[f"ours/{sharing}"]["prompt_ids"] == results["trl"]["prompt_ids"]


@pytest.mark.parametrize("case", _params())
def test_loss_and_metrics_match_trl(case, models, mlx_model, completions, delta):
    results = _both(case, models, mlx_model, completions, delta)
    theirs = dict(results["trl"]["metrics"], loss=results["trl"]["loss"])
    for sharing in ("false", "true"):
        ours = results[f"ours/{sharing}"]
        values = dict(ours["metrics"])
        # our loss metric is the loss we return
        assert abs(values["loss"] - ours["loss"]) <= REL * abs(ours["loss"]) + ABS
        label = f"{case.id} prompt_sharing {sharing}\n{_table(values, theirs)}"
        assert set(values) == set(theirs), label
        for k, b in theirs.items():
            assert abs(values[k] - b) <= REL * abs(b) + ABS, f"{k}: {label}"


@pytest.mark.parametrize("case", _params())
def test_gradient_matches_trl(case, models, mlx_model, completions, delta):
    results = _both(case, models, mlx_model, completions, delta)
    theirs = results["trl"]["grads"]
    for sharing in ("false", "true"):
        ours = results[f"ours/{sharing}"]["grads"]
        assert sorted(ours) == sorted(theirs), "different LoRA parameter sets"
        worst = max(
            (np.abs(ours[k] - b).max() / np.abs(b).max(), k) for k, b in theirs.items()
        )
        assert worst[0] <= GRAD_REL, f"{case.id} prompt_sharing {sharing}: {worst}"


def test_cases_exercise_what_they_claim(models, mlx_model, completions, delta):
    """The covering set is not vacuous: ragged completions, one truncated; None rewards and
    one completion no function scores; moved cases clip; KL cases have a KL; flat groups.
    """
    tokenizer = R.load_hf_tokenizer(models[0])
    assert len(set(map(len, completions))) >= 6
    truncated = [c for c in completions if c[-1] != tokenizer.eos_token_id]
    assert len(truncated) == 1 and len(truncated[0]) == M
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    rows = [r for r in T.prompt_rows(False) for _ in range(G)]
    prompts, targets = [r["prompt"] for r in rows], [r["target"] for r in rows]
    length = T.length_reward(prompts, texts, completions, targets)
    yes = T.yes_reward(prompts, texts, completions)
    assert sum(v is None for v in yes) == 2
    assert [a is None and b is None for a, b in zip(length, yes)].count(True) == 1
    for case in CASES:
        m = _both(case, models, mlx_model, completions, delta)["trl"]["metrics"]
        assert m["completions/clipped_ratio"] > 0, case.id
        flat_scored = case.flat and case.options.get("scale_rewards") != "batch"
        if case.method == "grpo" and flat_scored:
            assert m["frac_reward_zero_std"] > 0, case.id
        if case.beta:
            assert abs(m["kl"]) > 1e-3, case.id
        if case.moved and case.options.get("loss_type") == "cispo":
            assert m["cispo_clip_ratio"] > 0, case.id
        elif case.moved:
            assert m["clip_ratio/region_mean"] > 0, case.id
