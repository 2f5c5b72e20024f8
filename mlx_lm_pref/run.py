"""One preference run: everything it decides and keeps, in one object.

A run starts where mlx-lm's ``run`` starts for ``mlx_lm.lora`` (``patches/lora.py``), or at
``train()`` for a script that calls the trainer itself. ``PreferenceRun`` holds the options
as asked and, once training starts, as resolved for the model (the reference strategy, the
prompt-sharing decision), the loss bound to them, the step-0 adapter of an
``initial_adapter`` reference, the guard and the reporter.

mlx-lm calls the patched functions of one run (``load_dataset``, ``train``, ``evaluate``,
``evaluate_model``, ``mx.save_safetensors``) from its own code, with its own arguments: there
is no argument through which the run could reach them. ``current_run()`` is that one place,
a context variable set for the duration of the run (and so per thread, and gone after it).
"""

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Optional

from mlx_lm.tuner.datasets import CacheDataset

from .batching import preference_dataset_of
from .config import PreferenceArgs


@dataclass
class PreferenceRun:
    options: PreferenceArgs
    # mlx_lm.lora: the (train, valid, test) datasets, built and checked before the model
    # loads (bad data costs no model load).
    splits: Optional[tuple] = None
    # Datasets scored with training's reference besides train and valid (--test's split).
    scored_alike: list = field(default_factory=list)
    # ``reference: precomputed``: (dataset as loaded, the same with its reference log-probs)
    # for every dataset scored before step 1 (datasets are never changed in place).
    scored: list = field(default_factory=list)
    # Set when training starts (``session.start_training``).
    loss: Optional[object] = None  # objective.PreferenceLoss
    guard: Optional[object] = None  # safety.RunGuard
    reporter: Optional[object] = None  # metrics.PreferenceReporter
    rollouts: Optional[object] = None  # rollout.Rollouts: GRPO's and RLOO's batches
    checkpoints: Optional[object] = None  # resume.RunCheckpoints
    # The options as asked, before ``start_training`` resolved them for the model (what a
    # checkpoint records and a resumed run is compared with).
    asked: Optional[PreferenceArgs] = None
    # mlx_lm.lora: its options and the training data's fingerprint, which a checkpoint
    # records (``gate.run_identity``).
    identity: dict = field(default_factory=dict)
    # --resume-adapter-file of a preference run with reference initial_adapter: the file
    # holding that run's reference adapter (``gate.continue_adapter``).
    reference_file: Optional[str] = None
    # A resumed run: the iteration mlx-lm's loop starts at (``patches/trainer.py``).
    loop_start: Optional[int] = None
    # What it trains with, in words (method, reference, layout), for the end-of-run summary.
    description: str = ""
    train_seconds: Optional[float] = None  # train()'s wall time, validation included

    @property
    def trained(self) -> bool:
        return self.loss is not None

    def scored_version(self, dataset):
        """``dataset`` (a PreferenceDataset, or mlx-lm's CacheDataset of one) with its
        precomputed reference log-probs when the run scored it, else itself."""
        pairs = preference_dataset_of(dataset)
        for loaded, scored in self.scored:
            if loaded is pairs:
                return CacheDataset(scored) if pairs is not dataset else scored
        return dataset

    @property
    def trained_tokens(self) -> int:
        return self.reporter.trained_tokens if self.reporter else 0


_current: ContextVar = ContextVar("mlx_lm_pref_run", default=None)


def current_run() -> Optional[PreferenceRun]:
    return _current.get()


@contextmanager
def running(run: PreferenceRun):
    token = _current.set(run)
    try:
        yield run
    finally:
        _current.reset(token)
