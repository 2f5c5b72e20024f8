"""The preference options: one dataclass, the single source for CLI flags and YAML keys.

Each field becomes ``--field-name`` on ``mlx_lm.lora``'s parser and ``field_name`` in its
``CONFIG_DEFAULTS`` (so a YAML config may set it). Names and defaults are TRL 1.16's
(``DPOConfig``, ``ORPOConfig``, ``CPOConfig``, ``KTOConfig``). Values are checked in ``__post_init__`` for
both paths, because YAML values never pass through argparse.

``loss_type`` picks the trainer and, for DPO, TRL's loss names:
- ``sft`` (default): mlx-lm's own SFT loss, untouched;
- ``dpo`` (= ``sigmoid``) or any TRL DPO loss name, or a list of them combined with
  ``loss_weights`` (RPO = ``[sigmoid, sft]``); inside a list ``sft`` is TRL's DPO ``sft`` term;
- ``orpo``; ``cpo`` (with ``cpo_loss_type``), ``simpo`` and ``alphapo`` (TRL's CPO sugar);
- ``kto`` or ``apo_zero_unpaired``: TRL's ``KTOTrainer`` on unpaired rows (a completion and a
  boolean label each; paired rows are unpaired as TRL does);
- ``grpo``, ``dr_grpo``, ``dapo``, ``bnpo`` or ``cispo``: TRL's ``GRPOTrainer`` with that
  ``loss_type`` (TRL's default is dapo), and ``rloo``: TRL's ``RLOOTrainer``; both train on
  prompt-only rows with completions sampled from the model and scored by ``reward_funcs``.
"""

import argparse
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

DPO_LOSSES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
    "cdpo",
)
KTO_LOSSES = ("kto", "apo_zero_unpaired")
GRPO_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo")
LOSS_TYPES = ("sft", "dpo", "orpo", "cpo", "simpo", "alphapo") + KTO_LOSSES
LOSS_TYPES += GRPO_LOSSES + ("rloo",)
LOSS_TYPES += tuple(n for n in DPO_LOSSES if n != "sft")
CPO_LOSSES = ("sigmoid", "hinge", "ipo", "simpo")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL: the f-DPO reparameterisation only cancels log Z in a chosen-minus-rejected difference.
F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust"}
F_DIVERGENCE_LOSSES |= {"discopop", "sft", "cdpo"}
REFERENCES = ("auto", "adapters_off", "initial_adapter", "precomputed", "none")
TRUNCATION_MODES = ("keep_start", "keep_end")
PROMPT_SHARING = ("auto", "true", "false")
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
RL = ("grpo", "rloo")
# TRL 1.16's defaults that differ between trainers (GRPOConfig, RLOOConfig, the others').
BETA = {"grpo": 0.0, "rloo": 0.05}
NUM_GENERATIONS = {"grpo": 8, "rloo": 2}


# The trainers whose TRL 1.16 config declares each option (DPOConfig, ORPOConfig, CPOConfig,
# KTOConfig); the options not listed are read by every method. ``truncation_mode``'s only
# other value, keep_end, is DPO's collator alone (ORPO and CPO cut the answer, KTO the end);
# ``rpo_alpha`` is TRL 0.x's DPO option.
READ_BY = {
    "loss_weights": ("dpo",),
    "label_smoothing": ("dpo", "cpo"),
    "f_divergence_type": ("dpo",),
    "f_alpha_divergence_coef": ("dpo",),
    "ld_alpha": ("dpo",),
    "use_weighting": ("dpo",),
    "discopop_tau": ("dpo",),
    "rpo_alpha": ("dpo",),
    "truncation_mode": ("dpo",),
    "cpo_loss_type": ("cpo",),
    "cpo_alpha": ("cpo",),
    "simpo_gamma": ("cpo",),
    "alpha": ("cpo",),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
    "reference": ("dpo", "kto") + RL,
    "identical_pairs": ("dpo", "orpo", "cpo", "kto"),
    # GRPOConfig and RLOOConfig
    "num_generations": RL,
    "max_completion_length": RL,
    "temperature": RL,
    "top_p": RL,
    "top_k": RL,
    "min_p": RL,
    "repetition_penalty": RL,
    "steps_per_generation": RL,
    "generation_batch_size": RL,
    "num_iterations": RL,
    "epsilon": RL,
    "epsilon_high": RL,
    "reward_funcs": RL,
    "reward_weights": RL,
    "mask_truncated_completions": RL,
    "delta": ("grpo",),
    "scale_rewards": ("grpo",),
    "importance_sampling_level": ("grpo",),
    "multi_objective_aggregation": ("grpo",),
    "top_entropy_quantile": ("grpo",),
    "use_bias_correction_kl": ("grpo",),
    "normalize_advantages": ("rloo",),
    "reward_clip_range": ("rloo",),
}
TRAINERS = {
    "dpo": "DPOTrainer",
    "orpo": "ORPOTrainer",
    "cpo": "CPOTrainer",
    "kto": "KTOTrainer",
    "grpo": "GRPOTrainer",
    "rloo": "RLOOTrainer",
}
# How TRL's other trainers cut a sequence longer than max_length (they have no keep_end).
CUTS = {
    "orpo": "has no truncation_mode: it keeps the prompt whole and cuts the answer",
    "cpo": "has no truncation_mode: it keeps the prompt whole and cuts the answer",
    "kto": "cuts rows longer than max_seq_length from the right only (keep_start)",
    "grpo": "cuts nothing: it drops the prompts that leave no room for "
    "max_completion_length tokens",
    "rloo": "cuts nothing: it drops the prompts that leave no room for "
    "max_completion_length tokens",
}


