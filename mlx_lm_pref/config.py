"""The preference options: one dataclass, the single source for CLI flags and YAML keys.

Each field becomes ``--field-name`` on ``mlx_lm.lora``'s parser and ``field_name`` in its
``CONFIG_DEFAULTS`` (so a YAML config may set it). ``choices`` in the metadata are checked for
both paths in ``__post_init__``, because YAML values never pass through argparse.
"""

import argparse
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import MISSING, asdict, dataclass, field, fields

LOSS_TYPES = ("sft", "dpo", "orpo")
REFERENCES = ("adapters_off",)


@dataclass(frozen=True)
class PreferenceArgs:
    loss_type: str = field(
        default="sft",
        metadata={
            "help": "Training objective. 'sft' is mlx-lm's own loss, untouched; 'dpo' and "
            "'orpo' train on preference rows (prompt, chosen, rejected).",
            "choices": LOSS_TYPES,
        },
    )
    beta: float = field(
        default=0.1,
        metadata={
            "help": "DPO: strength of the KL penalty to the reference. ORPO: weight of the "
            "odds-ratio term (TRL's beta, lambda in the ORPO paper)."
        },
    )
    reference: str = field(
        default="adapters_off",
        metadata={
            "help": "How DPO obtains the reference model. 'adapters_off': the same model "
            "with every LoRA scale set to 0 (the base model), no extra memory.",
            "choices": REFERENCES,
        },
    )

    def __post_init__(self):
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(
                    f"Unknown {f.name} {value!r}. Valid values: {', '.join(choices)}."
                )
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}.")

    @property
    def is_preference(self) -> bool:
        return self.loss_type != "sft"

    @property
    def needs_reference(self) -> bool:
        return self.loss_type == "dpo"

    @classmethod
    def from_namespace(cls, ns) -> "PreferenceArgs":
        """Read the options from an argparse/SimpleNamespace or a dataclass; None means default."""
        values = {}
        for f in fields(cls):
            v = getattr(ns, f.name, None)
            if v is not None:
                values[f.name] = f.type(v) if f.type is float else v
        return cls(**values)

    def as_constants(self) -> tuple:
        """The options as a tuple of str/float, the only non-array leaves mx.compile accepts.

        Preference batches carry this tuple, so the loss knows how to score a batch without
        any global state; ``PreferenceArgs(*t)`` reads it back.
        """
        return tuple(asdict(self).values())


def config_defaults() -> dict:
    """The entries mlx_lm.lora's CONFIG_DEFAULTS gains."""
    return {
        f.name: f.default for f in fields(PreferenceArgs) if f.default is not MISSING
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option. Defaults stay None so a YAML value can fill them in."""
    group = parser.add_argument_group("preference tuning (mlx_lm_pref)")
    for f in fields(PreferenceArgs):
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            type=f.type if f.type in (int, float) else str,
            choices=f.metadata.get("choices"),
            default=None,
            help=f"{f.metadata['help']} Default: {f.default}.",
        )


# The options of the mlx_lm.lora run in progress. Datasets built without a config that names
# them (mlx-lm's hf_dataset path passes each dataset's own entry as the config) read them here.
_active = ContextVar("mlx_lm_pref_options", default=PreferenceArgs())


def active_options() -> PreferenceArgs:
    return _active.get()


@contextmanager
def using_options(options: PreferenceArgs):
    token = _active.set(options)
    try:
        yield options
    finally:
        _active.reset(token)


def options_for(config) -> PreferenceArgs:
    """The options a dataset config asks for, or those of the run in progress."""
    if getattr(config, "loss_type", None) is not None:
        return PreferenceArgs.from_namespace(config)
    return active_options()
