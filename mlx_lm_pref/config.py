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
  boolean label each; paired rows are unpaired as TRL does).
"""

import argparse
import math
from dataclasses import dataclass, field, fields, replace
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
LOSS_TYPES = ("sft", "dpo", "orpo", "cpo", "simpo", "alphapo") + KTO_LOSSES
LOSS_TYPES += tuple(n for n in DPO_LOSSES if n != "sft")
CPO_LOSSES = ("sigmoid", "hinge", "ipo", "simpo")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL: the f-DPO reparameterisation only cancels log Z in a chosen-minus-rejected difference.
F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust"}
F_DIVERGENCE_LOSSES |= {"discopop", "sft", "cdpo"}
REFERENCES = ("auto", "adapters_off", "initial_adapter", "precomputed", "none")
TRUNCATION_MODES = ("keep_start", "keep_end")
PROMPT_SHARING = ("auto", "true", "false")


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
    "reference": ("dpo", "kto"),
}
TRAINERS = {
    "dpo": "DPOTrainer",
    "orpo": "ORPOTrainer",
    "cpo": "CPOTrainer",
    "kto": "KTOTrainer",
}
# How TRL's other trainers cut a sequence longer than max_length (they have no keep_end).
CUTS = {
    "orpo": "has no truncation_mode: it keeps the prompt whole and cuts the answer",
    "cpo": "has no truncation_mode: it keeps the prompt whole and cuts the answer",
    "kto": "cuts rows longer than max_seq_length from the right only (keep_start)",
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
    beta: float = field(
        default=0.1,
        metadata={
            "help": "DPO and KTO: KL-penalty strength (IPO's tau). ORPO: weight of the "
            "odds-ratio term. CPO/SimPO: inverse temperature."
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

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("loss_type", _names(self.loss_type))
        set_("head_chunk_size", _chunk_size(self.head_chunk_size))
        if isinstance(self.prompt_sharing, bool):  # YAML true/false
            set_("prompt_sharing", str(self.prompt_sharing).lower())
        if self.loss_weights is not None:
            set_("loss_weights", _floats(self.loss_weights))
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
            value = getattr(self, name)
            if method not in methods and value != defaults[name]:
                raise ConfigError(unread_message(name, value, typed, method))

    def _validate(self):
        names, method = self.loss_type, self.method
        if method in ("orpo", "cpo", "kto") and len(names) > 1:
            raise ConfigError(
                f"loss_type {names[0]} cannot be combined with {list(names[1:])}."
            )
        if set(names) & set(KTO_LOSSES) and method != "kto":
            raise ConfigError(
                f"loss_type {'/'.join(KTO_LOSSES)} trains on unpaired rows and cannot "
                f"follow other loss types ({list(names)})."
            )
        self._validate_kto()
        if not self.beta > 0:
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

    @property
    def method(self) -> str:
        """'sft' (mlx-lm's own), 'dpo', 'orpo', 'cpo' or 'kto'."""
        if self.loss_type == ("sft",):
            return "sft"
        if self.loss_type[0] in ("orpo", "cpo"):
            return self.loss_type[0]
        if self.loss_type[0] in KTO_LOSSES:
            return "kto"
        return "dpo"

    @property
    def kl_term(self) -> bool:
        """KTO's KL estimate from mismatched rows (every KTO loss but apo_zero_unpaired)."""
        return self.loss_type == ("kto",)

    @property
    def is_preference(self) -> bool:
        return self.method != "sft"

    @property
    def needs_reference(self) -> bool:
        return self.method in ("dpo", "kto")

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
            if f.type is bool and not isinstance(v, bool):
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option, in mlx-lm's style: booleans are ``store_true`` flags, and
    defaults stay None so a YAML value can fill them in."""
    group = parser.add_argument_group("preference tuning (mlx_lm_pref)")
    for f in fields(PreferenceArgs):
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.metadata['help']} Default: {default}."
        if f.type is bool:
            group.add_argument(flag, action="store_true", default=None, help=help)
            continue
        group.add_argument(
            flag,
            type=float if f.type in (float, Optional[float]) else str,
            choices=f.metadata.get("choices"),
            default=None,
            help=help,
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
    "max_completion_length": Instead(
        "max_seq_length",
        note="a limit on the whole sequence; completions are not cut on their own",
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
        None, note="generate with mlx_lm.generate --adapter-path after training"
    ),
    "is_encoder_decoder": Instead(None, note="mlx-lm trains decoder-only models"),
}
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
