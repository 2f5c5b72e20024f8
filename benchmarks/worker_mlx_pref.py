"""Times mlx_lm_pref (this repo) on one batch: ``python worker_mlx_pref.py JOB.json OUT.json``.

Runs in the product's venv. Each method gets a fresh model (``mlx_lm.utils.load_model`` of the
synthetic folder, frozen, LoRA on every layer by ``mlx_lm.tuner.utils.linear_to_lora_layers``)
and mlx-lm's own compiled training step, built as ``mlx_lm.tuner.trainer.train`` builds it
(``nn.value_and_grad(model, loss)``, ``mx.compile`` over model, optimizer and random state,
``step(batch, prev_grad, do_update)``). Methods:

- ``sft``: mlx-lm's ``default_loss`` on the same 2B sequences (whole sequence in the loss, as
  ``mlx_lm.lora`` without ``--mask-prompt``);
- ``forward``: one compiled forward pass plus per-token log-probs over the same 2B sequences
  (what DPO's reference pass costs), no gradient;
- any ``loss_type`` of ``mlx_lm_pref.config.PreferenceArgs`` (``dpo``, ``orpo``, ``cpo``,
  ``simpo``...): ``mlx_lm_pref.objective.PreferenceLoss(options)``, the loss ``train()``
  binds to a run's options, on the batch the product's ``batching.make_batch`` builds from
  the job's pairs. ``dpo@<reference>`` picks DPO's reference (default ``adapters_off``);
  a ``+share`` suffix sets ``prompt_sharing: true`` (each prompt once), and without it the
  job's ``prompt_sharing`` applies (default ``false``: whole rows, the same (2B, L) array as
  SFT).
"""

import gc
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from bench_common import (  # noqa: E402
    LEARNING_RATE,
    LORA,
    batch_stats,
    cpu_seconds,
    read_json,
    rss_mb,
    rss_peak_mb,
    rss_reset,
    trim_heap,
    write_json,
)
from mlx.nn.utils import average_gradients  # noqa: E402
from mlx.utils import tree_map  # noqa: E402


def load_lora_model(path, num_layers=None):
    """The model at ``path``, LoRA on its top ``num_layers`` layers (default: every one)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    mx.random.seed(0)
    model, config = load_model(Path(path))
    model.freeze()
    linear_to_lora_layers(model, num_layers or config["num_hidden_layers"], dict(LORA))
    mx.eval(model.parameters())
    return model


def compiled_train_step(model, optimizer, loss, grad_accum_steps=1):
    """``mlx_lm.tuner.trainer.train``'s step, line for line (without its loop)."""
    loss_value_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, prev_grad, do_update):
        (lvalue, toks), grad = loss_value_and_grad(model, *batch)
        if prev_grad is not None:
            grad = tree_map(lambda x, y: x + y, grad, prev_grad)
        if do_update:
            grad = average_gradients(grad)
            if grad_accum_steps > 1:
                grad = tree_map(lambda x: x / grad_accum_steps, grad)
            optimizer.update(model, grad)
            grad = None
        return lvalue, toks, grad

    def run(batch):
        lvalue, toks, _ = step(batch, None, True)
        mx.eval(state, lvalue, toks)
        return lvalue

    return run


def compiled_forward(model):
    from mlx_lm_pref.logps import span_mask, token_logps

    @mx.compile
    def fwd(tokens, spans):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logps = token_logps(model(inputs), targets)
        return (logps * span_mask(spans, targets.shape[1])).sum(axis=-1)

    def run(batch):
        out = fwd(*batch)
        mx.eval(out)
        return out

    return run


def preference_batch(model, options, job):
    """The batch the product builds for the job's pairs with these options."""
    from mlx_lm_pref.batching import make_batch
    from mlx_lm_pref.data import Pair
    from mlx_lm_pref.sharing import resolve_prompt_sharing

    options = resolve_prompt_sharing(model, options)
    pairs = [
        Pair(p["chosen"], p["rejected"], p["chosen_start"], p["rejected_start"])
        for p in job["pairs"]
    ]
    if options.method == "kto":
        pairs = kto_rows(pairs)
    return make_batch(pairs, 1 << 16, "bench", options.prompt_sharing)


