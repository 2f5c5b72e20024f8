"""Helpers the tests share: tiny models and preference data built locally (no hub), the CLI
in a fresh interpreter, and batches in both layouts. Fixtures live in ``conftest.py``.
"""

import importlib
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_lm_pref.batching import PreferenceBatch, collate_shared
from mlx_lm_pref.data import Pair

# Float32 noise between two runs that compute the same numbers in another order (another
# batch layout or shape, other processes): measured over the combination test's design with
# OpenBLAS and with mlx's bundled BLAS (see test_combinations), metrics up to 1.6e-4 relative
# / 2.3e-5 absolute and adapter entries up to 4e-5 of their tensor's largest entry, after a few
# SGD steps.
NOISE = dict(rel=3e-4, abs=1e-4)
ADAPTER_NOISE = 2e-4  # of the tensor's largest entry


def assert_adapters_equal(a: dict, b: dict, label="", noise=ADAPTER_NOISE):
    """Two adapters (name -> numpy array) equal within float32 noise: each tensor within
    ``noise`` of its largest entry."""
    assert a.keys() == b.keys() and a, label
    worst = max(
        (np.abs(value - b[name]).max() / max(np.abs(b[name]).max(), 1e-6), name)
        for name, value in a.items()
    )
    assert worst[0] <= noise, (label, *worst)


# A Llama small enough to build in-process in milliseconds (tests of pure functions).
TINY_LLAMA = dict(
    model_type="llama",
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=50,
)
NOUNS = ["sky", "sea", "leaf", "sun", "rose", "snow", "coal", "lime", "plum", "sand"]
ADJ = ["calm", "bright", "small", "old", "quiet", "cold", "warm", "tall"]


def make_rows(n, seed, conversational=False, prompt=True):
    """Pairs whose chosen answer always says 'yes', learnt in a few dozen steps. The rejected
    answer names another noun, so an untrained model's preferences vary from pair to pair.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        noun, adj = rng.choice(NOUNS), rng.choice(ADJ)
        q = f"Is the {adj} {noun} nice?"
        good, bad = (
            f"Yes, the {noun} is nice.",
            f"No, the {rng.choice(NOUNS)} is {rng.choice(ADJ)}.",
        )
        if conversational:
            p = [{"role": "user", "content": q}]
            c = [{"role": "assistant", "content": good}]
            r = [{"role": "assistant", "content": bad}]
            rows.append(
                {"prompt": p, "chosen": c, "rejected": r}
                if prompt
                else {"chosen": p + c, "rejected": p + r}
            )
        else:
            rows.append(
                {"prompt": q + " ", "chosen": good, "rejected": bad}
                if prompt
                else {"chosen": f"{q} {good}", "rejected": f"{q} {bad}"}
            )
    return rows


def corpus():
    rows = make_rows(200, 123)
    return [r["prompt"] + r["chosen"] + " " + r["rejected"] for r in rows]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_data(
    folder, conversational=False, n_train=64, n_valid=16, n_test=16, prompt=True
):
    folder = Path(folder)
    for name, n, seed in (
        ("train", n_train, 1),
        ("valid", n_valid, 2),
        ("test", n_test, 3),
    ):
        write_jsonl(
            folder / f"{name}.jsonl", make_rows(n, seed, conversational, prompt)
        )
    return folder


def run_cli(*args, cwd=None, check=True, module="mlx_lm_pref", timeout=600, env=None):
    """Run ``python -m <module> ...`` in a fresh interpreter (patch state cannot leak),
    with ``env`` added to the environment."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    proc = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
        )
    return proc


def lora(model, data, adapter_path, *args, **kwargs):
    """``mlx_lm_pref lora --model M --data D --adapter-path A ...`` in a fresh interpreter."""
    return run_cli(
        "lora",
        "--model",
        model,
        "--data",
        data,
        "--adapter-path",
        adapter_path,
        *args,
        **kwargs,
    )