def unread_message(name, value, loss_type, method) -> str:
    """Why ``name`` set to ``value`` is refused for ``method`` (see ``READ_BY``)."""
    losses = ",".join(loss_type)
    trainer = f"TRL's {TRAINERS[method]}"
    if name == "reference":
        why = f"reference {value} with loss_type {losses}: "
        why += f"{method.upper()} has no reference model"
    elif name == "truncation_mode":
        why = f"truncation_mode {value}: {trainer} {CUTS[method]}"
    elif name == "max_completion_length":
        why = "max_completion_length limits sampled completions (GRPO, RLOO, and "
        why += "log_completions' samples); "
        why += f"loss_type {losses} reads max_seq_length, a limit on the whole sequence"
    elif name == "rpo_alpha":
        why = "rpo_alpha applies to DPO loss types only; "
        why += f"loss_type {losses} would ignore it"
    else:
        owners = " and ".join(m.upper() for m in READ_BY[name])
        why = f"{name} is a {owners} option; {trainer} has no such option "
        why += f"(loss_type {losses}) and would ignore it"
    return f"{why}. Remove it."


class ConfigError(ValueError):
    """A preference option, or a combination of options, that cannot be trained as asked."""


def _names(value) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = value.split(",")
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(v, str) for v in value)
    ):
        raise ConfigError(
            f"loss_type must be a name or a list of names, got {value!r}."
        )
    return tuple(v.strip() for v in value)


def _chunk_size(value) -> str:
    """``auto`` or a whole number >= 0 (0: off), as text."""
    text = str(value).strip().lower()
    if text == "auto":
        return text
    if text.isdigit() and not isinstance(value, (bool, float)):
        if int(text) == 0 or int(text) >= 64:
            return str(int(text))
    raise ConfigError(
        f"head_chunk_size must be auto, 0 (off) or a whole number of vocabulary rows "
        f">= 64, got {value!r}."
    )


def _unknown(name, value, choices) -> ConfigError:
    guess = close_match(value, choices)
    hint = f" Did you mean {guess!r}?" if guess else ""
    return ConfigError(
        f"Unknown {name} {value!r}. Valid values: {', '.join(choices)}.{hint}"
    )


def _number(name, value) -> float:
    """A float option's value: a finite number, or text that reads as one (argparse,
    YAML)."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value}.")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number, got {value!r}.")
    return number


def _floats(value, name="loss_weights") -> Tuple[float, ...]:
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)):
        value = (value,)
    return tuple(_number(name, v) for v in value)


def _whole(name, value, least) -> int:
    """An int option's value: a whole number >= ``least`` (text that reads as one from
    argparse; YAML gives ints)."""
    if isinstance(value, (bool, float)) or not str(value).strip().lstrip("-").isdigit():
        raise ConfigError(f"{name} must be a whole number >= {least}, got {value!r}.")
    number = int(str(value).strip())
    if number < least:
        raise ConfigError(f"{name} must be a whole number >= {least}, got {number}.")
    return number


def _specs(value) -> tuple:
    """reward_funcs: a comma-separated text (the command line), a YAML list of names, or
    (a script's) the functions themselves."""
    if isinstance(value, str) or callable(value):
        value = (
            [v for v in value.split(",") if v.strip()]
            if isinstance(value, str)
            else [value]
        )
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, str) or callable(v) for v in value
    ):
        raise ConfigError(
            f"reward_funcs must be names (module:function, file.py:function or a "
            f"built-in) or functions, got {value!r}."
        )
    return tuple(v.strip() if isinstance(v, str) else v for v in value)


SAMPLE_TOKENS = 128  # log_completions' answers in the methods that do not sample

# The int options (argparse reads them as text; YAML gives ints) and their least values.
WHOLE = {
    "num_generations": 2,
    "max_completion_length": 1,
    "top_k": 0,
    "steps_per_generation": 1,
    "generation_batch_size": 1,
    "num_iterations": 1,
    "num_completions_to_print": 0,
    "save_total_limit": 1,
}


