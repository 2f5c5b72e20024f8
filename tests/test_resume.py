"""Resume that resumes (TRL's ``resume_from_checkpoint``), through the real ``mlx_lm.lora``.

A run of 2N iterations and a run of N iterations continued with ``--resume`` to 2N end with
the same adapter (within 1e-6 of each tensor's largest entry: the same computation, replayed)
and the same ``metrics.jsonl``: weights, optimizer moments, the schedule's position, the data
order, dropout's and sampling's random states, the guard's pending metrics and the token
counts all come back. Then each way a run can stop (Ctrl-C, SIGTERM, a kill inside a save, a
non-finite step) and each resume that would be another run (refused in one line, exit 2).
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import (
    free_port_pair,
    lora,
    make_rows,
    read_metrics,
    run_cli_many,
    write_data,
    write_jsonl,
)

EXACT = 1e-6  # of a tensor's largest entry

# Adam with a warm-up then cosine decay, LoRA dropout: every piece of state matters.
SCHEDULE = """
lr_schedule:
  name: cosine_decay
  warmup: 2
  warmup_init: 0.0
  arguments: [2.0e-3, 16]
lora_parameters:
  rank: 4
  dropout: 0.1
  scale: 20.0
"""

REWARDS = """
def tokens(completion_ids, **kwargs):
    return [float(sum(ids) % 7) for ids in completion_ids]
"""

# name -> (options, N): each trains 2N iterations, or N then N more resumed.
CASES = {
    "dpo-sharing-accumulation": (
        ["--loss-type", "dpo", "--prompt-sharing", "true"]
        + ["--grad-accumulation-steps", "2"],
        4,
    ),
    "kto-adamw-accumulation": (
        ["--loss-type", "kto", "--optimizer", "adamw", "--steps-per-report", "2"]
        + ["--grad-accumulation-steps", "2"],
        4,
    ),
    "grpo-beta-iterations": (
        ["--loss-type", "dapo", "--beta", "0.04", "--num-generations", "2"]
        + ["--max-completion-length", "6", "--steps-per-generation", "2"]
        + ["--num-iterations", "2", "--log-completions"],
        4,
    ),
    "rloo-muon": (
        ["--loss-type", "rloo", "--num-generations", "2", "--optimizer", "muon"]
        + ["--max-completion-length", "6"],
        2,
    ),
    "orpo-full-adafactor": (
        ["--loss-type", "orpo", "--fine-tune-type", "full", "--optimizer", "adafactor"],
        2,
    ),
    "dpo-precomputed-sgd": (
        ["--loss-type", "dpo", "--reference", "precomputed", "--optimizer", "sgd"],
        2,
    ),
    # SFT asks for checkpoints; without it a run stays upstream's (test_cli)
    "sft-checkpoints": (["--no-save-only-model"], 3),
}


def write_case(root: Path, name: str) -> list:
    """The case's data, reward file and YAML under ``root``; the options every run shares."""
    options, _ = CASES[name]
    data = root / "data"
    if "--num-generations" in options:
        rows = [{"prompt": r["prompt"]} for r in make_rows(16, 5)]
        for split in ("train", "valid", "test"):
            write_jsonl(data / f"{split}.jsonl", rows)
        (root / "rewards.py").write_text(REWARDS)
        options = options + ["--reward-funcs", f"{root / 'rewards.py'}:tokens"]
    elif name.startswith("sft"):
        rows = [
            {"prompt": r["prompt"], "completion": r["chosen"]} for r in make_rows(24, 5)
        ]
        for split in ("train", "valid", "test"):
            write_jsonl(data / f"{split}.jsonl", rows)
    else:
        write_data(data, n_train=24, n_valid=4, n_test=4)
    (root / "config.yaml").write_text(SCHEDULE)
    return [
        "--model", None, "--data", data, "--train", "-c", root / "config.yaml",
        "--batch-size", "2", "--num-layers", "2", "--steps-per-report", "1",
        "--steps-per-eval", "2", "--val-batches", "1", "--save-every", "2",
        "--seed", "3", *options,
    ]  # fmt: skip


def load(path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def assert_same_adapters(a, b, label=""):
    a, b = load(a), load(b)
    assert a.keys() == b.keys() and a
    worst = max(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-12) for k in a)
    assert worst <= EXACT, (label, worst)


def after(records, n) -> list:
    """The records of the steps after iteration ``n`` (a validation at ``n`` runs after
    step ``n``)."""
    return [
        m
        for m in records
        if m["iteration"] > n or (m["iteration"] == n and m["split"] == "val")
    ]


