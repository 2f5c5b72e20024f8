"""Where a DPO step's time goes beyond SFT + forward, by ablation on the same batch.

    .venv/bin/python benchmarks/profile_dpo.py [--sizes small medium] [--batches 1 4]

Times, in one process with mlx-lm's compiled training step (``worker_mlx_pref``) and the
timed steps round-robin over the variants, on the mixed workload's batch and whole rows
(``prompt_sharing: false``):

- ``sft``: mlx-lm's ``default_loss``; ``forward``: a compiled forward pass with log-probs;
- ``dpo``: sigmoid DPO, reference ``adapters_off``, with TRL's metrics, the output layer as
  ``head_chunk_size: auto`` picks it (tiles from 4,096 entries up, so on these models);
  ``dpo:logits``: the same with the whole logits (``head_chunk_size: 0``);
- ``dpo@none``: no reference pass at all.

So ``dpo - dpo@none`` is what the reference pass costs inside the DPO step (against
``forward`` alone), ``dpo@none - sft`` what the policy part (loss and TRL's token metrics)
costs beyond mlx-lm's own loss, and ``dpo / dpo:logits`` what the tiles cost or save on this
vocabulary (``bench_vocab.py`` measures them on real ones). Writes the table to RESULTS.md
(section "profile") and the raw numbers to results/profile.json.
"""

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = ["sft", "forward", "dpo", "dpo:logits", "dpo@none"]


def measure(model_path, tokens, spans, pairs, steps):
    """Median ms per variant (this runs inside the worker environment)."""
    import mlx.core as mx
    import worker_mlx_pref as W

    tokens, spans = mx.array(tokens, dtype=mx.int32), mx.array(spans, dtype=mx.int32)
    ready = {}
    for variant in VARIANTS:
        job = {"pairs": pairs, "prompt_sharing": "false"}
        model = W.load_lora_model(model_path)
        run, batch, _ = W.build(variant, model, tokens, spans, job)
        run(batch)  # compiles; the second step compiles again, for the optimizer state
        run(batch)
        ready[variant] = (run, batch, model)
    times = {v: [] for v in VARIANTS}
    for i in range(steps):
        for variant in VARIANTS[i % len(VARIANTS) :] + VARIANTS[: i % len(VARIANTS)]:
            run, batch, _ = ready[variant]
            t = time.perf_counter()
            run(batch)
            times[variant].append((time.perf_counter() - t) * 1e3)
    return {v: sorted(t)[len(t) // 2] for v, t in times.items()}


def main():
    from bench_common import (
        LENGTH_MIX,
        describe_size,
        env_for_mlx,
        machine_line,
        markdown_table,
        read_json,
        write_json,
        write_section,
    )

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["small", "medium"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--assets", default="/tmp/mlx_lm_pref_bench")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:  # in the worker environment: job in, numbers out
        job = read_json(a.worker[0])
        write_json(a.worker[1], measure(**job))
        return

    import subprocess
    import tempfile

    from bench_data import build_assets, sample_batch

    t0, header = time.time(), machine_line()
    results = {}
    for size in a.sizes:
        path = build_assets(size, a.assets)
        for B in a.batches:
            tokens, spans, info = sample_batch(path, B, LENGTH_MIX, seed=B)
            job = {
                "model_path": str(path),
                "tokens": tokens.tolist(),
                "spans": spans.tolist(),
                "pairs": info["pairs"],
                "steps": a.steps,
            }
            with tempfile.TemporaryDirectory() as d:
                write_json(Path(d) / "job.json", job)
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        f"{d}/job.json",
                        f"{d}/out.json",
                    ],
                    env=env_for_mlx(1),
                    check=True,
                )
                results[f"{size}/{B}"] = read_json(Path(d) / "out.json")
            print(f"{size}/{B}: {results[f'{size}/{B}']}", flush=True)
    rows = []
    for key, t in results.items():
        rows.append([
            key, *(f"{t[v]:.0f}" for v in VARIANTS),
            f"{t['dpo'] / (t['sft'] + t['forward']):.2f}",
            f"{(t['dpo'] - t['dpo@none']) / t['forward']:.2f}",
            f"{t['dpo@none'] / t['sft']:.2f}",
            f"{t['dpo'] / t['dpo:logits']:.2f}",
        ])  # fmt: skip
    header_row = ["model/pairs", *(f"{v} ms" for v in VARIANTS), "DPO / (SFT + fwd)",
                  "ref. pass in DPO / forward", "policy part / SFT",
                  "tiles / whole logits"]  # fmt: skip
    table = markdown_table(header_row, rows)
    print(table)
    write_json(HERE / "results" / "profile.json", results)
    write_section("profile", "\n".join([
        "## Where a DPO step's time goes (ablation)",
        "",
        f"`python benchmarks/profile_dpo.py` ({time.strftime('%Y-%m-%d %H:%M')}, "
        f"{time.time() - t0:.0f} s). {header}; 1 BLAS thread; mixed workload, whole rows; "
        f"median of {a.steps} round-robin steps. Models: "
        + "; ".join(describe_size(s) for s in a.sizes) + ".",
        "",
        "`dpo` has the output layer in tiles (`head_chunk_size: auto` on these "
        "vocabularies), `:logits` the whole logits. `@none`: no reference pass. Derived "
        "columns: what the reference pass adds to the DPO step, relative to a forward "
        "pass alone; the rest of the DPO step (policy forward + backward + loss with "
        "TRL's metrics) relative to SFT; the tiled step over the whole-logits one.",
        "",
        table,
    ]))  # fmt: skip


if __name__ == "__main__":
    main()
