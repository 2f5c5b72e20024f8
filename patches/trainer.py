"""Patches for ``mlx_lm.tuner.trainer``.

``train`` and ``evaluate`` captured the originals of ``default_loss`` and ``iterate_batches``
as default arguments. Their wrappers bind mlx-lm's arguments by name and, when the data are
preference pairs, delegate to ``mlx_lm_pref.session``, which hands mlx-lm's loop a loss and a
batch iterator bound to the run's options. ``default_loss`` and ``iterate_batches`` themselves
stay preference-aware for a caller who names them explicitly, and fall through to the
originals for SFT data.
"""

import inspect

from mlx_lm_pref import session
from mlx_lm_pref.batching import (
    PreferenceBatch,
    iterate_preference_batches,
    preference_dataset_of,
)
from mlx_lm_pref.run import current_run
from mlx_lm_pref.safety import SafeSaveModule

from . import PreferenceWrapper, function_wrapper


def default_loss(wrapped, instance, args, kwargs):
    # A preference batch comes alone, ``loss(model, batch)``; SFT's is (model, batch, lengths).
    batch = args[1] if len(args) > 1 else kwargs.get("batch")
    if not isinstance(batch, PreferenceBatch):
        return wrapped(*args, **kwargs)
    run = current_run()
    if run is None or run.loss is None:
        raise ValueError(
            "default_loss got a preference batch outside a training run, so it has no "
            "options to score it with: use mlx_lm_pref.objective.PreferenceLoss(options)."
        )
    return run.loss(*args, **kwargs)


def iterate_batches(wrapped, instance, args, kwargs):
    dataset = kwargs["dataset"] if "dataset" in kwargs else args[0]
    if preference_dataset_of(dataset) is not None:
        return iterate_preference_batches(*args, **kwargs)
    return wrapped(*args, **kwargs)


def loop_range(wrapped, instance, args, kwargs):
    # mlx-lm's loop counts ``for it in range(1, args.iters + 1)``; a resumed run's count
    # starts after its checkpoint, so its evaluation, report, save and accumulation cadence,
    # checkpoint names and printed iterations are the interrupted run's. Once per run; every
    # other range in the module is upstream's.
    run = current_run()
    if run is not None and run.loop_start and len(args) == 2 and args[0] == 1:
        start, run.loop_start = run.loop_start, None
        return wrapped(start, args[1])
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


def _defaults(bound, signature) -> set:
    return {n for n in ("loss", "iterate_batches") if _is_default(bound, signature, n)}


def train(wrapped, instance, args, kwargs):
    bound, signature = _bind(wrapped, args, kwargs)
    if preference_dataset_of(bound.arguments["train_dataset"]) is None:
        run = current_run()
        asked = run is not None and (
            run.options.writes_checkpoints or run.options.log_completions
        )
        if asked:  # SFT, checkpointed or sampled
            with session.sft_training(bound.arguments, run):
                return wrapped(*bound.args, **bound.kwargs)
        return wrapped(*args, **kwargs)
    with session.training(bound.arguments, _defaults(bound, signature)):
        return wrapped(*bound.args, **bound.kwargs)


def evaluate(wrapped, instance, args, kwargs):
    with session.random_states_kept_by(current_run()):
        return _evaluate(wrapped, args, kwargs)


def _evaluate(wrapped, args, kwargs):
    bound, signature = _bind(wrapped, args, kwargs)
    if preference_dataset_of(bound.arguments["dataset"]) is None:
        # a checkpointed SFT run's validation: the batches, not the watched steps
        batches = bound.arguments["iterate_batches"]
        bound.arguments["iterate_batches"] = getattr(batches, "unwatched", batches)
        return wrapped(*bound.args, **bound.kwargs)
    return session.evaluation(
        bound.arguments,
        _defaults(bound, signature),
        upstream=lambda: wrapped(*bound.args, **bound.kwargs),
    )


PATCHES = [
    ("default_loss", function_wrapper(default_loss)),
    ("iterate_batches", function_wrapper(iterate_batches)),
    ("train", function_wrapper(train)),
    ("evaluate", function_wrapper(evaluate)),
    # train() saves with mx.save_safetensors looked up here: atomic, finite-only saves.
    ("mx", SafeSaveModule),
    ("range", function_wrapper(loop_range)),
]
