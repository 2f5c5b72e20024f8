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
import shutil
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx_lm.tuner.callbacks import TrainingCallback

from .console import is_main_rank, log

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
    "reward",
    "reward_std",
    "completions/mean_length",
)


# Totals over the ranks, not ratios: a step's value is its numerators summed.
COUNTS = ("num_tokens",)


def pack_metrics(names, metrics: dict) -> mx.array:
    """(K, 2) float32: each metric's ``(numerator, denominator)`` in ``names`` order (the
    compiled step's metrics channel, see ``objective``)."""
    if set(metrics) != set(names):
        raise ValueError(f"metrics {sorted(metrics)} are not the names {list(names)}.")
    return mx.stack(
        [
            mx.stack([mx.array(n), mx.array(d)]).astype(mx.float32)
            for n, d in (metrics[name] for name in names)
        ]
    )


def batch_values(names, totals: np.ndarray) -> tuple:
    """Each batch's (step's) values from its numerators and denominators summed over the
    ranks, ``totals`` (S, K, 2): ``(values, present)``, each (S, K). A metric is present
    where its denominator is not 0 (TRL logs KTO's label-conditional metrics only for the
    batches holding that label); a count is its numerator, always present."""
    num, den = totals[..., 0], totals[..., 1]
    present = den != 0
    values = np.where(present, num / np.where(present, den, 1), 0.0)
    for k, name in enumerate(names):
        if name in COUNTS:
            values[:, k], present[:, k] = num[:, k], True
    return values, present


def metric_values(metrics: dict) -> dict:
    """One batch's values in one process, from ``{name: (numerator, denominator)}`` (what
    ``PreferenceLoss.metrics`` returns): those present, as floats."""
    names = tuple(metrics)
    totals = np.array(pack_metrics(names, metrics), np.float64)[None]
    return average_metrics(names, totals)


def average_metrics(names, totals, pooled=()) -> dict:
    """The named metrics of ``totals`` (S, K, 2), the numerators and denominators of S steps
    (or evaluation batches) summed over the ranks: each the mean of its per-step values
    over the steps it is present at (left out where none), as TRL averages logged values;
    a count summed; the names in ``pooled`` as their numerators' sum over their
    denominators' (TRL's evaluation loss: every pair weighs the same)."""
    totals = np.asarray(totals, np.float64).reshape(-1, len(names), 2)
    values, present = batch_values(names, totals)
    out = {}
    for k, name in enumerate(names):
        if name in pooled and totals[:, k, 1].sum():
            out[name] = float(totals[:, k, 0].sum() / totals[:, k, 1].sum())
        elif name in COUNTS:
            out[name] = float(values[:, k].sum())
        elif present[:, k].any():
            out[name] = float(values[present[:, k], k].mean())
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


def print_metrics(split: str, metrics: dict, names=None, suffix: str = ""):
    """One line under mlx-lm's own report line for the same iteration."""
    if is_main_rank():
        line = f"        {split:<5} {format_metrics(metrics, names)}{suffix}"
        print(line, flush=True)


class Eta:
    """The time a run has left, at the pace since its first training report (validation
    included): from the second report on. The first report's pace would include the
    compilation of the step."""

    def __init__(self, iters: int, clock=time.perf_counter):
        self.iters, self.clock = iters, clock
        self.first = None  # (iteration, time) of the first report

    def __call__(self, iteration: int) -> str:
        now = self.clock()
        if self.first is None:
            self.first = (iteration, now)
        start, then = self.first
        if iteration <= start or iteration >= self.iters:
            return ""
        left = (now - then) / (iteration - start) * (self.iters - iteration)
        minutes, seconds = divmod(round(left), 60)
        return f"  · ETA {minutes}m{seconds:02d}s" if minutes else f"  · ETA {seconds}s"


def report_samples(samples: list, iteration: int, callback=None):
    """``log_completions``' samples: printed, and a table when the run reports to wandb."""
    print_samples(samples)
    wandb = wandb_of(callback)
    if wandb is not None and samples and is_main_rank():
        wandb.log(
            {"completions": sample_table(wandb, iteration, samples)}, step=iteration
        )


def wandb_of(callback):
    """The wandb module when ``callback``'s chain (mlx-lm's ``--report-to``) has wandb's."""
    while callback is not None:
        if type(callback).__name__ == "WandBCallback":
            import wandb

            return wandb
        callback = getattr(callback, "wrapped_callback", None)
    return None


def sample_table(wandb, iteration: int, samples: list):
    """TRL's ``completions`` table: step, prompt, completion, then each reward and the
    advantage where the samples have them (GRPO/RLOO)."""
    scores = [k for k in samples[0] if k.startswith("rewards/") or k == "advantage"]
    rows = [
        [iteration, _text(s["prompt"]), _text(s["completion"]), *(s[k] for k in scores)]
        for s in samples
    ]
    return wandb.Table(columns=["step", "prompt", "completion", *scores], data=rows)


