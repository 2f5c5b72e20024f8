"""The reference pass on the policy's frozen layers (``share_frozen_layers``), on real shapes.

    .venv/bin/python benchmarks/bench_frozen.py [--models smollm2 qwen2.5-0.5b-like]
        [--num-layers 8 16] [--steps 3]

(it restarts itself with Debian's OpenBLAS preloaded where that exists, as the other
scripts start their workers: benchmarks/README.md)

For each model and number of LoRA layers (mlx-lm's ``--num-layers``: the top N), one batch of
B = 2 one-sentence pairs (prompts of 20-40 tokens, chosen answers of 8-24, rejected ones of
24-64: the SmolLM2 demo's shape) and mlx-lm's own compiled training step (as
``mlx_lm.tuner.trainer.train`` builds it, ``worker_mlx_pref.compiled_train_step``) for:

- ``sft``: mlx-lm's ``default_loss`` over the same 2B rows;
- ``dpo`` (sigmoid, reference ``adapters_off``) with ``share_frozen_layers`` ``auto`` (the
  reference runs from the first adapted layer) and ``:false`` (every layer, the pass before
  the option existed), in the layout ``prompt_sharing: auto`` (the default) gives this
  batch, and on whole rows (``+rows``, the (2B, L) rows SFT trains on);
- ``kto`` likewise, on the same pairs unpaired (2B rows + 2B KL rows), against ``sft-kto``:
  mlx-lm's ``default_loss`` over the same 4B sequences (KTO's rows: an SFT step on them);
- ``orpo`` (no reference: unchanged by the option, a control);
- ``grpo`` (``--methods sft grpo grpo:false grpo@beta0``): GRPO's training step with its
  reference in the step (beta 0.04), ``:false`` through every layer, ``@beta0`` without a
  reference (TRL's default), on the same 2B rows as groups of 2.

``--num-layers 30`` (every layer of SmolLM2 adapted) leaves nothing to share: ``auto`` and
``false`` run the same graph, so their ratio is the measurement's noise.

Each method has its own model (LoRA rank 8, scale 20, the top N layers, Adam); after two
untimed steps (compiling) the timed steps go round-robin over the methods. Prints the median
step of each and its ratio to SFT on the same sequences, and writes RESULTS.md's section
"frozen" (``--section``). Models: SmolLM2-135M-Instruct (30 layers, vocabulary 49,152; converted by
convert_smollm2.py, BENCH_SMOLLM2) and a Qwen2.5-0.5B-shaped model with random weights
(24 layers, hidden 896, vocabulary 151,936).
"""

import argparse
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from bench_common import (  # noqa: E402
    LEARNING_RATE,
    LORA,
    REAL_MODELS,
    machine_line,
    median,
    write_section,
)
from worker_mlx_pref import (  # noqa: E402
    compiled_forward,
    compiled_train_step,
    kto_rows,
)

QWEN_LIKE = dict(
    model_type="qwen2",
    hidden_size=896,
    num_hidden_layers=24,
    intermediate_size=4864,
    num_attention_heads=14,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    vocab_size=151936,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)
MODELS = ("smollm2", "qwen2.5-0.5b-like")
LENGTHS = {"prompt": (20, 40), "chosen": (8, 24), "rejected": (24, 64)}
PAIRS = 2


def load(name, num_layers):
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(0)
    if name == "smollm2":
        from mlx_lm.utils import load_model

        model, _ = load_model(REAL_MODELS["smollm2"])
    else:
        from mlx_lm.models import qwen2

        model = qwen2.Model(qwen2.ModelArgs.from_dict(QWEN_LIKE))
    model.freeze()
    linear_to_lora_layers(model, num_layers, dict(LORA))
    mx.eval(model.parameters())
    return model


def sentence_pairs(vocab, seed=0):
    from mlx_lm_pref.data import Pair

    rng = random.Random(seed)
    draw = lambda k: [rng.randrange(3, vocab) for _ in range(rng.randint(*LENGTHS[k]))]
    pairs = []
    for _ in range(PAIRS):
        prompt = [1] + draw("prompt")
        pairs.append(
            Pair(prompt + draw("chosen"), prompt + draw("rejected"), len(prompt))
        )
    return pairs


def sft_rows(sequences):
    """(tokens, lengths) for mlx-lm's default_loss: the whole sequences in the loss."""
    width = max(map(len, sequences))
    tokens = mx.array([s + [0] * (width - len(s)) for s in sequences])
    lengths = mx.array([[0, len(s)] for s in sequences])
    return tokens, lengths


