"""``mlx_lm_pref evaluate``: an adapter judged against the model without it.

For every prompt of a split (``test.jsonl`` by default), the model answers greedily twice,
with the adapter and without it (its LoRA scales set to 0, as the reference of training:
one copy of the weights; a fully fine-tuned model is compared with ``--model`` loaded
again), and a judge scores both answers. The judge is called as GRPO's reward functions
are (``rewards.py``): ``judge(prompts=, completions=, completion_ids=, **columns)`` returns
one number (or None: unscored) per completion, so a reward function is a judge and the
other way round. Printed: each side's mean score, the adapter's win rate over the model
without it (a tie counts half) with its 95% Wilson interval, and samples side by side;
``--out`` writes all of it, every answer included, as JSON.

Everything the user typed is checked before the model loads (one line, exit 2).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from .console import log
from .data import DataError, read_jsonl

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
SPLITS = ("test", "valid", "train")


class EvaluateError(ValueError):
    """Something the user typed, said in one line."""


def win_rate(adapter: Sequence[float], base: Sequence[float]) -> dict:
    """The adapter's wins, ties and losses over the base on each prompt's scores (NaN:
    unscored, left out), the win rate ``(wins + ties / 2) / n`` and its 95% Wilson score
    interval (Wilson, 1927: the interval that stays inside [0, 1] for small n)."""
    a, b = np.asarray(adapter, np.float64), np.asarray(base, np.float64)
    scored = ~(np.isnan(a) | np.isnan(b))
    a, b = a[scored], b[scored]
    wins, ties = int((a > b).sum()), int((a == b).sum())
    n = len(a)
    result = {"wins": wins, "ties": ties, "losses": n - wins - ties, "n": n}
    if n == 0:
        return {**result, "win_rate": float("nan"), "interval": [math.nan, math.nan]}
    p = (wins + ties / 2) / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 / (1 + Z95**2 / n) * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n))
    return {**result, "win_rate": p, "interval": [centre - half, centre + half]}


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mlx_lm_pref evaluate",
        description="Answer a split's prompts with and without an adapter and score both "
        "with a judge function: each side's mean score, the adapter's win rate with its "
        "95%% interval, and samples side by side.",
    )
    parser.add_argument(
        "--model", required=True, help="The base model (a folder or id)."
    )
    parser.add_argument(
        "--adapter-path",
        required=True,
        help="The adapter folder (adapters.safetensors and adapter_config.json).",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="A folder holding SPLIT.jsonl, or a .jsonl file: rows with a 'prompt' "
        "(text or messages); the other fields go to the judge by name.",
    )
    parser.add_argument(
        "--judge",
        required=True,
        help="file.py:function or package.module:function, called as a GRPO reward "
        "function: judge(prompts, completions, completion_ids, **columns) -> a number "
        "(or None) per completion; higher is better.",
    )
    parser.add_argument(
        "--split", choices=SPLITS, default="test", help="Default: test."
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        help="Most tokens per answer (greedy, to the first EOS). Default: 256.",
    )
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="Only the first N prompts."
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=3,
        help="Answers printed side by side, those the judge scores apart first. "
        "Default: 3.",
    )
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    return parser.parse_args(argv)


def checked_inputs(args) -> tuple:
    """``(rows, wheres, judge)``: every input checked before the model loads."""
    from .prompts import PromptDataset
    from .rewards import RewardError, resolve_reward_func

    for name in ("max_tokens", "num_prompts", "samples"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "samples" else 1):
            least = 0 if name == "samples" else 1
            raise EvaluateError(
                f"--{name.replace('_', '-')} {value}: at least {least}."
            )
    adapter = Path(args.adapter_path)
    for name in ("adapters.safetensors", "adapter_config.json"):
        if not (adapter / name).is_file():
            raise EvaluateError(f"--adapter-path {adapter}: no {name} there.")
    data = Path(args.data)
    path = data if data.suffix == ".jsonl" else data / f"{args.split}.jsonl"
    if not path.is_file():
        raise EvaluateError(f"--data {args.data}: no {path.name} there ({path}).")
    rows, lines = read_jsonl(path)
    rows, lines = rows[: args.num_prompts], lines[: args.num_prompts]
    if not rows:
        raise EvaluateError(f"{path}: no rows.")
    kinds = set()
    for row, line in zip(rows, lines):
        kinds.add(PromptDataset._check(row, f"{path}:{line}", "prompt")[1])
    if len(kinds) > 1:
        raise EvaluateError(f"{path}: text and message prompts mixed; one format.")
    try:
        _, judge = resolve_reward_func(args.judge)
    except RewardError as e:
        raise EvaluateError(str(e).replace("reward function", "--judge", 1)) from None
    return rows, [f"{path}:{line}" for line in lines], judge


class Progress:
    """A line per step of ``total``, rewritten in place on a terminal (in a log, one
    every 10 s), with the time left at the rate so far, and the time taken at the end.
    """

    def __init__(self, what: str, total: int):
        self.what, self.total, self.start = what, total, time.perf_counter()
        self.tty, self.shown = sys.stderr.isatty(), self.start

    def __call__(self, done: int):
        now = time.perf_counter()
        if not self.tty and now - self.shown < 10 and done != self.total:
            return
        self.shown, elapsed = now, now - self.start
        left = elapsed / done * (self.total - done)
        line = f"[mlx_lm_pref] {self.what} {done}/{self.total}  ETA {left:.0f} s"
        if done == self.total:
            line = f"[mlx_lm_pref] {self.what} {done}/{self.total} in {elapsed:.1f} s"
        end = "\n" if done == self.total or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def answers(model, tokenizer, prompt_ids, max_tokens, what) -> List[List[int]]:
    """Greedy answers (token ids, without their EOS) of ``prompt_ids``, with progress."""
    from .generation import eos_token_ids, greedy_completions

    progress = Progress(what, len(prompt_ids))
    return greedy_completions(
        model, prompt_ids, max_tokens, eos_token_ids(tokenizer), progress
    )


def scores(judge, rows, completions, completion_ids, conversational) -> np.ndarray:
    from .rewards import score_completions

    prompts = [row["prompt"] for row in rows]
    if conversational:
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    columns = {
        key: [row.get(key) for row in rows]
        for key in dict.fromkeys(k for row in rows for k in row)
        if key != "prompt"
    }
    funcs = [("judge", judge)]
    return score_completions(funcs, prompts, completions, completion_ids, columns, 0)[
        :, 0
    ]


def evaluate(args) -> dict:
    rows, wheres, judge = checked_inputs(args)
    from mlx_lm import load

    from .data import _hf
    from .prompts import tokenize_prompt
    from .reference import adapter_layers, adapters_disabled

    model, tokenizer = load(args.model, adapter_path=args.adapter_path)
    conversational = not isinstance(rows[0]["prompt"], str)
    prompt_ids = []
    for row, where in zip(rows, wheres):
        try:
            prompt_ids.append(
                tokenize_prompt(tokenizer, row["prompt"], conversational, row)
            )
        except DataError as e:
            raise EvaluateError(f"{where}: {e}") from None
    tuned = answers(model, tokenizer, prompt_ids, args.max_tokens, "with the adapter")
    if adapter_layers(model):
        with adapters_disabled(model):
            base = answers(model, tokenizer, prompt_ids, args.max_tokens, "without it")
    else:  # full fine-tuning: the base model is --model itself
        del model
        model, _ = load(args.model)
        base = answers(model, tokenizer, prompt_ids, args.max_tokens, "without it")
    hf = _hf(tokenizer)
    texts = {
        side: [hf.decode(ids, skip_special_tokens=True) for ids in ids_list]
        for side, ids_list in (("adapter", tuned), ("base", base))
    }
    score = {
        side: scores(judge, rows, texts[side], ids_list, conversational)
        for side, ids_list in (("adapter", tuned), ("base", base))
    }
    return {
        "model": args.model,
        "adapter_path": str(args.adapter_path),
        "judge": args.judge,
        "prompts": len(rows),
        "mean_score": {side: _mean(v) for side, v in score.items()},
        **win_rate(score["adapter"], score["base"]),
        "answers": [
            {
                "where": where,
                "prompt": row["prompt"],
                "adapter": texts["adapter"][k],
                "base": texts["base"][k],
                "score_adapter": _plain(score["adapter"][k]),
                "score_base": _plain(score["base"][k]),
            }
            for k, (row, where) in enumerate(zip(rows, wheres))
        ],
    }


def _mean(values) -> Optional[float]:
    values = np.asarray(values, np.float64)
    return None if np.isnan(values).all() else float(np.nanmean(values))


def _plain(value) -> Optional[float]:
    return None if math.isnan(value) else float(value)


def report(result: dict, samples: int) -> List[str]:
    """The printed summary."""
    from .metrics import _short

    mean = {
        k: "unscored" if v is None else f"{v:.4g}"
        for k, v in result["mean_score"].items()
    }
    low, high = result["interval"]
    lines = [
        f"{result['prompts']} prompts, judged by {result['judge']}",
        f"  mean score   with the adapter {mean['adapter']}   without it {mean['base']}",
        f"  win rate     {result['win_rate']:.1%}  (95% interval {low:.1%} to {high:.1%}; "
        f"{result['wins']} wins, {result['ties']} ties, {result['losses']} losses of "
        f"{result['n']} scored)",
    ]
    # the answers the judge tells apart first, then the rest, each in file order
    answers = sorted(
        result["answers"], key=lambda a: a["score_adapter"] == a["score_base"]
    )
    for answer in answers[:samples]:
        lines += [
            f"  {answer['where']}  {_short(answer['prompt'], 100)!r}",
            f"    with    {_short(answer['adapter'], 100)!r}  ({answer['score_adapter']})",
            f"    without {_short(answer['base'], 100)!r}  ({answer['score_base']})",
        ]
    return lines


def main(argv=None):
    from .rewards import RewardError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = evaluate(args)
    except (EvaluateError, DataError) as e:
        print(f"mlx_lm_pref evaluate: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RewardError as e:  # the judge raised, or returned what is not a score each
        message = str(e).replace("reward function 'judge'", f"--judge {args.judge}", 1)
        message = message.replace(" at generation batch 0", "", 1)
        print(f"mlx_lm_pref evaluate: error: {message}", file=sys.stderr)
        sys.exit(2)
    for line in report(result, args.samples):
        print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        log(f"results written to {args.out}")
    return result
