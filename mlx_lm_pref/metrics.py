"""TRL-named metrics in mlx-lm's reports, its TrainingCallback and ``metrics.jsonl``.

``PreferenceReporter`` wraps whatever callback mlx-lm was given. At a training report it reads
the on-device running sums of the steps since the last report (kept by the run's guard), prints the
metrics under mlx-lm's own progress line, appends one JSON object to
``<adapter_path>/metrics.jsonl`` and passes the metrics on to the wrapped callback (so
``--report-to wandb`` logs them): training metrics under their TRL names, validation ones with
mlx-lm's ``val_`` prefix.
"""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.tuner.callbacks import TrainingCallback

from .console import is_main_rank

METRICS_FILE = "metrics.jsonl"


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def append_metrics(path: Optional[Path], split: str, iteration: int, metrics: dict):
    if path is None or not is_main_rank():
        return
    with open(path, "a") as fid:
        fid.write(
            json.dumps({"split": split, "iteration": iteration, **metrics}) + "\n"
        )


def print_metrics(split: str, metrics: dict):
    """One line under mlx-lm's own report line for the same iteration."""
    if is_main_rank():
        print(f"          {split:<5} {format_metrics(metrics)}", flush=True)


class PreferenceReporter(TrainingCallback):
    """Training reports average the metrics of the steps since the last report, which the
    run's guard sums on device as the steps finish (``safety.RunGuard``)."""

    def __init__(self, guard, names, path: Optional[Path], inner=None):
        self.guard = guard
        self.names = names
        self.path = path
        self.inner = inner
        self.trained_tokens = 0  # TRL's num_tokens: every real token trained on so far

    def _train_metrics(self) -> dict:
        sums, steps = self.guard.take_sums()
        sums = mx.concatenate([sums, mx.array([float(steps)])])
        sums = mx.distributed.all_sum(sums, stream=mx.cpu).tolist()
        steps = sums[-1] or float("nan")  # every step skipped: nothing to average
        metrics = {k: v / steps for k, v in zip(self.names, sums)}
        if "num_tokens" in metrics:
            self.trained_tokens += int(sums[self.names.index("num_tokens")])
            metrics["num_tokens"] = float(self.trained_tokens)
        return metrics

    def on_train_loss_report(self, train_info: dict):
        metrics = self._train_metrics()
        it = train_info["iteration"]
        print_metrics("train", metrics)
        append_metrics(self.path, "train", it, metrics)
        if self.inner is not None:
            self.inner.on_train_loss_report({**train_info, **metrics})

    def on_val_loss_report(self, val_info: dict):
        metrics = dict(getattr(val_info["val_loss"], "metrics", {}))
        if "num_tokens" in metrics:
            metrics["num_tokens"] = float(self.trained_tokens)
        it = val_info["iteration"]
        print_metrics("val", metrics)
        append_metrics(self.path, "val", it, metrics)
        if self.inner is not None:
            prefixed = {f"val_{k}": v for k, v in metrics.items()}
            self.inner.on_val_loss_report(
                {**val_info, "val_loss": float(val_info["val_loss"]), **prefixed}
            )
