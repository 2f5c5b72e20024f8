"""Patches for ``mlx_lm.tuner.trainer``.

``train`` and ``evaluate`` captured the originals of ``default_loss`` and ``iterate_batches``
as default arguments. Their wrappers start (or join) the ``PreferenceRun`` when the data are
preference pairs and hand mlx-lm's loop a loss and a batch iterator bound to the run's
options; ``train`` also picks and checks the reference, routes the metrics to mlx-lm's
reports and stops on non-finite values before they reach the adapter file (``safety``).
``default_loss`` and ``iterate_batches`` themselves stay preference-aware for a caller who
names them explicitly, and fall through to the originals for SFT data.
"""

import inspect
import time
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path

import mlx.core as mx

from mlx_lm_pref.batching import (
    PreferenceBatch,
    iterate_eval_batches,
    iterate_preference_batches,
    preference_dataset_of,
)
from mlx_lm_pref.config import ConfigError
from mlx_lm_pref.console import is_main_rank, log
from mlx_lm_pref.data import label_balance
from mlx_lm_pref.evaluation import evaluate_preference
from mlx_lm_pref.head import head_for, resolve_head_chunks
from mlx_lm_pref.metrics import METRICS_FILE, PreferenceReporter, shown_metrics
from mlx_lm_pref.objective import METRICS_ATTRIBUTE, PreferenceLoss, metric_names
from mlx_lm_pref.precompute import model_fingerprint, precompute_reference
from mlx_lm_pref.reference import InitialAdapter, check_reference, resolve_reference
from mlx_lm_pref.run import PreferenceRun, current_run, running
from mlx_lm_pref.safety import RunGuard, SafeSaveModule, skip_nonfinite
from mlx_lm_pref.sharing import resolve_prompt_sharing

from . import PreferenceWrapper, function_wrapper


def default_loss(wrapped, instance, args, kwargs):
    # A preference batch comes alone, ``loss(model, batch)``; SFT's is (model, batch, lengths).
    batch = args[1] if len(args) > 1 else kwargs.get("batch")
    if not isinstance(batch, PreferenceBatch):
        return wrapped(*args, **kwargs)
    run = current_run()
    if run is None or run.loss is None:
        raise ConfigError(
            "default_loss got a preference batch outside a training run, so it has no "
            "options to score it with: use mlx_lm_pref.objective.PreferenceLoss(options)."
        )
    return run.loss(*args, **kwargs)


def iterate_batches(wrapped, instance, args, kwargs):
    dataset = kwargs["dataset"] if "dataset" in kwargs else args[0]
    if preference_dataset_of(dataset) is not None:
        return iterate_preference_batches(*args, **kwargs)
    return wrapped(*args, **kwargs)


def _bind(wrapped, args, kwargs):
    signature = inspect.signature(wrapped)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound, signature


def _is_default(bound, signature, name) -> bool:
    """Whether the caller left ``name`` to mlx-lm (its captured default, or the module's
    patched function of that name)."""
    value, default = bound.arguments[name], signature.parameters[name].default
    return value is default or (
        isinstance(value, PreferenceWrapper) and value.__wrapped__ is default
    )


class WatchedBatches:
    """The training batch iterator, with the guard settling each step before the next.
    Validation, which train() hands the same iterator, gets ``unwatched``."""

    def __init__(self, iterate_batches, guard):
        self.unwatched, self.guard = iterate_batches, guard

    def __call__(self, *args, **kwargs):
        return self.guard.watch(self.unwatched(*args, **kwargs))


def _ours(batches) -> bool:
    return getattr(batches, "func", None) is iterate_preference_batches


def train(wrapped, instance, args, kwargs):
    bound, signature = _bind(wrapped, args, kwargs)
    a = bound.arguments
    pairs = preference_dataset_of(a["train_dataset"])
    if pairs is None:
        return wrapped(*args, **kwargs)
    if a["val_dataset"] and preference_dataset_of(a["val_dataset"]) is None:
        raise ValueError(
            "The training set holds preference pairs but the validation set does not."
        )
    # A script's own PreferenceLoss(options): its options, checked for this model and its
    # reference set up as for the dataset's own (train() resolves them, the loss cannot).
    own = a["loss"] if isinstance(a["loss"], PreferenceLoss) else None
    run = current_run()  # mlx_lm.lora's, else this call starts one
    options = own.options if own else pairs.options
    with nullcontext(run) if run else running(PreferenceRun(options)) as run:
        start_training(run, a)
        if own or _is_default(bound, signature, "loss"):
            a["loss"] = run.loss
        if _is_default(bound, signature, "iterate_batches"):
            a["iterate_batches"] = partial(
                iterate_preference_batches, prompt_sharing=run.options.prompt_sharing
            )
        a["iterate_batches"] = WatchedBatches(a["iterate_batches"], run.guard)
        a["training_callback"] = run.reporter
        model, guard = a["model"], run.guard
        restore_optimizer = skip_nonfinite(a["optimizer"]) if guard.skip else None
        model[METRICS_ATTRIBUTE] = mx.zeros((len(run.loss.metric_names),))
        tic = time.perf_counter()
        try:
            with guard.ctrl_c_between_steps():
                return wrapped(*bound.args, **bound.kwargs)
        except KeyboardInterrupt:
            log(f"Interrupted after iteration {guard.iteration}. {guard.on_disk()}")
            raise
        finally:
            run.train_seconds = time.perf_counter() - tic
            if restore_optimizer:
                restore_optimizer()
            model.pop(METRICS_ATTRIBUTE, None)


