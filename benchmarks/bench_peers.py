"""Part 2: mlx_lm_pref side by side with mlx-lm-lora and TRL on the same weights and tokens.

    bash benchmarks/setup_peers.sh     # once: /tmp/venv_peer (mlx-lm-lora), checks /tmp/venv_trl
    .venv/bin/python benchmarks/bench_peers.py [--quick]

For each model size and batch size, one batch of B pairs (drawn as in bench_methods.py) is
handed, as token ids, to three worker processes, one per tool and venv:

- mlx_lm_pref (worker_mlx_pref.py, /tmp/venv): DPO (reference adapters_off), ORPO, CPO
  (sigmoid, cpo_alpha 1 as TRL) in mlx-lm's compiled training step;
- mlx-lm-lora (worker_mlx_lm_lora.py, /tmp/venv_peer): its own train_dpo / train_orpo /
  train_cpo loops (compiled steps, batch iterators, losses), DPO with its second full model
  copy as the reference, through a shim supplying the Metal-only
  ``max_recommended_working_set_size`` key its trainers read;
- TRL (worker_trl.py, /tmp/venv_trl): DPOTrainer and ORPOTrainer on torch CPU, float32,
  PEFT LoRA of the same shape, reference = adapters disabled.

All of them load the same synthetic Llama folder (HF layout) and train LoRA on every linear
layer (rank 8, scale 20 = PEFT alpha 160) with Adam(W) at lr 1e-5, on one thread each by
default (``--threads``; see benchmarks/README.md). Prints one table and writes
it to benchmarks/RESULTS.md (section "peers"), the raw results to
benchmarks/results/peers.json and a chart to benchmarks/results/peers.png.
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
    LORA,
    QUICK_LENGTH_MIX,
    REAL_MODELS,
    SIZES,
    VENV_PEER,
    VENV_TRL,
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

UNSHARED = "mlx_lm_pref (no sharing)"
TOOLS = {
    # tool: (python, worker, methods, job options)
    "mlx_lm_pref": (
        sys.executable,
        "worker_mlx_pref.py",
        ["dpo", "orpo", "cpo"],
        {"prompt_sharing": "auto"},
    ),
    UNSHARED: (
        sys.executable,
        "worker_mlx_pref.py",
        ["dpo", "orpo", "cpo"],
        {"prompt_sharing": "false"},
    ),
    "mlx-lm-lora": (
        str(Path(VENV_PEER) / "bin" / "python"),
        "worker_mlx_lm_lora.py",
        ["dpo", "orpo", "cpo"],
        {},
    ),
    "trl": (
        str(Path(VENV_TRL) / "bin" / "python"),
        "worker_trl.py",
        ["dpo", "orpo"],
        {},
    ),
}


def summarize(results):
    """rows[(size, B, method, tool)] with ratios to mlx_lm_pref's same method."""
    rows = {}
    for key, per_tool in results.items():
        size, B = key.split("/")
        for tool, res in per_tool["tools"].items():
            for method, r in res.get("methods", {}).items():
                row = (
                    {"error": r["error"]}
                    if "error" in r
                    else {
                        "step_ms": median(r["times_ms"]),
                        "min_ms": min(r["times_ms"]),
                        "cpu_ms": median(r["cpu_ms"]) if r.get("cpu_ms") else None,
                        "first_ms": r["first_step_ms"],
                        "tok_s": r["real_tokens"] / (median(r["times_ms"]) / 1e3),
                        "mx_peak_mb": r.get("mx_peak_mb"),
                        "mx_weights_mb": r.get("mx_weights_mb"),
                        "rss_peak_mb": r["rss_peak_mb"],
                        "rss_delta_mb": r["rss_peak_mb"] - r["rss_before_mb"],
                        "real_fraction": r["real_fraction"],
                        "width": r["width"],
                        "compiled": r.get("compiled", True),
                        "first_loss": r.get("first_loss"),
                    }
                )
                rows[(size, B, method, tool)] = row
    for (size, B, method, tool), row in rows.items():
        ours = rows.get((size, B, method, "mlx_lm_pref"))
        if "error" in row or not ours or "error" in ours:
            continue
        row["step_x"] = row["step_ms"] / ours["step_ms"]
        row["min_x"] = row["min_ms"] / ours["min_ms"]
        if row["cpu_ms"] and ours["cpu_ms"]:
            row["cpu_x"] = row["cpu_ms"] / ours["cpu_ms"]
        if row["mx_peak_mb"] and ours["mx_peak_mb"]:
            row["mx_peak_x"] = row["mx_peak_mb"] / ours["mx_peak_mb"]
        row["rss_delta_x"] = row["rss_delta_mb"] / max(ours["rss_delta_mb"], 1e-9)
    return rows


