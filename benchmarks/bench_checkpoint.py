"""What a checkpoint adds per save: its size and the time to write it, against mlx-lm's own
save at the same point (``adapters.safetensors`` and ``NNNNNNN_adapters.safetensors``).

For each model: LoRA as ``mlx_lm.lora`` applies it by default (16 layers, rank 8; every layer
of a shallower model), one Adam step so the optimizer holds its moments, then the median of
``--repeats`` saves of each: mlx-lm's two adapter files, and the checkpoint folder
``resume.RunCheckpoints`` writes (adapter, optimizer state, random states, trainer_state.json;
written under a temporary name, each file flushed to disk, renamed). ``--full`` adds full
fine-tuning of each model (the optimizer state is then twice the model's trained weights).

    .venv/bin/python benchmarks/bench_checkpoint.py [--model PATH ...] [--full]

Default models: the demo's built-in model and, when present, SmolLM2-135M-Instruct converted
for mlx-lm (``--model /tmp/smollm2``: 49,152-entry vocabulary, 30 layers, hidden 576) and the
synthetic ``v152k-h256`` of the other benchmarks (151,936-entry vocabulary).
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import write_section  # noqa: E402


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6


def measure(model_path, full, repeats):
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlx_lm_pref.checkpoint import (
        ADAPTERS,
        OPTIMIZER,
        RANK_STATE,
        optimizer_arrays,
        rank_state,
        write_checkpoint,
    )

    model, _ = load(str(model_path))
    model.freeze()
    layers = min(16, len(model.layers))
    if full:
        for layer in model.layers[-layers:]:
            layer.unfreeze()
    else:
        linear_to_lora_layers(model, layers, {"rank": 8, "dropout": 0.0, "scale": 20.0})
    optimizer = optim.Adam(learning_rate=1e-5)
    grads = {k: mx.ones_like(v) for k, v in tree_flatten(model.trainable_parameters())}
    from mlx.utils import tree_unflatten

    optimizer.update(model, tree_unflatten(list(grads.items())))
    mx.eval(model.parameters(), optimizer.state)
    work = Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))
    upstream, ours = [], []
    try:
        for i in range(repeats):
            tic = time.perf_counter()
            weights = dict(tree_flatten(model.trainable_parameters()))
            mx.save_safetensors(str(work / "adapters.safetensors"), weights)
            mx.save_safetensors(str(work / f"{i:07d}_adapters.safetensors"), weights)
            upstream.append(time.perf_counter() - tic)
            tic = time.perf_counter()
            files = {
                ADAPTERS: dict(tree_flatten(model.trainable_parameters())),
                OPTIMIZER: optimizer_arrays(optimizer),
                RANK_STATE: {
                    k: mx.array(v)
                    for k, v in rank_state(None, mx.zeros((0, 1, 2)), 1).items()
                },
            }
            state = {"iteration": i, "options": {}, "args": {}}
            write_checkpoint(work / "checkpoints" / f"{i:07d}", files, state)
            ours.append(time.perf_counter() - tic)
        adapter_mb = (work / "adapters.safetensors").stat().st_size / 1e6
        checkpoint_mb = folder_mb(work / "checkpoints" / f"{0:07d}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return {
        "model": Path(model_path).name,
        "vocab": model.args.vocab_size if hasattr(model, "args") else None,
        "tuning": "full" if full else f"lora r8 x{layers}",
        "trainable": trainable,
        "adapter_mb": adapter_mb,
        "checkpoint_mb": checkpoint_mb,
        "upstream_s": statistics.median(upstream),
        "checkpoint_s": statistics.median(ours),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="*", default=None)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    models = args.model
    if models is None:
        from mlx_lm_pref.demo.task import ensure_model

        models = [ensure_model()]
        models += [
            p
            for p in ("/tmp/smollm2", "/tmp/mlx_lm_pref_bench/llama_v152k-h256")
            if Path(p).is_dir()
        ]
    rows = []
    for model in models:
        for full in (False, True) if args.full else (False,):
            rows.append(measure(model, full, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    head = "| model | vocabulary | tuning | trainable | mlx-lm's save | + checkpoint | checkpoint / mlx-lm's save (time) |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['vocab']:,} | {r['tuning']} | {r['trainable']:,} | "
            f"{2 * r['adapter_mb']:.2f} MB, {1e3 * r['upstream_s']:.1f} ms | "
            f"{r['checkpoint_mb']:.2f} MB, {1e3 * r['checkpoint_s']:.1f} ms | "
            f"{r['checkpoint_s'] / r['upstream_s']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        command = "`.venv/bin/python benchmarks/bench_checkpoint.py" + (
            " --full`" if args.full else "`"
        )
        write_section(
            "checkpoint",
            f"What a checkpoint adds per save ({command}, median of {args.repeats}; "
            "mlx-lm's save is its two adapter files):\n\n" + table,
        )


if __name__ == "__main__":
    main()