def read_metrics(adapter_path):
    return [
        json.loads(l)
        for l in (Path(adapter_path) / "metrics.jsonl").read_text().splitlines()
    ]


def whole_rows(batch):
    """A ``PreferenceBatch``'s ``(tokens, spans)`` as numpy in the concatenated layout,
    whichever layout it came in (see ``mlx_lm_pref.batching``)."""
    spans = np.array(batch.spans)
    if not batch.shared:
        return np.array(batch.tokens), spans
    prompts, lengths, continuations = (np.array(t) for t in batch.tokens)
    B = len(prompts)
    P = np.concatenate([lengths, lengths])
    rows = [
        prompts[k % B, : P[k]].tolist() + continuations[k, : spans[k, 1]].tolist()
        for k in range(2 * B)
    ]
    out = np.zeros((2 * B, max(map(len, rows))), np.int32)
    for k, row in enumerate(rows):
        out[k, : len(row)] = row
    return out, spans + P[:, None]


# The tiled output layer: a vocabulary of several tiles of 64 rows, the last one partial.
TILED = dict(vocab=1000, head_chunk_size="64")


def tiny_lora_model(seed=0, nonzero_adapter=True, vocab_size=None, **config):
    mx.random.seed(seed)
    config = {
        **TINY_LLAMA,
        **({"vocab_size": vocab_size} if vocab_size else {}),
        **config,
    }
    model = llama.Model(llama.ModelArgs(**config))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "dropout": 0.0, "scale": 2.0})
    if nonzero_adapter:  # a trained-looking adapter, so policy != reference
        lora_b = [
            (k, mx.random.normal(v.shape) * 0.05)
            for k, v in tree_flatten(model.trainable_parameters())
            if k.endswith("lora_b")
        ]
        model.update(tree_unflatten(lora_b))
    mx.eval(model.parameters())
    return model


def random_batch(seed=0, pairs=4):
    """A whole-rows ``PreferenceBatch``: chosen rows then rejected rows, right-padded, with
    completions of different lengths and a per-side start."""
    rng = np.random.default_rng(seed)
    rows, spans = [], []
    for _ in range(pairs):
        p = [1] + list(rng.integers(3, 50, rng.integers(2, 6)))
        rows.append((p + list(rng.integers(3, 50, rng.integers(1, 7)))))
        rows.append((p + list(rng.integers(3, 50, rng.integers(1, 7)))))
        spans += [(len(p), len(rows[-2])), (len(p), len(rows[-1]))]
    order = list(range(0, 2 * pairs, 2)) + list(range(1, 2 * pairs, 2))
    width = max(map(len, rows)) + 3  # some padding
    tokens = np.zeros((2 * pairs, width), np.int32)
    for k, i in enumerate(order):
        tokens[k, : len(rows[i])] = rows[i]
    spans = np.array(spans)[order].astype(np.int32)
    return PreferenceBatch(mx.array(tokens), mx.array(spans))


def shared_layout(batch):
    """The same pairs in prompt sharing's layout (``batching.collate_shared``)."""
    tokens, spans = np.array(batch.tokens), np.array(batch.spans)
    B = len(tokens) // 2
    pairs = [
        Pair(
            tokens[k, : spans[k, 1]].tolist(),
            tokens[B + k, : spans[B + k, 1]].tolist(),
            int(spans[k, 0]),
            int(spans[B + k, 0]),
        )
        for k in range(B)
    ]
    return PreferenceBatch(*collate_shared(pairs, 2048), batch.reference)


