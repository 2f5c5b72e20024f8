"""Failing safe: non-finite values stop training before they reach the adapter file, saves
are atomic, and Ctrl-C ends cleanly saying what is on disk."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import mlx.core as mx
import pytest
from helpers import lora, write_data

TRAIN = [
    "--train",
    "--loss-type",
    "dpo",
    "--batch-size",
    "4",
    "--num-layers",
    "2",
    "--steps-per-report",
    "1",
    "--seed",
    "0",
]


def test_non_finite_update_stops_and_keeps_the_last_good_adapter(tiny_model, tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    # An absurd learning rate: step 1 moves the weights to ~1e30 (finite), step 2 overflows.
    proc = lora(
        tiny_model,
        data,
        out,
        "--learning-rate",
        "1e30",
        "--save-every",
        "1",
        "--iters",
        "10",
        *TRAIN,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "training stopped: iteration 2: " in proc.stderr
    assert "holds the weights of iteration 1, intact" in proc.stderr
    saved = (out / "adapters.safetensors").read_bytes()
    assert saved == (out / "0000001_adapters.safetensors").read_bytes()
    assert not (out / "0000002_adapters.safetensors").exists()
    # the last good checkpoint, named; none of the step that was not finite
    assert "checkpoints/0000001 holds the run at iteration 1" in proc.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["0000001"]
    weights = mx.load(str(out / "adapters.safetensors"))
    assert all(mx.all(mx.isfinite(v)).item() for v in weights.values())


def test_non_finite_loss_is_caught_between_saves(tiny_model, tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    proc = lora(
        tiny_model,
        data,
        out,
        "--learning-rate",
        "1e30",
        "--iters",
        "10",
        *TRAIN,
        check=False,
    )
    assert proc.returncode == 1
    assert "iteration 2: the loss or a metric is not finite" in proc.stderr
    assert "No adapter was saved by this run." in proc.stderr
    assert not (out / "adapters.safetensors").exists()


SAVER = """
import sys, mlx.core as mx
from mlx_lm_pref.safety import atomic_save_safetensors
target = sys.argv[1]
k = 0
while True:  # every save is whole: one value repeated 40M times (160 MB)
    k += 1
    atomic_save_safetensors(target, {"w": mx.full((40_000_000,), float(k))})
"""


def test_a_save_killed_mid_write_leaves_a_whole_file(tmp_path):
    target = tmp_path / "adapters.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SAVER), str(target)])
    try:
        deadline = time.time() + 120
        while not (target.exists() and list(tmp_path.glob("*.tmp*"))):
            assert time.time() < deadline and proc.poll() is None, "no save in progress"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)  # mid-write of the next save
        proc.wait()
    finally:
        proc.kill()
    assert list(tmp_path.glob("*.tmp*")), "the kill did not land during a write"
    w = mx.load(str(target))["w"]
    assert w.shape == (40_000_000,) and mx.all(w == w[0]).item() and w[0].item() >= 1


def test_ctrl_c_ends_cleanly_saying_what_was_saved(tiny_model, tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_lm_pref",
            "lora",
            "--model",
            str(tiny_model),
            "--data",
            str(data),
            "--adapter-path",
            str(out),
            "--iters",
            "100000",
            "--save-every",
            "3",
            "--learning-rate",
            "1e-4",
            *TRAIN,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        # A suite started in the background inherits an ignored SIGINT, and Python keeps
        # ignoring it: give the run a terminal's default, as a user's would have.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "0000003_adapters.safetensors" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 130, output[-2000:]
    assert "Traceback" not in output
    assert "[mlx_lm_pref] Interrupted after iteration" in output
    assert "adapters.safetensors holds the weights of iteration" in output
    assert mx.load(str(out / "adapters.safetensors"))  # whole and loadable


def test_skip_mode_drops_non_finite_updates_and_goes_on(tiny_model, tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    # After step 1 every step overflows: each of those updates must leave the weights alone.
    proc = lora(
        tiny_model,
        data,
        out,
        "--learning-rate",
        "1e30",
        "--save-every",
        "1",
        "--iters",
        "5",
        "--on-nonfinite",
        "skip",
        *TRAIN,
    )
    for it in (2, 3, 4):
        assert f"iteration {it}: non-finite gradient, update skipped" in proc.stdout
    first = (out / "0000001_adapters.safetensors").read_bytes()
    assert (out / "0000005_adapters.safetensors").read_bytes() == first
    assert (out / "adapters.safetensors").read_bytes() == first


def test_first_ctrl_c_waits_for_the_step_boundary_second_interrupts_at_once():
    """The first SIGINT only sets a flag (nothing mid-step can swallow it); the batch
    iterator raises at the next step; a second SIGINT raises where it lands."""
    from mlx_lm_pref.safety import RunGuard

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        guard = RunGuard(None, ("loss",), "adapters.safetensors")
        batches = guard.watch(iter(["b1", "b2"]))
        with guard.ctrl_c_between_steps():
            assert next(batches) == "b1"
            os.kill(os.getpid(), signal.SIGINT)  # mid-step: no exception here
            assert guard.interrupted
            with pytest.raises(KeyboardInterrupt):  # the second one
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)
            guard.settled = guard.iteration  # no model-less step to check
            with pytest.raises(KeyboardInterrupt):
                next(batches)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
