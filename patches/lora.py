"""Patches for ``mlx_lm.lora``, the module behind the ``mlx_lm.lora`` command.

The parser and ``CONFIG_DEFAULTS`` gain the preference options. ``run`` checks the YAML keys,
the options and the data before the model loads (bad input costs one line and exit 2, and
nothing is written), then runs upstream's ``run`` inside a ``PreferenceRun``; ``load_dataset``
hands it the datasets built by then. ``train`` and ``evaluate`` were imported here by name and
get the trainer's wrappers; ``evaluate_model`` (``--test``) reports the preference metrics
instead of a perplexity.
"""

import inspect
import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm.tuner.trainer
import yaml
from mlx_lm.tuner.datasets import CacheDataset

from mlx_lm_pref.batching import preference_dataset_of
from mlx_lm_pref.config import (
    TRL_NAMES,
    ConfigError,
    PreferenceArgs,
    add_arguments,
    close_match,
    config_defaults,
)
from mlx_lm_pref.console import plain_console, rprint
from mlx_lm_pref.data import DataError, is_preference_row
from mlx_lm_pref.metrics import (
    METRICS_FILE,
    append_metrics,
    format_metrics,
    shown_metrics,
    summary_lines,
)
from mlx_lm_pref.run import PreferenceRun, current_run, running
from mlx_lm_pref.safety import NonFiniteError
from mlx_lm_pref.sharing import CHECKPOINTING

from . import function_wrapper
from . import trainer as trainer_patches

# YAML keys mlx-lm reads besides its flags and CONFIG_DEFAULTS (LORA.md).
MORE_KEYS = {"hf_dataset", "lr_schedule", "lora_parameters", "optimizer_config"}
FEATURES = {f"{n}_feature" for n in ("prompt", "completion", "chat", "text")}
FEATURES |= {"chosen_feature", "rejected_feature"}
HF_DATASET_KEYS = {"path", "train_split", "valid_split", "test_split", "config"}
HF_DATASET_KEYS |= FEATURES | {"mask_prompt"}


def main(wrapped, instance, args, kwargs):
    """Our own errors say what to fix and what is on disk, in one line; a traceback would
    bury that. A config file that is not YAML, or not a mapping, is one of them."""
    try:
        check_config_file(sys.argv[1:])
        return wrapped(*args, **kwargs)
    except (ConfigError, DataError) as e:
        print(f"mlx_lm_pref: error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"mlx_lm_pref: training stopped: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)  # the trainer already said what was saved


def check_config_file(argv):
    from mlx_lm import lora as lora_cli

    config = lora_cli.build_parser().parse_known_args(argv)[0].config
    if not config:
        return
    try:
        with open(config) as fid:
            values = yaml.load(fid, lora_cli.yaml_loader)
    except OSError as e:
        raise ConfigError(f"{config}: {e.strerror}.") from None
    except yaml.YAMLError as e:
        raise ConfigError(
            f"{config}: not valid YAML ({e}).".replace("\n", " ")
        ) from None
    if not isinstance(values, dict):
        raise ConfigError(f"{config}: expected a mapping of keys to values.")


def build_parser(wrapped, instance, args, kwargs):
    parser = wrapped(*args, **kwargs)
    add_arguments(parser)
    return parser


def run(wrapped, instance, args, kwargs):
    ns = kwargs["args"] if "args" in kwargs else args[0]
    check_config_keys(ns)
    options = PreferenceArgs.from_namespace(ns)
    if not options.is_preference:
        check_sft_data(ns)
        # An SFT run stays upstream's byte for byte, adapter_config.json included.
        for name in config_defaults():
            if hasattr(ns, name):
                delattr(ns, name)
        return wrapped(*args, **kwargs)
    check_run(options, ns)
    with running(PreferenceRun(options)) as preference_run, plain_console():
        preference_run.splits = load_datasets_first(ns)
        test_set = preference_dataset_of(preference_run.splits[2])
        if getattr(ns, "test", False) and test_set is not None:
            # --test scores the test split after training with training's reference,
            # which for reference precomputed means scoring it before training too.
            preference_run.scored_alike.append(test_set)
        result = wrapped(*args, **kwargs)
        if preference_run.trained:
            lines = summary_lines(preference_run, ns.adapter_path)
            rprint("\n".join([f"[mlx_lm_pref] {lines[0]}", *lines[1:]]), flush=True)
        return result