@dataclass(frozen=True)
class PreferenceArgs:
    loss_type: Tuple[str, ...] = field(
        default=("sft",),
        metadata={
            "help": "sft (mlx-lm's own loss, untouched), dpo (= sigmoid) or any TRL DPO loss "
            f"({', '.join(DPO_LOSSES)}), a comma-separated list of DPO losses combined "
            "with --loss-weights, orpo, cpo, simpo, alphapo, or kto / apo_zero_unpaired "
            "(TRL's KTOTrainer: unpaired rows with a boolean label).",
        },
    )
    beta: Optional[float] = field(
        default=None,
        metadata={
            "help": "DPO and KTO: KL-penalty strength (IPO's tau). ORPO: weight of the "
            "odds-ratio term. CPO/SimPO: inverse temperature. GRPO/RLOO: weight of the KL "
            "to the reference (0: no reference pass). Default: TRL's, 0.1 (0.0 for GRPO, "
            "0.05 for RLOO)."
        },
    )
    loss_weights: Optional[Tuple[float, ...]] = field(
        default=None,
        metadata={
            "help": "Weights of the DPO losses in --loss-type, comma-separated (1 each).",
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "Label noise epsilon for robust, exo_pair, aot, aot_unpaired, cdpo and "
            "CPO/SimPO (TRL's sigmoid DPO ignores it; cdpo is TRL 0.x's smoothed sigmoid)."
        },
    )
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata={
            "help": "f-DPO divergence (Wang et al. 2023) applied to the DPO log-ratios.",
            "choices": F_DIVERGENCES,
        },
    )
    f_alpha_divergence_coef: float = field(
        default=0.5,
        metadata={"help": "alpha for f_divergence_type alpha_divergence."},
    )
    ld_alpha: Optional[float] = field(
        default=None,
        metadata={
            "help": "LD-DPO: weight in [0, 1] of the completion tokens past the shorter "
            "completion's length, for policy and reference (unset: standard DPO)."
        },
    )
    use_weighting: bool = field(
        default=False,
        metadata={"help": "WPO: weight each pair by its policy probability (DPO)."},
    )
    discopop_tau: float = field(
        default=0.05,
        metadata={"help": "Temperature of the discopop loss's mixing coefficient."},
    )
    rpo_alpha: Optional[float] = field(
        default=None,
        metadata={
            "help": "RPO convenience (TRL 0.x): adds TRL's DPO 'sft' term with this weight, "
            "i.e. loss_type [..., sft] with loss_weights [..., rpo_alpha]."
        },
    )
    cpo_loss_type: str = field(
        default="sigmoid",
        metadata={
            "help": "Loss of --loss-type cpo (TRL CPOConfig.loss_type).",
            "choices": CPO_LOSSES,
        },
    )
    cpo_alpha: float = field(
        default=1.0,
        metadata={
            "help": "CPO/SimPO: weight of the NLL (behaviour cloning) term on chosen "
            "completions; 0 gives pure SimPO."
        },
    )
    simpo_gamma: float = field(
        default=0.5,
        metadata={"help": "SimPO target reward margin gamma."},
    )
    alpha: float = field(
        default=0.0,
        metadata={
            "help": "CPO/SimPO reward shape (AlphaPO): r = (1 - p^-alpha) / alpha; 0 uses "
            "log-probs."
        },
    )
    desirable_weight: float = field(
        default=1.0,
        metadata={
            "help": "KTO: weight of the losses of desirable rows (label true), to balance "
            "unequal numbers of desirable and undesirable rows."
        },
    )
    undesirable_weight: float = field(
        default=1.0,
        metadata={
            "help": "KTO: weight of the losses of undesirable rows (label false)."
        },
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={
            "help": "Which end of a pair longer than max_seq_length is kept (DPO).",
            "choices": TRUNCATION_MODES,
        },
    )
    on_nonfinite: str = field(
        default="stop",
        metadata={
            "help": "A non-finite loss or gradient: stop training, naming the iteration and "
            "leaving the last saved adapter intact, or skip that update (parameters and "
            "optimizer state unchanged) and go on.",
            "choices": ("stop", "skip"),
        },
    )
    identical_pairs: str = field(
        default="keep",
        metadata={
            "help": "Pairs whose chosen equals rejected teach nothing; they are counted and "
            "reported, and kept (as TRL does) or dropped.",
            "choices": ("keep", "drop"),
        },
    )
    reference: str = field(
        default="auto",
        metadata={
            "help": "The DPO reference model. adapters_off: the base model (LoRA scales set "
            "to 0 for the reference pass, no extra memory). initial_adapter: the adapter as "
            "it was when training started (DPO after SFT with --resume-adapter-file; only "
            "the adapter tensors are kept). precomputed: one pass before training scores "
            "every pair with the model as it starts (cached on disk); no reference forward "
            "per step, and the only choice for full fine-tuning. none: reference log-probs "
            "are 0 (TRL 0.x reference_free). auto: precomputed for full fine-tuning, "
            "initial_adapter when training starts from trained adapter weights, else "
            "adapters_off.",
            "choices": REFERENCES,
        },
    )

    prompt_sharing: str = field(
        default="auto",
        metadata={
            "help": "Run each pair's prompt through the model once and both completions on "
            "its keys and values (same losses and gradients as the concatenated rows). "
            "auto: for the batches where it computes fewer positions, on models where a "
            "probe pair checks out; true: every batch with a shared prompt; false: never.",
            "choices": PROMPT_SHARING,
        },
    )

    share_frozen_layers: str = field(
        default="auto",
        metadata={
            "help": "The reference pass (adapters off, or the initial adapter) takes the "
            "policy pass's hidden states below the first adapted layer, where both compute "
            "the same thing, and runs only the layers from there up (the same numbers). "
            "auto: where a probe batch checks out when training starts; false: the "
            "reference runs every layer.",
            "choices": ("auto", "false"),
        },
    )

    report_metrics: str = field(
        default="compact",
        metadata={
            "help": "What the report lines under mlx-lm's show: compact, the numbers one "
            "watches (loss, KTO's kl, rewards/accuracies, rewards/margins; ORPO's nll_loss and "
            "log_odds_ratio), or all of them. metrics.jsonl and --report-to get all either "
            "way.",
            "choices": ("compact", "all"),
        },
    )

    head_chunk_size: str = field(
        default="auto",
        metadata={
            "help": "Run the output layer in tiles of this many vocabulary rows, so the "
            "(rows, tokens, vocabulary) logits never exist whole: a fraction of the memory "
            "on a real vocabulary, the same numbers. auto: tiles sized from the batch when "
            "the vocabulary has 4096 entries or more and the model's output layer is a plain "
            "one (checked when training starts); 0: the whole logits."
        },
    )

    # ---- checkpoints (TRL's TrainingArguments names) ----
    resume_from_checkpoint: Optional[str] = field(
        default=None,
        metadata={
            "help": "Continue an interrupted run from a checkpoint: true (or --resume) "
            "for the newest under adapter_path/checkpoints, or a checkpoint folder. "
            "Weights, optimizer state, the schedule's position, the data's position and "
            "the random states come back; iters, report, eval and save cadence may "
            "change, nothing else."
        },
    )
    save_total_limit: Optional[int] = field(
        default=None,
        metadata={
            "help": "Keep only the newest N checkpoints (checkpoints/NNNNNNN, written every "
            "save_every iterations and at the end); default: all."
        },
    )
    save_only_model: Optional[bool] = field(
        default=None,
        metadata={
            "help": "true: save only the adapter weights (mlx-lm's "
            "NNNNNNN_adapters.safetensors), no checkpoints: such a run cannot be resumed. "
            "false: write checkpoints, SFT runs too. Default: checkpoints for preference "
            "runs, none for SFT (upstream's)."
        },
    )

    # ---- GRPO and RLOO (TRL 1.16's GRPOConfig / RLOOConfig) ----
    reward_funcs: Optional[Tuple[str, ...]] = field(
        default=None,
        metadata={
            "help": "GRPO/RLOO: the reward functions, comma-separated: module.path:function, "
            "file.py:function, or a built-in (think_format_reward, "
            "soft_overlong_punishment, repetition_penalty_reward, accuracy_reward). Each "
            "is called as TRL's: f(prompts=, completions=, completion_ids=, **columns) -> "
            "one float (or None) per completion."
        },
    )
    reward_weights: Optional[Tuple[float, ...]] = field(
        default=None,
        metadata={"help": "Weights of the reward functions, comma-separated (1 each)."},
    )
    num_generations: Optional[int] = field(
        default=None,
        metadata={
            "help": "Completions sampled per prompt (a group), at least 2. Default: 8 for "
            "GRPO, 2 for RLOO (TRL's)."
        },
    )
    max_completion_length: Optional[int] = field(
        default=None,
        metadata={
            "help": "Most tokens sampled per completion. Default: 512 (TRL's); the "
            "samples of log_completions in other methods: 128."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature, > 0; the log-probs of the loss are taken at it "
            "too, as TRL's."
        },
    )
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling: in (0, 1], 1 keeps all."}
    )
    top_k: int = field(
        default=0, metadata={"help": "Sample among the k likeliest tokens (0: all)."}
    )
    min_p: Optional[float] = field(
        default=None,
        metadata={
            "help": "Drop tokens below min_p times the likeliest one's probability."
        },
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata={"help": "mlx-lm's repetition penalty while sampling (1: none)."},
    )
    steps_per_generation: Optional[int] = field(
        default=None,
        metadata={
            "help": "Batches trained per generation: the generation batch is batch_size x "
            "this many completions. Default: grad_accumulation_steps."
        },
    )
    generation_batch_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "Completions sampled at once (a multiple of batch_size); the other way "
            "to set steps_per_generation."
        },
    )
    num_iterations: int = field(
        default=1,
        metadata={
            "help": "mu: times each generation batch is trained on (its log-probs at "
            "sampling time are the importance ratio's denominator)."
        },
    )
    epsilon: float = field(
        default=0.2, metadata={"help": "Lower clipping bound of the importance ratio."}
    )
    epsilon_high: Optional[float] = field(
        default=None,
        metadata={
            "help": "Upper clipping bound (DAPO's clip-higher); cispo's ratio cap. Default: "
            "epsilon."
        },
    )
    delta: Optional[float] = field(
        default=None,
        metadata={"help": "GRPO: two-sided clipping, the ratio capped at delta."},
    )
    scale_rewards: str = field(
        default="group",
        metadata={
            "help": "GRPO: divide advantages by the reward std of the group, of the batch, "
            "or not at all (Dr. GRPO).",
            "choices": SCALE_REWARDS,
        },
    )
    multi_objective_aggregation: str = field(
        default="sum_then_normalize",
        metadata={
            "help": "GRPO: weighted sum of the rewards then group-normalised, or each "
            "reward group-normalised first (GDPO).",
            "choices": AGGREGATIONS,
        },
    )
    importance_sampling_level: str = field(
        default="token",
        metadata={
            "help": "GRPO: importance ratio per token, or per sequence (GSPO).",
            "choices": ("token", "sequence"),
        },
    )
    mask_truncated_completions: bool = field(
        default=False,
        metadata={
            "help": "Leave completions cut at max_completion_length out of the loss."
        },
    )
    top_entropy_quantile: float = field(
        default=1.0,
        metadata={
            "help": "GRPO: train only on the tokens in this top quantile of entropy "
            "(1: every token)."
        },
    )
    use_bias_correction_kl: bool = field(
        default=True,
        metadata={
            "help": "GRPO: weight the KL term's tokens by the importance ratio (TRL's "
            "default); false: the plain k3 estimate."
        },
    )
    normalize_advantages: bool = field(
        default=False,
        metadata={"help": "RLOO: normalise advantages over the generation batch."},
    )
    reward_clip_range: Optional[Tuple[float, ...]] = field(
        default=None,
        metadata={"help": "RLOO: clip rewards to min,max before the baseline."},
    )
    log_completions: bool = field(
        default=False,
        metadata={
            "help": "Samples while training, written to completions.jsonl beside "
            "metrics.jsonl and printed under the reports: GRPO and RLOO print the sampled "
            "prompts, completions and rewards at each report; the other methods the "
            "greedy answers to a few fixed validation prompts at each validation."
        },
    )
    num_completions_to_print: Optional[int] = field(
        default=None,
        metadata={
            "help": "How many samples log_completions prints (GRPO, RLOO; default: "
            "all), or how many validation prompts it answers (other methods; default 4)."
        },
    )

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("loss_type", _names(self.loss_type))
        set_("head_chunk_size", _chunk_size(self.head_chunk_size))
        for name in ("prompt_sharing", "share_frozen_layers"):
            if isinstance(getattr(self, name), bool):  # YAML true/false
                set_(name, str(getattr(self, name)).lower())
        if self.loss_weights is not None:
            set_("loss_weights", _floats(self.loss_weights))
        for name in ("reward_weights", "reward_clip_range"):
            if getattr(self, name) is not None:
                set_(name, _floats(getattr(self, name), name))
        if self.reward_funcs is not None:
            set_("reward_funcs", _specs(self.reward_funcs))
        if isinstance(self.resume_from_checkpoint, bool):  # YAML true / false
            set_(
                "resume_from_checkpoint",
                "true" if self.resume_from_checkpoint else None,
            )
        elif isinstance(self.resume_from_checkpoint, Path):
            set_("resume_from_checkpoint", str(self.resume_from_checkpoint))
        if isinstance(self.scale_rewards, bool):  # TRL's True / False
            set_("scale_rewards", "group" if self.scale_rewards else "none")
        for name, least in WHOLE.items():
            if getattr(self, name) is not None:
                set_(name, _whole(name, getattr(self, name), least))
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise _unknown(f.name, value, choices)
        for name in self.loss_type:
            if name not in LOSS_TYPES:
                raise _unknown("loss_type", name, LOSS_TYPES)
        self._normalise(set_)
        self._validate()

    def _normalise(self, set_):
        """Fold TRL's sugar into the canonical form (idempotent)."""
        typed = self.loss_type
        names = tuple("sigmoid" if n == "dpo" else n for n in self.loss_type)
        if names == ("simpo",) or names == ("alphapo",):
            set_("cpo_loss_type", "simpo")
            if names == ("alphapo",):  # TRL CPOConfig: alphapo = simpo with cpo_alpha 0
                set_("cpo_alpha", 0.0)
            names = ("cpo",)
        set_("loss_type", names)
        self._refuse_unread(typed)
        method = self.method
        if self.beta is None:
            set_("beta", BETA.get(method, 0.1))
        if method in RL:
            if self.num_generations is None:
                set_("num_generations", NUM_GENERATIONS[method])
            if self.max_completion_length is None:
                set_("max_completion_length", 512)
        elif self.log_completions and self.max_completion_length is None:
            set_("max_completion_length", SAMPLE_TOKENS)
        if self.rpo_alpha is not None and self.method == "dpo":
            weights = self.loss_weights or (1.0,) * len(names)
            set_("loss_type", names + ("sft",))
            set_("loss_weights", weights + (float(self.rpo_alpha),))
            set_("rpo_alpha", None)

    def _refuse_unread(self, typed):
        """An option set away from its default for a method whose TRL trainer has no such
        option would be accepted and ignored: refuse it (``READ_BY``). An SFT run is
        mlx-lm's, which ignores our keys."""
        method = self.method
        if method == "sft":
            return
        defaults = {f.name: f.default for f in fields(self)}
        for name, methods in READ_BY.items():
            if name == "max_completion_length" and self.log_completions:
                continue  # it limits the samples of every method
            value = getattr(self, name)
            if method not in methods and value != defaults[name]:
                raise ConfigError(unread_message(name, value, typed, method))

    def _validate(self):
        names, method = self.loss_type, self.method
        if method in ("orpo", "cpo", "kto") + RL and len(names) > 1:
            raise ConfigError(
                f"loss_type {names[0]} cannot be combined with {list(names[1:])}."
            )
        if set(names) & set(GRPO_LOSSES + ("rloo",)) and method not in RL:
            raise ConfigError(
                f"loss_type {'/'.join(GRPO_LOSSES + ('rloo',))} trains on sampled "
                f"completions and cannot follow other loss types ({list(names)})."
            )
        if set(names) & set(KTO_LOSSES) and method != "kto":
            raise ConfigError(
                f"loss_type {'/'.join(KTO_LOSSES)} trains on unpaired rows and cannot "
                f"follow other loss types ({list(names)})."
            )
        self._validate_kto()
        if method in RL:
            self._validate_rl()
        elif not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}.")
        if self.loss_weights is not None and len(self.loss_weights) != len(names):
            raise ConfigError(
                f"loss_weights has {len(self.loss_weights)} values for {len(names)} loss "
                f"types {list(names)}: give one weight per loss type."
            )
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}."
            )
        if "exo_pair" in names and self.label_smoothing == 0.0:
            raise ConfigError(
                "loss_type exo_pair needs label_smoothing > 0 (its log(epsilon) term is "
                "-inf at 0); the EXO paper uses 1e-3."
            )
        if (
            self.f_divergence_type != "reverse_kl"
            and not set(names) <= F_DIVERGENCE_LOSSES
        ):
            raise ConfigError(
                f"f_divergence_type {self.f_divergence_type} is only defined for "
                f"{sorted(F_DIVERGENCE_LOSSES)}; got {list(names)}. Use reverse_kl."
            )
        if self.use_weighting and set(names) & {"aot", "aot_unpaired"}:
            raise ConfigError(
                "use_weighting (WPO) cannot be combined with aot/aot_unpaired: those losses "
                "sort pairs within the batch, which would misalign the per-pair weights."
            )
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ConfigError(f"ld_alpha must be in [0, 1], got {self.ld_alpha}.")
        if self.cpo_alpha < 0:
            raise ConfigError(f"cpo_alpha must be >= 0, got {self.cpo_alpha}.")

    def _validate_kto(self):
        """KTO's own weights, and its reference."""
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.method != "kto":
            return
        if self.desirable_weight == 0 and self.undesirable_weight == 0:
            raise ConfigError(
                "desirable_weight and undesirable_weight are both 0: nothing to train."
            )
        if self.reference == "none":
            raise ConfigError(
                f"reference none with loss_type {self.loss_type[0]}: TRL's KTOTrainer "
                "always has a reference model. Use reference auto (or adapters_off, "
                "initial_adapter, precomputed)."
            )

    def _validate_rl(self):
        """GRPO's and RLOO's options, as TRL's configs and trainers check them."""
        names = self.loss_type
        if len(names) > 1:
            raise ConfigError(
                f"loss_type {names[0]} cannot be combined with {list(names[1:])}."
            )
        if not self.reward_funcs:
            raise ConfigError(
                f"loss_type {names[0]} learns from rewards: give --reward-funcs (YAML: "
                "reward_funcs), e.g. my_rewards.py:brevity or think_format_reward."
            )
        if self.reward_weights is not None and len(self.reward_weights) != len(
            self.reward_funcs
        ):
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} values for "
                f"{len(self.reward_funcs)} reward functions: give one weight each."
            )
        if self.steps_per_generation and self.generation_batch_size:
            raise ConfigError(
                "steps_per_generation and generation_batch_size set the same thing: "
                "give one of them."
            )
        checks = (
            ("beta", self.beta >= 0, ">= 0"),
            ("temperature", self.temperature > 0, "> 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", self.min_p is None or 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("epsilon", self.epsilon >= 0, ">= 0"),
            ("epsilon_high", (self.epsilon_high or 0) >= 0, ">= 0"),
            ("delta", self.delta is None or self.delta > 1, "> 1"),
            ("top_entropy_quantile", 0 < self.top_entropy_quantile <= 1, "in (0, 1]"),
        )
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"{name} must be {want}, got {getattr(self, name)}.")
        clip = self.reward_clip_range
        if clip is not None and (len(clip) != 2 or clip[0] > clip[1]):
            raise ConfigError(
                f"reward_clip_range must be min,max with min <= max, got {list(clip)}."
            )
        if self.reference not in ("auto", "adapters_off", "initial_adapter"):
            raise ConfigError(
                f"reference {self.reference} with loss_type {names[0]}: completions are "
                "sampled while training, so the reference scores them live. Use "
                "reference auto, adapters_off or initial_adapter."
            )
        if self.beta == 0 and self.reference != "auto":
            raise ConfigError(
                f"reference {self.reference} with beta 0: beta 0 has no KL term and no "
                "reference pass. Set beta > 0, or remove reference."
            )

    @property
    def method(self) -> str:
        """'sft' (mlx-lm's own), 'dpo', 'orpo', 'cpo', 'kto', 'grpo' or 'rloo'."""
        if self.loss_type == ("sft",):
            return "sft"
        if self.loss_type[0] in ("orpo", "cpo", "rloo"):
            return self.loss_type[0]
        if self.loss_type[0] in KTO_LOSSES:
            return "kto"
        if self.loss_type[0] in GRPO_LOSSES:
            return "grpo"
        return "dpo"

    @property
    def generates(self) -> bool:
        """GRPO and RLOO: trained on completions sampled from the model."""
        return self.method in RL

    def generation_steps(self, batch_size, grad_accumulation_steps=1) -> int:
        """TRL's steps_per_generation: given, or from generation_batch_size (a multiple of
        ``batch_size``), or mlx-lm's ``grad_accumulation_steps``."""
        if self.generation_batch_size:
            return self.generation_batch_size // batch_size
        return self.steps_per_generation or grad_accumulation_steps

    @property
    def clip_high(self) -> float:
        """TRL's epsilon_high: epsilon unless set."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def kl_term(self) -> bool:
        """KTO's KL estimate from mismatched rows (every KTO loss but apo_zero_unpaired)."""
        return self.loss_type == ("kto",)

    @property
    def is_preference(self) -> bool:
        return self.method != "sft"

    @property
    def writes_checkpoints(self) -> bool:
        """Preference runs unless save_only_model; SFT runs when asked (save_only_model
        false, or resuming)."""
        if self.save_only_model is not None:
            return not self.save_only_model
        return self.is_preference or bool(self.resume_from_checkpoint)

    @property
    def needs_reference(self) -> bool:
        """DPO and KTO; GRPO and RLOO with a KL term (beta > 0)."""
        return self.method in ("dpo", "kto") or (self.generates and self.beta > 0)

    @property
    def live_reference(self) -> bool:
        """A reference pass through the model at each step (``auto``, unresolved outside
        a training run, is the base model's)."""
        live = ("auto", "adapters_off", "initial_adapter")
        return self.needs_reference and self.reference in live

    @property
    def weights(self) -> Tuple[float, ...]:
        return self.loss_weights or (1.0,) * len(self.loss_type)

    @classmethod
    def from_namespace(cls, ns) -> "PreferenceArgs":
        """Read the options from an argparse/SimpleNamespace (the merged CLI and YAML values
        of mlx_lm.lora) or a dataclass; None means default. A value of the wrong type (a
        YAML string where a boolean or a number belongs) is refused, not coerced: the string
        "false" would otherwise be true."""
        values = {}
        for f in fields(cls):
            v = getattr(ns, f.name, None)
            if v is None:
                continue
            if f.type in (bool, Optional[bool]) and not isinstance(v, bool):
                raise ConfigError(
                    f"{f.name} must be true or false, got {v!r}"
                    + (
                        " (a string: write it without quotes)"
                        if isinstance(v, str)
                        else ""
                    )
                    + "."
                )
            if f.type in (float, Optional[float]):
                v = _number(f.name, v)
            values[f.name] = v
        return cls(**values)

    def replace(self, **changes) -> "PreferenceArgs":
        return replace(self, **changes)


