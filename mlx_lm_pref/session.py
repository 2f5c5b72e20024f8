"""A preference run's training and evaluation sessions: what mlx-lm's ``train()`` and
``evaluate()`` are handed in place of their SFT loss and batches.

The patch wrappers (``patches/trainer.py``) only bind mlx-lm's arguments by name and
delegate here. ``training(a, defaults)`` starts (or joins) the ``PreferenceRun``, decides
what it trains with for this model (``start_training``: prompt sharing and the output layer
in tiles, each checked once on the model; the reference and its step-0 adapter or
precomputed log-probs; the loss, the guard, the reporter) and rewrites ``a``, the trainer's
arguments, to use them. ``evaluation(a, defaults)`` picks the loss and batches an
``evaluate()`` call scores with. Everything a user typed was checked before the model
loaded (``gate``); what is checked here depends on the model.
"""

import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path

import mlx.core as mx

from .batching import (
    iterate_eval_batches,
    iterate_preference_batches,
    preference_dataset_of,
)
from .checkpoint import REFERENCE, find_checkpoint, random_states_kept, read_state
from .config import ConfigError
from .console import is_main_rank, log
from .data import label_balance
from .degeneration import WATCHED, DegenerationWatch, chosen_tokens
from .evaluation import evaluate_preference
from .frozen import log_frozen_layers, resolve_frozen_layers
from .grpo import reward_functions
from .head import head_for, resolve_head_chunks
from .metrics import (
    METRICS_FILE,
    Eta,
    PreferenceReporter,
    SampleReports,
    shown_metrics,
)
from .objective import PreferenceLoss, metric_names
from .precompute import model_fingerprint, precompute_reference
from .reference import InitialAdapter, check_reference, resolve_reference
from .resume import RunCheckpoints
from .rewards import RewardError
from .rollout import COMPLETIONS_FILE, Rollouts
from .run import PreferenceRun, current_run, running
from .safety import RunGuard
from .samples import (
    ValidationSamples,
    preference_prompts,
    sample_count,
    sft_prompts,
)
from .sharing import resolve_prompt_sharing

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


class WatchedBatches:
    """The training batch iterator, with the guard settling each step before the next and
    the run's checkpoints written between steps (the batches then on their own random
    stream, see ``checkpoint.BatchStream``). Validation, which train() hands the same
    iterator, gets ``unwatched``."""

    def __init__(self, iterate_batches, guard, checkpoints=None):
        self.unwatched, self.guard = iterate_batches, guard
        self.checkpoints = checkpoints

    def __call__(self, *args, **kwargs):
        if self.checkpoints is None:
            return self.guard.watch(self.unwatched(*args, **kwargs))
        # Our iterators leave out the batches a resumed run already trained on without
        # building them; another's are drawn and dropped.
        skips = isinstance(self.unwatched, Rollouts) or (
            getattr(self.unwatched, "func", None) is iterate_preference_batches
        )

        def make(skip):
            extra = {"skip": skip} if skips else {}
            return self.unwatched(*args, **kwargs, **extra)

        stream = self.checkpoints.batches(make, skips)
        return self.guard.watch(stream, self.checkpoints.at_boundary)


@contextmanager
def training(a: dict, defaults: set):
    """A preference training session for mlx-lm's ``train()`` arguments ``a`` (bound by
    name, rewritten in place); ``defaults``: the names among ``loss`` and
    ``iterate_batches`` the caller left to mlx-lm."""
    if a["val_dataset"] and preference_dataset_of(a["val_dataset"]) is None:
        raise ValueError(
            "The training set holds preference pairs but the validation set does not."
        )
    # A script's own PreferenceLoss(options): its options, checked for this model and its
    # reference set up as for the dataset's own (start_training resolves them).
    own = a["loss"] if isinstance(a["loss"], PreferenceLoss) else None
    pairs = preference_dataset_of(a["train_dataset"])
    run = current_run()  # mlx_lm.lora's, else this call starts one
    options = own.options if own else pairs.options
    with nullcontext(run) if run else running(PreferenceRun(options)) as run:
        start_training(run, a)
        for name in ("train_dataset", "val_dataset"):  # with precomputed references
            a[name] = run.scored_version(a[name])
        if own or "loss" in defaults:
            a["loss"] = run.loss
        if "iterate_batches" in defaults and run.rollouts is not None:
            a["iterate_batches"] = run.rollouts
        elif "iterate_batches" in defaults:
            a["iterate_batches"] = partial(
                iterate_preference_batches, prompt_sharing=run.options.prompt_sharing
            )
        a["iterate_batches"] = WatchedBatches(
            a["iterate_batches"], run.guard, run.checkpoints
        )
        a["training_callback"] = run.reporter
        tic = time.perf_counter()
        try:
            with guarded(run, a["optimizer"]):
                yield run
        except RewardError as e:  # the user's function: what it did, what is on disk
            raise RewardError(f"{e} {run.guard.on_disk()}") from None
        finally:
            run.train_seconds = time.perf_counter() - tic