HEADER = [
    "model",
    "pairs",
    "method",
    "tool",
    "step ms",
    "x ours",
    "min ms",
    "x ours",
    "CPU ms",
    "x ours",
    "first step ms",
    "tok/s",
    "mx peak MB",
    "x ours",
    "weights MB",
    "peak RSS MB",
    "RSS growth MB",
    "x ours",
    "width",
    "real tok",
    "loss step 1",
]
ORDER = {"dpo": 0, "orpo": 1, "cpo": 2}
TOOL_ORDER = {"mlx_lm_pref": 0, UNSHARED: 1, "mlx-lm-lora": 2, "trl": 3}


def table_rows(rows):
    out = []
    keys = sorted(
        rows,
        key=lambda k: (
            list(SIZES).index(k[0]),
            int(k[1]),
            ORDER.get(k[2], 9),
            TOOL_ORDER.get(k[3], 9),
        ),
    )
    for key in keys:
        size, B, method, tool = key
        row = rows[key]
        label = tool if row.get("compiled", True) else tool + " (uncompiled*)"
        if "error" in row:
            out.append(
                [size, B, method, tool, "error: " + row["error"][:70]]
                + [""] * (len(HEADER) - 5)
            )
            continue
        out.append(
            [
                size,
                B,
                method,
                label,
                fmt(row["step_ms"], ".0f"),
                fmt(row.get("step_x"), ".2f"),
                fmt(row["min_ms"], ".0f"),
                fmt(row.get("min_x"), ".2f"),
                fmt(row["cpu_ms"], ".0f"),
                fmt(row.get("cpu_x"), ".2f"),
                fmt(row["first_ms"], ".0f"),
                fmt(row["tok_s"], ".0f"),
                fmt(row["mx_peak_mb"], ".0f"),
                fmt(row.get("mx_peak_x"), ".2f"),
                fmt(row["mx_weights_mb"], ".0f"),
                fmt(row["rss_peak_mb"], ".0f"),
                fmt(row["rss_delta_mb"], ".0f"),
                fmt(row.get("rss_delta_x"), ".2f"),
                row["width"],
                fmt(100 * row["real_fraction"], ".0f") + "%",
                fmt(row["first_loss"], ".4f"),
            ]
        )
    return out


def derived_lines(rows):
    """Per size/batch: what mlx-lm-lora's reference copy costs, and whether the step-1
    losses agree (same tokens, fresh adapters: same formula -> same number)."""
    out = []
    configs = sorted(
        {(k[0], k[1]) for k in rows}, key=lambda c: (list(SIZES).index(c[0]), int(c[1]))
    )
    for size, B in configs:
        get = lambda m, t: rows.get((size, B, m, t), {"error": "-"})  # noqa: E731
        ours, peer = get("dpo", "mlx_lm_pref"), get("dpo", "mlx-lm-lora")
        parts = []
        if "error" not in ours and "error" not in peer:
            parts.append(
                f"DPO weights in memory: mlx-lm-lora {peer['mx_weights_mb']:.0f} MB vs "
                f"{ours['mx_weights_mb']:.0f} MB ({peer['mx_weights_mb'] / ours['mx_weights_mb']:.2f}x, "
                f"its reference is a second copy), MLX peak {peer['mx_peak_mb']:.0f} vs "
                f"{ours['mx_peak_mb']:.0f} MB ({peer['mx_peak_mb'] / ours['mx_peak_mb']:.2f}x)"
            )
        for m in ("dpo", "orpo", "cpo"):
            losses = {t: get(m, t).get("first_loss") for t in TOOL_ORDER}
            losses = {t: v for t, v in losses.items() if v is not None}
            if len(losses) > 1:
                parts.append(
                    f"{m} step-1 loss "
                    + ", ".join(f"{t} {v:.4f}" for t, v in losses.items())
                )
        if parts:
            out.append(f"{size}/{B}: " + "; ".join(parts))
    return out