def config_defaults() -> dict:
    """The entries mlx_lm.lora's CONFIG_DEFAULTS gains."""

    def plain(value):  # as a user would write it in YAML
        return ",".join(value) if isinstance(value, tuple) else value

    return {f.name: plain(f.default) for f in fields(PreferenceArgs)}


# --help's closing examples: starting values that worked (README, "Methods: which one, and
# settings that work", has what each was measured on).
EXAMPLES = """\
starting points that worked (measured; README: "Methods: which one, and settings that work"):
  DPO (pairs)                   --loss-type dpo --rpo-alpha 1 --learning-rate 3e-5
                                (SmolLM2-135M-Instruct; without rpo_alpha, 1e-4 collapsed)
  ORPO (pairs, no reference)    --loss-type orpo --learning-rate 3e-5   (SmolLM2-135M)
  KTO (rows with a label)       --loss-type kto --beta 2 --learning-rate 3e-5   (demo model)
  GRPO (your reward function)   --loss-type grpo --reward-funcs my_rewards.py:score
                                --num-generations 8 --learning-rate 1e-4   (demo model)
  samples while training        --log-completions
  an interrupted run            the same command with --resume
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option, in mlx-lm's style: booleans are ``store_true`` flags, and
    defaults stay None so a YAML value can fill them in; the examples close --help."""
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    group = parser.add_argument_group("preference tuning (mlx_lm_pref)")
    for f in fields(PreferenceArgs):
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.metadata['help']} Default: {default}."
        if f.type in (bool, Optional[bool]):  # --no-... for one on by default or unset
            optional = default or f.type is not bool
            action = argparse.BooleanOptionalAction if optional else "store_true"
            group.add_argument(flag, action=action, default=None, help=help)
            continue
        group.add_argument(
            flag,
            type=float if f.type in (float, Optional[float]) else str,
            choices=f.metadata.get("choices"),
            default=None,
            help=help,
        )
    group.add_argument(
        "--resume",
        dest="resume_from_checkpoint",
        action="store_const",
        const="true",
        default=None,
        help="Continue the run from its newest checkpoint (resume_from_checkpoint: true).",
    )