def kto_rows(pairs):
    """KTO on the same data: each pair's chosen (desirable) and rejected (undesirable) as
    rows, each with its KL row (its prompt and the next row's completion, as the product's
    ``with_kl`` pairs them): 2B rows and 2B KL rows for B pairs."""
    from mlx_lm_pref.data import Example

    rows = [(p.chosen, p.chosen_start, True) for p in pairs]
    rows += [(p.rejected, p.rejected_start, False) for p in pairs]
    examples = []
    for k, (sequence, start, label) in enumerate(rows):
        other, other_start, _ = rows[(k + 1) % len(rows)]
        kl = sequence[:start] + other[other_start:]
        examples.append(Example(sequence, start, label, kl_sequence=kl))
    return examples


def layout_stats(batch):
    """batch_stats of a preference batch in either layout: the shared one computes
    B x prompt width + 2B x continuation width positions."""
    tokens, spans = batch.tokens, batch.spans
    if not batch.shared:
        return batch_stats(spans[:, 1].tolist(), tokens.shape[0], tokens.shape[1])
    prompts, lengths, rows = tokens
    ends = (spans[:, 1] + mx.concatenate([lengths, lengths])).tolist()
    stats = batch_stats(ends, 1, prompts.size + rows.size)
    stats.update(rows=rows.shape[0], width=f"{prompts.shape[1]}+{rows.shape[1]}")
    return stats


def build(method, model, tokens, spans, job):
    """(run(batch), batch, layout stats or None) for one method."""
    if method == "forward":
        model.eval()
        return compiled_forward(model), (tokens, spans), None
    model.train()
    opt = optim.Adam(learning_rate=LEARNING_RATE)
    if method == "sft":
        from mlx_lm.tuner.trainer import default_loss

        lengths = mx.stack([mx.zeros_like(spans[:, 1]), spans[:, 1]], axis=1)
        return compiled_train_step(model, opt, default_loss), (tokens, lengths), None
    from mlx_lm_pref.config import PreferenceArgs
    from mlx_lm_pref.objective import (
        METRICS_ATTRIBUTE,
        PreferenceLoss,
        sequence_logps_dpo,
    )
    from mlx_lm_pref.reference import InitialAdapter

    # "dpo@precomputed+share:logits": a loss_type, for DPO a reference strategy (default
    # adapters_off), +share for prompt sharing, :logits for the whole logits (the output
    # layer's tiles off) or :<rows> for tiles of that many vocabulary rows
    spec, _, head = method.partition(":")
    spec, share, _ = spec.partition("+share")
    loss_type, _, reference = spec.partition("@")
    # DPO's default here is its reference with the adapters off; ORPO and CPO have none
    plain = PreferenceArgs(loss_type=loss_type).needs_reference and "adapters_off"
    options = PreferenceArgs(
        loss_type=loss_type,
        reference=reference or plain or "auto",
        prompt_sharing="true" if share else job.get("prompt_sharing", "false"),
        head_chunk_size={"logits": "0", "": job.get("head_chunk_size", "auto")}.get(
            head, head
        ),
    )
    loss = PreferenceLoss(
        options,
        InitialAdapter(model) if options.reference == "initial_adapter" else None,
    )
    model[METRICS_ATTRIBUTE] = mx.zeros((len(loss.metric_names), 2))  # as train() does
    batch = preference_batch(model, options, job)
    if options.reference == "precomputed":  # scored once, outside the timed steps
        reference = mx.stop_gradient(sequence_logps_dpo(model, batch, options))
        batch = batch._replace(reference=reference)
    return compiled_train_step(model, opt, loss), (batch,), layout_stats(batch)


def param_mb(model):
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e6


