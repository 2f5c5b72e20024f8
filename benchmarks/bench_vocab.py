"""Part 4: real vocabularies. The output layer in tiles vs the whole logits, against SFT.

    .venv/bin/python benchmarks/bench_vocab.py [--quick] [--part steps|length|both]
        [--sizes v152k-h256 ...] [--lengths 512 1024 ...]

``steps``: on models with real vocabularies and small real hidden sizes (bench_common's
``v152k-h256``, ``gemma3-270m-like``, ``qwen3-0.6b-like``, each with 2 layers so a step fits
a 2-core CPU box), one batch of pairs whose prompts are 3/4 of each sequence, through
mlx-lm's compiled step (``worker_mlx_pref.py``): SFT (mlx-lm's ``default_loss``), a forward
pass, and DPO / ORPO / SimPO with the output layer in tiles (the default, ``auto``) and with
the whole logits (``:logits``, ``head_chunk_size: 0``: the path before tiles), on whole rows
and with prompt sharing. Each method runs alone in its own worker process (clean peaks).
Reported: step time and ``mx.get_peak_memory()`` peak, both as a ratio to SFT, and the share
of each spent in the output layer: the same method on the same model with a 4096-entry
vocabulary (the tokenizer's own) instead, 1 - that / this.

``length``: the longest sequence (1 pair, prompt 3/4, lengths doubling from 512) each method
trains at within a memory budget (``--budget-gb``, default 4: peak of one step), on
``v152k-h256``: mlx-lm's SFT, DPO with whole logits and in tiles, ORPO, DPO with sharing,
and mlx-lm-lora's DPO (its own trainer, peer venv: ``bash benchmarks/setup_peers.sh``).

Each part writes its own section of benchmarks/RESULTS.md ("vocab", "vocab-length") and
its raw numbers (benchmarks/results/vocab_steps.json, vocab_length.json), so the two can
run separately.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import (  # noqa: E402
    SIZES,
    VENV_PEER,
    describe_size,
    machine_line,
    markdown_table,
    median,
    run_worker,
    text_table,
    write_json,
    write_section,
)

STEP_METHODS = [
    "sft",
    "forward",
    "dpo:logits",
    "dpo",
    "dpo@precomputed",
    "orpo:logits",
    "orpo",
    "simpo",
    "dpo+share",
    "orpo+share",
]
# the larger models: the core of the comparison
SHORT_METHODS = ["sft", "forward", "dpo:logits", "dpo", "dpo+share"]
CONFIGS = {  # size: (pairs, sequence length, methods)
    "v152k-h256": (2, 512, STEP_METHODS),
    "gemma3-270m-like": (1, 512, SHORT_METHODS),
    "qwen3-0.6b-like": (1, 512, SHORT_METHODS),
}
QUICK_CONFIGS = {"v152k-h256": (1, 128, ["sft", "dpo:logits", "dpo", "orpo"])}
LENGTH_METHODS = ["sft", "dpo:logits", "dpo", "orpo", "dpo+share", "mlx-lm-lora dpo"]
SMALL_VOCAB = 4096


def batch_for(path, B, L, seed=0):
    """One batch of B pairs of L-token sequences (prompt 3/4) through the product's data
    path, as the job fields the workers take."""
    from bench_data import sample_batch

    P = L * 3 // 4
    mix = {"prompt": (P, P), "completion": (L - P, L - P)}
    tokens, spans, info = sample_batch(path, B, mix, seed=seed, pairs_per_batch=2)
    return {"tokens": tokens.tolist(), "spans": spans.tolist(), "pairs": info["pairs"]}


def run_one(path, batch, method, warmup, steps, threads):
    """One method alone in a worker process: its result dict."""
    if method.startswith("mlx-lm-lora "):
        job = {"model": str(path), "methods": [method.split()[1]], **batch}
        job.update(warmup=warmup, steps=steps, max_seq_length=1 << 16)
        python = str(Path(VENV_PEER) / "bin" / "python")
        res = run_worker(python, "worker_mlx_lm_lora.py", job, 7200, threads)
        return res.get("methods", {}).get(method.split()[1], res)
    job = {"model": str(path), "methods": [method], "interleave": False, **batch}
    job.update(warmup=warmup, steps=steps)
    res = run_worker(sys.executable, "worker_mlx_pref.py", job, 7200, threads)
    return res.get("methods", {}).get(method, res)


def small_twin(size, root):
    """The size with the tokenizer's own 4096-entry vocabulary instead."""
    from bench_data import build_assets

    name = f"{size}-v4096"
    SIZES[name] = {**SIZES[size], "vocab_size": SMALL_VOCAB}
    return build_assets(name, root)


