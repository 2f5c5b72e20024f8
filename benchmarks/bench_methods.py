"""Part 1: step time, throughput and memory of each method relative to SFT on the same tokens.

    .venv/bin/python benchmarks/bench_methods.py [--quick]

(the worker gets LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 and, by default,
OPENBLAS_NUM_THREADS=1; see benchmarks/README.md)

For each model size and batch size (in pairs), one batch of B pairs is drawn from rows whose
lengths follow the length mix, through the product's real data path (PreferenceDataset with
DPO's TRL tokenization, iterate_preference_batches; the batch of median width of one epoch).
A worker process (worker_mlx_pref.py) then times, on exactly those 2B sequences, mlx-lm's own
compiled training step for SFT (mlx-lm's default_loss), DPO (reference adapters_off), ORPO and
SimPO (mlx_lm_pref.objective.PreferenceLoss), and a compiled forward pass with log-probs
(what DPO's reference pass costs). Every figure is also given as a ratio to SFT from the same
run. Prints the table and writes it to benchmarks/RESULTS.md (section "methods"), the raw
numbers to benchmarks/results/methods.json and a chart to benchmarks/results/methods.png.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import (  # noqa: E402
    LENGTH_MIX,
    LONG_PROMPT_MIX,
    LORA,
    QUICK_LENGTH_MIX,
    QUICK_LONG_PROMPT_MIX,
    REAL_MODELS,
    SIZES,
    describe_size,
    fmt,
    machine_line,
    markdown_table,
    matplotlib_python,
    median,
    run_worker,
    text_table,
    write_json,
    write_section,
)

# dpo@<reference>: DPO with that reference strategy (plain dpo: adapters_off); +share: with
# prompt sharing (each prompt once); without it, the whole (2B, L) rows SFT trains on.
METHODS = [
    "sft",
    "forward",
    "dpo",
    "dpo@initial_adapter",
    "dpo@precomputed",
    "dpo@none",
    "orpo",
    "simpo",
    "dpo+share",
    "dpo@precomputed+share",
    "orpo+share",
    "simpo+share",
]
LONG_PROMPT_METHODS = [
    "sft",
    "forward",
    "dpo",
    "dpo+share",
    "dpo@precomputed+share",
    "orpo",
    "orpo+share",
    "simpo+share",
]
# workload: (length mix, quick length mix, methods)
WORKLOADS = {
    "mixed": (LENGTH_MIX, QUICK_LENGTH_MIX, METHODS),
    "long-prompt": (LONG_PROMPT_MIX, QUICK_LONG_PROMPT_MIX, LONG_PROMPT_METHODS),
}


def summarize(res):
    """Per method: step ms (median, min), CPU ms, tok/s, peaks, real fraction, and ratios
    to SFT."""
    rows = {}
    for name, r in res["methods"].items():
        if "error" in r:
            rows[name] = {"error": r["error"]}
            continue
        ms = median(r["times_ms"])
        rows[name] = {
            "step_ms": ms,
            "min_ms": min(r["times_ms"]),
            "cpu_ms": median(r["cpu_ms"]),
            "tok_s": r["real_tokens"] / (ms / 1e3),
            "mx_peak_mb": r["mx_peak_mb"],
            "mx_weights_mb": r["mx_weights_mb"],
            "rss_growth_mb": r["rss_growth_mb"],
            "real_fraction": r["real_fraction"],
            "first_step_ms": r["first_step_ms"],
        }
    sft = rows.get("sft", {})
    for name, row in rows.items():
        if "error" in row or "error" in sft or not sft:
            continue
        for k in (
            "step_ms",
            "min_ms",
            "cpu_ms",
            "tok_s",
            "mx_peak_mb",
            "rss_growth_mb",
            "real_fraction",
        ):
            row[k + "_x"] = row[k] / sft[k]
    return rows


def table_rows(results):
    out = []
    for key, res in results.items():
        workload, size, B = key.split("/")
        for name, row in res["summary"].items():
            if "error" in row:
                out.append(
                    [workload, size, B, name, "error: " + row["error"][:60]]
                    + [""] * (len(HEADER) - 5)
                )
                continue
            out.append(
                [
                    workload,
                    size,
                    B,
                    name,
                    fmt(row["step_ms"], ".0f"),
                    fmt(row.get("step_ms_x"), ".2f"),
                    fmt(row["min_ms"], ".0f"),
                    fmt(row.get("min_ms_x"), ".2f"),
                    fmt(row["cpu_ms"], ".0f"),
                    fmt(row.get("cpu_ms_x"), ".2f"),
                    fmt(row["tok_s"], ".0f"),
                    fmt(row.get("tok_s_x"), ".2f"),
                    fmt(row["mx_peak_mb"], ".0f"),
                    fmt(row.get("mx_peak_mb_x"), ".2f"),
                    fmt(row["rss_growth_mb"], ".0f"),
                    fmt(row.get("rss_growth_mb_x"), ".2f"),
                    fmt(100 * row["real_fraction"], ".0f") + "%",
                    fmt(row.get("real_fraction_x"), ".2f"),
                ]
            )
    return out


HEADER = [
    "workload",
    "model",
    "pairs",
    "method",
    "step ms",
    "x SFT",
    "min ms",
    "x SFT",
    "CPU ms",
    "x SFT",
    "tok/s",
    "x SFT",
    "mx peak MB",
    "x SFT",
    "RSS growth MB",
    "x SFT",
    "real tok",
    "x SFT",
]


def derived_lines(results):
    """DPO against SFT + forward, per configuration."""
    lines = []
    for key, res in results.items():
        s = res["summary"]
        for name in ("dpo+share", "orpo+share", "simpo+share", "dpo@precomputed+share"):
            if name in s and "error" not in s[name] and "error" not in s["sft"]:
                lines.append(
                    f"{key}: {name} {s[name]['step_ms']:.0f} ms vs SFT "
                    f"{s['sft']['step_ms']:.0f} ms on the same sequences: "
                    f"{s[name]['step_ms'] / s['sft']['step_ms']:.2f} x SFT"
                )
        if all(k in s and "error" not in s[k] for k in ("sft", "forward", "dpo")):
            both = s["sft"]["step_ms"] + s["forward"]["step_ms"]
            lines.append(
                f"{key}: DPO {s['dpo']['step_ms']:.0f} ms vs SFT + forward "
                f"{s['sft']['step_ms']:.0f} + {s['forward']['step_ms']:.0f} = {both:.0f} ms "
                f"(DPO / (SFT + forward) = {s['dpo']['step_ms'] / both:.2f}); forward alone "
                f"= {s['forward']['step_ms'] / s['sft']['step_ms']:.2f} x SFT; in CPU time "
                f"DPO / (SFT + forward) = "
                f"{s['dpo']['cpu_ms'] / (s['sft']['cpu_ms'] + s['forward']['cpu_ms']):.2f}"
            )
    return lines


def batch_lines(results):
    out = []
    for key, res in results.items():
        b, info = res["batch"], res["data"]
        out.append(
            f"{key}: batch ({b['rows']}, {b['width']}) = {b['computed_tokens']} computed "
            f"positions, {b['real_tokens']} real tokens ({100 * b['real_fraction']:.0f}%); "
            f"prompts {info['prompt_lengths']}, chosen {info['chosen_lengths']}, rejected "
            f"{info['rejected_lengths']} tokens; real share over the epoch's "
            f"{info['epoch_batches']} batches: {100 * info['epoch_real_fraction']:.0f}%"
            + (
                f"; distinct batch shapes over the epoch (each compiled once): "
                f"{info['epoch_shapes']} as whole rows, {info['epoch_shapes_auto']} with "
                f"prompt_sharing auto ({info['epoch_shared_batches']} of "
                f"{info['epoch_batches']} batches shared)"
                if "epoch_shapes" in info
                else ""
            )
        )
    return out


def chart(results, path):
    py = matplotlib_python()
    if py is None:
        return None
    data = {
        k: {m: r.get("step_ms_x") for m, r in v["summary"].items() if m != "sft"}
        for k, v in results.items()
    }
    code = f"""
