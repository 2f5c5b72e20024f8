"""TRL-named metrics in mlx-lm's reports, its TrainingCallback and ``metrics.jsonl``.

``PreferenceReporter`` wraps whatever callback mlx-lm was given. At a training report it reads
the on-device running sums of the steps since the last report (kept by the run's guard), prints
the headline metrics (``COMPACT``, or all with ``report_metrics: all``) on one line under
mlx-lm's own, appends every metric as one JSON object to ``<adapter_path>/metrics.jsonl`` and
passes them all on to the wrapped callback (so ``--report-to wandb`` logs them): training
metrics under their TRL names, validation ones with mlx-lm's ``val_`` prefix. It keeps the last
record of each split for the end-of-run summary (``summary_lines``).
"""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.tuner.callbacks import TrainingCallback

from .console import is_main_rank

METRICS_FILE = "metrics.jsonl"


# What a TRL user watches; the report lines show these (those the method has) by default
# (KTO's kl: the reference point its rewards are judged against).
COMPACT = (
    "loss",
    "kl",
    "rewards/accuracies",
    "rewards/margins",
    "nll_loss",
    "log_odds_ratio",
)


# KTO: TRL logs a label-conditional metric only at the steps (evaluation batches) that hold a
# row of that label, and averages it over those; the hidden flag of each counts them.
PRESENT_WHEN = {
    "rewards/chosen": "_chosen",
    "logps/chosen": "_chosen",
    "logits/chosen": "_chosen",
    "rewards/rejected": "_rejected",
    "logps/rejected": "_rejected",
    "logits/rejected": "_rejected",
    "rewards/margins": "_both",
}


def average_metrics(names, sums, count) -> dict:
    """The named metrics from ``sums`` of their per-step values over ``count`` steps: each
    the mean over the steps it was logged at (a label-conditional one is left out when no
    step had it); the hidden ``_`` flags are left out."""
    total = dict(zip(names, sums))
    out = {}
    for name in names:
        if name.startswith("_"):
            continue
        flag = PRESENT_WHEN.get(name)
        steps = total[flag] if flag in total else count
        if steps:
            out[name] = total[name] / steps
    return out


def format_metrics(metrics: dict, names=None) -> str:
    """``name value`` pairs with 4 significant digits (token counts whole), in the metrics'
    order; only ``names`` when given."""
    return "  ".join(
        f"{k} {v:,.0f}" if k == "num_tokens" else f"{k} {v:.4g}"
        for k, v in metrics.items()
        if names is None or k in names
    )


def shown_metrics(options):
    """The names a report line shows for ``options.report_metrics`` (None: all)."""
    return None if options.report_metrics == "all" else COMPACT


def append_metrics(path: Optional[Path], split: str, iteration: int, metrics: dict):
    if path is None or not is_main_rank():
        return
    with open(path, "a") as fid:
        fid.write(
            json.dumps({"split": split, "iteration": iteration, **metrics}) + "\n"
        )


def print_metrics(split: str, metrics: dict, names=None):
    """One line under mlx-lm's own report line for the same iteration."""
    if is_main_rank():
        print(f"        {split:<5} {format_metrics(metrics, names)}", flush=True)


class PreferenceReporter(TrainingCallback):
    """Training reports average the metrics of the steps since the last report, which the
    run's guard sums on device as the steps finish (``safety.RunGuard``)."""

    def __init__(self, guard, names, path: Optional[Path], inner=None, shown=COMPACT):
        self.guard = guard
        self.names = names
        self.path = path
        self.inner = inner
        self.shown = shown
        self.trained_tokens = 0  # TRL's num_tokens: every real token trained on so far
        self.last = {}  # split -> (iteration, metrics) of its last report
        # mlx-lm's own count of the tokens trained on (every method; TRL's ORPO has no
        # num_tokens): the summary's
        self.upstream_tokens = 0

    def tokens_so_far(self) -> int:
        """TRL's ``num_tokens`` now: every token trained on, the steps since the last
        training report included (TRL counts at every step)."""
        pending = self.guard.peek_sums()[self.names.index("num_tokens")]
        pending = mx.distributed.all_sum(pending, stream=mx.cpu).item()
        return self.trained_tokens + int(pending)

    def record(self, split: str, iteration: int, metrics: dict):
        print_metrics(split, metrics, self.shown)
        append_metrics(self.path, split, iteration, metrics)
        self.last[split] = (iteration, metrics)

    def _train_metrics(self) -> dict:
        sums, steps = self.guard.take_sums()
        sums = mx.concatenate([sums, mx.array([float(steps)])])
        sums = mx.distributed.all_sum(sums, stream=mx.cpu).tolist()
        steps = sums[-1] or float("nan")  # every step skipped: nothing to average
        metrics = average_metrics(self.names, sums[:-1], steps)
        if "num_tokens" in metrics:
            self.trained_tokens += int(sums[self.names.index("num_tokens")])
            metrics["num_tokens"] = float(self.trained_tokens)
        return metrics

    def on_train_loss_report(self, train_info: dict):
        metrics = self._train_metrics()
        self.upstream_tokens = train_info.get("trained_tokens", self.upstream_tokens)
        self.record("train", train_info["iteration"], metrics)
        if self.inner is not None:
            self.inner.on_train_loss_report({**train_info, **metrics})

    def on_val_loss_report(self, val_info: dict):
        metrics = dict(getattr(val_info["val_loss"], "metrics", {}))
        if "num_tokens" in metrics:
            metrics["num_tokens"] = float(self.tokens_so_far())
        self.record("val", val_info["iteration"], metrics)
        if self.inner is not None:
            prefixed = {f"val_{k}": v for k, v in metrics.items()}
            self.inner.on_val_loss_report(
                {**val_info, "val_loss": float(val_info["val_loss"]), **prefixed}
            )


def summary_lines(run, adapter_path: Optional[Path]) -> list:
    """The end-of-run block: where the adapter is, how long training took, what it trained
    with, and each split's last metrics (as in ``metrics.jsonl``, 4 significant digits).
    """
    guard, reporter = run.guard, run.reporter
    lines = ["run summary"]
    if guard.saved_at is not None:
        lines.append(f"  adapter   {guard.adapter_file} (iteration {guard.saved_at})")
    if adapter_path is not None:
        lines.append(f"  metrics   {Path(adapter_path) / METRICS_FILE}")
    seconds, tokens = run.train_seconds or float("nan"), int(reporter.upstream_tokens)
    lines.append(
        f"  trained   {guard.iteration} iterations, {tokens:,} tokens in {seconds:.1f} s "
        f"({tokens / seconds:,.0f} tokens/s, validation included)"
    )
    lines.append(f"  with      {run.description}")
    for split in ("train", "val", "test"):
        if split in reporter.last:
            iteration, metrics = reporter.last[split]
            lines.append(
                f"  {split:<5} @{iteration:<4}{format_metrics(metrics, reporter.shown)}"
            )
    return lines
