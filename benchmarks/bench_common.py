"""Shared pieces of the benchmarks: stdlib + numpy only, so the peer workers (other venvs,
without mlx_lm_pref) import it too.

- the model sizes and the length mix;
- memory probes: peak RSS of this process between ``rss_reset()`` and ``rss_peak_mb()`` (Linux
  ``/proc/self/clear_refs`` resets ``VmHWM``);
- the job / result JSON files the orchestrators exchange with the workers;
- table formatting and the marker-delimited sections of ``benchmarks/RESULTS.md``.
"""

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"  # as mlx_lm_pref.env.OPENBLAS

VENV = os.environ.get("BENCH_VENV", sys.prefix)  # the product's: the one running this
VENV_PEER = os.environ.get("BENCH_VENV_PEER", "/tmp/venv_peer")
VENV_TRL = os.environ.get("BENCH_VENV_TRL", "/tmp/venv_trl")

# Synthetic Llamas (mlx_lm.models.llama, random weights). The vocabulary is larger than the
# tokenizer's (ids past it are never used) so the LM head has a realistic share of the work.
SIZES = {
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=1024,
        vocab_size=8192,
    ),
    "medium": dict(
        hidden_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=2048,
        vocab_size=8192,
    ),
    # Real vocabularies (Qwen3 151,936; Gemma 3 262,144) on small real hidden sizes, with 2
    # layers so that a step fits a 2-core CPU box: the output layer is most of the work, as
    # it is for the small models people tune.
    "v152k-h256": dict(
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=1024,
        vocab_size=151936,
    ),
    "qwen3-0.6b-like": dict(  # Qwen3-0.6B's hidden size, heads and vocabulary
        hidden_size=1024,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=3072,
        vocab_size=151936,
    ),
    "gemma3-270m-like": dict(  # Gemma-3-270M's hidden size and vocabulary (Llama blocks)
        hidden_size=640,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=2048,
        vocab_size=262144,
    ),
}
# A real pretrained model: SmolLM2-135M-Instruct (its tokenizer, tied embeddings), converted
# for mlx-lm by convert_smollm2.py into REAL_MODELS' folder (BENCH_SMOLLM2 moves it).
SIZES["smollm2"] = dict(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
)
REAL_MODELS = {"smollm2": Path(os.environ.get("BENCH_SMOLLM2", "/tmp/smollm2"))}
# LoRA on every linear layer of every block (mlx-lm's defaults for Llama, all layers).
LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0}
LEARNING_RATE = 1e-5
BETA = 0.1

# Token lengths, sampled uniformly per pair (chosen and rejected independently).
LENGTH_MIX = {"prompt": (64, 256), "completion": (16, 128)}
QUICK_LENGTH_MIX = {"prompt": (16, 48), "completion": (8, 24)}
# Every prompt at least 4x its pair's completions (the prompt-sharing target's workload).
LONG_PROMPT_MIX = {"prompt": (256, 384), "completion": (16, 64)}
QUICK_LONG_PROMPT_MIX = {"prompt": (64, 96), "completion": (8, 16)}


def param_count(cfg: dict) -> int:
    h, L, f, v = (
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["intermediate_size"],
        cfg["vocab_size"],
    )
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    block = h * h * 2 + h * kv * 2 + 3 * h * f + 2 * h
    return L * block + 2 * v * h + h


def describe_size(name: str) -> str:
    c = SIZES[name]
    if name in REAL_MODELS:  # pretrained, its embeddings tied to the output layer
        params = param_count(c) - c["vocab_size"] * c["hidden_size"]
        return (
            f"{name}: SmolLM2-135M-Instruct, pretrained ({params / 1e6:.1f}M params: "
            f"hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, FFN "
            f"{c['intermediate_size']}, vocab {c['vocab_size']}, tied embeddings)"
        )
    return (
        f"{name}: {param_count(c) / 1e6:.1f}M params (hidden {c['hidden_size']}, "
        f"{c['num_hidden_layers']} layers, FFN {c['intermediate_size']}, vocab "
        f"{c['vocab_size']})"
    )


