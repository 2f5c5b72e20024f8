"""Patches for ``mlx_lm.tuner.trainer``.

``default_loss`` and ``iterate_batches`` become preference-aware and fall through to the
originals for SFT data. ``train`` and ``evaluate`` captured the originals as default arguments,
so their wrappers put the patched ones in whenever the caller left the default; ``train`` also
picks and checks the reference, routes the metrics to mlx-lm's reports, and stops on
non-finite values before they reach the adapter file (``safety``).
"""

import inspect
import sys
from pathlib import Path

import mlx.core as mx

from mlx_lm_pref.batching import iterate_preference_batches, preference_dataset_of
from mlx_lm_pref.metrics import METRICS_FILE, PreferenceReporter
from mlx_lm_pref.objective import (
    clear_metric_state,
    evaluate_preference,
    init_metric_state,
    metric_names,
    preference_loss,
)
from mlx_lm_pref.precompute import (
    model_fingerprint,
    precompute_reference,
    run_datasets,
)
from mlx_lm_pref.reference import (
    check_reference,
    freeze_initial_adapter,
    resolve_reference,
)
from mlx_lm_pref.safety import (
    RunGuard,
    SafeSaveModule,
    active_guard,
    skip_nonfinite,
)
from mlx_lm_pref.sharing import resolve_prompt_sharing

from . import function_wrapper

TARGET = "mlx_lm.tuner.trainer"


def default_loss(wrapped, instance, args, kwargs):
    # A preference batch is (tokens, spans, options[, reference]): with the model, four
    # arguments or more; an SFT batch is (tokens, lengths).
    if len(args) + len(kwargs) >= 4:
        return preference_loss(*args, **kwargs)
    return wrapped(*args, **kwargs)


def iterate_batches(wrapped, instance, args, kwargs):
    dataset = kwargs["dataset"] if "dataset" in kwargs else args[0]
    if preference_dataset_of(dataset) is not None:
        return iterate_preference_batches(*args, **kwargs)
    return wrapped(*args, **kwargs)


def _bind(wrapped, args, kwargs):
    """Bind a call to ``train``/``evaluate``, swapping their captured default loss and batch
    iterator for the patched module-level ones."""
    signature = inspect.signature(wrapped)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    trainer = sys.modules[TARGET]
    for name, patched in (
        ("loss", "default_loss"),
        ("iterate_batches", "iterate_batches"),
    ):
        if bound.arguments[name] is signature.parameters[name].default:
            bound.arguments[name] = getattr(trainer, patched)
    return bound


def train(wrapped, instance, args, kwargs):
    bound = _bind(wrapped, args, kwargs)
    a = bound.arguments
    pairs = preference_dataset_of(a["train_dataset"])
    if pairs is None:
        return wrapped(*args, **kwargs)
    if a["val_dataset"] and preference_dataset_of(a["val_dataset"]) is None:
        raise ValueError(
            "The training set holds preference pairs but the validation set does not."
        )
    model, options = a["model"], _resolve(a["model"], pairs.options, a["args"])
    scored_alike = [
        preference_dataset_of(d) for d in (a["train_dataset"], a["val_dataset"]) if d
    ]
    scored_alike += [d for d in run_datasets.get() if d not in scored_alike]
    for dataset in scored_alike:  # the batches carry the options: all score alike
        dataset.options = options
    if options.reference == "precomputed":
        _precompute(model, scored_alike, options, a["args"])
    metrics_path = Path(a["args"].adapter_file).parent / METRICS_FILE
    if mx.distributed.init().rank() == 0:
        # A training run starts its own record, as it overwrites adapters.safetensors.
        metrics_path.unlink(missing_ok=True)
    a["training_callback"] = PreferenceReporter(
        model, metric_names(options), metrics_path, inner=a["training_callback"]
    )
    guard = RunGuard(model, a["args"].adapter_file, skip=options.on_nonfinite == "skip")
    a["iterate_batches"] = WatchedBatches(a["iterate_batches"], guard)
    restore_optimizer = skip_nonfinite(a["optimizer"]) if guard.skip else (lambda: None)
    init_metric_state(model, options)
    token = active_guard.set(guard)
    try:
        with guard.ctrl_c_between_steps():
            return wrapped(*bound.args, **bound.kwargs)
    except KeyboardInterrupt:
        print(
            f"\n[mlx_lm_pref] Interrupted after iteration {guard.iteration}. {guard.on_disk()}"
        )
        raise
    finally:
        active_guard.reset(token)
        restore_optimizer()
        clear_metric_state(model)
        # What --test after training needs to score as training did (plain attributes,
        # outside model.state): the reference in use and TRL's num_tokens.
        model._pref_reference = options.reference
        model._pref_trained_tokens = a["training_callback"].trained_tokens