def build(method, name, num_layers, pairs):
    """(run(batch), batch) for one method, with its own model."""
    from mlx_lm.tuner.trainer import default_loss

    from mlx_lm_pref.batching import make_batch
    from mlx_lm_pref.config import PreferenceArgs
    from mlx_lm_pref.objective import METRICS_ATTRIBUTE, PreferenceLoss

    model = load(name, num_layers)
    model.train()
    opt = optim.Adam(learning_rate=LEARNING_RATE)
    if method.startswith("sft"):
        rows = kto_rows(pairs) if method == "sft-kto" else None
        if rows is None:
            sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        else:
            sequences = [e.sequence for e in rows] + [e.kl_sequence for e in rows]
        return compiled_train_step(model, opt, default_loss), sft_rows(sequences)
    if method == "forward":
        model.eval()
        sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        tokens, lengths = sft_rows(sequences)
        return compiled_forward(model), (tokens, lengths)
    spec, _, share = method.partition(":")
    if spec.startswith("grpo"):
        loss = grpo_loss(spec, share)
        model[METRICS_ATTRIBUTE] = mx.zeros((len(loss.metric_names), 2))
        return compiled_train_step(model, opt, loss), (rollout_batch(pairs, loss),)
    spec, rows = spec.removesuffix("+rows"), spec.endswith("+rows")
    loss_type, _, reference = spec.partition("@")
    layout = "false" if rows else "auto"
    options = PreferenceArgs(
        loss_type=loss_type,
        prompt_sharing=layout,
        share_frozen_layers=share or "auto",
        **({"reference": reference or "adapters_off"} if loss_type != "orpo" else {}),
    )
    loss = PreferenceLoss(options)
    model[METRICS_ATTRIBUTE] = mx.zeros((len(loss.metric_names), 2))
    data = kto_rows(pairs) if loss_type == "kto" else pairs
    batch = make_batch(data, 1 << 16, "bench", layout)
    return compiled_train_step(model, opt, loss), (batch,)


def grpo_loss(spec, share):
    """GRPO's loss (TRL's default ``loss_type`` dapo) with its reference (the adapters
    off) at beta 0.04, or none (``grpo@beta0``: TRL's default beta 0)."""
    from mlx_lm_pref.config import PreferenceArgs
    from mlx_lm_pref.objective import PreferenceLoss

    beta = 0.0 if spec == "grpo@beta0" else 0.04
    options = PreferenceArgs(
        loss_type="dapo",
        beta=beta,
        num_generations=2,
        reward_funcs="think_format_reward",
        share_frozen_layers=share or "auto",
        prompt_sharing="false",
    )
    return PreferenceLoss(
        options.replace(reference="adapters_off") if beta else options
    )


