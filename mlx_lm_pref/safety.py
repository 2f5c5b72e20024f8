"""Preference training that fails safe: non-finite values stop it before they are saved,
adapter files are replaced atomically, and Ctrl-C says what is on disk.

mlx-lm's ``train`` saves with ``mx.save_safetensors`` looked up in its module; the patch table
points that module's ``mx`` at ``SafeSaveModule``, which is ``mlx.core`` except that saves go
to a temporary file renamed over the target (an interrupted save leaves the old file whole) and,
while a preference run is in progress, refuse non-finite weights.
"""

import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import wrapt
from mlx.utils import tree_flatten, tree_map

from .console import log
from .metrics import average_metrics
from .objective import METRICS_ATTRIBUTE
from .run import current_run


class NonFiniteError(FloatingPointError):
    pass


# Whether the step's optimizer update had finite gradients (``watch_updates``): a second
# output of the compiled step beside the metrics, reset to true after each step is settled.
UPDATE_ATTRIBUTE = "_pref_update_finite"


class RunGuard:
    """Watches every finished training step of a preference run: its gradients, loss and
    metrics must be finite (else stop; with ``skip``, a step whose gradients were not finite
    had its update dropped in the graph and is counted as skipped), and its metrics join
    those the next training report averages (as TRL logs them, over the steps since the
    last report). One host read per step, after mlx-lm's own ``mx.eval`` of the step.

    A step is settled once, by whichever comes first after it: the next batch (``watch``),
    a training report, or a save (``SafeSaveModule``). mlx-lm's loop stops without asking for
    another batch after its last step, so that step is settled by the final report or save.
    """

    def __init__(self, model, metric_names, adapter_file, skip=False):
        self.model = model
        self.names = metric_names
        self.adapter_file = Path(adapter_file)
        self.skip = skip
        self.iteration = 0  # training steps started
        self.settled = 0  # training steps checked and kept
        self.saved_at = None  # the iteration whose weights adapter_file holds
        self.skipped = []
        self.interrupted = False
        self.steps = []  # (K, 2) metrics of each kept step since the last report
        self.checkpoint = None  # (folder, iteration) of the newest checkpoint
        self.ranks = mx.distributed.init().size()

    def start(self, optimizer):
        """Set up the model's metrics and update channels and watch the optimizer's
        updates; returns a function that undoes both."""
        self.model[METRICS_ATTRIBUTE] = mx.zeros((len(self.names), 2))
        self.model[UPDATE_ATTRIBUTE] = mx.array(True)
        restore = watch_updates(optimizer, self.model, self.skip)

        def stop():
            restore()
            self.model.pop(METRICS_ATTRIBUTE, None)
            self.model.pop(UPDATE_ATTRIBUTE, None)

        return stop

    def settle(self):
        """Check the last step that ran and keep its metrics for the next report."""
        if self.settled == self.iteration:
            return
        self.settled = self.iteration
        metrics, update = self.model[METRICS_ATTRIBUTE], self.model[UPDATE_ATTRIBUTE]
        finite, update = mx.all(mx.isfinite(metrics)).item(), update.item()
        self.model[UPDATE_ATTRIBUTE] = mx.array(True)  # steps without an update stay so
        if finite and update:
            if self.names:  # an SFT run's guard keeps no metrics
                self.steps.append(metrics)
            return
        if self.skip and not update:  # dropped in the graph (watch_updates)
            self.skipped.append(self.iteration)
            log(f"iteration {self.iteration}: non-finite gradient, update skipped.")
            return
        if self.skip:  # the update was applied: only a metric is off
            log(
                f"iteration {self.iteration}: a metric is not finite "
                f"({self._shown(metrics)}); the update was applied, the step is left "
                "out of the report."
            )
            return
        what = "the loss or a metric" if not finite else "a gradient"
        raise NonFiniteError(
            f"iteration {self.iteration}: {what} is not finite ({self._shown(metrics)}). "
            f"{self.on_disk()} Lower the learning rate, check the data of this step, or "
            "use float32 weights."
        )

    def _shown(self, metrics) -> str:
        values = average_metrics(self.names, np.array(metrics)[None])
        return ", ".join(f"{k} {v:.4g}" for k, v in values.items())

    def peek_steps(self) -> mx.array:
        """(S, K, 2): the metrics of the steps kept since the last ``take_steps``, left in
        place. At a validation every step that ran is settled: mlx-lm validates after
        drawing the next batch (``watch`` settles the last step before handing it over),
        and that batch's step has not run (so settling now would be wrong)."""
        return mx.stack(self.steps) if self.steps else mx.zeros((0, len(self.names), 2))

    def take_steps(self) -> mx.array:
        """``peek_steps()`` with the last step settled first; then forgotten."""
        self.settle()
        steps, self.steps = self.peek_steps(), []
        return steps

    def on_disk(self) -> str:
        if self.saved_at is None:
            text = "No adapter was saved by this run."
        else:
            text = (
                f"{self.adapter_file} holds the weights of iteration {self.saved_at}, "
                "intact."
            )
        if self.checkpoint is not None:
            folder, iteration = self.checkpoint
            text += (
                f" The checkpoint {folder} holds the run at iteration {iteration}: "
                "continue it with --resume (YAML: resume_from_checkpoint: true)."
            )
        return text

    @contextmanager
    def ctrl_c_between_steps(self):
        """The first Ctrl-C (or SIGTERM) ends the run between two steps, after a
        checkpoint; a second one at once.

        A KeyboardInterrupt raised wherever the interpreter happens to be can be lost (one
        that lands in a destructor is printed and dropped); a flag read between steps cannot.
        """
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only
            return
        defaults = {
            signal.SIGINT: signal.default_int_handler,
            signal.SIGTERM: signal.SIG_DFL,
        }
        mine = [  # the signals nobody else handles here
            n
            for n, default in defaults.items()
            if signal.getsignal(n) in (default, signal.SIG_DFL)
        ]
        saved = {n: signal.getsignal(n) for n in mine}

        def first(signum, frame):
            self.interrupted = True
            for n in mine:
                signal.signal(n, saved[n])

        for n in mine:
            signal.signal(n, first)
        try:
            yield
        finally:
            for n in mine:
                signal.signal(n, saved[n])

    def _stop_asked(self) -> bool:
        """Whether any rank was asked to stop (every rank then stops at the same step)."""
        if self.ranks == 1:
            return self.interrupted
        asked = mx.array(int(self.interrupted))
        return mx.distributed.all_sum(asked, stream=mx.cpu).item() > 0

    def watch(self, batches, boundary=None):
        """Pass mlx-lm's batches through, settling each finished step before the next batch
        is drawn. ``boundary(iteration, stop)`` runs there (the checkpoints) and says
        whether a requested stop happens now."""
        batches = iter(batches)
        while True:
            self.settle()
            stop = self._stop_asked()
            if boundary is not None:
                stop = boundary(self.iteration, stop)
            if stop:
                raise KeyboardInterrupt
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.iteration += 1  # the step about to run (and save)
            yield batch


