"""A run's checkpoints: when they are written, what goes in, and a resumed run put back where
the checkpoint left it (the files themselves: ``checkpoint.py``).

``RunCheckpoints`` is bound to one training run. The guard calls ``at_boundary`` between
steps, before the next batch is drawn: a checkpoint is due every ``save_every`` iterations
that end an optimizer step (with gradient accumulation, and for GRPO/RLOO a whole generation
batch and its ``num_iterations`` passes: nothing half-done is left that a checkpoint would
have to hold), and when Ctrl-C or SIGTERM asked the run to stop. ``restore`` puts a
checkpoint's state into the run before mlx-lm's loop starts, which then counts from the
checkpoint's next iteration (``patches/trainer.py``'s ``range``).
"""

import json
import math
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .checkpoint import (
    ADAPTERS,
    OPTIMIZER,
    RANK_STATE,
    REFERENCE,
    BatchStream,
    checkpoint_folder,
    load_optimizer_state,
    load_rank_state,
    optimizer_arrays,
    options_record,
    rank_state,
    read_state,
    refuse_differences,
    set_mlx_key,
    unpack_numpy_state,
    write_checkpoint,
)
from .config import ConfigError
from .console import is_main_rank, log
from .metrics import METRICS_FILE
from .rollout import COMPLETIONS_FILE


def step_unit(options, training_args) -> int:
    """The iterations a checkpoint must fall between: an optimizer step (gradient
    accumulation), and for GRPO/RLOO a generation batch trained ``num_iterations`` times.
    """
    accumulation = getattr(training_args, "grad_accumulation_steps", 1)
    if not options.generates:
        return accumulation
    rounds = options.generation_steps(training_args.batch_size, accumulation)
    return math.lcm(accumulation, rounds * options.num_iterations)


