"""DPO and ORPO step time and peak memory relative to SFT on the same tokens.

Runs mlx-lm's own compiled training step (as ``mlx_lm.tuner.trainer.train`` builds it) on a
synthetic Llama with LoRA on every layer: SFT on the 2B sequences of B pairs, then DPO and ORPO
on the same pairs. Prints median step times and the ratios measured in this run.

    python benchmarks/step_time.py [--hidden 256 --layers 4 --batch 4 --prompt 96 --completion 32]
"""

import argparse
import statistics
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm.models import llama
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.utils import linear_to_lora_layers

import mlx_lm_pref  # noqa: F401
from mlx_lm_pref.batching import collate
from mlx_lm_pref.config import PreferenceArgs
from mlx_lm_pref.data import Pair
from mlx_lm_pref.objective import init_metric_state, preference_loss


def build_model(hidden, layers, vocab=2048):
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=hidden * 4,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 64, 1),
        rms_norm_eps=1e-5,
        vocab_size=vocab,
    )
    model = llama.Model(args)
    model.freeze()
    linear_to_lora_layers(model, layers, {"rank": 8, "dropout": 0.0, "scale": 20.0})
    mx.eval(model.parameters())
    return model


def time_step(model, loss, batch, steps, warmup=3):
    opt = optim.Adam(learning_rate=1e-5)
    state = [model.state, opt.state, mx.random.state]
    value_and_grad = nn.value_and_grad(model, loss)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch):
        (lvalue, toks), grad = value_and_grad(model, *batch)
        opt.update(model, grad)
        return lvalue, toks

    times = []
    mx.reset_peak_memory()
    for i in range(warmup + steps):
        tic = time.perf_counter()
        lvalue, toks = step(batch)
        mx.eval(state, lvalue, toks)
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    return statistics.median(times), mx.get_peak_memory() / 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--prompt", type=int, default=96)
    p.add_argument("--completion", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()

    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(a.batch):
        prompt = list(rng.integers(3, 2048, a.prompt))
        pairs.append(
            Pair(
                prompt + list(rng.integers(3, 2048, a.completion)),
                prompt + list(rng.integers(3, 2048, a.completion)),
                a.prompt,
            )
        )
    tokens, spans = collate(pairs, 4096)
    # SFT over the same 2B sequences, the whole sequence in the loss (mlx-lm's default).
    sft_batch = (tokens, mx.stack([mx.zeros_like(spans[:, 1]), spans[:, 1]], axis=1))

    results = {}
    model = build_model(a.hidden, a.layers)
    results["sft"] = time_step(model, default_loss, sft_batch, a.steps)
    for loss_type in ("dpo", "orpo"):
        model = build_model(a.hidden, a.layers)
        options = PreferenceArgs(loss_type=loss_type)
        init_metric_state(model, options)
        results[loss_type] = time_step(
            model, preference_loss, (tokens, spans, options.as_constants()), a.steps
        )
    n_tok = int(spans[:, 1].sum().item())
    print(
        f"model hidden={a.hidden} layers={a.layers}; {a.batch} pairs = {2 * a.batch} rows, "
        f"{n_tok} real tokens, width {tokens.shape[1]}"
    )
    print(
        f"{'method':<6} {'step ms':>9} {'x SFT':>7} {'tok/s':>9} {'peak MB':>9} {'x SFT':>7}"
    )
    sft_t, sft_m = results["sft"]
    for name, (t, m) in results.items():
        print(
            f"{name:<6} {t * 1e3:>9.1f} {t / sft_t:>7.2f} {n_tok / t:>9.0f} {m:>9.1f} {m / sft_m:>7.2f}"
        )


if __name__ == "__main__":
    main()