import json, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
data = json.loads({str(__import__('json').dumps(data))!r})
order = {METHODS!r}
workloads = list(dict.fromkeys(k.split("/")[0] for k in data))
fig, axes = plt.subplots(len(workloads), 1, figsize=(11, 3.4 * len(workloads)), squeeze=False)
for ax, wl in zip(axes[:, 0], workloads):
    keys = [k for k in data if k.startswith(wl + "/")]
    methods = sorted({{m for k in keys for m in data[k]}},
                     key=lambda m: order.index(m) if m in order else 99)
    w = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        hatch = "//" if m.endswith("+share") else None
        color = plt.get_cmap("tab20")(order.index(m) % 20) if m in order else None
        ax.bar([j + i * w for j in range(len(keys))], [data[k].get(m) or 0 for k in keys], w,
               label=m, hatch=hatch, color=color)
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="SFT")
    if "dpo" in methods and "forward" in methods:  # where DPO would be at SFT + forward
        i = methods.index("dpo")
        for j, k in enumerate(keys):
            if data[k].get("forward") and data[k].get("dpo"):
                x = j + i * w
                ax.hlines(1 + data[k]["forward"], x - w / 2, x + w / 2, colors="k", lw=2,
                          label="SFT + forward" if j == 0 else None)
    ax.set_xticks([j + w * (len(methods) - 1) / 2 for j in range(len(keys))],
                  [k.split("/", 1)[1] for k in keys])
    ax.set_ylabel("step time / SFT step")
    ax.set_title(f"{{wl}} workload: step time relative to SFT on the same sequences", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
axes[-1, 0].set_xlabel("model / pairs per batch")
fig.tight_layout(); fig.savefig({str(path)!r}, dpi=110)
"""
    ok = subprocess.run([py, "-c", code], capture_output=True, text=True)
    if ok.returncode != 0:
        print("chart failed:", ok.stderr[-500:], file=sys.stderr)
        return None
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small model, short sequences, 2 timed steps",
    )
    p.add_argument("--sizes", nargs="+", choices=list(SIZES))
    p.add_argument(
        "--batches", nargs="+", type=int, help="pairs per batch (default 1 4)"
    )
    p.add_argument(
        "--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS)
    )
    p.add_argument("--methods", nargs="+", help="default: each workload's own list")
    p.add_argument("--steps", type=int, help="timed steps (median); default 3, quick 2")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed first steps: the first compiles, the second compiles again for "
        "the optimizer state the first one created",
    )
    p.add_argument(
        "--assets", default=str(Path(tempfile.gettempdir()) / "mlx_lm_pref_bench")
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS threads of the worker "
        "(OPENBLAS_NUM_THREADS); 0 = OpenBLAS's default (one per core). Default 1: "
        "steadier on a shared machine (see README)",
    )
    p.add_argument(
        "--section",
        default="methods",
        help="the RESULTS.md section written (default methods; e.g. methods-smollm2 for a "
        "run on the real model)",
    )
    p.add_argument("--no-write", action="store_true", help="print only")
    a = p.parse_args()
    sizes = a.sizes or (["small"] if a.quick else ["small", "medium"])
    batches = a.batches or [1, 4]
    steps = a.steps or (2 if a.quick else 3)

    from bench_data import build_assets, sample_batch

    t0 = time.time()
    header_line = machine_line()
    results = {}
    mixes = {}
    for workload in a.workloads:
        full_mix, quick_mix, workload_methods = WORKLOADS[workload]
        mix = mixes[workload] = quick_mix if a.quick else full_mix
        methods = a.methods or workload_methods
        for size in sizes:
            path = build_assets(size, a.assets)
            for B in batches:
                tokens, spans, info = sample_batch(path, B, mix, seed=B)
                job = {
                    "model": str(path),
                    "tokens": tokens.tolist(),
                    "spans": spans.tolist(),
                    "pairs": info["pairs"],
                    "methods": methods,
                    "warmup": a.warmup,
                    "steps": steps,
                    "interleave": True,
                }
                print(
                    f"== {workload}, {size}, {B} pair(s): batch {tuple(tokens.shape)}",
                    file=sys.stderr,
                    flush=True,
                )
                res = run_worker(
                    sys.executable,
                    "worker_mlx_pref.py",
                    job,
                    timeout=1800,
                    threads=a.threads,
                )
                if "error" in res and "methods" not in res:
                    res = {
                        "methods": {m: {"error": res["error"]} for m in methods},
                        "batch": {},
                    }
                res["data"] = {k: v for k, v in info.items() if k != "pairs"}
                res["summary"] = summarize(res)
                results[f"{workload}/{size}/{B}"] = res
    elapsed = time.time() - t0

    table = text_table(HEADER, table_rows(results))
    print(table)
    for line in derived_lines(results):
        print(line)
    if a.no_write:
        return
    write_json(HERE / "results" / f"{a.section}.json", results)
    png = chart(results, HERE / "results" / f"{a.section}.png")
    cmd = " ".join(["python benchmarks/bench_methods.py", *sys.argv[1:]])
    mix_txt = "; ".join(
        f"{w}: prompts {m['prompt'][0]}-{m['prompt'][1]} tokens, completions "
        f"{m['completion'][0]}-{m['completion'][1]} tokens"
        for w, m in mixes.items()
    )
    mix_txt += " (uniform)"
    versions = next(
        (r.get("versions") for r in results.values() if r.get("versions")), {}
    )
    body = [
        "## Methods vs SFT (mlx_lm_pref)"
        + (f" on {', '.join(sizes)}" if set(sizes) & set(REAL_MODELS) else "")
        + (" — QUICK smoke run" if a.quick else ""),
        "",
        f"`{cmd}` ({time.strftime('%Y-%m-%d %H:%M')}, {elapsed:.0f} s). {header_line}; "
        f"mlx {versions.get('mlx', '?')}, mlx-lm {versions.get('mlx_lm', '?')}, CPU "
        "backend with Debian's OpenBLAS.",
        "",
        "Models: "
        + "; ".join(describe_size(s) for s in sizes)
        + f". LoRA on every linear "
        f"layer of every block (rank {LORA['rank']}, scale {LORA['scale']}), Adam. Length mixes: "
        f"{mix_txt}. Median of {steps} steps after {a.warmup} untimed (compiling) steps. "
        + (
            f"BLAS threads: {a.threads}."
            if a.threads
            else "BLAS threads: OpenBLAS's " "default (one per core)."
        ),
        "",
        "Every method runs mlx-lm's compiled training step on the same 2B sequences: "
        "`sft` = mlx-lm's `default_loss` over the whole (2B, L) rows; `forward` = one "
        "compiled forward pass + per-token log-probs (no gradient), i.e. what DPO's "
        "reference pass costs; `dpo` = sigmoid DPO, reference `adapters_off`; `dpo@initial_adapter`, "
        "`dpo@precomputed` (reference log-probs scored once, outside the timed steps), `dpo@none`: "
        "the other reference strategies; `orpo`; "
        "`simpo` (TRL's CPOTrainer SimPO, cpo_alpha 1). These run on the whole (2B, L) rows "
        "(`prompt_sharing: false`); a `+share` suffix means the same method with prompt "
        "sharing (each pair's prompt once, then both completions on its keys and values: "
        "B prompt rows + 2B continuation rows), as `prompt_sharing: auto` does on these "
        "batches. Each method has its own freshly "
        "loaded model; after each one's first (compiling, untimed) step the timed steps go "
        "round-robin over the methods, so that other jobs on the machine slow them alike.",
        "",
        "Columns: `step ms` = median wall time per step; `min ms` = the fastest timed step; "
        "`CPU ms` = median process CPU time (user + system, all threads) per step (the last "
        "two move less than the median with other jobs on a shared machine). `tok/s` = real "
        "tokens (prompt + completion, both rows of each pair) per second of median step. "
        "`mx peak` = `mx.get_peak_memory()` over the first step after "
        "`mx.reset_peak_memory()`, as growth over the memory in use before it plus the "
        "method's own weights (LoRA included): what the method needs alone. `RSS growth` = "
        "the worker's VmHWM during that step minus its RSS before it. `real tok` = real "
        "tokens / computed positions (rows x width; shared: B x prompt width + 2B x "
        "continuation width) of the batch. `x SFT` = the figure "
        "divided by SFT's from the same run.",
        "",
        markdown_table(HEADER, table_rows(results)),
        "",
    ]
    body += ["- " + line for line in derived_lines(results)]
    body += ["", "Batches:", ""] + ["- " + line for line in batch_lines(results)]
    if png:
        body += ["", f"![step time relative to SFT](results/{png.name})"]
    write_section(a.section, "\n".join(body))
    print(
        f"wrote {HERE / 'RESULTS.md'} (section {a.section}) in {elapsed:.0f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