class Instead(NamedTuple):
    """What to write instead of a TRL option name: ``option`` (ours or mlx-lm's) set to
    ``value`` if a particular one, or, where ``option`` is None, nothing: ``note`` says why.
    """

    option: Optional[str]
    value: str = ""
    note: str = ""


UNSUPPORTED_REFERENCE = (
    "TR-DPO's reference updates: the reference stays as training starts"
)
MASKED_PADDING = "padding is masked out: its token does not matter"
# TRL option names that are not ours: the fields DPOConfig, ORPOConfig, CPOConfig and KTOConfig
# declare themselves (tests/test_gate.py checks that each is ours or listed here), the common
# TrainingArguments ones, and TRL 0.x's. In a preference YAML mlx-lm would keep and ignore them
# (``max_length: 1024`` would train at 2048 tokens); on the command line argparse would say
# "unrecognized arguments". Both name what to write instead.
TRL_NAMES = {
    "max_length": Instead(
        "max_seq_length", note="mlx-lm's default is 2048, TRL's 1024"
    ),
    "max_prompt_length": Instead(
        "max_seq_length",
        note="a limit on the whole sequence; TRL 1.x dropped max_prompt_length, and "
        "prompts are not cut on their own",
    ),
    "per_device_train_batch_size": Instead(
        "batch_size", note="the batch of all processes together"
    ),
    "per_device_eval_batch_size": Instead(
        "batch_size", note="validation and --test batches are training's size"
    ),
    "gradient_accumulation_steps": Instead("grad_accumulation_steps"),
    "gradient_checkpointing": Instead("grad_checkpoint"),
    "num_train_epochs": Instead("iters", note="optimizer steps, not epochs"),
    "max_steps": Instead("iters"),
    "logging_steps": Instead("steps_per_report"),
    "eval_steps": Instead("steps_per_eval"),
    "save_steps": Instead("save_every"),
    "output_dir": Instead("adapter_path"),
    "lr_scheduler_type": Instead("lr_schedule"),
    "warmup_steps": Instead("lr_schedule", note="its warmup"),
    "weight_decay": Instead(
        "optimizer", "adamw", "with weight_decay under optimizer_config: adamw"
    ),
    "precompute_ref_log_probs": Instead("reference", "precomputed"),
    "precompute_ref_batch_size": Instead(
        None, note="reference: precomputed scores in batches of batch_size"
    ),
    "reference_free": Instead("reference", "none"),
    "sync_ref_model": Instead(None, note=UNSUPPORTED_REFERENCE),
    "ref_model_mixup_alpha": Instead(None, note=UNSUPPORTED_REFERENCE),
    "ref_model_sync_steps": Instead(None, note=UNSUPPORTED_REFERENCE),
    "model_init_kwargs": Instead(
        None, note="mlx_lm.load loads --model; trust_remote_code is mlx-lm's own option"
    ),
    "router_aux_loss_coef": Instead(
        None, note="no router auxiliary loss is added for mixture-of-experts models"
    ),
    "disable_dropout": Instead(
        None,
        note="mlx-lm's models have no dropout but LoRA's, lora_parameters' dropout, 0 "
        "by default",
    ),
    "dataset_num_proc": Instead(
        None, note="the rows are tokenized in one process, before the model loads"
    ),
    "padding_free": Instead(
        None, note="batches are padded; prompt_sharing runs each prompt once instead"
    ),
    "pad_to_multiple_of": Instead(
        None, note="batches are padded to one more than a multiple of 32 tokens"
    ),
    "pad_token": Instead(None, note=MASKED_PADDING),
    "padding_value": Instead(None, note=MASKED_PADDING),
    "activation_offloading": Instead(
        None, note="grad_checkpoint saves activation memory by recomputing instead"
    ),
    "generate_during_eval": Instead(
        "log_completions",
        note="greedy answers to validation prompts at each validation",
    ),
    "is_encoder_decoder": Instead(None, note="mlx-lm trains decoder-only models"),
    # GRPOConfig's and RLOOConfig's
    "num_generations_eval": Instead(
        "num_generations", note="evaluation samples as many completions as training"
    ),
    "chat_template_kwargs": Instead(
        None, note="give it per row: a chat_template_kwargs field of each row"
    ),
    "shuffle_dataset": Instead(
        None, note="prompts come in a new random order every epoch, TRL's default"
    ),
    "cast_lm_head_to_fp32": Instead(
        None, note="log-probs are taken in float32 (the output layer in tiles)"
    ),
    "off_policy_mask_threshold": Instead(
        None, note="completions are sampled by the model being trained"
    ),
    "max_tool_calling_iterations": Instead(None, note="no tool calling"),
    "log_completions_hub_repo": Instead(
        "log_completions", note="written to completions.jsonl"
    ),
    "log_unique_prompts": Instead("log_completions", note="every sample is written"),
    "log_multimodal": Instead(None, note="mlx-lm trains on text"),
}
SAMPLED_BY_MLX_LM = "completions are sampled with mlx-lm's own generation and KV cache"
for _name in (
    "use_vllm",
    "use_transformers_paged",
    "use_transformers_continuous_batching",
    "transformers_continuous_batching_config",
    "cache_implementation",
    "generation_kwargs",
    "ds3_gather_for_generation",
    "vllm_mode",
    "vllm_model_impl",
    "vllm_server_base_url",
    "vllm_server_host",
    "vllm_server_port",
    "vllm_server_timeout",
    "vllm_group_port",
    "vllm_gpu_memory_utilization",
    "vllm_tensor_parallel_size",
    "vllm_max_model_length",
    "vllm_enable_sleep_mode",
    "vllm_structured_outputs_regex",
    "vllm_importance_sampling_correction",
    "vllm_importance_sampling_mode",
    "vllm_importance_sampling_cap",
    "vllm_importance_sampling_clip_min",
    "vllm_importance_sampling_clip_max",
):
    TRL_NAMES[_name] = Instead(None, note=SAMPLED_BY_MLX_LM)