class RunCheckpoints:
    """Writes the run's checkpoints and restores one (see the module docstring).

    Args:
        run: the ``PreferenceRun`` (guard, reporter, rollouts, options).
        model, optimizer: what trains.
        training_args: mlx-lm's ``TrainingArgs`` (adapter file, save cadence).
        identity: what else must not change on resume (``mlx_lm.lora``'s options and the
            training data's fingerprint), recorded as is.
        reference: ``{"strategy": ..., "model_hash": ...}``, the resolved reference.
        initial: the ``InitialAdapter`` of ``reference: initial_adapter``.
    """

    def __init__(
        self, run, model, optimizer, training_args, identity, reference, initial=None
    ):
        self.run, self.model, self.optimizer = run, model, optimizer
        self.adapter_path = Path(training_args.adapter_file).parent
        self.save_every = training_args.steps_per_save
        self.unit = step_unit(run.options, training_args)
        self.identity, self.reference, self.initial = identity, reference, initial
        self.stream: Optional[BatchStream] = None
        self.saved_at = None  # the iteration of the last checkpoint written
        self.resumed_from = None  # (folder, state) of a resumed run
        self.ranks = mx.distributed.init().size()
        self.warned = False
        if self.save_every % self.unit:
            log(
                f"checkpoints every {math.lcm(self.save_every, self.unit)} iterations: "
                f"one holds whole optimizer steps of {self.unit} iterations, and "
                f"save_every is {self.save_every}."
            )

    # ---- writing ----

    def at_boundary(self, iteration: int, stop: bool) -> bool:
        """Between steps: write a checkpoint if one is due. Returns whether the run stops
        now (asked to, and at a step a checkpoint can hold)."""
        whole = iteration % self.unit == 0
        if stop and not whole:
            if not self.warned:
                self.warned = True
                log(
                    f"stopping at the end of the optimizer step (iteration "
                    f"{iteration + self.unit - iteration % self.unit}) to save it whole."
                )
            return False
        due = iteration and iteration % self.save_every == 0
        if (due or stop) and whole and iteration != self.saved_at and iteration:
            self.save(iteration)
        return stop

    def finish(self, iteration: int) -> None:
        """At the end of training: the last checkpoint, if the last step was whole."""
        if iteration and iteration != self.saved_at:
            if iteration % self.unit == 0:
                self.save(iteration)
            else:
                log(
                    f"no checkpoint at iteration {iteration}: it ends inside an "
                    f"optimizer step of {self.unit} iterations."
                )

    def save(self, iteration: int) -> None:
        """Write the checkpoint of ``iteration`` (every rank calls this, at the same
        step: the random states are gathered; rank 0 writes)."""
        guard, reporter = self.run.guard, self.run.reporter
        per_rank = rank_state(self.stream, guard.peek_steps(), self.ranks)
        self.saved_at = iteration
        guard.checkpoint = (checkpoint_folder(self.adapter_path, iteration), iteration)
        if not is_main_rank():
            return
        files = {
            ADAPTERS: dict(tree_flatten(self.model.trainable_parameters())),
            OPTIMIZER: optimizer_arrays(self.optimizer),
            RANK_STATE: {k: mx.array(v) for k, v in per_rank.items()},
        }
        if self.initial is not None:
            files[REFERENCE] = self.initial.arrays(self.model)
        rollouts = self.run.rollouts
        state = {
            "iteration": iteration,
            "batches": self.stream.drawn if self.stream else iteration,
            "world_size": self.ranks,
            "trained_tokens": reporter.trained_tokens if reporter else 0,
            "upstream_tokens": reporter.upstream_tokens if reporter else 0,
            "skipped": list(guard.skipped),
            "generations": rollouts.generations if rollouts is not None else 0,
            "reference": self.reference,
            "options": options_record(self.run.asked),
            **self.identity,
        }
        write_checkpoint(
            checkpoint_folder(self.adapter_path, iteration),
            files,
            state,
            keep=self.run.options.save_total_limit,
        )

    # ---- resuming ----

    def restore(self, folder) -> dict:
        """Put the checkpoint in ``folder`` into the run: weights, optimizer, random
        states, the guard's and the reporter's counts, the records after it dropped.
        Returns its state; the batch stream is started from it by ``batches``."""
        state = read_state(folder)
        refuse_differences(folder, state["options"], options_record(self.run.asked))
        if state["world_size"] != self.ranks:
            raise ConfigError(
                f"resume_from_checkpoint {folder}: written by {state['world_size']} "
                f"processes, resumed on {self.ranks}; resume on as many (each holds its "
                "own random state and data)."
            )
        self._load_weights(folder)
        self.optimizer.state = load_optimizer_state(folder)
        mine = load_rank_state(folder, mx.distributed.init().rank())
        set_mlx_key(mine["mlx_key"])
        np.random.set_state(unpack_numpy_state(mine["numpy"]))
        iteration = state["iteration"]
        guard, reporter = self.run.guard, self.run.reporter
        guard.iteration = guard.settled = iteration
        guard.skipped = list(state["skipped"])
        if "pending" in mine:
            guard.steps = [mx.array(s) for s in mine["pending"]]
        guard.checkpoint = (Path(folder), iteration)
        if reporter is not None:  # an SFT run reports through mlx-lm alone
            reporter.trained_tokens = state["trained_tokens"]
            reporter.upstream_offset = state["upstream_tokens"]
        if self.run.rollouts is not None:
            self.run.rollouts.generations = state["generations"]
        self.saved_at = iteration
        self.resumed_from = (Path(folder), state, unpack_numpy_state(mine["stream"]))
        if is_main_rank():
            keep_records(self.adapter_path, iteration, state["generations"])
        return state

    def _load_weights(self, folder):
        saved = mx.load(str(Path(folder) / ADAPTERS))
        trainable = dict(tree_flatten(self.model.trainable_parameters()))
        if set(saved) != set(trainable):
            missing = sorted(set(trainable) - set(saved))[:3]
            extra = sorted(set(saved) - set(trainable))[:3]
            raise ConfigError(
                f"resume_from_checkpoint {folder}: its weights are not this model's "
                f"trainable parameters (missing {missing}, unexpected {extra}): resume "
                "with the run's model, fine_tune_type and num_layers."
            )
        self.model.load_weights(list(saved.items()), strict=False)
        mx.eval(self.model.parameters())

    def batches(self, make, skips: bool) -> BatchStream:
        """The training batches (``make(skip)``), on their own random stream: a fresh one,
        or the resumed run's, placed after the checkpoint's last batch."""
        if self.resumed_from is None:
            self.stream = BatchStream(make, skips=skips)
        else:
            _, state, start = self.resumed_from
            self.stream = BatchStream(make, start, state["batches"], skips=skips)
        return self.stream


def keep_records(adapter_path: Path, iteration: int, generations: int) -> None:
    """``metrics.jsonl`` and ``completions.jsonl`` as they were at the checkpoint: the
    records of the steps after it (and the validation run right after it) are dropped, so a
    resumed run appends each iteration once."""

    def kept(record):
        if "generation" in record:
            return record["generation"] <= generations
        if record.get("split") == "val":  # run before the step after ``iteration - 1``
            return record["iteration"] < iteration
        return record.get("split") == "train" and record["iteration"] <= iteration

    for name in (METRICS_FILE, COMPLETIONS_FILE):
        path = adapter_path / name
        if not path.is_file():
            continue
        lines = [l for l in path.read_text().splitlines() if l.strip()]
        lines = [l for l in lines if kept(json.loads(l))]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(l + "\n" for l in lines))
        tmp.replace(path)
