"""GRPO on a real vocabulary: the training pass with each prompt run once for its group vs
over whole rows, the output layer in tiles vs the whole logits, and sampling a group from
one prefill vs mlx-lm's own ``BatchGenerator`` on the same prompts.

    .venv/bin/python benchmarks/bench_grpo.py [--quick] [--size v152k-h256]
        [--prompt 256] [--completion 64] [--groups 1] [--steps 3]
    .venv/bin/python benchmarks/bench_grpo.py --part peers [--peer-groups 1 4]
        [--betas 0.04 0] [--threads 1]

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

``--part peers``: whole GRPO steps of ours against mlx-lm-lora 5.10.2's ``train_grpo``
(``worker_mlx_lm_lora_grpo.py``, in the peer venv: ``bash benchmarks/setup_peers.sh``), on
the same model folder (``bench_data.build_assets``: the synthetic Llama saved with its
tokenizer, which both load), the same prompts (random ids), G = 8, the same sampler
(temperature 1, no top-p / top-k / min-p), ``loss_type`` grpo, Adam, LoRA on every linear
layer, each side in its own process. A step is what a training iteration does: sample the
generation batch (``--peer-groups`` prompts x G), score it (rewards, advantages, and ours the
reference log-probs with the adapters off), and train on it (forward, backward, update);
``--betas``: 0.04 (a reference pass on both sides) and 0 (TRL's default: none). No
completion stops early: the tokenizer's EOS set is replaced by an id no sampler returns
(``{-1}``) on both sides, so every completion has ``--completion`` tokens (checked: the
mean lengths are reported). Median over ``--steps`` after one untimed step, the peak of
``mx.get_peak_memory()`` over them (weights, optimizer state and the sampling's cache
included). Writes the "grpo-peers" section and benchmarks/results/grpo_peers.json.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import (  # noqa: E402
    LEARNING_RATE,
    LORA,
    SIZES,
    VENV_PEER,
    describe_size,
    env_for_mlx,
    machine_line,
    markdown_table,
    median,
    run_worker,
    text_table,
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
    funcs = [
        ("count", lambda completion_ids, **_: [sum(c) % 7 for c in completion_ids])
    ]
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


def bench_reward(completions, **_):
    """The peers part's reward (as worker_mlx_lm_lora_grpo.bench_reward): a spread inside
    each group, the same numbers on both sides, not read from the text (random weights
    sample ids past the tokenizer's, which decode to nothing)."""
    import numpy as np

    return np.random.default_rng(len(completions)).random(len(completions)).tolist()


def peers_worker(job):
    """Ours, whole GRPO steps as a training run takes them: ``Rollouts._rollout`` (sample
    the generation batch, then score it) and mlx-lm's compiled step over the batch."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.utils import load_tokenizer
    from worker_mlx_pref import compiled_train_step, load_lora_model

    import mlx_lm_pref.rollout as rollout_module
    from mlx_lm_pref.config import PreferenceArgs
    from mlx_lm_pref.head import resolve_head_chunks
    from mlx_lm_pref.objective import METRICS_ATTRIBUTE, PreferenceLoss
    from mlx_lm_pref.prompts import Prompt
    from mlx_lm_pref.reference import resolve_reference
    from mlx_lm_pref.rollout import Rollouts
    from mlx_lm_pref.sharing import resolve_prompt_sharing

    model = load_lora_model(job["model"])
    tokenizer = load_tokenizer(Path(job["model"]))
    tokenizer.eos_token_ids = {-1}  # no completion stops early (as the peer's worker)
    mx.eval(model.parameters())
    weights_gb = mx.get_active_memory() / 1e9
    options = PreferenceArgs(
        loss_type=job["loss_type"],
        beta=job["beta"],
        reference="adapters_off" if job["beta"] else "auto",
        reward_funcs=("think_format_reward",),  # the options' check; bench_reward runs
        num_generations=job["G"],
        max_completion_length=job["completion"],
        temperature=job["temperature"],
        top_p=job["top_p"],
        top_k=job["top_k"],
        min_p=job["min_p"] or None,
    )
    # as session.start_training: prompt sharing and tiles probed, the reference resolved
    options = resolve_head_chunks(model, resolve_prompt_sharing(model, options))
    if options.beta:
        options = options.replace(reference=resolve_reference(model, options.reference))
    model.train()
    loss = PreferenceLoss(options)
    model[METRICS_ATTRIBUTE] = mx.zeros((len(loss.metric_names), 2))  # as train() does
    run_step = compiled_train_step(model, optim.Adam(learning_rate=LEARNING_RATE), loss)
    rollouts = Rollouts(model, options, [("bench", bench_reward)], tokenizer=tokenizer)
    prompts = [Prompt(list(p), f"prompt {k}") for k, p in enumerate(job["prompts"])]
    sampled = []
    sample = rollout_module.sample_completions

    def timed_sample(*args, **kwargs):
        tic = time.perf_counter()
        out = sample(*args, **kwargs)
        sampled.append((time.perf_counter() - tic, out))
        return out

    rollout_module.sample_completions = timed_sample
    mx.random.seed(0)
    rows = []
    for i in range(job["warmup"] + job["steps"]):
        mx.reset_peak_memory()
        tic = time.perf_counter()
        (batch,) = rollouts._rollout(prompts, range(len(prompts)), 1, False, True)
        mid = time.perf_counter()
        run_step((batch,))
        toc = time.perf_counter()
        seconds, completions = sampled[-1]
        rows.append(
            {
                "step_s": toc - tic,
                "sampling_s": seconds,
                "scoring_s": mid - tic - seconds,
                "pass_s": toc - mid,
                "peak_gb": mx.get_peak_memory() / 1e9,
                "mean_completion": sum(map(len, completions)) / len(completions),
                "shared_layout": batch.groups is not None,  # each prompt run once
            }
        )
    timed = rows[job["warmup"] :]
    out = {k: [r[k] for r in timed] for k in timed[0]}
    out.update(
        first_peak_gb=rows[0]["peak_gb"],
        weights_gb=weights_gb,
        completions=len(sampled[-1][1]),
        prompt_sharing=options.prompt_sharing,
        head_chunk_size=options.head_chunk_size,
        reference=options.reference if options.beta else None,
    )
    return out


def run(job, timeout=3600, threads=0):
    """A worker in its own process; its result."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env_for_mlx(threads),
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
    parser.add_argument("--part", choices=["passes", "peers"], default="passes")
    parser.add_argument(
        "--peer-groups", type=int, nargs="+", default=[1], help="peers: prompts"
    )
    parser.add_argument("--betas", type=float, nargs="+", default=[0.04, 0.0])
    parser.add_argument(
        "--threads", type=int, default=1, help="peers: BLAS threads (0: one per core)"
    )
    parser.add_argument(
        "--assets", default=str(Path(tempfile.gettempdir()) / "mlx_lm_pref_bench")
    )
    parser.add_argument("--no-write", action="store_true", help="peers: print only")
    a = parser.parse_args()
    if a.worker:
        job = json.loads(a.worker)
        workers = {"pass": pass_worker, "peers": peers_worker}
        print(json.dumps(workers.get(job["kind"], sampling_worker)(job)))
        return
    if a.part == "peers":
        peers_part(a)
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


PEER_SAMPLER = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)
PEER_HEADER = [
    "prompts x G",
    "beta",
    "tool",
    "step s",
    "sampling s",
    "scoring s",
    "training s",
    "peak GB",
    "weights GB",
    "mean completion",
    "step x theirs",
    "peak x theirs",
]


