"""Patches for ``mlx_lm.lora``, the module behind the ``mlx_lm.lora`` command.

The parser and ``CONFIG_DEFAULTS`` gain the preference options; ``run`` makes the run's options
visible to the dataset loaders and refuses unsupported setups before anything is loaded or
written; ``train`` and ``evaluate`` were imported here by name and get the trainer's wrappers;
``evaluate_model`` (``--test``) reports the preference metrics instead of a perplexity.
"""

import inspect
from pathlib import Path

import mlx.core as mx
import mlx_lm.tuner.trainer
from mlx_lm.cli_ui import rprint
from mlx_lm.tuner.datasets import CacheDataset

from mlx_lm_pref.batching import preference_dataset_of
from mlx_lm_pref.config import (
    ConfigError,
    PreferenceArgs,
    add_arguments,
    config_defaults,
    using_options,
)
from mlx_lm_pref.metrics import METRICS_FILE, append_metrics, format_metrics
from mlx_lm_pref.precompute import run_datasets

from . import function_wrapper
from . import trainer as trainer_patches


def build_parser(wrapped, instance, args, kwargs):
    parser = wrapped(*args, **kwargs)
    add_arguments(parser)
    return parser


def run(wrapped, instance, args, kwargs):
    ns = kwargs["args"] if "args" in kwargs else args[0]
    options = PreferenceArgs.from_namespace(ns)
    if not options.is_preference:
        # An SFT run stays upstream's byte for byte, adapter_config.json included.
        for name in config_defaults():
            if hasattr(ns, name):
                delattr(ns, name)
        return wrapped(*args, **kwargs)
    check_run(options, ns)
    token = run_datasets.set(())
    try:
        with using_options(options):
            return wrapped(*args, **kwargs)
    finally:
        run_datasets.reset(token)


def check_run(options, ns):
    """Refuse, before anything is loaded or written, what the run could not do."""
    live_reference = options.reference in ("adapters_off", "initial_adapter")
    if options.needs_reference and live_reference and ns.fine_tune_type == "full":
        raise ConfigError(
            f"--loss-type {','.join(options.loss_type)} with --fine-tune-type full: the "
            f"reference ({options.reference}) comes from the LoRA adapters, and full "
            "fine-tuning has none. Use --reference precomputed (the default there), "
            "--fine-tune-type lora (or dora), or a reference-free loss (orpo, simpo)."
        )
    pairs_per_rank = ns.batch_size // mx.distributed.init().size()
    if set(options.loss_type) & {"aot", "aot_unpaired"} and pairs_per_rank < 2:
        raise ConfigError(
            "loss_type aot/aot_unpaired sorts log-ratios across the pairs of a batch: "
            f"batch_size {ns.batch_size} gives {pairs_per_rank} pair per rank. Use "
            "--batch-size 2 or more per rank."
        )


def load_dataset(wrapped, instance, args, kwargs):
    splits = wrapped(*args, **kwargs)
    ns = kwargs["args"] if "args" in kwargs else args[0]
    # --test scores the test split after training with training's reference, which for
    # reference precomputed means scoring it before training too.
    if getattr(ns, "test", False) and preference_dataset_of(splits[2]):
        run_datasets.set((splits[2],))
    return splits


def evaluate_model(wrapped, instance, args, kwargs):
    a = inspect.signature(wrapped).bind(*args, **kwargs).arguments
    ns, model, test_set = a["args"], a["model"], a["test_set"]
    if preference_dataset_of(test_set) is None:
        return wrapped(*args, **kwargs)
    # Score as training did (its reference), else the base model as reference.
    trained_with = getattr(model, "_pref_reference", None)
    if trained_with and test_set.options.needs_reference:
        test_set.options = test_set.options.replace(reference=trained_with)
    # Through the patched trainer.evaluate, the same path as validation during training.
    result = mlx_lm.tuner.trainer.evaluate(
        model=model,
        dataset=CacheDataset(test_set),
        batch_size=ns.batch_size,
        num_batches=ns.test_batches,
        max_seq_length=ns.max_seq_length,
    )
    if "num_tokens" in result.metrics:  # TRL's count of tokens trained on so far
        result.metrics["num_tokens"] = float(getattr(model, "_pref_trained_tokens", 0))
    rprint(f"Test {format_metrics(result.metrics)}")
    if ns.adapter_path:
        iteration = ns.iters if ns.train else 0
        append_metrics(
            Path(ns.adapter_path) / METRICS_FILE, "test", iteration, result.metrics
        )
    return result


PATCHES = [
    ("build_parser", function_wrapper(build_parser)),
    ("CONFIG_DEFAULTS", lambda defaults: {**defaults, **config_defaults()}),
    ("run", function_wrapper(run)),
    ("load_dataset", function_wrapper(load_dataset)),
    ("train", function_wrapper(trainer_patches.train)),
    ("evaluate", function_wrapper(trainer_patches.evaluate)),
    ("evaluate_model", function_wrapper(evaluate_model)),
]