def _resolve(model, options, training_args):
    """Check prompt sharing on this model; pick the reference for this training run, check
    it, and say which it is."""
    checkpointing = getattr(training_args, "grad_checkpoint", False)
    options = resolve_prompt_sharing(model, options, checkpointing)
    if options.prompt_sharing != "false" and mx.distributed.init().rank() == 0:
        print(f"[mlx_lm_pref] prompt sharing: {SHARING_NAMES[options.prompt_sharing]}")
    if not options.needs_reference:
        return options
    options = options.replace(reference=resolve_reference(model, options.reference))
    check_reference(model, options)
    if options.reference == "initial_adapter":
        freeze_initial_adapter(model)
    if mx.distributed.init().rank() == 0:
        print(
            f"[mlx_lm_pref] {options.method} reference: {REFERENCE_NAMES[options.reference]}"
        )
    return options


def _precompute(model, datasets, options, training_args):
    model_hash = model_fingerprint(model)
    for dataset in datasets:
        status = precompute_reference(
            model,
            dataset,
            options,
            training_args.batch_size,
            training_args.max_seq_length,
            model_hash,
        )
        if mx.distributed.init().rank() == 0:
            print(f"[mlx_lm_pref] reference log-probs of {dataset.source}: {status}")


class WatchedBatches:
    """The training batch iterator, with a finiteness check between steps. Validation,
    which train() hands the same iterator, gets ``unwatched``."""

    def __init__(self, iterate_batches, guard):
        self.unwatched, self.guard = iterate_batches, guard

    def __call__(self, *args, **kwargs):
        return self.guard.watch(self.unwatched(*args, **kwargs))


SHARING_NAMES = {
    "auto": "auto (each prompt run once in the batches where that computes fewer positions)",
    "true": "on (each prompt run once in every batch)",
}
REFERENCE_NAMES = {
    "precomputed": "precomputed (the model as training starts, scored once before step 1)",
    "adapters_off": "adapters_off (the base model: LoRA scales set to 0)",
    "initial_adapter": "initial_adapter (the adapter as loaded at step 0)",
    "none": "none (reference log-probs are 0)",
}


def evaluate(wrapped, instance, args, kwargs):
    bound = _bind(wrapped, args, kwargs)
    a = bound.arguments
    pairs = preference_dataset_of(a["dataset"])
    if pairs is None:
        return wrapped(*args, **kwargs)
    pairs.options = resolve_prompt_sharing(a["model"], pairs.options)
    a["iterate_batches"] = getattr(
        a["iterate_batches"], "unwatched", a["iterate_batches"]
    )
    if a["iterate_batches"] is sys.modules[TARGET].iterate_batches:
        # Evaluation walks the pairs in file order, as TRL's evaluate() does.
        a["iterate_batches"] = None
    return evaluate_preference(*bound.args, **bound.kwargs)


PATCHES = [
    ("default_loss", function_wrapper(default_loss)),
    ("iterate_batches", function_wrapper(iterate_batches)),
    ("train", function_wrapper(train)),
    ("evaluate", function_wrapper(evaluate)),
    # train() saves with mx.save_safetensors looked up here: atomic, finite-only saves.
    ("mx", SafeSaveModule),
]