@contextmanager
def guarded(run: PreferenceRun, optimizer):
    """mlx-lm's loop under the run's guard: each step checked, Ctrl-C and SIGTERM ending it
    between steps (after a checkpoint), the last checkpoint written when it ends, and what
    is on disk said when it stops."""
    stop_watching = run.guard.start(optimizer)
    try:
        with run.guard.ctrl_c_between_steps():
            yield
        if run.checkpoints is not None:
            run.checkpoints.finish(run.guard.iteration)
    except KeyboardInterrupt:
        log(f"Interrupted after iteration {run.guard.iteration}. {run.guard.on_disk()}")
        raise
    finally:
        stop_watching()


@contextmanager
def sft_training(a: dict, run: PreferenceRun):
    """An SFT run that asked for samples (``log_completions``: mlx-lm's reports, then the
    samples at each validation) or checkpoints (``save_only_model: false``, or resuming):
    mlx-lm's own loss, batches and reports; the guard (non-finite steps stop it, Ctrl-C ends
    it between steps) and the checkpoints of a preference run."""
    model, training_args = a["model"], a["args"]
    resumed = _resumed(run.options, training_args)
    if run.options.log_completions:
        _sft_samples(a, run.options, resumed)
    if not run.options.writes_checkpoints:
        yield run
        return
    run.asked = run.options
    run.guard = RunGuard(model, (), training_args.adapter_file)
    run.checkpoints = RunCheckpoints(
        run, model, a["optimizer"], training_args, run.identity, {"strategy": None}
    )
    if resumed:
        _restore(run, resumed, training_args)
    a["iterate_batches"] = WatchedBatches(
        a["iterate_batches"], run.guard, run.checkpoints
    )
    with guarded(run, a["optimizer"]):
        yield run


def _sft_samples(a: dict, options, resumed) -> None:
    """log_completions in an SFT run: greedy answers to the first validation prompts after
    each validation report (text rows have no prompt: said once, no samples)."""
    found = a["val_dataset"] and sft_prompts(a["val_dataset"], sample_count(options))
    if not found or not found[0]:
        log(
            "log_completions: the validation rows hold no prompt to answer; no samples."
        )
        return
    prompts, tokenizer = found
    path = Path(a["args"].adapter_file).parent / COMPLETIONS_FILE
    if is_main_rank() and not resumed:
        path.unlink(missing_ok=True)
    samples = ValidationSamples(prompts, tokenizer, options.max_completion_length, path)
    a["training_callback"] = SampleReports(
        a["training_callback"], partial(samples, a["model"])
    )