for _name in (
    "entropy_coef",
    "entropy_coef_min",
    "entropy_coef_max",
    "entropy_coef_delta",
    "entropy_target",
    "use_adaptive_entropy",
):
    TRL_NAMES[_name] = Instead(
        None,
        note="no entropy bonus; top_entropy_quantile trains on high-entropy tokens",
    )
for _name in ("sapo_temperature_neg", "sapo_temperature_pos"):
    TRL_NAMES[_name] = Instead(None, note="loss_type sapo is not supported")
for _name in ("vespo_k_neg", "vespo_k_pos", "vespo_lambda_neg", "vespo_lambda_pos"):
    TRL_NAMES[_name] = Instead(None, note="loss_type vespo is not supported")
# mlx-lm options that have no command-line flag.
YAML_ONLY = {"hf_dataset", "lr_schedule", "lora_parameters", "optimizer_config"}


def trl_hint(name: str, cli: bool = False) -> str:
    """The one line that refuses TRL's option ``name``, spelt as a flag (``cli``) or as a
    YAML key."""
    instead = TRL_NAMES[name]

    def spell(option):
        if not cli:
            return option
        if option in YAML_ONLY:
            return f"{option} in a --config YAML file"
        return "--" + option.replace("_", "-")

    said = f"{spell(name)} is" if cli else f"'{name}' is"
    said += " TRL's name, not mlx-lm's" + ("" if cli else " (which would ignore it)")
    if instead.option is None:
        return f"{said}: not supported ({instead.note})."
    use = spell(instead.option)
    if instead.value:
        use += (" " if cli else ": ") + instead.value
    note = f" ({instead.note})" if instead.note else ""
    return f"{said}; use {use}{note}."


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance with adjacent transpositions counting one (optimal string
    alignment): 'chosne' is one edit from 'chosen'."""
    d = [
        [i + j if i * j == 0 else 0 for j in range(len(b) + 1)]
        for i in range(len(a) + 1)
    ]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(
                d[i - 1][j] + 1,
                d[i][j - 1] + 1,
                d[i - 1][j - 1] + (a[i - 1] != b[j - 1]),
            )
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def close_match(name: str, known) -> Optional[str]:
    """The known name ``name`` is probably a misspelling of: one edit away (two for names
    of 6 characters or more), case and '-'/'_' aside; None if there is none."""
    if not isinstance(name, str):
        return None
    plain = name.lower().replace("-", "_")
    limit = 1 if len(plain) < 6 else 2
    best = min(known, key=lambda k: edit_distance(plain, k), default=None)
    if best is None or best == name or edit_distance(plain, best) > limit:
        return None
    return best