def changed(path_a, path_b) -> bool:
    """Whether training moved the weights at all (the equality is not trivial)."""
    a, b = load(path_a), load(path_b)
    return any(np.abs(a[k] - b[k]).max() > 0 for k in a)


@pytest.fixture(scope="module")
def resumed(tiny_model, tmp_path_factory):
    """Every case's three runs, in one interpreter: 2N at once, N, then --resume to 2N."""
    jobs, roots = [], {}
    cache = {"MLX_LM_PREF_CACHE": str(tmp_path_factory.mktemp("cache"))}
    for name, (_, n) in CASES.items():
        root = roots[name] = tmp_path_factory.mktemp(name)
        common = [tiny_model if a is None else a for a in write_case(root, name)]
        once = [*common, "--adapter-path", root / "once", "--iters", 2 * n]
        half = [*common, "--adapter-path", root / "half", "--iters", n]
        jobs += [(once, root, cache), (half, root, cache), (half[:-1] + [2 * n, "--resume"], root, cache)]  # fmt: skip
    results = run_cli_many(jobs, timeout=1500)
    return {
        name: (roots[name], results[3 * k : 3 * k + 3]) for k, name in enumerate(CASES)
    }


@pytest.mark.parametrize("name", list(CASES))
def test_resumed_run_equals_the_uninterrupted_one(resumed, name):
    root, results = resumed[name]
    for code, out, err in results:
        assert code == 0, out[-3000:] + err[-3000:]
    n = CASES[name][1]
    assert f"resuming {root / 'half' / 'checkpoints' / f'{n:07d}'}" in results[2][1]
    assert "iters " + str(2 * n) + f" (was {n})" in results[2][1]
    once, half = root / "once", root / "half"
    assert_same_adapters(once / "adapters.safetensors", half / "adapters.safetensors")
    at_n = half / "checkpoints" / f"{n:07d}" / "adapters.safetensors"
    assert changed(once / "adapters.safetensors", at_n)
    # the records after the checkpoint, written by the resumed run (a run that ended at
    # N validated there; the uninterrupted one did not where N is not on its cadence)
    if name.startswith("sft"):  # mlx-lm's own report lines
        lines = lambda out: [  # noqa: E731  (iteration, loss) and (iteration, val, loss)
            l.split()[:3] if " val " in l else l.split()[:2]
            for l in re.sub(r"\x1b\[[0-9;]*m", "", out).splitlines()
            if l.strip()[:1].isdigit()
        ]
        tail = lines(results[2][1])
        assert tail and tail == lines(results[0][1])[-len(tail) :]
    else:
        assert after(read_metrics(half), n) == after(read_metrics(once), n)
        assert after(read_metrics(once), n)
    # mlx-lm's own checkpoints continue too, and ours hold each save
    names = sorted(p.name for p in half.glob("*_adapters.safetensors"))
    assert names == sorted(p.name for p in once.glob("*_adapters.safetensors"))
    # every save that ends an optimizer step, and the end of the first run
    unit = 4 if "--steps-per-generation" in CASES[name][0] else 1
    saves = {i for i in range(2, 2 * n + 1, 2) if i % unit == 0} | {n}
    assert [p.name for p in sorted((half / "checkpoints").iterdir())] == [
        f"{i:07d}" for i in sorted(saves)
    ]
    if "--log-completions" in CASES[name][0]:
        lines = lambda p: (p / "completions.jsonl").read_text()  # noqa: E731
        assert lines(half) == lines(once) and lines(once)


def test_checkpoint_holds_the_run(resumed):
    """What a checkpoint holds, read back as a user would."""
    root, _ = resumed["dpo-sharing-accumulation"]
    folder = root / "half" / "checkpoints" / "0000004"
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["iteration"] == 4 and state["batches"] == 4
    assert state["reference"] == {"strategy": "adapters_off"}
    assert state["options"]["loss_type"] == ["sigmoid"]
    assert state["args"]["grad_accumulation_steps"] == 2
    optimizer = mx.load(str(folder / "optimizer.safetensors"))
    assert optimizer["step"].item() == 2  # two optimizer steps of 2 iterations
    assert any(k.endswith(".m") for k in optimizer)  # Adam's moments
    adapters = load(folder / "adapters.safetensors")
    assert (
        adapters.keys() == load(root / "half" / "0000004_adapters.safetensors").keys()
    )
    random = mx.load(str(folder / "rank_state.safetensors"))
    assert random["mlx_key"].shape == (1, 2) and random["numpy"].shape == (1, 628)