def start_training(run: PreferenceRun, a: dict) -> None:
    """Decide what the run trains with, for this model: prompt sharing (the probe), the
    output layer in tiles (the probe), the reference (and its step-0 adapter or its
    precomputed log-probs), and set up the loss, the guard and the reporter."""
    model, training_args = a["model"], a["args"]
    run.asked = run.options
    resumed = _resumed(run.options, training_args)
    options = resolve_prompt_sharing(model, run.options, training_args.grad_checkpoint)
    if options.prompt_sharing != "false":
        log(f"prompt sharing: {SHARING_NAMES[options.prompt_sharing]}")
    options = resolve_head_chunks(model, options)
    layout = _announce_head(model, options)
    initial, reference = None, {"strategy": None}
    if options.needs_reference:
        if resumed:  # the run's own, whatever the model holds now
            strategy = resumed[1]["reference"]["strategy"]
        else:
            strategy = resolve_reference(model, options.reference)
        options = options.replace(reference=strategy)
        check_reference(model, options)
        if options.reference == "initial_adapter":
            saved = None
            if resumed:
                saved = mx.load(str(resumed[0] / REFERENCE))
            elif run.reference_file:  # the reference of the run it continues
                saved = mx.load(run.reference_file)
            initial = InitialAdapter(model, saved)
        reference["strategy"] = options.reference
        where = " (the checkpoint's)" if resumed else ""
        log(f"{options.method} reference: {REFERENCE_NAMES[options.reference]}{where}")
        options = resolve_frozen_layers(model, options)
        log_frozen_layers(model, options)
    datasets = [
        preference_dataset_of(d) for d in (a["train_dataset"], a["val_dataset"]) if d
    ]
    if options.method == "kto":
        for line in label_balance(datasets[0], options):
            log(line)
    datasets += [d for d in run.scored_alike if d not in datasets]
    if options.reference == "precomputed":
        if resumed:
            reference["model_hash"] = resumed[1]["reference"]["model_hash"]
        else:
            reference["model_hash"] = model_fingerprint(model)
        run.scored = _precompute(
            model, datasets, options, training_args, reference["model_hash"], resumed
        )
    metrics_path = Path(training_args.adapter_file).parent / METRICS_FILE
    if is_main_rank() and not resumed:
        # A training run starts its own record, as it overwrites adapters.safetensors.
        metrics_path.unlink(missing_ok=True)
    names = metric_names(options)
    run.options = options
    run.loss = PreferenceLoss(options, initial)
    run.guard = RunGuard(
        model, names, training_args.adapter_file, skip=options.on_nonfinite == "skip"
    )
    run.reporter = PreferenceReporter(
        run.guard,
        names,
        metrics_path,
        inner=a["training_callback"],
        shown=shown_metrics(options),
    )
    run.reporter.eta = Eta(training_args.iters)
    run.description = _description(options, layout)
    if options.method in WATCHED and a["val_dataset"] and not resumed:
        val = preference_dataset_of(a["val_dataset"])
        run.reporter.watch = DegenerationWatch(options.method, chosen_tokens(val))
    completions = metrics_path.parent / COMPLETIONS_FILE
    if (
        is_main_rank()
        and not resumed
        and (options.generates or options.log_completions)
    ):
        completions.unlink(missing_ok=True)
    if options.generates:
        run.rollouts = Rollouts(
            model,
            options,
            reward_functions(options),
            getattr(training_args, "grad_accumulation_steps", 1),
            initial,
            completions if options.log_completions else None,
        )
        if options.log_completions:
            run.reporter.samples = partial(_samples, run.rollouts, options)
    elif options.log_completions and a["val_dataset"]:
        val = preference_dataset_of(a["val_dataset"])
        prompts = preference_prompts(val, sample_count(options))
        samples = ValidationSamples(
            prompts, val.tokenizer, options.max_completion_length, completions
        )
        run.reporter.val_samples = partial(samples, model)
    if options.writes_checkpoints:
        run.checkpoints = RunCheckpoints(
            run, model, a["optimizer"], training_args, run.identity, reference, initial
        )
    if resumed:
        _restore(run, resumed, training_args)


def _restore(run, resumed, training_args):
    folder, state = resumed
    run.checkpoints.restore(folder)
    run.loop_start = state["iteration"] + 1
    log(
        f"resuming {folder}: iteration {state['iteration']} of {training_args.iters} "
        "done; weights, optimizer state, learning-rate schedule, data position and "
        "random states restored."
    )


def _resumed(options, training_args):
    """``(folder, state)`` of the checkpoint a resumed run continues, else None."""
    if not options.resume_from_checkpoint:
        return None
    if not options.writes_checkpoints:
        raise ConfigError(
            "resume_from_checkpoint with save_only_model: a resumed run writes "
            "checkpoints; remove save_only_model."
        )
    adapter_path = Path(training_args.adapter_file).parent
    folder = find_checkpoint(options.resume_from_checkpoint, adapter_path)
    state = read_state(folder)
    if state["iteration"] >= training_args.iters:
        raise ConfigError(
            f"resume_from_checkpoint {folder}: the run is at iteration "
            f"{state['iteration']} and iters is {training_args.iters}: nothing is left "
            "to train; raise iters to train on."
        )
    return folder, state