def check_config_keys(ns):
    """A misspelt YAML key would be ignored (mlx-lm reads only the keys it knows) and the
    run go on without it: refuse the keys that are one or two edits from a known one. For
    an SFT run only the misspellings of preference options (upstream's own keys are
    upstream's business)."""
    if not getattr(ns, "config", None):
        return
    from mlx_lm import lora as lora_cli

    with open(ns.config) as fid:
        config = yaml.load(fid, lora_cli.yaml_loader)  # a mapping: check_config_file
    ours = set(config_defaults())
    preference = PreferenceArgs.from_namespace(ns).is_preference
    known = set(lora_cli.CONFIG_DEFAULTS) | MORE_KEYS | FEATURES | ours
    known |= {a.dest for a in lora_cli.build_parser()._actions}
    entries = config.get("hf_dataset") or []
    entries = [entries] if isinstance(entries, dict) else entries
    if not isinstance(entries, list):
        raise ConfigError(
            f"{ns.config}: hf_dataset must be a mapping (path, train_split, ...) or a "
            "list of them."
        )
    checks = [(config, known, "")]
    checks += [(e, HF_DATASET_KEYS, f"hf_dataset[{i}].") for i, e in enumerate(entries)]
    for mapping, names, where in checks:
        if not isinstance(mapping, dict):
            raise ConfigError(f"{ns.config}: {where.rstrip('.')} must be a mapping.")
        if where and preference and not mapping.get("path"):
            raise ConfigError(
                f"{ns.config}: {where}path is missing: the dataset's name or folder."
            )
        for key in mapping:
            if key in names:
                continue
            if preference and not where and key in TRL_NAMES:
                raise ConfigError(
                    f"{ns.config}: '{key}' is TRL's name, not one of mlx-lm's (which "
                    f"would ignore it); use {TRL_NAMES[key]}."
                )
            guess = close_match(key, names)
            if guess and (preference or guess in ours):
                raise ConfigError(
                    f"{ns.config}: unknown key '{where}{key}'; did you mean '{guess}'?"
                )


def check_sft_data(ns):
    """Preference pairs in an SFT run's local data (``loss_type`` forgotten or misspelt)
    fail in upstream's loader after the model loaded; say so before."""
    path = Path(getattr(ns, "data", None) or "") / "train.jsonl"
    if (
        getattr(ns, "hf_dataset", None)
        or not getattr(ns, "train", False)
        or not path.is_file()
    ):
        return
    with open(path, "rb") as fid:
        first = next((line for line in fid if line.strip()), b"")
    try:
        row = json.loads(first)
    except ValueError:
        return  # upstream's loader reports it
    if is_preference_row(row):
        raise DataError(
            f"{path}: rows with 'chosen' and 'rejected' are preference pairs; train on "
            "them with --loss-type dpo or orpo (YAML: loss_type: dpo)."
        )


