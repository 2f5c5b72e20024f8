"""Data-parallel training through mlx-lm's own distributed path: ``mlx.launch -n 2 --backend
ring`` on this machine (two ranks over 127.0.0.1) against one process with the same global
batch size.

With S ranks and ``--batch-size B`` each rank scores B/S pairs of the same global batch (a pair
never splits), mlx-lm averages the gradients (``average_gradients``) and the reporter
sums each metric's numerators and denominators over the ranks, as TRL gathers them. For a
loss that is a mean over pairs (DPO's sigmoid here) the mean of the per-rank means is the
global mean, so the updates equal the single-process ones; so does every metric, the
token-weighted ones (``logits/*``, ``entropy``, ``mean_token_accuracy``: token sums over
token counts, not means of per-rank means) included.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import (
    NOISE,
    assert_adapters_equal,
    free_port_pair,
    read_metrics,
    run_cli,
    write_data,
)

# Numbers compared at float32-noise tolerances: run with and without OpenBLAS (.ci/run).
pytestmark = pytest.mark.numerics

# Means over pairs, means over tokens, and counts: equal to the single-process values.
EXACT = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "num_tokens",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
]

ARGS = [
    "--train",
    "--loss-type",
    "dpo",
    "--iters",
    "4",
    "--batch-size",
    "4",
    "--num-layers",
    "2",
    # SGD: an update proportional to the gradient, so float32 noise in it stays noise (Adam's
    # first steps are lr * sign(g), which flips on noise in entries near 0)
    "--optimizer",
    "sgd",
    "--learning-rate",
    "0.2",
    "--steps-per-report",
    "1",
    "--steps-per-eval",
    "2",
    "--val-batches",
    "-1",
    "--seed",
    "0",
]


def launch(ranks, *args, timeout=300):
    """``mlx.launch -n <ranks> --backend ring -- python -m mlx_lm_pref ...`` on 127.0.0.1."""
    launcher = Path(sys.executable).parent / "mlx.launch"
    assert launcher.exists(), "mlx's mlx.launch console script is not installed"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [
            str(launcher),
            "-n",
            str(ranks),
            "--backend",
            "ring",
            "--starting-port",
            str(free_port_pair()),
            "--",
            sys.executable,
            "-m",
            "mlx_lm_pref",
            *map(str, args),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_two_ranks_equal_one_process_with_the_same_global_batch(tiny_model, tmp_path):
    # 17 validation pairs in batches of 4: the last global batch holds one pair, which only
    # rank 0 gets (rank 1 evaluates one batch fewer).
    data = write_data(tmp_path / "data", n_train=64, n_valid=17)
    with open(data / "train.jsonl", "a") as fid:  # one pair with nothing to learn
        fid.write(
            json.dumps({"prompt": "Is it? ", "chosen": "Yes.", "rejected": "Yes."})
        )
    common = ["lora", "--model", tiny_model, "--data", data, *ARGS]
    run_cli(*common, "--adapter-path", tmp_path / "single")
    proc = launch(2, *common, "--adapter-path", tmp_path / "ranks")
    # rank 0 alone writes and prints the preference lines
    assert proc.stdout.count("[mlx_lm_pref] dpo reference") == 1
    assert proc.stdout.count("1 of 65 pairs have chosen identical to rejected") == 1

    single, ranks = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ranks")
    assert [(m["split"], m["iteration"]) for m in ranks] == [
        (m["split"], m["iteration"]) for m in single
    ]
    assert [m["iteration"] for m in single if m["split"] == "val"] == [0, 1, 3]
    assert len([m for m in single if m["split"] == "train"]) == 4
    for a, b in zip(single, ranks):
        where = (a["split"], a["iteration"])
        for name in EXACT:
            assert b[name] == pytest.approx(a[name], **NOISE), (where, name)
    assert single[-1]["rewards/margins"] > 0.5  # training moved: not a trivial equality

    # the same updates: the saved adapters agree
    load = lambda out: {  # noqa: E731
        k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()
    }
    assert_adapters_equal(load(tmp_path / "ranks"), load(tmp_path / "single"))