def start_training(run: PreferenceRun, a: dict) -> None:
    """Decide what the run trains with, for this model: prompt sharing (the probe), the
    reference (and its step-0 adapter or its precomputed log-probs), and set up the loss,
    the guard and the reporter."""
    model, training_args = a["model"], a["args"]
    options = resolve_prompt_sharing(model, run.options, training_args.grad_checkpoint)
    if options.prompt_sharing != "false":
        log(f"prompt sharing: {SHARING_NAMES[options.prompt_sharing]}")
    options = resolve_head_chunks(model, options)
    head, tile = head_for(model, options.head_chunk_size)
    layout = "whole logits"
    if head is not None:
        rows = f"{tile} rows" if tile else "rows sized to each batch"
        layout = f"output layer in tiles of {rows}"
        log(f"{layout} (vocabulary {head.vocab:,}): no whole logits")
    initial = None
    if options.needs_reference:
        options = options.replace(reference=resolve_reference(model, options.reference))
        check_reference(model, options)
        if options.reference == "initial_adapter":
            initial = InitialAdapter(model)
        log(f"{options.method} reference: {REFERENCE_NAMES[options.reference]}")
    datasets = [
        preference_dataset_of(d) for d in (a["train_dataset"], a["val_dataset"]) if d
    ]
    if options.method == "kto":
        for line in label_balance(datasets[0], options):
            log(line)
    datasets += [d for d in run.scored_alike if d not in datasets]
    if options.reference == "precomputed":
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
            log(f"reference log-probs of {dataset.source}: {status}")
    metrics_path = Path(training_args.adapter_file).parent / METRICS_FILE
    if is_main_rank():
        # A training run starts its own record, as it overwrites adapters.safetensors.
        metrics_path.unlink(missing_ok=True)
    names = metric_names(options)
    run.options = options
    run.loss = PreferenceLoss(options, initial)
    run.guard = RunGuard(
        model,
        names,
        training_args.adapter_file,
        skip=options.on_nonfinite == "skip",
    )
    run.reporter = PreferenceReporter(
        run.guard,
        names,
        metrics_path,
        inner=a["training_callback"],
        shown=shown_metrics(options),
    )
    losses = ", ".join(options.loss_type)
    run.description = f"{options.method} ({losses}, beta {options.beta:g})"
    if options.method == "kto":
        run.description += (
            f", weights {options.desirable_weight:g}/{options.undesirable_weight:g}"
        )
    if options.needs_reference:
        run.description += f", reference {options.reference}"
    run.description += f", prompt_sharing {options.prompt_sharing}, {layout}"


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
    bound, signature = _bind(wrapped, args, kwargs)
    a = bound.arguments
    pairs = preference_dataset_of(a["dataset"])
    if pairs is None:
        return wrapped(*args, **kwargs)
    batches = a["iterate_batches"]
    batches = getattr(batches, "unwatched", batches)
    default_batches = _is_default(bound, signature, "iterate_batches") or _ours(batches)
    loss, run = a["loss"], current_run()
    if _is_default(bound, signature, "loss"):
        if run is not None and run.loss is not None:  # validation, or --test after it
            loss = run.loss
        else:  # a script's own evaluate call: the dataset's options, for this model
            options = resolve_prompt_sharing(a["model"], pairs.options)
            loss = PreferenceLoss(resolve_head_chunks(a["model"], options))
    elif isinstance(loss, PreferenceLoss) and (run is None or loss is not run.loss):
        # a script's own PreferenceLoss(options): checked for this model, as above
        options = resolve_prompt_sharing(a["model"], loss.options)
        loss = replace(loss, options=resolve_head_chunks(a["model"], options))
    if not isinstance(loss, PreferenceLoss):
        # A caller's own loss gets mlx-lm's own evaluation of it, on the pairs in file
        # order (whole rows: the caller's loss knows nothing of the shared layout).
        if default_batches:
            a["iterate_batches"] = iterate_eval_batches
        return wrapped(*bound.args, **bound.kwargs)
    if default_batches:  # TRL's evaluation order, in the run's layout
        batches = partial(
            iterate_eval_batches, prompt_sharing=loss.options.prompt_sharing
        )
    return evaluate_preference(
        a["model"],
        a["dataset"],
        a["batch_size"],
        a["num_batches"],
        loss,
        max_seq_length=a["max_seq_length"],
        iterate_batches=batches,
        clear_cache_threshold=a.get("clear_cache_threshold", 0),
        progress_callback=a.get("progress_callback"),
    )


PATCHES = [
    ("default_loss", function_wrapper(default_loss)),
    ("iterate_batches", function_wrapper(iterate_batches)),
    ("train", function_wrapper(train)),
    ("evaluate", function_wrapper(evaluate)),
    # train() saves with mx.save_safetensors looked up here: atomic, finite-only saves.
    ("mx", SafeSaveModule),
]