def _announce_head(model, options) -> str:
    """Say how the output layer runs; returns it in words."""
    head, tile = head_for(model, options.head_chunk_size)
    if head is None:
        return "whole logits"
    rows = f"{tile} rows" if tile else "rows sized to each batch"
    layout = f"output layer in tiles of {rows}"
    log(f"{layout} (vocabulary {head.vocab:,}): no whole logits")
    return layout


def _precompute(model, datasets, options, training_args, model_hash, resumed) -> list:
    """``(dataset, the same with its reference log-probs)`` for each of ``datasets``
    (a resumed run's from the cache only: its model is no longer the reference)."""
    scored = []
    for dataset in datasets:
        with_reference, status = precompute_reference(
            model,
            dataset,
            options,
            training_args.batch_size,
            training_args.max_seq_length,
            model_hash,
            cached_only=resumed[0] if resumed else None,
        )
        log(f"reference log-probs of {dataset.source}: {status}")
        scored.append((dataset, with_reference))
    return scored


def _samples(rollouts, options) -> list:
    """The last generation's samples a report prints (``num_completions_to_print``)."""
    return rollouts.samples[: options.num_completions_to_print]


def _description(options, layout) -> str:
    """What the run trains with, in words, for the end-of-run summary."""
    losses = ", ".join(options.loss_type)
    text = f"{options.method} ({losses}, beta {options.beta:g})"
    if options.generates:
        text += f", {options.num_generations} completions per prompt"
    if options.method == "kto":
        text += f", weights {options.desirable_weight:g}/{options.undesirable_weight:g}"
    if options.needs_reference:
        text += f", reference {options.reference}"
    return text + f", prompt_sharing {options.prompt_sharing}, {layout}"


def _checked_for(model, options):
    """``options`` resolved for ``model`` (prompt sharing, tiles and the frozen layers
    probed)."""
    options = resolve_head_chunks(model, resolve_prompt_sharing(model, options))
    return resolve_frozen_layers(model, options)


def _rollouts_for(run, model, options):
    """The training run's rollouts, or (a script's evaluation, ``--test`` alone) new ones
    for ``model``."""
    if run is not None and run.rollouts is not None:
        return run.rollouts
    return Rollouts(model, options, reward_functions(options))


def random_states_kept_by(run):
    """Validation leaves a preference run's random states as they were, whether it writes
    checkpoints or not (``save_only_model`` changes the files only), and a checkpointed SFT
    run's (see ``checkpoint.random_states_kept``); a plain SFT run's stay upstream's."""
    if run is None or (run.checkpoints is None and not run.options.is_preference):
        return nullcontext()
    return random_states_kept()


def evaluation(a: dict, defaults: set, upstream):
    """mlx-lm's ``evaluate()`` of preference data, for its arguments ``a`` (bound by name);
    ``upstream()`` runs mlx-lm's own with ``a`` (a caller's own loss)."""
    loss, run = a["loss"], current_run()
    if run is not None:  # the test split, scored before step 1 with the rest
        a["dataset"] = run.scored_version(a["dataset"])
    pairs = preference_dataset_of(a["dataset"])
    batches = a["iterate_batches"]
    batches = getattr(batches, "unwatched", batches)
    default_batches = (
        "iterate_batches" in defaults
        or getattr(batches, "func", None) is iterate_preference_batches
        or isinstance(batches, Rollouts)
    )
    if "loss" in defaults:
        if run is not None and run.loss is not None:  # validation, or --test after it
            loss = run.loss
        else:  # a script's own evaluate call: the dataset's options, for this model
            loss = PreferenceLoss(_checked_for(a["model"], pairs.options))
    elif isinstance(loss, PreferenceLoss) and (run is None or loss is not run.loss):
        # a script's own PreferenceLoss(options): checked for this model, as above
        loss = replace(loss, options=_checked_for(a["model"], loss.options))
    if not isinstance(loss, PreferenceLoss):
        # A caller's own loss gets mlx-lm's own evaluation of it, on the pairs in file
        # order (whole rows: the caller's loss knows nothing of the shared layout).
        if default_batches:
            a["iterate_batches"] = iterate_eval_batches
        return upstream()
    if default_batches and pairs.options.generates:  # sampled, then scored
        batches = _rollouts_for(run, a["model"], loss.options)
    elif default_batches:  # TRL's evaluation order, in the run's layout
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
