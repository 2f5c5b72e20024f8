"""Times mlx-lm-lora's own DPO / ORPO / CPO trainers on given token ids:
``python worker_mlx_lm_lora.py JOB.json OUT.json``, in the peer venv (setup_peers.sh).

Everything that runs is mlx-lm-lora's code: ``mlx_lm_lora.utils.from_pretrained`` (the model
with LoRA on every layer), ``mlx_lm_lora.train.load_reference_model`` (DPO's reference: a second
full copy of the model, loaded from the same folder and frozen), and its ``train_dpo`` /
``train_orpo`` / ``train_cpo`` loops with their compiled steps, batch iterators and loss
functions. The dataset holds exactly the B pairs of the batch (as dicts of token ids and prompt
lengths, the layout its ``DPODataset`` / ``ORPODataset`` produce), so every iteration trains on
the same tokens. Step times come from its own per-report timing (``steps_per_report=1``: the
``iterations_per_second`` its loop measures around batch building + compiled step + eval).

Shim: every trainer of mlx-lm-lora starts with
``mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])``, a key only
Metal devices report, so on a CPU machine they stop with ``KeyError`` before the first step.
``install_shim()`` wraps ``mx.device_info`` to add that key (the machine's RAM); nothing else
is changed.
"""

import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from bench_common import (  # noqa: E402
    BETA,
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

SHIM_KEY = "max_recommended_working_set_size"
_original_device_info = mx.device_info


def install_shim():
    def device_info():
        info = dict(_original_device_info())
        if SHIM_KEY not in info:
            info[SHIM_KEY] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return info

    mx.device_info = device_info


def remove_shim():
    mx.device_info = _original_device_info


def load_policy(path, num_layers):
    from mlx_lm_lora.utils import from_pretrained

    mx.random.seed(0)
    out = from_pretrained(
        model=str(path),
        lora_config={**LORA, "use_dora": False, "num_layers": num_layers},
    )
    return out[0]


class Recorder:
    """A TrainingCallback collecting mlx-lm-lora's per-report timing and memory."""

    def __init__(self):
        self.seconds, self.peaks, self.cpu, self.losses = [], [], [], []
        self.last_cpu = cpu_seconds()

    def on_train_loss_report(self, info):
        self.seconds.append(1.0 / info["iterations_per_second"])
        self.peaks.append(info["peak_memory"])
        self.losses.append(info["train_loss"])
        now = (
            cpu_seconds()
        )  # one report per iteration: CPU of that iteration (+ report)
        self.cpu.append(now - self.last_cpu)
        self.last_cpu = now

    def on_val_loss_report(self, info):
        pass


def trainer_for(method):
    from mlx_lm_lora.trainer import cpo_trainer, dpo_trainer, orpo_trainer

    if method == "dpo":
        return (
            dpo_trainer.train_dpo,
            dpo_trainer.DPOTrainingArgs,
            dpo_trainer.iterate_dpo_batches,
        )
    if method == "orpo":
        return (
            orpo_trainer.train_orpo,
            orpo_trainer.ORPOTrainingArgs,
            orpo_trainer.iterate_orpo_batches,
        )
    if method == "cpo":
        return (
            cpo_trainer.train_cpo,
            cpo_trainer.CPOTrainingArgs,
            cpo_trainer.iterate_cpo_batches,
        )
    raise ValueError(method)


def dataset_of(pairs):
    return [
        {
            "chosen": p["chosen"],
            "rejected": p["rejected"],
            "chosen_prompt_length": p["chosen_start"],
            "rejected_prompt_length": p["rejected_start"],
            "preference_score": 1.0,
        }
        for p in pairs
    ]


def unshimmed_failure(method, model_path, num_layers):
    """What the trainer does on this machine without the shim (expected: KeyError)."""
    train, Args, _ = trainer_for(method)
    remove_shim()
    try:
        kwargs = dict(model=None, optimizer=None, train_dataset=[], args=Args(iters=0))
        if method == "dpo":
            kwargs["ref_model"] = None
        train(**kwargs)
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    finally:
        install_shim()


def time_method(method, job, tmp):
    from mlx_lm_lora.train import load_reference_model

    train, Args, iterate = trainer_for(method)
    B = len(job["pairs"])
    data = dataset_of(job["pairs"])
    gc.collect()
    mx.clear_cache()
    cfg = read_json(Path(job["model"]) / "config.json")
    model = load_policy(job["model"], job.get("num_layers") or cfg["num_hidden_layers"])
    ref = None
    if method == "dpo":
        ref = load_reference_model(
            SimpleNamespace(reference_model_path=None, model=job["model"])
        )
    mx.eval(model.parameters())
    if ref is not None:
        mx.eval(ref.parameters())
    # the batch its iterator builds from these pairs (two (B, W) arrays)
    max_len = job.get("max_seq_length", 4096)
    first = next(iterate(data, B, max_len, train=False))
    chosen, rejected = first[0], first[1]
    lengths = [len(p["chosen"]) for p in job["pairs"]] + [
        len(p["rejected"]) for p in job["pairs"]
    ]
    stats = batch_stats(lengths, 2 * B, chosen.shape[1])
    stats["arrays"] = [list(chosen.shape), list(rejected.shape)]
    weights_mb = mx.get_active_memory() / 1e6
    rec = Recorder()
    iters = job["warmup"] + job["steps"]
    args = Args(
        batch_size=B,
        iters=iters,
        steps_per_report=1,
        steps_per_eval=10**9,
        steps_per_save=10**9,
        max_seq_length=max_len,
        adapter_file=str(Path(tmp) / f"{method}_adapters.safetensors"),
    )
    if hasattr(args, "beta"):
        args.beta = BETA
    kwargs = dict(
        model=model,
        optimizer=optim.Adam(learning_rate=LEARNING_RATE),
        train_dataset=data,
        val_dataset=None,
        args=args,
        training_callback=rec,
    )
    if method == "dpo":
        kwargs.update(ref_model=ref, loss_type="sigmoid")
    mx.clear_cache()
    trim_heap()
    rss_before = rss_mb()
    rss_reset()
    mx.reset_peak_memory()
    rec.last_cpu = cpu_seconds()
    t = time.perf_counter()
    train(**kwargs)
    wall = time.perf_counter() - t
    result = {
        "first_step_ms": rec.seconds[0] * 1e3,
        "first_loss": rec.losses[0],
        "times_ms": [s * 1e3 for s in rec.seconds[job["warmup"] :]],
        "cpu_ms": [s * 1e3 for s in rec.cpu[job["warmup"] :]],
        "mx_peak_mb": mx.get_peak_memory() / 1e6,
        "mx_weights_mb": weights_mb,
        "rss_before_mb": rss_before,
        "rss_peak_mb": rss_peak_mb(),
        "wall_s": wall,
        "reference": (
            "second full model copy (load_reference_model)" if ref is not None else None
        ),
        **stats,
    }
    del model, ref, kwargs
    return result


def uncompiled_run(job, method, tmp):
    import subprocess

    sub_job, sub_out = Path(tmp) / "retry_job.json", Path(tmp) / "retry_out.json"
    write_json(sub_job, {**job, "methods": [method], "disable_compile": True})
    subprocess.run([sys.executable, __file__, str(sub_job), str(sub_out)])
    if not sub_out.exists():
        return {"error": "uncompiled retry produced nothing"}
    return read_json(sub_out)["methods"].get(
        method, {"error": "uncompiled retry failed"}
    )


def main():
    job = read_json(sys.argv[1])
    if job.get("disable_compile"):
        mx.disable_compile()
    import mlx_lm
    import mlx_lm_lora

    out = {
        "tool": "mlx-lm-lora",
        "methods": {},
        "versions": {
            "mlx": mx.__version__,
            "mlx_lm": mlx_lm.__version__,
            "mlx_lm_lora": getattr(mlx_lm_lora, "__version__", "?"),
        },
        "shim": f"mx.device_info() gains '{SHIM_KEY}' (= physical RAM) when missing",
    }
    try:
        from importlib.metadata import version

        out["versions"]["mlx_lm_lora"] = version("mlx-lm-lora")
    except Exception:
        pass
    install_shim()
    with tempfile.TemporaryDirectory() as tmp:
        for method in job["methods"]:
            try:
                r = time_method(method, job, tmp)
                r["compiled"] = not job.get("disable_compile", False)
            except Exception as e:
                import traceback

                traceback.print_exc()
                r = {"error": f"{type(e).__name__}: {e}"}
                if not job.get("disable_compile"):
                    # e.g. CPO: its compiled step fails inside mx.compile (see README). Time
                    # the same loop uncompiled, in a fresh process, and say so.
                    print(
                        f"[mlx-lm-lora] {method}: {r['error']}; retrying with "
                        "mx.disable_compile()",
                        file=sys.stderr,
                        flush=True,
                    )
                    retry = uncompiled_run(job, method, tmp)
                    if "error" not in retry:
                        retry["compile_error"] = r["error"]
                        r = retry
            r["unshimmed"] = unshimmed_failure(method, job["model"], 0)
            out["methods"][method] = r
            print(
                f"[mlx-lm-lora] {method}: "
                + (
                    f"{sorted(r['times_ms'])[len(r['times_ms']) // 2]:.0f} ms"
                    if "times_ms" in r
                    else r["error"]
                ),
                file=sys.stderr,
                flush=True,
            )
            write_json(sys.argv[2], out)


if __name__ == "__main__":
    main()