def chart(rows, path):
    py = matplotlib_python()
    if py is None:
        return None
    import json

    data = {}
    for (size, B, method, tool), row in rows.items():
        if "error" not in row:
            data.setdefault(f"{size}/{B}\n{method}", {})[tool] = row["step_ms"]
    keys = sorted(
        data,
        key=lambda k: (
            list(SIZES).index(k.split("/")[0]),
            int(k.split("/")[1].split("\n")[0]),
            ORDER.get(k.split("\n")[1], 9),
        ),
    )
    code = f"""
import json, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
data = json.loads({json.dumps(data)!r}); keys = {keys!r}
tools = {list(TOOL_ORDER)!r}
fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(keys) + 1.5), 4))
w = 0.2
for i, t in enumerate(tools):
    ax.bar([j + i * w for j in range(len(keys))], [data[k].get(t, 0) for k in keys], w, label=t)
ax.set_xticks([j + 1.5 * w for j in range(len(keys))], keys, fontsize=7)
ax.set_yscale("log"); ax.set_ylabel("median step time, ms (log)")
ax.set_title("Training step time on the same weights and tokens (CPU)")
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
fig.tight_layout(); fig.savefig({str(path)!r}, dpi=110)
"""
    ok = subprocess.run([py, "-c", code], capture_output=True, text=True)
    if ok.returncode != 0:
        print("chart failed:", ok.stderr[-500:], file=sys.stderr)
        return None
    return path