def print_samples(samples: list):
    """Samples' prompts and completions (and rewards), a line each, cut to the terminal's
    width."""
    if not is_main_rank():
        return
    width = max(shutil.get_terminal_size().columns, 60) - 8
    for sample in samples:
        scores = "  ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in sample.items()
            if k.startswith("rewards/") or k == "advantage"
        )
        prompt = repr(_short(sample["prompt"], width // 3))
        room = width - len("sample  -> ") - len(prompt) - len(scores) - 4
        completion = repr(_short(sample["completion"], max(room, 20)))
        line = f"sample {prompt} -> {completion}  {scores}".rstrip()
        print(f"        {line}", flush=True)


def _text(value) -> str:
    """A prompt or completion as text: messages by their last one's content."""
    if isinstance(value, list):
        return value[-1]["content"] if value else ""
    return str(value)


def _short(value, limit=80) -> str:
    text = " ".join(_text(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PreferenceReporter(TrainingCallback):
    """Training reports average the metrics of the steps since the last report, which the
    run's guard keeps on device as the steps finish (``safety.RunGuard``): one reduction
    over the ranks per report."""

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
        self.upstream_offset = 0  # a resumed run's count at its checkpoint
        # log_completions: a function returning the samples a training report prints
        self.samples = None
        # log_completions (methods that do not sample): iteration -> a validation's samples
        self.val_samples = None
        # DPO and KTO: validation metrics -> the degeneration warning, or None
        self.watch = None
        # iteration -> the time left, shown at the end of training reports (or None)
        self.eta = None

    def tokens_so_far(self) -> int:
        """TRL's ``num_tokens`` now: every token trained on, the steps since the last
        training report included (TRL counts at every step)."""
        pending = self.guard.peek_steps()[:, self.names.index("num_tokens"), 0].sum()
        pending = mx.distributed.all_sum(pending, stream=mx.cpu).item()
        return self.trained_tokens + int(round(pending))

    def record(self, split: str, iteration: int, metrics: dict):
        eta = self.eta(iteration) if self.eta is not None and split == "train" else ""
        print_metrics(split, metrics, self.shown, eta)
        append_metrics(self.path, split, iteration, metrics)
        self.last[split] = (iteration, metrics)

    def _train_metrics(self) -> dict:
        steps = mx.distributed.all_sum(self.guard.take_steps(), stream=mx.cpu)
        metrics = average_metrics(self.names, np.array(steps))
        if "num_tokens" in metrics:
            self.trained_tokens += int(round(metrics["num_tokens"]))
            metrics["num_tokens"] = float(self.trained_tokens)
        return metrics

    def on_train_loss_report(self, train_info: dict):
        metrics = self._train_metrics()
        if "trained_tokens" in train_info:
            self.upstream_tokens = self.upstream_offset + train_info["trained_tokens"]
        self.record("train", train_info["iteration"], metrics)
        if self.samples is not None:
            report_samples(self.samples(), train_info["iteration"], self.inner)
        if self.inner is not None:
            self.inner.on_train_loss_report({**train_info, **metrics})

    def on_val_loss_report(self, val_info: dict):
        metrics = dict(getattr(val_info["val_loss"], "metrics", {}))
        if "num_tokens" in metrics:
            metrics["num_tokens"] = float(self.tokens_so_far())
        self.record("val", val_info["iteration"], metrics)
        warning = self.watch(metrics) if self.watch is not None else None
        if warning and is_main_rank():
            log(warning)
        if self.val_samples is not None:
            samples = self.val_samples(val_info["iteration"])
            report_samples(samples, val_info["iteration"], self.inner)
        if self.inner is not None:
            prefixed = {f"val_{k}": v for k, v in metrics.items()}
            self.inner.on_val_loss_report(
                {**val_info, "val_loss": float(val_info["val_loss"]), **prefixed}
            )


class SampleReports(TrainingCallback):
    """An SFT run's reports (mlx-lm's, and the caller's callback), then ``log_completions``'
    samples after each validation report: ``samples(iteration)``."""

    def __init__(self, inner, samples):
        self.inner, self.samples = inner, samples

    def on_train_loss_report(self, train_info: dict):
        if self.inner is not None:
            self.inner.on_train_loss_report(train_info)

    def on_val_loss_report(self, val_info: dict):
        if self.inner is not None:
            self.inner.on_val_loss_report(val_info)
        samples = self.samples(val_info["iteration"])
        report_samples(samples, val_info["iteration"], self.inner)


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
