"""Patches for ``mlx_lm.lora``, the module behind the ``mlx_lm.lora`` command.

The parser and ``CONFIG_DEFAULTS`` gain the preference options. Everything the user typed goes
through ``mlx_lm_pref.gate`` before the model loads: ``main`` reads the command line through
it, ``run`` has it check the options, the files and the data (bad input costs one line and
exit 2, and nothing is written), then runs upstream's ``run`` inside a ``PreferenceRun``;
``load_dataset`` hands upstream the datasets the gate built. ``train`` and ``evaluate`` were
imported here by name and get the trainer's wrappers; ``evaluate_model`` (``--test``) reports
the preference metrics instead of a perplexity.
"""

import inspect
import sys
from pathlib import Path

import mlx_lm.tuner.trainer
from mlx_lm.tuner.datasets import CacheDataset

from mlx_lm_pref import gate
from mlx_lm_pref.batching import preference_dataset_of
from mlx_lm_pref.config import (
    ConfigError,
    PreferenceArgs,
    add_arguments,
    config_defaults,
)
from mlx_lm_pref.console import plain_console, rprint
from mlx_lm_pref.data import DataError
from mlx_lm_pref.metrics import (
    METRICS_FILE,
    append_metrics,
    format_metrics,
    shown_metrics,
    summary_lines,
)
from mlx_lm_pref.rewards import RewardError
from mlx_lm_pref.run import PreferenceRun, current_run, running
from mlx_lm_pref.safety import NonFiniteError

from . import function_wrapper
from . import trainer as trainer_patches


def main(wrapped, instance, args, kwargs):
    """Our own errors say what to fix and what is on disk, in one line; a traceback would
    bury that."""
    try:
        with gate.command_line(sys.argv[1:]):
            return wrapped(*args, **kwargs)
    except (ConfigError, DataError, RewardError) as e:
        print(f"mlx_lm_pref: error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"mlx_lm_pref: training stopped: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)  # the trainer already said what was saved


def build_parser(wrapped, instance, args, kwargs):
    parser = wrapped(*args, **kwargs)
    add_arguments(parser)
    return parser


def run(wrapped, instance, args, kwargs):
    ns = kwargs["args"] if "args" in kwargs else args[0]
    options = gate.check(ns)
    if not options.is_preference and (
        options.writes_checkpoints or options.log_completions
    ):
        # SFT with checkpoints or samples (asked for): upstream's run, its train() in a
        # checkpointed or sampled session (patches/trainer.py)
        with running(PreferenceRun(options, identity=gate.run_identity(ns))):
            return wrapped(*args, **kwargs)
    if not options.is_preference:
        # An SFT run stays upstream's byte for byte, adapter_config.json included.
        for name in config_defaults():
            if hasattr(ns, name):
                delattr(ns, name)
        return wrapped(*args, **kwargs)
    preference_run = PreferenceRun(
        options,
        identity=gate.run_identity(ns),
        reference_file=getattr(ns, "reference_adapter_file", None),
    )
    with running(preference_run), plain_console():
        preference_run.splits = gate.load_datasets(ns)
        test_set = preference_dataset_of(preference_run.splits[2])
        if ns.test and test_set is not None:
            # --test scores the test split after training with training's reference,
            # which for reference precomputed means scoring it before training too.
            preference_run.scored_alike.append(test_set)
        result = wrapped(*args, **kwargs)
        if preference_run.trained:
            lines = summary_lines(preference_run, ns.adapter_path)
            rprint("\n".join([f"[mlx_lm_pref] {lines[0]}", *lines[1:]]), flush=True)
        return result


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
    ns, test_set = a["args"], a["test_set"]
    if preference_dataset_of(test_set) is None:
        return wrapped(*args, **kwargs)
    preference_run = current_run()
    trained = preference_run is not None and preference_run.trained
    result = score_test_set(
        ns, a["model"], test_set, preference_run if trained else None
    )
    options = (preference_run or preference_dataset_of(test_set)).options
    rprint(f"Test {format_metrics(result.metrics, shown_metrics(options))}")
    iteration = ns.iters if ns.train else 0
    if ns.adapter_path:
        append_metrics(
            Path(ns.adapter_path) / METRICS_FILE, "test", iteration, result.metrics
        )
    if trained:
        preference_run.reporter.last["test"] = (iteration, result.metrics)
    return result


def score_test_set(ns, model, test_set, trained_run):
    """The test split's metrics through the patched ``trainer.evaluate``, the path of
    validation during training: scored as training did (``trained_run``'s loss and
    reference), else with the dataset's options and the base model as reference."""
    result = mlx_lm.tuner.trainer.evaluate(
        model=model,
        dataset=CacheDataset(test_set),
        batch_size=ns.batch_size,
        num_batches=ns.test_batches,
        max_seq_length=ns.max_seq_length,
        **({"loss": trained_run.loss} if trained_run else {}),
    )
    if "num_tokens" in result.metrics:  # TRL's count of tokens trained on so far
        tokens = trained_run.trained_tokens if trained_run else 0
        result.metrics["num_tokens"] = float(tokens)
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
