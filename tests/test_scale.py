"""Scaling features of mlx-lm with every preference method, through the real CLI: gradient
accumulation (checkpointing, in every combination: test_combinations), quantized (QLoRA)
and bf16/fp16 bases; float32 losses;
ORPO at the edges of its domain; and the supported mlx-lm range at its oldest end."""

import collections
import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import (
    TINY_LLAMA,
    corpus,
    lora,
    lora_runs,
    make_rows,
    read_metrics,
    run_cli,
    write_data,
    write_jsonl,
)
from packaging.version import Version

from mlx_lm_pref.losses import log1mexp, orpo_odds_ratio

METHODS = {
    "dpo": ["--loss-type", "dpo"],
    "orpo": ["--loss-type", "orpo"],
    "cpo": ["--loss-type", "cpo"],
    "simpo": ["--loss-type", "simpo"],
}
UPDATES = 3  # optimizer updates per run


def numbers(metrics):
    return {k: v for k, v in metrics.items() if k not in ("split", "iteration")}


def assert_adapters_close(a, b, rtol=1e-3, atol=3e-5):
    """Float32 noise (summation order, batch shapes) only: the updates themselves move the
    weights by more than 1e-2."""
    a = mx.load(str(Path(a) / "adapters.safetensors"))
    b = mx.load(str(Path(b) / "adapters.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        np.testing.assert_allclose(
            np.array(b[key]), np.array(a[key]), rtol=rtol, atol=atol, err_msg=key
        )
    return a


# ---- gradient accumulation and checkpointing ----


@pytest.fixture(scope="module")
def equal_length_data(tiny_model, tmp_path_factory):
    """4 training and 4 validation pairs whose prompts, chosen and rejected sequences all
    tokenize to the same lengths (with and without special tokens, so under the DPO and the
    ORPO/CPO tokenization alike).

    Then every token mean in a loss (ORPO's and CPO's NLL, RPO's sft term) and in a metric
    averages equally sized groups, so the mean over k micro-batches of b pairs is exactly the
    mean over their k*b pairs; and with exactly k*b training pairs, each optimizer update of
    the accumulated run sees every pair once, whatever order mlx-lm's shuffle picks."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))

    def signature(row):
        texts = (
            row["prompt"],
            row["prompt"] + row["chosen"] + tok.eos_token,
            row["prompt"] + row["rejected"] + tok.eos_token,
        )
        return tuple(
            len(tok(t, add_special_tokens=special)["input_ids"])
            for special in (True, False)
            for t in texts
        )

    groups = collections.defaultdict(list)
    for row in make_rows(400, 11):
        if row not in groups[signature(row)]:
            groups[signature(row)].append(row)
    rows = max(groups.values(), key=len)
    assert len(rows) >= 8
    folder = tmp_path_factory.mktemp("equal_length")
    write_jsonl(folder / "train.jsonl", rows[:4])
    write_jsonl(folder / "valid.jsonl", rows[4:8])
    return folder


@pytest.fixture(scope="module")
def train_runs(tiny_model, equal_length_data, tmp_path_factory):
    """Each method trained with SGD (an update proportional to the gradient, so a wrongly
    scaled accumulated gradient shows), validating before the first and the last update:
    on batches of 4, and on 2 accumulated batches of 2 (one interpreter for all:
    ``lora_runs``). (method, accumulate) -> its adapter folder."""
    runs, outs = [], {}
    for method in METHODS:
        for batch_size, accumulate in ((4, 1), (2, 2)):
            out = outs[method, accumulate] = tmp_path_factory.mktemp(method)
            runs.append(
                (
                    ["--model", tiny_model, "--data", equal_length_data,
                     "--adapter-path", out, "--train", *METHODS[method],
                     "--batch-size", batch_size, "--grad-accumulation-steps",
                     accumulate, "--iters", UPDATES * accumulate,
                     "--steps-per-report", accumulate, "--steps-per-eval", "100",
                     "--val-batches", "-1", "--num-layers", "2", "--optimizer", "sgd",
                     "--learning-rate", "0.2", "--seed", "0"],
                    out,
                )
            )  # fmt: skip
    for proc in lora_runs(runs):
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return outs


@pytest.mark.numerics
@pytest.mark.parametrize("method", list(METHODS))
def test_grad_accumulation_equals_one_batch_of_k_times_b(train_runs, method):
    whole, accumulated = train_runs[method, 1], train_runs[method, 2]
    a, b = read_metrics(whole), read_metrics(accumulated)
    # validation before the first and before the last update, a training report per update
    assert [(m["split"], m["iteration"]) for m in a] == [
        ("val", 0),
        ("train", 1),
        ("train", 2),
        ("val", 2),
        ("train", 3),
    ]
    assert [(m["split"], m["iteration"]) for m in b] == [
        ("val", 0),
        ("train", 2),
        ("train", 4),
        ("val", 5),
        ("train", 6),
    ]
    for x, y in zip(a, b):  # the same numbers, every metric (equal-length pairs)
        for name, value in numbers(x).items():
            if x["split"] == "val" and name == "num_tokens" and x["iteration"]:
                # the tokens trained on before that validation: 5 micro-batches of 2 pairs
                # there, 2 batches of 4 here (mlx-lm validates before the next batch)
                value *= y["iteration"] / (2 * x["iteration"])
            assert y[name] == pytest.approx(value, rel=1e-5, abs=1e-5), (x, name)
    assert a[-1]["loss"] != a[1]["loss"]  # training moved
    weights = assert_adapters_close(whole, accumulated)
    assert max(float(mx.abs(v).max()) for v in weights.values()) > 1e-2


# ---- quantized, bf16 and fp16 bases ----


@pytest.fixture(scope="module")
def base_models(tiny_model, tmp_path_factory):
    """A 4-bit model converted by mlx_lm's own converter from the local tiny model (offline:
    run_cli sets HF_HUB_OFFLINE), and bf16 / fp16 builds of the same architecture."""
    from mlx_lm_pref.demo.tiny import build_model

    root = tmp_path_factory.mktemp("bases")
    run_cli(
        "convert",
        "--hf-path",
        tiny_model,
        "--mlx-path",
        root / "q4",
        "-q",
        module="mlx_lm",
    )
    models = {"q4": root / "q4"}
    for name, dtype in (("bf16", mx.bfloat16), ("fp16", mx.float16)):
        models[name] = build_model(root / name, corpus(), vocab_size=300, dtype=dtype)
    return models


def unpaired_data(folder):
    """``write_data``'s pairs as KTO rows, the labels alternating (each batch holds both)."""
    for path in folder.glob("*.jsonl"):
        pairs = [json.loads(line) for line in path.read_text().splitlines()]
        rows = [
            {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for k, p in enumerate(pairs)
            for side in (("chosen", "rejected") if k % 2 else ("rejected", "chosen"))
        ]
        write_jsonl(path, rows)
    return folder


LOW_PRECISION = [(b, m) for b in ("q4", "bf16", "fp16") for m in ("dpo", "orpo", "kto")]


@pytest.fixture(scope="module")
def low_precision_runs(base_models, tmp_path_factory):
    """Each (base, loss_type) of LOW_PRECISION trained 12 steps (one interpreter for all:
    ``lora_runs``): (base, loss_type) -> its adapter folder."""
    runs, outs = [], []
    for base, loss_type in LOW_PRECISION:
        folder = tmp_path_factory.mktemp(f"{base}-{loss_type}")
        data = write_data(folder / "data", n_train=48, n_valid=16)
        if loss_type == "kto":
            unpaired_data(data)
        outs.append(folder / "adapters")
        runs.append(
            (
                ["--model", base_models[base], "--data", data, "--adapter-path",
                 outs[-1], "--train", "--loss-type", loss_type, "--iters", "12",
                 "--batch-size", "4", "--num-layers", "2", "--learning-rate", "2e-3",
                 "--steps-per-report", "1", "--steps-per-eval", "100",
                 "--val-batches", "-1", "--seed", "0"],
                folder,
            )
        )  # fmt: skip
    for proc in lora_runs(runs):
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return dict(zip(LOW_PRECISION, outs))


@pytest.mark.parametrize("base,loss_type", LOW_PRECISION)
def test_low_precision_bases_train(base_models, low_precision_runs, base, loss_type):
    model = base_models[base]
    if base == "q4":
        config = json.loads((model / "config.json").read_text())
        assert config["quantization"]["bits"] == 4
        weights = mx.load(str(model / "model.safetensors"))
        assert any(k.endswith(".scales") for k in weights)  # really quantized
    out = low_precision_runs[base, loss_type]
    metrics = read_metrics(out)
    for m in metrics:
        for name, value in numbers(m).items():
            assert math.isfinite(value), (base, m["split"], m["iteration"], name)
    val = [m for m in metrics if m["split"] == "val"]
    train = [m for m in metrics if m["split"] == "train"]
    assert [m["iteration"] for m in val] == [0, 11] and len(train) == 12
    assert val[-1]["loss"] < val[0]["loss"] - 0.05
    # the last 4 steps against the first one (the initial weights)
    assert sum(m["loss"] for m in train[-4:]) / 4 < train[0]["loss"] - 0.05
    if loss_type == "kto":
        assert val[-1]["rewards/margins"] > val[0]["rewards/margins"]
        assert abs(val[0]["loss"] - 0.5) < 1e-6 and val[0]["kl"] == 0.0
    else:
        assert val[-1]["rewards/accuracies"] > val[0]["rewards/accuracies"]
    if loss_type == "dpo":  # policy == reference at the start, in any precision
        assert abs(val[0]["loss"] - math.log(2)) < 1e-6
    for value in mx.load(str(out / "adapters.safetensors")).values():
        assert bool(mx.all(mx.isfinite(value)))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_losses_and_logps_are_float32_on_low_precision_models(dtype):
    """The model's logits stay in its dtype; log-probs, losses and metrics are float32
    (logps.token_logps casts the logits before the log-softmax)."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlx_lm_pref.batching import PreferenceBatch
    from mlx_lm_pref.config import PreferenceArgs
    from mlx_lm_pref.logps import token_logps
    from mlx_lm_pref.metrics import pack_metrics
    from mlx_lm_pref.objective import PreferenceLoss

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**TINY_LLAMA))
    model.set_dtype(dtype)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "dropout": 0.0, "scale": 2.0})
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(3, 50, (4, 12)).astype(np.int32))
    spans = mx.array([[5, 12], [5, 10], [6, 12], [6, 11]], dtype=mx.int32)

    logits = model(tokens[:, :-1])
    assert logits.dtype == dtype
    logps = token_logps(logits, tokens[:, 1:])
    assert logps.dtype == mx.float32
    exact = token_logps(logits.astype(mx.float32), tokens[:, 1:])
    assert bool(mx.array_equal(logps, exact))
    assert bool(mx.all(logps <= 0))
    assert {v.dtype for _, v in tree_flatten(model.parameters())} >= {dtype}

    for loss_type in ("dpo", "orpo", "simpo"):
        loss = PreferenceLoss(PreferenceArgs(loss_type=loss_type))
        value, _, metrics = loss.metrics(model, PreferenceBatch(tokens, spans))
        packed = pack_metrics(loss.metric_names, metrics)
        assert value.dtype == mx.float32, loss_type
        assert packed.dtype == mx.float32, loss_type
        assert bool(mx.all(mx.isfinite(packed))), loss_type


# ---- ORPO at log p = 0 and very negative log p ----


def orpo_value_and_grads(chosen, rejected, dtype):
    """The ORPO odds-ratio loss and its gradient for mean log-probs given in ``dtype`` (as a
    bf16 model would produce them) and cast to float32, as the objective computes them.
    """
    c = mx.array([chosen], dtype=dtype).astype(mx.float32)
    r = mx.array([rejected], dtype=dtype).astype(mx.float32)
    f = lambda c, r: orpo_odds_ratio(c, r, 0.1)[0].sum()  # noqa: E731
    value, (gc, gr) = mx.value_and_grad(f, argnums=(0, 1))(c, r)
    return value.item(), gc.item(), gr.item()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("chosen", [-1e-9, -1e4, -0.7])
@pytest.mark.parametrize("rejected", [-1e-9, -1e4, -0.7])
def test_orpo_is_finite_near_log_p_zero_and_far_below(chosen, rejected, dtype):
    value, gc, gr = orpo_value_and_grads(chosen, rejected, dtype)
    assert all(map(math.isfinite, (value, gc, gr))), (value, gc, gr)
    assert value >= 0 and gc <= 0 <= gr  # more chosen / less rejected never costs more
    assert math.isfinite(log1mexp(mx.array(chosen, dtype=dtype)).item())


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("other", [0.0, -1e-9, -1e4])
@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_orpo_at_exactly_log_p_zero(side, other, dtype):
    pair = (0.0, other) if side == "chosen" else (other, 0.0)
    value, gc, gr = orpo_value_and_grads(*pair, dtype)
    assert all(map(math.isfinite, (value, gc, gr))), (value, gc, gr)


# ---- the supported mlx-lm range ----


def lower_bound():
    """The oldest mlx-lm version the package declares support for."""
    from mlx_lm_pref.compat import supported_range

    spec = supported_range().specifier
    (lowest,) = [s.version for s in spec if s.operator in (">=", "==", "~=")]
    assert spec.contains(lowest)
    return lowest


LIFECYCLE = """
import importlib, importlib.metadata, sys
import mlx_lm.lora, mlx_lm.tuner.trainer as trainer
originals = {n: getattr(trainer, n) for n in ("default_loss", "iterate_batches", "train", "evaluate")}
import mlx_lm_pref
from mlx_lm_pref.patches import applied
count = len(applied())
assert count >= 15, sorted(applied())
assert all(getattr(trainer, n) is not f for n, f in originals.items())
mlx_lm_pref.unpatch()
assert all(getattr(trainer, n) is f for n, f in originals.items())
assert "loss_type" not in mlx_lm.lora.CONFIG_DEFAULTS
assert not applied() and mlx_lm_pref.patch() is True and len(applied()) == count
print("mlx-lm", importlib.metadata.version("mlx-lm"), mlx_lm.__file__)
"""


@pytest.fixture(scope="module")
def oldest_mlx_lm(mlx_lm_release):
    """PYTHONPATH entries putting the oldest supported mlx-lm in front of the installed one
    (when it differs), and its version."""
    from mlx_lm_pref.compat import NEEDS_OLD_TRANSFORMERS

    oldest, installed = lower_bound(), importlib.metadata.version("mlx-lm")
    if oldest == installed:
        return [], oldest
    transformers = importlib.metadata.version("transformers")
    if Version(oldest) < NEEDS_OLD_TRANSFORMERS and Version(transformers).major >= 5:
        pytest.skip(
            f"mlx-lm {oldest} needs transformers < 5 (here {transformers}): .ci/run's "
            "second venv runs this test on it"
        )
    return [str(mlx_lm_release(oldest))], oldest


@pytest.mark.smoke
def test_oldest_supported_mlx_lm(oldest_mlx_lm, tiny_model, tmp_path, monkeypatch):
    """Patch lifecycle and one short DPO run on the lower end of the supported range (the
    installed newest release is what the rest of the suite runs on)."""
    paths, version = oldest_mlx_lm
    if paths:
        monkeypatch.setenv(
            "PYTHONPATH", os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")])
        )
    proc = subprocess.run(
        [sys.executable, "-c", LIFECYCLE],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLX_LM_PREF_NO_AUTOPATCH": "1"},  # unpatched until imported
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"mlx-lm {version} " in proc.stdout
    if paths:
        assert paths[0] in proc.stdout  # the --target copy, not the installed one
    data = write_data(tmp_path / "data", n_train=16, n_valid=8)
    lora(
        tiny_model,
        data,
        tmp_path / "adapters",
        "--train",
        "--loss-type",
        "dpo",
        "--iters",
        "2",
        "--batch-size",
        "4",
        "--num-layers",
        "2",
        "--steps-per-report",
        "1",
        "--val-batches",
        "-1",
        cwd=tmp_path,
    )
    metrics = read_metrics(tmp_path / "adapters")
    assert [(m["split"], m["iteration"]) for m in metrics] == [
        ("val", 0),
        ("train", 1),
        ("val", 1),
        ("train", 2),
    ]
    assert abs(metrics[0]["loss"] - math.log(2)) < 1e-6
    # KTO on the same release: the pairs unpaired, the KL rows, a precomputed reference
    lora(
        tiny_model,
        unpaired_data(data),
        tmp_path / "kto",
        "--train",
        "--loss-type",
        "kto",
        "--reference",
        "precomputed",
        "--iters",
        "2",
        "--batch-size",
        "4",
        "--num-layers",
        "2",
        "--val-batches",
        "-1",
        cwd=tmp_path,
        env={"MLX_LM_PREF_CACHE": str(tmp_path / "cache")},
    )
    first = read_metrics(tmp_path / "kto")[0]
    assert abs(first["loss"] - 0.5) < 1e-6 and first["kl"] == 0.0