def steps_part(configs, root, warmup, steps, threads):
    from bench_data import build_assets

    out = {}
    for size, (B, L, methods) in configs.items():
        path, small = build_assets(size, root), small_twin(size, root)
        batch = batch_for(path, B, L)
        for method in methods:
            print(f"== {size} {B}x{L} {method}", file=sys.stderr, flush=True)
            big = run_one(path, batch, method, warmup, steps, threads)
            tiny = run_one(small, batch, method, warmup, steps, threads)
            out[f"{size}/{method}"] = {
                "size": size,
                "B": B,
                "L": L,
                "method": method,
                "result": big,
                "small_vocab": tiny,
            }
    return out


def step_rows(results):
    rows = []
    sft = {r["size"]: r["result"] for r in results.values() if r["method"] == "sft"}
    fwd = {r["size"]: r["result"] for r in results.values() if r["method"] == "forward"}
    for r in results.values():
        res, tiny, base = r["result"], r["small_vocab"], sft.get(r["size"], {})
        if "error" in res or "times_ms" not in res:
            rows.append(
                [
                    r["size"],
                    f"{r['B']}x{r['L']}",
                    r["method"],
                    "error",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                ]
            )
            continue
        ms, peak = median(res["times_ms"]), res["mx_peak_mb"]
        sft_ms = median(base["times_ms"]) if base.get("times_ms") else float("nan")
        sft_peak = base.get("mx_peak_mb", float("nan"))
        vs_forward = ""
        if (
            r["method"].startswith("dpo")
            and "@" not in r["method"]
            and r["size"] in fwd
        ):
            both = sft_ms + median(fwd[r["size"]]["times_ms"])
            vs_forward = f"{ms / both:.2f}"
        share_t = share_m = ""
        if tiny.get("times_ms"):
            share_t = f"{1 - median(tiny['times_ms']) / ms:.0%}"
            share_m = f"{1 - tiny['mx_peak_mb'] / peak:.0%}"
        rows.append(
            [
                r["size"],
                f"{r['B']}x{r['L']}",
                r["method"],
                f"{ms / 1e3:.1f}",
                f"{ms / sft_ms:.2f}",
                vs_forward,
                f"{peak / 1e3:.2f}",
                f"{peak / sft_peak:.2f}",
                share_t,
                share_m,
            ]
        )
    return rows


STEP_HEADER = [
    "model",
    "pairs x tokens",
    "method",
    "step s",
    "x SFT",
    "x (SFT+fwd)",
    "mx peak GB",
    "x SFT",
    "head time",
    "head memory",
]


def length_part(root, budget_gb, lengths, threads):
    from bench_data import build_assets

    path = build_assets("v152k-h256", root)
    out = {}
    for method in LENGTH_METHODS:
        fits = []
        for L in lengths:
            print(f"== length {method} {L}", file=sys.stderr, flush=True)
            res = run_one(path, batch_for(path, 1, L, seed=L), method, 0, 1, threads)
            peak = res.get("mx_peak_mb")
            fits.append({"L": L, "mx_peak_mb": peak, "error": res.get("error")})
            if peak is None or peak > budget_gb * 1e3:
                break
        out[method] = fits
    return out