# ---- interruptions ----


def interrupt(argv, cwd, sig, after_line, env=None):
    """Run ``mlx_lm_pref lora argv``, send ``sig`` once ``after_line`` is printed; returns
    (exit code, output)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm_pref", "lora", *map(str, argv)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        # A suite started in the background inherits an ignored SIGINT.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    out = []
    for line in proc.stdout:
        out.append(line)
        if after_line in line:
            proc.send_signal(sig)
            break
    out.append(proc.stdout.read())
    return proc.wait(timeout=300), "".join(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_resumed_equals_the_uninterrupted_one(
    tiny_model, tmp_path, sig
):
    """Ctrl-C (or SIGTERM) finishes the optimizer step, writes a checkpoint and exits 130
    saying how to continue; --resume then ends where the uninterrupted run ends."""
    write_data(tmp_path / "data", n_train=24, n_valid=4, n_test=4)
    (tmp_path / "config.yaml").write_text(SCHEDULE)
    common = ["--model", tiny_model, "--data", "data", "--train", "-c", "config.yaml"]
    common += ["--loss-type", "dpo", "--batch-size", "2", "--num-layers", "2"]
    # reports every 3 steps: a checkpoint after step 4 holds step 4's metrics, which the
    # resumed run's report at 6 averages with its own
    common += ["--steps-per-report", "3", "--steps-per-eval", "5", "--val-batches", "1"]
    common += ["--save-every", "1000", "--grad-accumulation-steps", "2"]
    common += ["--iters", "40"]
    lora(tiny_model, "data", "once", *common[4:], cwd=tmp_path)
    code, out = interrupt(
        [*common, "--adapter-path", "cut"], tmp_path, sig, "train loss"
    )
    assert code == 130, out[-3000:]
    assert "Traceback" not in out
    saved = sorted((tmp_path / "cut" / "checkpoints").iterdir())
    assert len(saved) == 1, out[-2000:]  # the one Ctrl-C wrote (save_every is 1000)
    at = int(saved[0].name)
    assert at % 2 == 0 and at < 40  # a whole optimizer step, mid-run
    pending = mx.load(str(saved[0] / "rank_state.safetensors")).get("pending")
    assert (pending is not None) == (at % 3 != 0), at
    assert f"checkpoints/{at:07d} holds the run at iteration {at}" in out
    assert "--resume" in out
    proc = lora(tiny_model, "data", "cut", *common[4:], "--resume", cwd=tmp_path)
    assert f"resuming cut/checkpoints/{at:07d}" in proc.stdout
    assert_same_adapters(
        tmp_path / "once" / "adapters.safetensors",
        tmp_path / "cut" / "adapters.safetensors",
    )
    assert read_metrics(tmp_path / "cut") == read_metrics(tmp_path / "once")


KILL_IN_SECOND_SAVE = """
import os, signal, sys
import mlx_lm_pref.checkpoint as checkpoint
commit, saves = checkpoint.commit, []
def killed_in_second_save(tmp, folder):
    saves.append(folder)
    if len(saves) == 2:  # written, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    commit(tmp, folder)