# --------------------------------------------------------------------------- memory


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def trim_heap():
    """Collect garbage and hand free malloc memory back to the OS (glibc ``malloc_trim``), so
    that an RSS baseline taken next does not depend on what ran earlier in the process.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_reset():
    """Reset this process's peak RSS (VmHWM) to its current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_peak_mb() -> float:
    return _status_kb("VmHWM") / 1024


def _status_kb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return float(line.split()[1])
    return float("nan")


# --------------------------------------------------------------------------- timing


def cpu_seconds() -> float:
    """CPU time (user + system) of this process so far, all threads: less sensitive than wall
    time to other jobs on a shared machine (though spinning BLAS threads still count).
    """
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def median_ms(times) -> float:
    return statistics.median(times) * 1e3


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t


# --------------------------------------------------------------------------- batches


def batch_stats(rows_lengths, rows, width) -> dict:
    """Real tokens and the share of computed positions (rows x width) they fill."""
    real = int(sum(rows_lengths))
    computed = int(rows * width)
    return {
        "real_tokens": real,
        "computed_tokens": computed,
        "width": int(width),
        "rows": int(rows),
        "real_fraction": real / computed,
    }


def read_json(path):
    return json.loads(Path(path).read_text())


def write_json(path, obj):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1))


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average at start {load:.2f}"
    )


# --------------------------------------------------------------------------- output


def fmt(v, spec):
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return format(v, spec)


def markdown_table(header, rows) -> str:
    out = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def text_table(header, rows) -> str:
    cols = list(zip(*([header] + [[str(c) for c in r] for r in rows])))
    widths = [max(len(c) for c in col) for col in cols]
    line = lambda r: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w)
        for i, (c, w) in enumerate(zip(r, widths))
    )
    return "\n".join(
        [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    )


def write_section(name: str, body: str, path: Path = RESULTS_MD):
    """Replace the ``name`` section of RESULTS.md (between its markers), keeping the rest."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = re.sub(
            re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S
        )
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def matplotlib_python():
    """An interpreter that has matplotlib: this one, else the peer venv's (setup_peers.sh
    installs it there), else None."""
    try:
        import matplotlib  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    peer = Path(VENV_PEER) / "bin" / "python"
    if peer.exists():
        import subprocess

        ok = subprocess.run([str(peer), "-c", "import matplotlib"], capture_output=True)
        if ok.returncode == 0:
            return str(peer)
    return None


def env_for_mlx(threads: int = 0) -> dict:
    """The workers' environment: OpenBLAS preloaded, hubs offline, and with ``threads`` > 0
    every BLAS / OpenMP pool (OpenBLAS for MLX, OpenMP for torch) limited to that many.
    """
    env = dict(os.environ)
    if threads:
        for key in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[key] = str(threads)
    if Path(OPENBLAS).exists() and OPENBLAS not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = (OPENBLAS + " " + env.get("LD_PRELOAD", "")).strip()
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("WANDB_DISABLED", "true")
    env.setdefault("TQDM_DISABLE", "1")
    return env


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def run_worker(python, script, job, timeout, threads=0, log=None):
    """``python <script> JOB.json OUT.json`` in the benchmark environment: the worker's
    result, or ``{"error": ...}``. Its output goes to ``log`` (appended) or this stderr.
    """
    if not Path(python).exists():
        return {"error": f"{python} not found: run benchmarks/setup_peers.sh"}
    with tempfile.TemporaryDirectory() as d:
        job_path, out_path = Path(d) / "job.json", Path(d) / "out.json"
        write_json(job_path, job)
        logf = open(log, "a") if log else None
        if logf:
            logf.write(f"\n===== {script} {time.strftime('%H:%M:%S')}\n")
            logf.flush()
        try:
            proc = subprocess.run(
                [python, str(HERE / script), str(job_path), str(out_path)],
                env=env_for_mlx(threads),
                timeout=timeout,
                stdout=logf or sys.stderr,
                stderr=subprocess.STDOUT if logf else sys.stderr,
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            if logf:
                logf.close()
        res = read_json(out_path) if out_path.exists() else {}
        if rc != 0:
            res.setdefault(
                "error", f"{script} exited {rc}" + (f" (see {log})" if log else "")
            )
        return res