def atomic_save_safetensors(path, arrays, metadata=None):
    """``mx.save_safetensors`` through a temporary file and a rename."""
    path = str(path)
    if not path.endswith(".safetensors"):
        path += ".safetensors"  # as mx.save_safetensors names it
    tmp = f"{path}.tmp{os.getpid()}.safetensors"
    try:
        if metadata is None:
            mx.save_safetensors(tmp, arrays)
        else:
            mx.save_safetensors(tmp, arrays, metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class SafeSaveModule(wrapt.ObjectProxy):
    """``mlx.core`` for mlx-lm's trainer module, with a safe ``save_safetensors``."""

    def save_safetensors(self, file, arrays, metadata=None):
        run = current_run()
        guard = run.guard if run is not None else None
        if guard is not None:
            guard.settle()  # the step whose weights these are
            bad = [k for k, v in arrays.items() if not mx.all(mx.isfinite(v)).item()]
            if bad:
                raise NonFiniteError(
                    f"iteration {guard.iteration}: {len(bad)} adapter tensors are not "
                    f"finite ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); not "
                    f"saved. {guard.on_disk()}"
                )
        atomic_save_safetensors(file, arrays, metadata)
        if guard is not None and Path(file) == guard.adapter_file:
            guard.saved_at = guard.iteration


def watch_updates(optimizer, model, skip):
    """Record in ``model`` whether each ``optimizer.update``'s gradients are finite (inside
    the compiled step); with ``skip``, make a non-finite update a no-op there: parameters
    and optimizer state (moments, step count) stay as they were.

    Returns a function that puts the optimizer's own ``update`` back.
    """
    apply_gradients = optimizer.apply_gradients

    def update(model, gradients):
        if not optimizer._initialized:
            optimizer.init(gradients)
        leaves = [g for _, g in tree_flatten(gradients)]
        ok = mx.all(mx.stack([mx.all(mx.isfinite(g)) for g in leaves]))
        model[UPDATE_ATTRIBUTE] = ok
        if not skip:
            model.update(apply_gradients(gradients, model))
            return
        before = tree_map(lambda g, p: p, gradients, model.trainable_parameters())
        state_before = tree_map(lambda x: x, optimizer.state)
        updated = apply_gradients(gradients, model)
        model.update(tree_map(lambda new, old: mx.where(ok, new, old), updated, before))
        _keep_where(ok, optimizer.state, state_before)

    optimizer.update = update
    return lambda: optimizer.__dict__.pop("update", None)


def _keep_where(ok, state, before):
    """state[k] = where(ok, state[k], before[k]), in place (mlx-lm's compiled step holds
    these very dicts)."""
    items = state.items() if isinstance(state, dict) else enumerate(state)
    for k, v in list(items):
        if isinstance(v, mx.array):
            state[k] = mx.where(ok, v, before[k])
        elif isinstance(v, (dict, list)):
            _keep_where(ok, v, before[k])