checkpoint.commit = killed_in_second_save
from mlx_lm_pref.cli import lora
sys.argv = ["mlx_lm_pref.lora", *sys.argv[1:]]
lora()
"""


def proc_pid(folders) -> str:
    """The killed process's id, as its temporary folder is named."""
    return next(f.rsplit("tmp", 1)[1] for f in folders if f.startswith("."))


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tiny_model, tmp_path):
    write_data(tmp_path / "data", n_train=24, n_valid=4, n_test=4)
    common = ["--model", tiny_model, "--data", "data", "--train", "--loss-type", "dpo"]
    common += ["--batch-size", "2", "--num-layers", "2", "--iters", "6"]
    common += ["--save-every", "2", "--steps-per-report", "2", "--val-batches", "1"]
    proc = subprocess.run(
        [sys.executable, "-c", KILL_IN_SECOND_SAVE, *map(str, common)]
        + ["--adapter-path", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    folders = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    # the first checkpoint whole; the second only as its temporary folder
    assert folders == [f".0000004.tmp{proc_pid(folders)}", "0000002"], folders
    assert (tmp_path / "out/checkpoints/0000002/trainer_state.json").is_file()
    proc = lora(tiny_model, "data", "out", *common[4:], "--resume", cwd=tmp_path)
    assert "resuming out/checkpoints/0000002" in proc.stdout
    lora(tiny_model, "data", "once", *common[4:], cwd=tmp_path)
    assert_same_adapters(
        tmp_path / "once" / "adapters.safetensors",
        tmp_path / "out" / "adapters.safetensors",
    )


# ---- what a resume refuses, and save_total_limit ----


def test_resume_refusals_are_one_line_before_the_model_loads(tiny_model, tmp_path):
    write_data(tmp_path / "data", n_train=24, n_valid=4, n_test=4)
    base = ["--model", tiny_model, "--data", "data", "--train", "--loss-type", "dpo"]
    base += ["--batch-size", "2", "--num-layers", "2", "--save-every", "2"]
    base += ["--steps-per-report", "2", "--val-batches", "1"]
    common = [*base, "--iters", "4"]
    lora(
        tiny_model, "data", "out", *common[4:], "--save-total-limit", "1", cwd=tmp_path
    )
    # save_total_limit 1: the newest checkpoint only
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["0000004"]
    more = [*base, "--iters", "8", "--adapter-path", "out"]
    sft = tmp_path / "sft"
    write_jsonl(sft / "train.jsonl", [{"prompt": "Hi", "completion": " there"}] * 4)
    write_jsonl(sft / "valid.jsonl", [{"prompt": "Hi", "completion": " there"}] * 4)
    changed_data = tmp_path / "data2"
    write_data(changed_data, n_train=24, n_valid=4, n_test=4)
    with open(changed_data / "train.jsonl", "a") as fid:
        fid.write(json.dumps(make_rows(1, 9)[0]) + "\n")
    cases = [
        (more + ["--resume", "--beta", "0.2"], "beta 0.2 (the checkpoint: null)"),
        (more + ["--resume", "--batch-size", "4"], "batch_size 4 (the checkpoint: 2)"),
        (
            [a if a != "data" else str(changed_data) for a in more] + ["--resume"],
            "the training data differ",
        ),
        (
            [*common, "--adapter-path", "out", "--resume"],
            "is at iteration 4 and iters is 4: nothing is left to train",
        ),
        ([*common, "--adapter-path", "none", "--resume"], "no checkpoint under none"),
        (
            more + ["--resume-from-checkpoint", "out/checkpoints/0000002"],
            "no such folder",
        ),
        (
            more + ["--resume", "--resume-adapter-file", "out/adapters.safetensors"],
            "give one of them",
        ),
        (more + ["--resume", "--save-only-model"], "remove save_only_model"),
        (
            [
                a if a != "data" else str(sft)
                for a in more
                if a not in ("--loss-type", "dpo")
            ]
            + ["--resume"],
            'loss_type "sft" (the checkpoint: "dpo")',
        ),
    ]
    results = run_cli_many([(argv, tmp_path, {}) for argv, _ in cases])
    for (argv, message), (code, out, err) in zip(cases, results):
        assert code == 2, (argv, out[-2000:], err[-2000:])
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (message, err)
        assert "Loading pretrained model" not in out, message


def test_continuing_a_dpo_adapter_keeps_its_reference(tiny_model, tmp_path):
    """--resume-adapter-file of a DPO checkpoint keeps that run's reference (the base model
    here) instead of re-anchoring on the checkpoint: its first validation loss is not log 2;
    an SFT adapter becomes the reference (its first validation loss is log 2)."""
    write_data(tmp_path / "data", n_train=24, n_valid=4, n_test=4)
    common = ["--train", "--batch-size", "2", "--num-layers", "2", "--iters", "4"]
    common += ["--save-every", "2", "--steps-per-report", "2", "--val-batches", "1"]
    common += ["--learning-rate", "1e-3"]
    lora(tiny_model, "data", "dpo", *common, "--loss-type", "dpo", cwd=tmp_path)
    proc = lora(
        tiny_model, "data", "more", *common, "--loss-type", "dpo",
        "--resume-adapter-file", "dpo/0000004_adapters.safetensors", cwd=tmp_path,
    )  # fmt: skip
    assert (
        "reference: adapters_off (dpo/0000004_adapters.safetensors was trained by a dpo "
        "run with that reference; continuing keeps it)" in proc.stdout
    )
    first = read_metrics(tmp_path / "more")[0]
    assert first["split"] == "val" and abs(first["loss"] - np.log(2)) > 1e-3
    config = json.loads((tmp_path / "more" / "adapter_config.json").read_text())
    assert config["reference"] == "adapters_off"


def test_continuing_dpo_after_sft_keeps_the_sft_adapter_as_reference(
    tiny_model, tmp_path
):
    """SFT, then DPO from its adapter (the reference: first validation loss log 2), then
    DPO continued from that run's checkpoint file: the reference stays the SFT adapter,
    read from its file (not the checkpoint: the loss is no longer log 2), and is recorded
    for the next continuation."""
    write_data(tmp_path / "data", n_train=24, n_valid=4, n_test=4)
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in make_rows(8, 5)]
    for split in ("train", "valid"):
        write_jsonl(tmp_path / "sft" / f"{split}.jsonl", rows)
    common = ["--train", "--batch-size", "2", "--num-layers", "2", "--iters", "4"]
    common += ["--save-every", "2", "--steps-per-report", "2", "--val-batches", "1"]
    common += ["--learning-rate", "1e-3"]
    lora(tiny_model, "sft", "s", *common, cwd=tmp_path)
    lora(
        tiny_model, "data", "d1", *common, "--loss-type", "dpo",
        "--resume-adapter-file", "s/adapters.safetensors", cwd=tmp_path,
    )  # fmt: skip
    assert read_metrics(tmp_path / "d1")[0]["loss"] == pytest.approx(np.log(2))
    proc = lora(
        tiny_model, "data", "d2", *common, "--loss-type", "dpo",
        "--resume-adapter-file", "d1/0000002_adapters.safetensors", cwd=tmp_path,
    )  # fmt: skip
    assert "reference: initial_adapter from s/adapters.safetensors" in proc.stdout
    assert abs(read_metrics(tmp_path / "d2")[0]["loss"] - np.log(2)) > 1e-3
    config = json.loads((tmp_path / "d2" / "adapter_config.json").read_text())
    assert config["reference"] == "initial_adapter"
    assert config["reference_adapter_file"] == "s/adapters.safetensors"


@pytest.mark.numerics
def test_two_ranks_resume_as_they_ran(tiny_model, tmp_path):
    """2 ranks: rank 0 writes, every rank restores its own random state and data place."""
    write_data(tmp_path / "data", n_train=24, n_valid=4, n_test=4)
    (tmp_path / "config.yaml").write_text(SCHEDULE)
    common = ["lora", "--model", tiny_model, "--data", "data", "--train"]
    common += ["-c", "config.yaml", "--loss-type", "dpo", "--batch-size", "4"]
    common += ["--num-layers", "2", "--steps-per-report", "1", "--steps-per-eval", "2"]
    common += ["--val-batches", "1", "--save-every", "2", "--seed", "1"]
    common += ["--grad-accumulation-steps", "2", "--prompt-sharing", "true"]
    launch = lambda *args: subprocess.run(  # noqa: E731
        [str(Path(sys.executable).parent / "mlx.launch"), "-n", "2", "--backend",
         "ring", "--starting-port", str(free_port_pair()), "--", sys.executable, "-m",
         "mlx_lm_pref", *map(str, args)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    for args in (
        [*common, "--adapter-path", "once", "--iters", "8"],
        [*common, "--adapter-path", "half", "--iters", "4"],
        [*common, "--adapter-path", "half", "--iters", "8", "--resume"],
    ):
        proc = launch(*args)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    random = mx.load(str(tmp_path / "half/checkpoints/0000004/rank_state.safetensors"))
    assert random["numpy"].shape == (2, 628)  # each rank's own
    assert_same_adapters(
        tmp_path / "once" / "adapters.safetensors",
        tmp_path / "half" / "adapters.safetensors",
    )
    assert read_metrics(tmp_path / "half") == read_metrics(tmp_path / "once")


def test_random_states_round_trip():
    from mlx_lm_pref.checkpoint import (
        mlx_key,
        pack_numpy_state,
        set_mlx_key,
        unpack_numpy_state,
    )

    np.random.seed(5)
    np.random.normal()  # a cached gaussian in the state
    state = np.random.get_state()
    a = np.random.rand(3)
    np.random.set_state(unpack_numpy_state(pack_numpy_state(state)))
    assert (np.random.rand(3) == a).all()

    mx.random.seed(11)
    mx.random.uniform(shape=(2,))
    key = mlx_key()
    b = mx.random.uniform(shape=(4,))
    set_mlx_key(key)
    assert mx.array_equal(mx.random.uniform(shape=(4,)), b).item()