def rollout_batch(pairs, loss):
    """The pairs' 2B sequences as a GRPO training batch on whole rows: each prompt's group
    of G = 2 completions (chosen, rejected), advantages +1 / -1."""
    from mlx_lm_pref.grpo import RolloutBatch, rollout_metric_names

    sequences = [s for p in pairs for s in (p.chosen, p.rejected)]
    tokens, _ = sft_rows(sequences)
    starts = [p.chosen_start for p in pairs for _ in range(2)]
    n = len(sequences)
    return RolloutBatch(
        tokens=tokens,
        spans=mx.array([[a, len(s)] for a, s in zip(starts, sequences)], mx.int32),
        advantages=mx.array([1.0, -1.0] * (n // 2)),
        kept=mx.ones((n,)),
        normalizer=mx.array(float(sum(len(s) - a for a, s in zip(starts, sequences)))),
        rollout=mx.zeros((len(rollout_metric_names(loss.options)), 2)),
    )


METHODS = ["sft", "dpo", "dpo:false", "dpo+rows", "dpo+rows:false", "orpo"]
METHODS += ["sft-kto", "kto", "kto:false", "kto+rows", "kto+rows:false"]
# Where a DPO step's time goes (--methods ... dpo@none forward): dpo@none is the policy part
# alone (no reference pass), forward a compiled forward pass through every layer.
PROFILE = ["dpo@none", "dpo@none+rows", "forward"]
# GRPO's reference in the training step (beta 0.04, whole rows: SFT's rows), with and
# without the frozen layers shared, and TRL's default beta 0 (no reference) as a control.
GRPO = ["grpo", "grpo:false", "grpo@beta0"]


def measure(name, num_layers, steps, warmup, methods):
    vocab = 49152 if name == "smollm2" else QWEN_LIKE["vocab_size"]
    pairs = sentence_pairs(vocab)
    ready = {m: build(m, name, num_layers, pairs) for m in methods}
    times = {m: [] for m in methods}
    for i in range(warmup + steps):
        for m in methods[i % len(methods) :] + methods[: i % len(methods)]:
            run, batch = ready[m]
            t = time.perf_counter()
            run(batch)
            if i >= warmup:
                times[m].append(time.perf_counter() - t)
    lengths = [len(p.chosen) + len(p.rejected) for p in pairs]
    from mlx_lm_pref.batching import make_batch

    shared = make_batch(pairs, 1 << 16, "bench", "auto").shared
    return {m: median(t) for m, t in times.items()}, lengths, shared


def main():
    from mlx_lm_pref.demo.command import openblas_preload

    library = openblas_preload(os.environ)
    if library is not None:  # the timed steps run in this process
        command = [sys.executable, __file__, *sys.argv[1:]]
        os.execve(sys.executable, command, {**os.environ, "LD_PRELOAD": library})
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--num-layers", nargs="+", type=int, default=[8, 16])
    p.add_argument(
        "--methods", nargs="+", default=METHODS, choices=METHODS + PROFILE + GRPO
    )
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--section", default="frozen", help="the RESULTS.md section written")
    p.add_argument("--no-write", action="store_true", help="print only")
    a = p.parse_args()
    t0 = time.time()
    header = (
        "| model | LoRA layers | method | step s | x SFT | x the same without sharing |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    for name in a.models:
        for n in a.num_layers:
            print(f"== {name}, LoRA on the top {n} layers", file=sys.stderr, flush=True)
            seconds, lengths, shared = measure(name, n, a.steps, a.warmup, a.methods)
            for m, s in seconds.items():
                sft = seconds.get("sft-kto" if m.startswith("kto") else "sft")
                base = seconds.get(m.split(":")[0] + ":false") if ":" not in m else None
                lines.append(
                    f"| {name} | {n} | {m} | {s:.2f} | "
                    + (f"{s / sft:.2f}" if sft and not m.startswith("sft") else "")
                    + " | "
                    + (f"{s / base:.2f}" if base else "")
                    + " |"
                )
            print("\n".join(lines[-len(seconds) :]), flush=True)
    elapsed = time.time() - t0
    print("\n".join(lines))
    if a.no_write:
        return
    cmd = " ".join(["python benchmarks/bench_frozen.py", *sys.argv[1:]])
    body = [
        "## The reference pass on the policy's frozen layers (share_frozen_layers): "
        + ", ".join(a.models),
        "",
        f"`{cmd}` ({time.strftime('%Y-%m-%d %H:%M')}, {elapsed:.0f} s). {machine_line()}; "
        f"mlx {mx.__version__}, CPU backend with Debian's OpenBLAS.",
        "",
        f"One batch of {PAIRS} one-sentence pairs (prompts {LENGTHS['prompt']}, chosen "
        f"{LENGTHS['chosen']}, rejected {LENGTHS['rejected']} tokens; here {lengths} tokens "
        "per pair). `dpo`/`kto`: share_frozen_layers auto; `:false`: the reference through "
        "every layer; the layout prompt_sharing auto gives the batch ("
        + ("shared prompts" if shared else "whole rows")
        + "), `+rows`: whole rows. `sft`: mlx-lm's default_loss over the same 2B rows; "
        "`sft-kto`: over KTO's 4B sequences (rows and KL rows), the `x SFT` of the kto rows. "
        + (
            "`grpo`: GRPO's training step (loss_type dapo, beta 0.04, reference adapters_off "
            "in the step) over the same 2B rows as one group of G = 2 per prompt, whole "
            "rows; `grpo@beta0`: beta 0 (no reference pass). "
            if any(m.startswith("grpo") for m in a.methods)
            else ""
        )
        + f"LoRA rank {LORA['rank']}, scale {LORA['scale']}, on the top N layers (30: "
        "every one, nothing to share); Adam. "
        f"Median of {a.steps} steps after {a.warmup} untimed, round-robin over the methods.",
        "",
        *lines,
    ]
    write_section(a.section, "\n".join(body))


if __name__ == "__main__":
    main()
