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
import wrapt
from mlx.utils import tree_flatten, tree_map

from .console import log
from .objective import METRICS_ATTRIBUTE
from .run import current_run


class NonFiniteError(FloatingPointError):
    pass


class RunGuard:
    """Watches every finished training step of a preference run: its loss and metrics must
    be finite (else stop, or with ``skip`` count the update as dropped), and its metrics add
    to the running sums the training reports average (as TRL logs them, over the steps since
    the last report). One host read per step, after mlx-lm's own ``mx.eval`` of the step.

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
        self.settled = 0  # training steps checked and summed
        self.saved_at = None  # the iteration whose weights adapter_file holds
        self.skipped = []
        self.interrupted = False
        self.sums = mx.zeros((len(metric_names),))
        self.steps = 0  # steps in ``sums``

    def _metrics(self):
        return self.model[METRICS_ATTRIBUTE]

    def settle(self):
        """Check the last step that ran and add its metrics to the running sums."""
        if self.settled == self.iteration:
            return
        self.settled = self.iteration
        metrics = self._metrics()
        if mx.all(mx.isfinite(metrics)).item():
            self.sums, self.steps = self.sums + metrics, self.steps + 1
            return
        if self.skip:  # the update itself was dropped in the graph (skip_nonfinite)
            self.skipped.append(self.iteration)
            log(
                f"iteration {self.iteration}: non-finite loss or gradient, update skipped."
            )
            return
        shown = ", ".join(f"{k} {v:.4g}" for k, v in zip(self.names, metrics.tolist()))
        raise NonFiniteError(
            f"iteration {self.iteration}: the loss or a metric is not finite ({shown}). "
            f"{self.on_disk()} Lower the learning rate, check the data of this step, or "
            "use float32 weights."
        )

    def peek_sums(self):
        """The sums of the settled steps since the last ``take_sums``, left in place. At a
        validation every step that ran is settled: mlx-lm validates after drawing the next
        batch (``watch`` settles the last step before handing it over), and that batch's
        step has not run (so settling now would be wrong)."""
        return self.sums

    def take_sums(self):
        """``(sums, steps)`` since the last call, the last step included; then reset."""
        self.settle()
        taken = self.sums, self.steps
        self.sums, self.steps = mx.zeros_like(self.sums), 0
        return taken

    def on_disk(self) -> str:
        if self.saved_at is None:
            return "No adapter was saved by this run."
        return f"{self.adapter_file} holds the weights of iteration {self.saved_at}, intact."

    @contextmanager
    def ctrl_c_between_steps(self):
        """The first Ctrl-C ends the run before its next step; a second one at once.

        A KeyboardInterrupt raised wherever the interpreter happens to be can be lost (one
        that lands in a destructor is printed and dropped); a flag read between steps cannot.
        """
        if (
            threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        ):
            yield  # someone else handles Ctrl-C here
            return

        def first(signum, frame):
            self.interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        signal.signal(signal.SIGINT, first)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def watch(self, batches):
        """Pass mlx-lm's batches through, settling each finished step before the next."""
        for batch in batches:
            if self.interrupted:
                raise KeyboardInterrupt
            self.settle()
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


def skip_nonfinite(optimizer):
    """Make ``optimizer.update`` a no-op, inside the compiled step, whenever a gradient is
    not finite: parameters and optimizer state (moments, step count) stay as they were.

    Returns a function that puts the optimizer's own ``update`` back.
    """
    apply_gradients = optimizer.apply_gradients

    def update(model, gradients):
        if not optimizer._initialized:
            optimizer.init(gradients)
        leaves = [g for _, g in tree_flatten(gradients)]
        ok = mx.all(mx.stack([mx.all(mx.isfinite(g)) for g in leaves]))
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
