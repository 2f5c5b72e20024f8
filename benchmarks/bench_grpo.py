"""GRPO on a real vocabulary: the training pass with each prompt run once for its group vs
over whole rows, the output layer in tiles vs the whole logits, and sampling a group from
one prefill vs mlx-lm's own ``BatchGenerator`` on the same prompts.

    .venv/bin/python benchmarks/bench_grpo.py [--quick] [--size v152k-h256]
        [--prompt 256] [--completion 64] [--groups 1] [--steps 3]

A synthetic Llama of ``bench_common.SIZES`` (random weights, LoRA on every linear layer) and
a generation batch of ``--groups`` prompts x G = 8 completions, prompts ``--prompt`` tokens
and completions ``--completion`` tokens (4x: the prompts of chat and reasoning prompts are
longer than their answers). The pass is one forward and backward of the GRPO loss
(``loss_type: dapo``), through ``mx.compile`` as mlx-lm's step: median time over
``--steps`` after a warm-up, and ``mx.get_peak_memory()``. Each variant in its own process
(clean peaks). Sampling: ``--completion`` new tokens for each of the 8 rows (no EOS), our
``generation.sample_group`` (the prompt prefilled once, its cache repeated) against mlx-lm's
``BatchGenerator`` given the prompt 8 times; tokens per second. Writes the "grpo" section
of benchmarks/RESULTS.md and benchmarks/results/grpo.json.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import (  # noqa: E402
    LORA,
    SIZES,
    describe_size,
    env_for_mlx,
    machine_line,
    markdown_table,
    median,
    write_json,
    write_section,
)

G = 8
VARIANTS = {
    "shared+tiles": dict(prompt_sharing="true", head_chunk_size="auto"),
    "rows+tiles": dict(prompt_sharing="false", head_chunk_size="auto"),
    "rows+logits": dict(prompt_sharing="false", head_chunk_size="0"),
}


def build(size, seed=0):
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(seed)
    cfg = dict(model_type="llama", rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = llama.Model(llama.ModelArgs(**{**cfg, **SIZES[size]}))
    model.freeze()
    linear_to_lora_layers(model, SIZES[size]["num_hidden_layers"], LORA)
    mx.eval(model.parameters())
    return model


def rollout(model, options, job):
    """One generation batch's training batch: the prompts and completions random, the
    rewards a function of them (every group has a spread)."""
    import numpy as np

    from mlx_lm_pref.prompts import Prompt
    from mlx_lm_pref.rollout import Rollouts

    rng = np.random.default_rng(0)
    vocab = SIZES[job["size"]]["vocab_size"]
    prompts = [
        Prompt(list(rng.integers(10, vocab, job["prompt"])), "p")
        for _ in range(job["groups"])
    ]
    completions = [
        list(rng.integers(10, vocab, job["completion"] - k % 3))
        for k in range(job["groups"] * G)
    ]
    funcs = [("count", lambda completion_ids, **_: [sum(c) % 7 for c in completion_ids])]
    rollouts = Rollouts(model, options, funcs, tokenizer=_Tokenizer())
    return rollouts.score(prompts, completions)[0]


class _Tokenizer:
    """What ``Rollouts.score`` reads of a tokenizer: the EOS ids and a decoder."""

    eos_token_ids = [0]
    eos_token_id = 0
    pad_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids[:4]))


def pass_worker(job):
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_lm_pref.config import PreferenceArgs
    from mlx_lm_pref.objective import PreferenceLoss

    model = build(job["size"])
    options = PreferenceArgs(
        loss_type="dapo",
        reward_funcs=("think_format_reward",),
        num_generations=G,
        max_completion_length=job["completion"],
        **VARIANTS[job["variant"]],
    )
    from mlx_lm_pref.head import resolve_head_chunks

    options = resolve_head_chunks(model, options)
    batch = rollout(model, options, job)
    loss = PreferenceLoss(options)
    grad = nn.value_and_grad(model, lambda m, b: loss(m, b)[0])

    @mx.compile
    def step(batch):
        return grad(model, batch)

    times = []
    mx.reset_peak_memory()
    for i in range(job["steps"] + 1):
        tic = time.perf_counter()
        value, grads = step(batch)
        mx.eval(value, grads)
        if i:
            times.append(time.perf_counter() - tic)
    return {"seconds": median(times), "peak_gb": mx.get_peak_memory() / 1e9}


def sampling_worker(job):
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    from mlx_lm_pref.generation import sample_group

    model = build(job["size"])
    prompt = list(range(10, 10 + job["prompt"]))
    sampler = make_sampler(temp=1.0)
    n = job["completion"]
    out = {}
    for name in ("ours", "mlx_lm", "ours", "mlx_lm"):  # warm, then timed
        mx.random.seed(0)
        tic = time.perf_counter()
        if name == "ours":
            rows = sample_group(model, prompt, G, n, {-1}, sampler)
        else:
            gen = BatchGenerator(model, stop_tokens=[[-1]], sampler=sampler)
            gen.insert([prompt] * G, [n] * G)
            rows, finished = {}, set()
            while len(finished) < G:
                responses = gen.next_generated()  # mlx-lm 0.32's API
                if not responses:
                    break
                for r in responses:
                    rows.setdefault(r.uid, []).append(r.token)
                    if r.finish_reason is not None:
                        finished.add(r.uid)
            rows = list(rows.values())
        seconds = time.perf_counter() - tic
        assert len(rows) == G and all(len(r) == n for r in rows), name
        out[name] = {"tokens_per_s": G * n / seconds}
    return out


def run(job, timeout=3600):
    """A worker in its own process; its result."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env_for_mlx(0),
        timeout=timeout,
    )
    if proc.returncode:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", default="v152k-h256")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    a = parser.parse_args()
    if a.worker:
        job = json.loads(a.worker)
        worker = pass_worker if job["kind"] == "pass" else sampling_worker
        print(json.dumps(worker(job)))
        return
    if a.quick:
        a.prompt, a.completion, a.steps = 96, 24, 2
    base = dict(
        size=a.size,
        prompt=a.prompt,
        completion=a.completion,
        groups=a.groups,
        steps=a.steps,
    )
    t0 = time.time()
    passes = {v: run({**base, "kind": "pass", "variant": v}) for v in VARIANTS}
    sampling = run({**base, "kind": "sampling"})
    results = {"job": base, "passes": passes, "sampling": sampling}
    write_json(HERE / "results" / "grpo.json", results)
    for name, r in {**passes, "sampling": sampling}.items():
        if "error" in r:
            print(f"{name}: {r['error']}", file=sys.stderr)
            sys.exit(1)
    whole = passes["rows+logits"]
    rows = []
    for name, r in passes.items():
        rows.append(
            [
                name,
                f"{r['seconds']:.2f}",
                f"{r['seconds'] / passes['rows+tiles']['seconds']:.2f}",
                f"{r['peak_gb']:.2f}",
                f"{r['peak_gb'] / whole['peak_gb']:.2f}",
            ]
        )
    header = ["training pass", "s", "x rows+tiles", "peak GB", "x rows+logits"]
    ours, theirs = sampling["ours"], sampling["mlx_lm"]
    command = "benchmarks/bench_grpo.py " + " ".join(sys.argv[1:])
    body = "\n".join(
        [
            "## GRPO: one prompt per group, the output layer in tiles, sampling",
            "",
            f"`{command.strip()}` ({time.time() - t0:.0f} s; {machine_line()})",
            "",
            f"{describe_size(a.size)}; one generation batch of {a.groups} prompt(s) x G = "
            f"{G} completions, prompts {a.prompt} tokens, completions {a.completion} "
            "(ragged by up to 2); loss_type dapo, forward and backward through mx.compile.",
            "",
            markdown_table(header, rows),
            "",
            f"Sampling {G} x {a.completion} tokens of a {a.prompt}-token prompt: ours (one "
            f"prefill, the cache repeated) {ours['tokens_per_s']:.0f} tokens/s, mlx-lm's "
            f"BatchGenerator (the prompt {G} times) {theirs['tokens_per_s']:.0f} tokens/s: "
            f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x.",
        ]
    )
    print(body)
    write_section("grpo", body)


if __name__ == "__main__":
    main()