def lora_here(argv, entry="mlx_lm_pref.lora"):
    """``<entry> <argv>`` in this process, as the console script runs it: ``(exit code,
    stdout, stderr)``. ``entry`` is ``mlx_lm_pref.lora`` or plain ``mlx_lm.lora`` (upstream's
    ``main``, patched by the start-up hook on import). What mlx-lm's gradient
    checkpointing changes for good (the layer class's ``__call__``) is put back after the
    run, so the next run in this interpreter starts as a fresh one would."""
    import contextlib
    import io

    if entry == "mlx_lm.lora":
        from mlx_lm.lora import main as lora
    else:
        from mlx_lm_pref.cli import lora

    import mlx_lm.tuner.trainer as trainer

    out, err = io.StringIO(), io.StringIO()
    saved, checkpoint, checkpointed = sys.argv, trainer.grad_checkpoint, {}

    def grad_checkpoint(layer):  # replaces the layer class's __call__ for good
        checkpointed.setdefault(type(layer), type(layer).__call__)
        checkpoint(layer)

    sys.argv, trainer.grad_checkpoint = [entry, *map(str, argv)], grad_checkpoint
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                lora()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv, trainer.grad_checkpoint = saved, checkpoint
        for cls, call in checkpointed.items():
            cls.__call__ = call
    return code, out.getvalue(), err.getvalue()


DRIVER = f"""
import json, os, sys, traceback
sys.path.insert(0, {str(Path(__file__).parent)!r})
from helpers import lora_here
jobs, path, results = json.loads(sys.argv[1]), sys.argv[2], []
for argv, cwd, env, entry in jobs:
    os.chdir(cwd)
    os.environ.update(env)
    try:
        results.append(lora_here(argv, entry))
    except BaseException:
        results.append((1, "", traceback.format_exc()))
with open(path, "w") as fid:
    json.dump(results, fid)
"""


def run_cli_many(jobs, timeout=900):
    """``mlx_lm_pref lora`` runs one after another in one fresh interpreter (its import
    paid once): ``jobs`` are ``(argv, cwd, env)`` or ``(argv, cwd, env, entry)`` (see
    ``lora_here``); returns ``(exit code, stdout, stderr)`` per job, as the console script
    would have exited and printed."""
    import tempfile

    jobs = [(*job, "mlx_lm_pref.lora")[:4] for job in jobs]
    payload = json.dumps(
        [([str(a) for a in argv], str(cwd), env, e) for argv, cwd, env, e in jobs]
    )
    results = Path(tempfile.mkdtemp()) / "results.json"
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, payload, str(results)],
        # one BLAS thread: the interpreters run side by side, and a tiny model gains
        # nothing from more
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false", "OPENBLAS_NUM_THREADS": "1",
             "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )  # fmt: skip
    if proc.returncode != 0 or not results.exists():
        raise AssertionError(f"the driver failed:\n{proc.stderr[-4000:]}")
    return json.loads(results.read_text())


def lora_runs(runs, entry="mlx_lm_pref.lora"):
    """``(argv, cwd)`` runs of ``<entry> <argv>`` one after another in one fresh interpreter
    (``run_cli_many``), each a ``subprocess.CompletedProcess`` as ``run_cli`` returns:
    for parametrized cases that each refuse or train briefly, whose interpreter start
    would cost more than the run."""
    results = run_cli_many([(argv, cwd, {}, entry) for argv, cwd in runs])
    return [
        subprocess.CompletedProcess(argv, *r) for (argv, _), r in zip(runs, results)
    ]


def free_port_pair():
    """A port p with p and p + 1 free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


# A model of each architecture in mlx-lm, tiny (probes of prompt sharing, frozen layers).
TINY_ANY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-5,
    layer_norm_eps=1e-5,
    norm_eps=1e-5,
    vocab_size=64,
    max_position_embeddings=256,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    sliding_window=4,
    query_pre_attn_scalar=8,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    partial_rotary_factor=0.5,
    rope_scaling=None,
    attention_bias=False,
    mlp_bias=False,
    sliding_window_pattern=2,
    use_qk_norm=True,
    layer_norm_epsilon=1e-5,
)


def tiny_model_of(model_type, **overrides):
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(0)
    args = module.ModelArgs.from_dict(
        {**TINY_ANY, "model_type": model_type, **overrides}
    )
    return module.Model(args)