def length_rows(results, budget_gb, lengths):
    rows = []
    for method, fits in results.items():
        ok = [
            f["L"]
            for f in fits
            if f["mx_peak_mb"] and f["mx_peak_mb"] <= budget_gb * 1e3
        ]
        peaks = ", ".join(
            (
                f"{f['L']}: {f['mx_peak_mb'] / 1e3:.2f}"
                if f["mx_peak_mb"]
                else f"{f['L']}: error"
            )
            for f in fits
        )
        longest = str(max(ok)) if ok else "< " + str(fits[0]["L"])
        if ok and len(ok) == len(lengths):  # every length tried fits: at least that
            longest = ">= " + longest
        rows.append([method, longest, peaks])
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--part", choices=["steps", "length", "both"], default="both")
    p.add_argument("--sizes", nargs="+", help="steps part: these of CONFIGS only")
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    p.add_argument("--budget-gb", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--threads", type=int, default=0, help="BLAS threads (0: one per core)"
    )
    p.add_argument(
        "--assets", default=str(Path(tempfile.gettempdir()) / "mlx_lm_pref_bench")
    )
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    lengths = [128, 256] if a.quick else a.lengths
    configs = QUICK_CONFIGS if a.quick else CONFIGS
    if a.sizes:
        configs = {k: v for k, v in configs.items() if k in a.sizes}
    threads = a.threads or "one per core"
    if a.part in ("steps", "both"):
        t0 = time.time()
        results = steps_part(configs, a.assets, a.warmup, a.steps, a.threads)
        print(text_table(STEP_HEADER, step_rows(results)))
        if not a.no_write:
            sizes = sorted({r["size"] for r in results.values()})
            write_part(
                "vocab",
                a,
                results,
                t0,
                "## Real vocabularies: the output layer in tiles",
                [
                    "Models: " + "; ".join(describe_size(s) for s in sizes) + ". LoRA "
                    "on every linear layer of every block, Adam. One batch (`pairs x "
                    "tokens`, prompts 3/4 of each sequence); median of "
                    f"{a.steps} step(s) after {a.warmup} untimed, BLAS threads: "
                    f"{threads}. Methods as in part 1; `:logits` = the whole logits "
                    "(`head_chunk_size: 0`, the path before tiles), without it the "
                    "default (`auto`: tiles). `x (SFT+fwd)` = DPO's step over SFT's plus "
                    "a forward pass's. `head time` / `head memory`: the share of the "
                    "step's time and peak the output layer accounts for (1 - the same "
                    "method on the same model with a "
                    f"{SMALL_VOCAB}-entry vocabulary / this).",
                    "",
                    markdown_table(STEP_HEADER, step_rows(results)),
                ],
            )
    if a.part in ("length", "both"):
        t0 = time.time()
        results = length_part(a.assets, a.budget_gb, lengths, a.threads)
        table = (["method", "longest L", "peak GB per L"],)
        table += (length_rows(results, a.budget_gb, lengths),)
        print(text_table(*table))
        if not a.no_write:
            write_part(
                "vocab-length",
                a,
                results,
                t0,
                "## Real vocabularies: the longest sequence in a memory budget",
                [
                    f"Longest sequence within {a.budget_gb:g} GB "
                    "(`mx.get_peak_memory()` of one step, compile included; 1 pair, "
                    "prompt 3/4, lengths "
                    + ", ".join(map(str, lengths))
                    + ", stopping at the first that does not fit) on "
                    + describe_size("v152k-h256")
                    + f", BLAS threads: {threads}. `mlx-lm-lora dpo`: its own DPO "
                    "trainer (a second model copy as the reference).",
                    "",
                    markdown_table(*table),
                ],
            )


def write_part(section, a, results, t0, title, body):
    """One part's RESULTS.md section (with the command that made it) and raw numbers."""
    elapsed = time.time() - t0
    part = "steps" if section == "vocab" else "length"
    write_json(HERE / "results" / f"vocab_{part}.json", results)
    flags = " --quick" if a.quick else ""
    flags += f" --part {part}"
    flags += " --sizes " + " ".join(a.sizes) if a.sizes and part == "steps" else ""
    flags += f" --steps {a.steps}" if a.steps != 2 else ""
    flags += f" --threads {a.threads}" if a.threads else ""
    head = [
        title + (" — QUICK" if a.quick else ""),
        "",
        f"`python benchmarks/bench_vocab.py{flags}` ({time.strftime('%Y-%m-%d %H:%M')}, "
        f"{elapsed:.0f} s). {machine_line()}; CPU backend with Debian's OpenBLAS.",
        "",
    ]
    write_section(section, "\n".join(head + body) + "\n")
    print(f"wrote RESULTS.md (section {section}) in {elapsed:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