NOTES = """\
How each tool is driven (one worker process per tool, size and batch; same model folder, same
token ids):

- **mlx_lm_pref**: mlx-lm's compiled training step as `mlx_lm.tuner.trainer.train` builds it,
  loss `mlx_lm_pref.objective.PreferenceLoss`, on the batch `mlx_lm_pref.batching.make_batch`
  builds with the defaults: `prompt_sharing: auto`, which on these batches runs each prompt
  once (B rows) and both completions on its keys and values (2B rows; `width` = prompt +
  continuation width). **mlx_lm_pref (no sharing)**: the same with `prompt_sharing: false`,
  chosen and rejected rows in one (2B, L) array, padded to 1 + a multiple of 32. DPO's
  reference: the same model with the LoRA scales at 0 (`adapters_off`), in the same compiled
  graph. CPO = `loss_type: cpo` (sigmoid, `cpo_alpha` 1.0, TRL's defaults).
- **mlx-lm-lora**: its own `train_dpo` / `train_orpo` / `train_cpo` (compiled step, its batch
  iterators, its losses), model from `mlx_lm_lora.utils.from_pretrained`, DPO reference from
  `mlx_lm_lora.train.load_reference_model` (a second full copy of the model, loaded from the
  same folder). The dataset holds exactly the B pairs, so each iteration trains on them; step
  time = its own per-report timing with `steps_per_report=1` (batch building + step + eval).
  **Shim**: all its trainers call
  `mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])`, a key only Metal
  reports, and stop with `KeyError` on a CPU machine before the first step (the worker records
  that error per method, unshimmed). The worker wraps `mx.device_info` to add the key (the
  machine's RAM); nothing else is changed.
- **TRL**: `DPOTrainer` / `trl.experimental.orpo.ORPOTrainer` `.train()` for warmup + timed
  steps on torch CPU, float32 (`bf16=False`), PEFT LoRA (r 8, alpha 160, all 7 projections),
  `gradient_checkpointing=False` (TRL's configs default it to True; mlx-lm does not
  checkpoint), DPO reference = PEFT adapters disabled. TRL's own tokenization is bypassed so
  that it trains on exactly the same ids (`_prepare_dataset` / `tokenize_row` return them);
  collation, loss, backward and AdamW are TRL's/transformers'. Step time = callback
  `on_step_begin` -> `on_step_end`.

Columns: `x ours` = the figure over mlx_lm_pref's for the same method, size and batch.
`step ms` = median wall time of the timed steps, `min ms` = the fastest, `CPU ms` = median
process CPU time (user + system, all threads) per step; on a shared machine the last two
move less with other jobs than the median does.
`first step` = the first (compiling / warming) step, not in the median. `mx peak` =
`mx.get_peak_memory()` over all steps after `mx.reset_peak_memory()`, weights included (MLX
tools only); `weights MB` = MLX memory of the model(s) before the first step (policy +
reference copy for mlx-lm-lora's DPO); `peak RSS` = the worker's VmHWM over all steps (reset
just before the first), `RSS growth` = peak RSS minus RSS before the first step (activations,
gradients, optimizer state, caches). `width` = padded
length of the arrays the model runs on (2B rows for all three); `real tok` = real tokens /
computed positions. `loss step 1` = the loss each tool reports for its first step, before any
update (fresh LoRA: the policy is the base model, so the same formula gives the same number on
the same tokens: DPO's is ln 2 = 0.6931 for all).
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small model, short sequences, 2 timed steps",
    )
    p.add_argument(
        "--configs",
        nargs="+",
        metavar="SIZE/PAIRS",
        help="model size / pairs per batch (default: small/1 small/4 medium/4; "
        "quick: small/1 small/4)",
    )
    p.add_argument("--tools", nargs="+", choices=list(TOOLS), default=list(TOOLS))
    p.add_argument("--methods", nargs="+", help="of each tool's (default: all of them)")
    p.add_argument("--steps", type=int, help="timed steps (median); default 2")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed first steps (MLX tools compile twice: again once the optimizer "
        "state exists)",
    )
    p.add_argument(
        "--assets", default=str(Path(tempfile.gettempdir()) / "mlx_lm_pref_bench")
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads per tool: OpenBLAS "
        "(MLX tools) and torch/OpenMP (TRL); 0 = the libraries' defaults (one per "
        "core). Default 1: see README",
    )
    p.add_argument(
        "--section",
        default="peers",
        help="the RESULTS.md section written (default peers; e.g. peers-smollm2 for a "
        "run on the real model)",
    )
    p.add_argument(
        "--num-layers",
        type=int,
        help="LoRA on the top N layers, for every tool (default: every layer)",
    )
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    configs = a.configs or (
        ["small/1", "small/4"] if a.quick else ["small/1", "small/4", "medium/4"]
    )
    configs = [(c.split("/")[0], int(c.split("/")[1])) for c in configs]
    sizes = list(dict.fromkeys(s for s, _ in configs))
    steps = a.steps or 3
    mix = QUICK_LENGTH_MIX if a.quick else LENGTH_MIX
    log = HERE / "results" / f"{a.section}.log"
    log.parent.mkdir(exist_ok=True)
    log.write_text("")

    from bench_data import build_assets, sample_batch

    t0 = time.time()
    header_line = machine_line()
    results = {}
    for size, B in configs:
        path = build_assets(size, a.assets)
        if True:
            tokens, spans, info = sample_batch(path, B, mix, seed=B)
            entry = {
                "data": {k: v for k, v in info.items() if k != "pairs"},
                "tools": {},
            }
            for tool in a.tools:
                python, script, methods, options = TOOLS[tool]
                methods = [m for m in methods if not a.methods or m in a.methods]
                job = {
                    "model": str(path),
                    "tokens": tokens.tolist(),
                    "spans": spans.tolist(),
                    "pairs": info["pairs"],
                    "methods": methods,
                    "warmup": a.warmup,
                    "steps": steps,
                    "threads": a.threads,
                    **({"num_layers": a.num_layers} if a.num_layers else {}),
                    **options,
                }
                print(
                    f"== {size}, {B} pair(s), {tool} ({time.time() - t0:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                res = run_worker(
                    python, script, job, timeout=1200, log=log, threads=a.threads
                )
                if "error" in res and not res.get("methods"):
                    res["methods"] = {m: {"error": res["error"]} for m in methods}
                entry["tools"][tool] = res
            results[f"{size}/{B}"] = entry
    elapsed = time.time() - t0
    rows = summarize(results)
    print(text_table(HEADER, table_rows(rows)))
    for line in derived_lines(rows):
        print(line)
    if a.no_write:
        return
    write_json(HERE / "results" / f"{a.section}.json", results)
    png = chart(rows, HERE / "results" / f"{a.section}.png")
    versions = {}
    for entry in results.values():
        for tool, res in entry["tools"].items():
            versions.update(
                {
                    k: v
                    for k, v in (res.get("versions") or {}).items()
                    if k != "torch_threads"
                }
            )
    cmd = " ".join(["python benchmarks/bench_peers.py", *sys.argv[1:]])
    mix_txt = (
        f"prompts {mix['prompt'][0]}-{mix['prompt'][1]} tokens, completions "
        f"{mix['completion'][0]}-{mix['completion'][1]} tokens (uniform)"
    )
    unshimmed = sorted(
        {
            f"{m}: {r['unshimmed']}"
            for e in results.values()
            for m, r in e["tools"].get("mlx-lm-lora", {}).get("methods", {}).items()
            if r.get("unshimmed")
        }
    )
    uncompiled = sorted(
        {
            f"{m}: {r['compile_error']}"
            for e in results.values()
            for m, r in e["tools"].get("mlx-lm-lora", {}).get("methods", {}).items()
            if r.get("compile_error")
        }
    )
    body = [
        "## Side by side: "
        + ", ".join(t for t in a.tools if t != UNSHARED).replace("trl", "TRL")
        + (f" on {', '.join(sizes)}" if set(sizes) & set(REAL_MODELS) else "")
        + (" — QUICK smoke run" if a.quick else ""),
        "",
        f"`{cmd}` ({time.strftime('%Y-%m-%d %H:%M')}, {elapsed:.0f} s). {header_line}. "
        + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
        + ".",
        "",
        "Models: " + "; ".join(describe_size(s) for s in sizes) + f". LoRA rank "
        f"{LORA['rank']}, scale {LORA['scale']}, every linear layer of every block. Length "
        f"mix: {mix_txt}. Median of {steps} steps after {a.warmup} untimed step(s). "
        + (
            f"Threads per tool: {a.threads} (OpenBLAS for the MLX tools, torch for TRL)."
            if a.threads
            else "Threads: the libraries' defaults (one per core)."
        ),
        "",
        markdown_table(HEADER, table_rows(rows)),
        "",
    ]
    body += ["- " + line for line in derived_lines(rows)] + [""]
    if unshimmed:
        body += [
            "mlx-lm-lora without the shim, on this machine: "
            + "; ".join(unshimmed)
            + ".",
            "",
        ]
    if uncompiled:
        body += [
            "\\* mlx-lm-lora's compiled step failed, so its loop ran with "
            "`mx.disable_compile()` (times not comparable to compiled ones): "
            + "; ".join(uncompiled)
            + ".",
            "",
        ]
    body += [NOTES]
    if png:
        body += ["", f"![step time per tool](results/{png.name})"]
    write_section(a.section, "\n".join(body))
    print(
        f"wrote {HERE / 'RESULTS.md'} (section {a.section}) in {elapsed:.0f} s; worker logs in "
        f"{log}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