def prepare(method, model_path, tokens, spans, job):
    """Load a fresh model for ``method`` and run its first (compiling, untimed) step,
    measuring the memory a step needs. Earlier methods' models stay loaded but idle, so the step's
    own figures are taken as growth over what was in use just before it."""
    model = load_lora_model(model_path, job.get("num_layers"))
    run, batch, stats = build(method, model, tokens, spans, job)
    mx.clear_cache()
    trim_heap()
    weights = param_mb(model)
    active_before = mx.get_active_memory() / 1e6
    rss_before = rss_mb()
    rss_reset()
    mx.reset_peak_memory()
    c, t = cpu_seconds(), time.perf_counter()
    value = run(batch)
    first_ms, first_cpu = (time.perf_counter() - t) * 1e3, (cpu_seconds() - c) * 1e3
    # (the first step's peak matches later steps' within a few %: compiling allocates no
    # data, and the optimizer state it creates is counted as it persists)
    growth = mx.get_peak_memory() / 1e6 - active_before
    return {
        "run": run,
        "batch": batch,
        "model": model,
        "active_before": active_before,
        "result": {
            "first_step_ms": first_ms,
            "first_step_cpu_ms": first_cpu,
            "first_loss": None if method == "forward" else float(value.item()),
            # as if this model were alone: its weights + what its steps add at their peak
            "mx_peak_mb": weights + growth,
            "mx_weights_mb": weights,
            "mx_step_growth_mb": growth,
            "rss_before_mb": rss_before,
            "rss_peak_mb": rss_peak_mb(),
            "rss_growth_mb": rss_peak_mb() - rss_before,
            "times_ms": [],
            "cpu_ms": [],
            "losses": [],
            **(stats or {}),
        },
    }


def timed_steps(entry, method, n, record):
    for _ in range(n):
        c, t = cpu_seconds(), time.perf_counter()
        value = entry["run"](entry["batch"])
        wall, cpu = time.perf_counter() - t, cpu_seconds() - c
        if record:
            entry["result"]["times_ms"].append(wall * 1e3)
            entry["result"]["cpu_ms"].append(cpu * 1e3)
        if method != "forward":
            entry["result"]["losses"].append(float(value.item()))


def main():
    """With ``"interleave": true`` in the job (bench_methods.py), each method is prepared in
    turn (fresh model, first step, memory) and kept; then the timed steps go round-robin over
    the methods, so that other jobs on a shared machine slow all of them alike and the ratios
    between them hold (absolute RSS then includes the idle models: use the RSS growth).
    Otherwise (bench_peers.py) each method runs alone in turn, its model freed after it.
    """
    job = read_json(sys.argv[1])
    tokens = mx.array(job["tokens"], dtype=mx.int32)
    spans = mx.array(job["spans"], dtype=mx.int32)
    stats = batch_stats([e for _, e in job["spans"]], tokens.shape[0], tokens.shape[1])
    interleave = job.get("interleave", False)
    out = {
        "tool": "mlx_lm_pref",
        "batch": stats,
        "methods": {},
        "timing": (
            "round-robin over methods" if interleave else "one method after another"
        ),
    }
    try:
        import mlx_lm

        out["versions"] = {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}
    except Exception:
        pass
    extra_warmup = max(job["warmup"] - 1, 0)  # prepare() ran the first step
    ready = {}
    for method in job["methods"]:
        try:
            entry = prepare(method, job["model"], tokens, spans, job)
            out["methods"][method] = entry["result"]
            if interleave:
                ready[method] = entry
            else:
                timed_steps(entry, method, extra_warmup, False)
                timed_steps(entry, method, job["steps"], True)
                # alone in the process: the peaks cover every step, as for the peers
                r = entry["result"]
                r["mx_peak_mb"] = (
                    r["mx_weights_mb"]
                    + mx.get_peak_memory() / 1e6
                    - entry["active_before"]
                )
                r["rss_peak_mb"] = rss_peak_mb()
                r["rss_growth_mb"] = r["rss_peak_mb"] - r["rss_before_mb"]
                del entry
                gc.collect()
                mx.clear_cache()
        except Exception as e:  # report and go on with the other methods
            out["methods"][method] = {"error": f"{type(e).__name__}: {e}"}
            print(
                f"[mlx_lm_pref] {method}: {out['methods'][method]['error']}",
                file=sys.stderr,
                flush=True,
            )
    names = list(ready)
    for i in range(extra_warmup + job["steps"] if names else 0):
        for method in names[i % len(names) :] + names[: i % len(names)]:
            timed_steps(ready[method], method, 1, i >= extra_warmup)
    for method, r in out["methods"].items():
        if "error" in r:
            continue
        r.update({k: v for k, v in stats.items() if k not in r})
        print(
            f"[mlx_lm_pref] {method}: {sorted(r['times_ms'])[len(r['times_ms']) // 2]:.0f} ms",
            file=sys.stderr,
            flush=True,
        )
    write_json(sys.argv[2], out)


if __name__ == "__main__":
    main()