def peers_part(a):
    """Ours against mlx-lm-lora's GRPO, whole steps (module docstring)."""
    import numpy as np
    from bench_data import build_assets

    if a.quick:
        a.prompt, a.completion, a.steps = 64, 16, 2
    path = build_assets(a.size, a.assets)
    vocab = SIZES[a.size]["vocab_size"]
    t0 = time.time()
    results = []
    for groups in a.peer_groups:
        rng = np.random.default_rng(groups)
        prompts = [rng.integers(10, vocab, a.prompt).tolist() for _ in range(groups)]
        for beta in a.betas:
            job = dict(
                model=str(path),
                prompts=prompts,
                G=G,
                beta=beta,
                completion=a.completion,
                loss_type="grpo",
                warmup=1,
                steps=a.steps,
                **PEER_SAMPLER,
            )
            print(f"== {groups} x {G}, beta {beta:g}", file=sys.stderr, flush=True)
            ours = run({**job, "kind": "peers"}, threads=a.threads)
            theirs = run_worker(
                str(Path(VENV_PEER) / "bin" / "python"),
                "worker_mlx_lm_lora_grpo.py",
                job,
                3600,
                a.threads,
                log=HERE / "results" / "grpo_peers.log",
            )
            results.append(
                {"groups": groups, "beta": beta, "ours": ours, "mlx-lm-lora": theirs}
            )
    write_json(HERE / "results" / "grpo_peers.json", {"args": vars(a), "runs": results})
    rows, failed = [], []
    for r in results:
        theirs = r["mlx-lm-lora"]
        for tool in ("ours", "mlx-lm-lora"):
            x = r[tool]
            if "error" in x:
                failed.append(
                    f"{tool} {r['groups']} x {G} beta {r['beta']:g}: {x['error']}"
                )
                continue
            step, peak = median(x["step_s"]), max(x["peak_gb"])
            if "error" in theirs:
                vs_step = vs_peak = "-"
            else:
                vs_step = f"{step / median(theirs['step_s']):.2f}"
                vs_peak = f"{peak / max(theirs['peak_gb']):.2f}"
            scoring = x.get("scoring_s", x.get("rewards_s"))
            rows.append(
                [
                    f"{r['groups']} x {G}",
                    f"{r['beta']:g}",
                    "mlx_lm_pref" if tool == "ours" else "mlx-lm-lora 5.10.2",
                    f"{step:.2f}",
                    f"{median(x['sampling_s']):.2f}",
                    f"{median(scoring):.2f}",
                    f"{median(x['pass_s']):.2f}",
                    f"{peak:.2f}",
                    f"{x['weights_gb']:.2f}",
                    f"{median(x['mean_completion']):.1f}",
                    vs_step,
                    vs_peak,
                ]
            )
    print(text_table(PEER_HEADER, rows))
    for line in failed:
        print(line, file=sys.stderr)
    if failed:
        sys.exit(1)
    ours = next(r["ours"] for r in results)
    reference = next(
        (r["ours"]["reference"] for r in results if r["beta"]), "adapters_off"
    )
    threads = a.threads or "one per core"
    command = "benchmarks/bench_grpo.py " + " ".join(sys.argv[1:])
    body = "\n".join(
        [
            "## GRPO: whole steps against mlx-lm-lora"
            + (" — QUICK" if a.quick else ""),
            "",
            f"`.venv/bin/python {command.strip()}` ({time.strftime('%Y-%m-%d %H:%M')}, "
            f"{time.time() - t0:.0f} s; {machine_line()}; BLAS threads: {threads})",
            "",
            f"{describe_size(a.size)}, saved once and loaded by both. One generation "
            f"batch per step: prompts of {a.prompt} random ids x G = {G} completions of "
            f"{a.completion} tokens (no stop token on either side), temperature 1, no "
            "top-p / top-k / min-p; loss_type grpo, LoRA on every linear layer, Adam. "
            f"Median of {a.steps} steps after one untimed; peak = the highest "
            "`mx.get_peak_memory()` of a step (weights, optimizer state and the sampling's "
            "cache included). `step` = `sampling` + `scoring` + `training`: ours "
            "`Rollouts._rollout` (its `sample_completions`; then rewards, advantages and, "
            "with beta > 0, the reference log-probs with the adapters off) and mlx-lm's "
            "compiled step (forward, backward, Adam); mlx-lm-lora its `train_grpo` loop "
            "(`generate_grpo`; `_rollout_rewards`; its step: the reference and the policy "
            "forward inside `grpo_loss`, backward, Adam), step times its loop's own "
            "(`iterations_per_second`). Ours: prompt sharing "
            f"`{ours.get('prompt_sharing')}` (the batches "
            + (
                "shared: each prompt run once"
                if all(ours.get("shared_layout", []))
                else "NOT all shared"
            )
            + "), output layer tiles "
            f"`{ours.get('head_chunk_size')}`, reference (beta > 0) `{reference}` (LoRA "
            "scales set to 0 for the reference pass: no second copy). "
            "mlx-lm-lora: a second full copy of the model as the reference, loaded as "
            "its CLI loads it for GRPO whatever the beta (with beta 0 it is never run).",
            "",
            markdown_table(PEER_HEADER, rows),
        ]
    )
    print(body)
    if not a.no_write:
        write_section("grpo-peers", body)


if __name__ == "__main__":
    main()