def check_run(options, ns):
    """Refuse, before anything is loaded or written, what the run could not do."""
    losses = ",".join(options.loss_type)
    for name, least in (("max_seq_length", 2), ("batch_size", 1), ("iters", 0)):
        value = getattr(ns, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(
                f"{name} must be a whole number >= {least}, got {value!r}."
            )
    live_reference = options.reference in ("adapters_off", "initial_adapter")
    if options.needs_reference and live_reference and ns.fine_tune_type == "full":
        raise ConfigError(
            f"--loss-type {losses} with --fine-tune-type full: the reference "
            f"({options.reference}) comes from the LoRA adapters, and full fine-tuning has "
            "none. Use --reference precomputed (the default there), --fine-tune-type lora "
            "(or dora), or a reference-free loss (orpo, simpo)."
        )
    if not options.needs_reference and options.reference != "auto":
        raise ConfigError(
            f"--reference {options.reference} with --loss-type {losses}: "
            f"{options.method.upper()} has no reference model. Remove --reference."
        )
    if getattr(ns, "mask_prompt", False):
        raise ConfigError(
            f"--mask-prompt with --loss-type {losses}: preference losses score the "
            "completions only (ORPO's NLL covers the prompt too, as TRL's): the option "
            "would change nothing. Remove --mask-prompt (YAML: mask_prompt)."
        )
    if (
        options.needs_reference
        and options.reference == "precomputed"
        and getattr(ns, "test", False)
        and not getattr(ns, "train", False)
    ):
        raise ConfigError(
            "--reference precomputed scores the pairs with the model as training starts, "
            "and --test without --train trains nothing. Use --reference auto (the base "
            "model) or adapters_off."
        )
    if options.prompt_sharing == "true" and getattr(ns, "grad_checkpoint", False):
        raise ConfigError(
            f"prompt_sharing true: {CHECKPOINTING}. Set prompt_sharing auto."
        )
    pairs_per_rank = ns.batch_size // mx.distributed.init().size()
    if options.kl_term and ns.batch_size < 2:
        raise ConfigError(
            "loss_type kto estimates its KL term from each row's prompt with another "
            "row's completion in the same batch: with batch_size 1 it would equal the "
            "reward (TRL refuses it too). Use --batch-size 2 or more, or --loss-type "
            "apo_zero_unpaired (no KL term)."
        )
    if options.method == "kto" and options.reference == "none":
        raise ConfigError(
            f"--reference none with --loss-type {losses}: TRL's KTOTrainer always has a "
            "reference model. Use --reference auto (or adapters_off, initial_adapter, "
            "precomputed)."
        )
    if set(options.loss_type) & {"aot", "aot_unpaired"} and pairs_per_rank < 2:
        raise ConfigError(
            "loss_type aot/aot_unpaired sorts log-ratios across the pairs of a batch: "
            f"batch_size {ns.batch_size} gives {pairs_per_rank} pair per rank. Use "
            "--batch-size 2 or more per rank."
        )


def load_datasets_first(ns) -> tuple:
    """The (train, valid, test) datasets, built with the model's tokenizer alone: every
    data error surfaces before the model loads."""
    from mlx_lm.utils import _download, load_config, load_tokenizer

    try:
        model_path = _download(ns.model)
        config = load_config(model_path)
        tokenizer = load_tokenizer(
            model_path,
            {"trust_remote_code": getattr(ns, "trust_remote_code", False)},
            eos_token_ids=config.get("eos_token_id"),
        )
    except Exception as e:  # what mlx-lm's load would fail on next
        raise ConfigError(f"--model {ns.model}: cannot load it ({e}).") from None
    splits = mlx_lm.lora.load_dataset(ns, tokenizer)
    check_num_layers(ns, config)
    return splits


def check_num_layers(ns, config: dict) -> None:
    """mlx-lm's default ``num_layers`` of 16 is more than a small model has; upstream says so
    with a traceback once the model is loaded."""
    layers = config.get("num_hidden_layers") or config.get("text_config", {}).get(
        "num_hidden_layers"
    )
    wanted = getattr(ns, "num_layers", None)
    if not getattr(ns, "train", False):  # --test alone: the adapter's own layers count
        return
    if isinstance(layers, int) and isinstance(wanted, int) and wanted > layers:
        raise ConfigError(
            f"--num-layers {wanted} (mlx-lm's default is 16) but {ns.model} has {layers} "
            f"layers: pass --num-layers -1 to train all of them, or at most {layers}."
        )


def load_dataset(wrapped, instance, args, kwargs):
    ns = kwargs["args"] if "args" in kwargs else args[0]
    preference_run = current_run()
    if preference_run is not None and preference_run.splits is not None:
        return preference_run.splits
    if not PreferenceArgs.from_namespace(ns).is_preference:
        return wrapped(*args, **kwargs)
    try:
        return wrapped(*args, **kwargs)
    except (ConfigError, DataError):
        raise
    except (ValueError, FileNotFoundError) as e:  # "Training set not found or empty",
        # or a hf_dataset that does not exist (datasets' DatasetNotFoundError)
        source = "hf_dataset" if getattr(ns, "hf_dataset", None) else ns.data
        raise DataError(f"{source}: {e}") from None


def evaluate_model(wrapped, instance, args, kwargs):
    a = inspect.signature(wrapped).bind(*args, **kwargs).arguments
    ns, model, test_set = a["args"], a["model"], a["test_set"]
    if preference_dataset_of(test_set) is None:
        return wrapped(*args, **kwargs)
    preference_run = current_run()
    trained = preference_run is not None and preference_run.trained
    # Through the patched trainer.evaluate, the same path as validation during training:
    # scored as training did (its loss and reference), else the base model as reference.
    result = mlx_lm.tuner.trainer.evaluate(
        model=model,
        dataset=CacheDataset(test_set),
        batch_size=ns.batch_size,
        num_batches=ns.test_batches,
        max_seq_length=ns.max_seq_length,
        **({"loss": preference_run.loss} if trained else {}),
    )
    if "num_tokens" in result.metrics:  # TRL's count of tokens trained on so far
        result.metrics["num_tokens"] = float(
            preference_run.trained_tokens if trained else 0
        )
    options = (
        preference_run.options
        if preference_run
        else preference_dataset_of(test_set).options
    )
    rprint(f"Test {format_metrics(result.metrics, shown_metrics(options))}")
    iteration = ns.iters if ns.train else 0
    if ns.adapter_path:
        append_metrics(
            Path(ns.adapter_path) / METRICS_FILE, "test", iteration, result.metrics
        )
    if trained:
        preference_run.reporter.last["test"] = (iteration, result.metrics)
    return result


PATCHES = [
    ("main", function_wrapper(main)),
    ("build_parser", function_wrapper(build_parser)),
    ("CONFIG_DEFAULTS", lambda defaults: {**defaults, **config_defaults()}),
    ("run", function_wrapper(run)),
    ("load_dataset", function_wrapper(load_dataset)),
    ("train", function_wrapper(trainer_patches.train)),
    ("evaluate", function_wrapper(trainer_patches.evaluate)),
    ("evaluate_model", function_wrapper(evaluate_model)),
]
