"""The real command line, end to end, in subprocesses: training, validation and --test
through the patched mlx_lm.lora, adapters loaded back with mlx_lm.load, SFT untouched, and
errors raised before anything is written."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    lora,
    lora_runs,
    make_rows,
    read_metrics,
    run_cli,
    write_data,
    write_jsonl,
)

OFF = {
    "MLX_LM_PREF_NO_AUTOPATCH": "1"
}  # mlx-lm exactly as upstream: see test_startup.py

TRAIN = [
    "--train",
    "--iters",
    "40",
    "--batch-size",
    "4",
    "--num-layers",
    "2",
    "--learning-rate",
    "1e-3",
    "--steps-per-eval",
    "20",
    "--val-batches",
    "-1",
    "--seed",
    "0",
]


def first_and_last(metrics, split):
    rows = [m for m in metrics if m["split"] == split]
    return rows[0], rows[-1]


def check_learned(adapters, model, loss_type):
    metrics = read_metrics(adapters)
    first, last = first_and_last(metrics, "val")
    assert first["iteration"] == 0 and last["iteration"] == 39
    assert last["rewards/accuracies"] > first["rewards/accuracies"]
    assert last["loss"] < first["loss"]
    assert last["rewards/margins"] > first["rewards/margins"]
    if loss_type == "dpo":
        # a fresh adapter: policy == reference, every pair scores exactly ln 2
        assert abs(first["loss"] - math.log(2)) < 1e-6
        assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    else:
        assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(last)
    # the adapter mlx-lm wrote loads back into an ordinary mlx-lm model
    from mlx_lm import load

    loaded, _ = load(str(model), adapter_path=str(adapters))
    assert any(
        "lora_a" in k
        for k, _ in __import__("mlx.utils").utils.tree_flatten(loaded.parameters())
    )
    return metrics


@pytest.mark.smoke
@pytest.mark.parametrize("loss_type", ["dpo", "orpo"])
def test_standard_rows_train_validate_and_test(tiny_model, tmp_path, loss_type):
    data = write_data(tmp_path / "data")
    adapters = tmp_path / "adapters"
    proc = lora(
        tiny_model,
        data,
        adapters,
        "--loss-type",
        loss_type,
        "--test",
        "--steps-per-report",
        "1",
        *TRAIN,
    )
    metrics = check_learned(adapters, tiny_model, loss_type)
    train = [m for m in metrics if m["split"] == "train"]
    assert [m["iteration"] for m in train] == list(range(1, 41))
    if loss_type == "dpo":
        assert abs(train[0]["loss"] - math.log(2)) < 1e-6  # the very first step
    test = [m for m in metrics if m["split"] == "test"]
    assert len(test) == 1 and test[0]["iteration"] == 40
    assert set(test[0]) == set(train[0])  # --test reports the same metric names
    assert "rewards/accuracies" in proc.stdout and "Test loss" in proc.stdout


@pytest.mark.parametrize("loss_type", ["dpo", "orpo"])
def test_conversational_rows_from_a_yaml_config_with_the_console_script(
    tiny_model, tmp_path, loss_type
):
    data = write_data(tmp_path / "chat", conversational=True)
    adapters = tmp_path / "adapters"
    config = tmp_path / "config.yaml"
    beta = {"dpo": 0.2, "orpo": 1.0}[loss_type]
    config.write_text(
        f"model: {tiny_model}\ndata: {data}\nadapter_path: {adapters}\nloss_type: {loss_type}\nbeta: {beta}\n"
    )
    script = Path(sys.executable).parent / "mlx_lm_pref.lora"
    assert script.exists(), "console script not installed"
    subprocess.run(
        [str(script), "--config", config, *TRAIN],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    check_learned(adapters, tiny_model, loss_type)
    saved = json.loads((adapters / "adapter_config.json").read_text())
    assert saved["loss_type"] == loss_type and saved["beta"] == beta


def test_implicit_prompts_through_hf_dataset(tiny_model, tmp_path):
    """mlx-lm's `hf_dataset` config path (the local `json` builder, no hub) with rows that
    have no 'prompt': the shared prefix is the prompt."""
    write_jsonl(tmp_path / "pairs.jsonl", make_rows(80, 7, prompt=False))
    adapters = tmp_path / "adapters"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model: {tiny_model}\nadapter_path: {adapters}\nloss_type: dpo\n"
        f"hf_dataset:\n  path: json\n  train_split: 'train[:64]'\n  valid_split: 'train[64:]'\n"
        f"  config:\n    data_files: {tmp_path / 'pairs.jsonl'}\n"
    )
    run_cli("lora", "--config", config, *TRAIN)
    check_learned(adapters, tiny_model, "dpo")


def train_losses(out):
    """The train losses mlx-lm printed: its table's rows from 0.32, "Train loss x" before."""
    rows = [l.split()[1] for l in out.splitlines() if "▼" in l or "▲" in l]
    return rows or re.findall(r"Train loss ([0-9.]+)", out)


@pytest.mark.smoke
def test_sft_is_bit_identical_to_unpatched_mlx_lm(tiny_model, tmp_path):
    """SFT through ``mlx_lm_pref lora`` and through plain ``mlx_lm.lora`` (patched by the
    start-up hook) writes the bytes and prints the losses of an mlx-lm that provably has
    no patches (the off switch: the package is never imported)."""
    rows = [{"text": r["prompt"] + r["chosen"]} for r in make_rows(40, 5)]
    for split in ("train", "valid"):
        write_jsonl(tmp_path / "sft" / f"{split}.jsonl", rows)
    args = [
        "--model",
        tiny_model,
        "--data",
        tmp_path / "sft",
        "--steps-per-report",
        "2",
        *TRAIN,
    ]
    probe = "import sys, mlx_lm.lora as l; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlx_lm_pref'), 'loss_type' in l.CONFIG_DEFAULTS)"
    for env, expected in ((OFF, ["[]", "False"]), ({}, ["['mlx_lm_pref',", "True"])):
        proc = subprocess.run(
            [sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True, text=True
        )  # fmt: skip
        assert (
            proc.stdout.split()[:1] + proc.stdout.split()[-1:] == expected
        ), proc.stderr
    runs = {
        "up": run_cli("lora", *args, "--adapter-path", tmp_path / "up", module="mlx_lm", env=OFF),
        "ours": run_cli("lora", *args, "--adapter-path", tmp_path / "ours"),
        "plain": run_cli("lora", *args, "--adapter-path", tmp_path / "plain", module="mlx_lm"),
    }  # fmt: skip
    assert len(train_losses(runs["up"].stdout)) == 20
    for name in ("ours", "plain"):
        for file in ("adapters.safetensors", "adapter_config.json"):
            assert (tmp_path / "up" / file).read_bytes() != b""
            assert (tmp_path / "up" / file).read_bytes() == (
                tmp_path / name / file
            ).read_bytes().replace(
                str(tmp_path / name).encode(), str(tmp_path / "up").encode()
            ), (
                name,
                file,
            )
        assert train_losses(runs["up"].stdout) == train_losses(runs[name].stdout), name
        assert not (tmp_path / name / "metrics.jsonl").exists()


def test_bad_row_stops_before_anything_is_written(tiny_model, tmp_path):
    data = write_data(tmp_path / "data")
    lines = (data / "valid.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"prompt": "Is it?", "chosen": "Yes.", "rejeced": "No."})
    (data / "valid.jsonl").write_text("\n".join(lines) + "\n")
    proc = lora(
        tiny_model,
        data,
        tmp_path / "out",
        "--loss-type",
        "dpo",
        *TRAIN,
        check=False,
    )
    assert proc.returncode != 0
    assert (
        f"{data / 'valid.jsonl'}:2: field 'rejeced' is not a preference field; did you mean 'rejected'?"
        in proc.stderr
    )
    assert not (tmp_path / "out").exists()


UNSUPPORTED = [
    (
        "loss_type: dpoo\n",
        "mlx_lm_pref: error: Unknown loss_type 'dpoo'. Valid values: sft, dpo, orpo, cpo, simpo",
    ),
    (
        "loss_type: dpo\nreference: adapters_off\nfine_tune_type: full\n",
        "full fine-tuning has none",
    ),
    (
        "loss_type: ipo\nreference: initial_adapter\nfine_tune_type: full\n",
        "full fine-tuning has none",
    ),
    ("loss_type: dpo\nbeta: 0\n", "beta must be > 0"),
    ("loss_type: aot\nbatch_size: 1\n", "Use --batch-size 2 or more per rank"),
    ("loss_type: exo_pair\n", "exo_pair needs label_smoothing > 0"),
]


@pytest.fixture(scope="module")
def unsupported_runs(tiny_model, tmp_path_factory):
    """Each of UNSUPPORTED's configs run (in one interpreter: ``lora_runs``), with its
    folder."""
    runs = []
    for k, (extra, _) in enumerate(UNSUPPORTED):
        folder = tmp_path_factory.mktemp(f"unsupported{k}")
        config = folder / "c.yaml"
        config.write_text(
            f"model: {tiny_model}\ndata: {folder}\nadapter_path: {folder / 'out'}\n{extra}"
        )
        runs.append((["--config", config, "--train"], folder))
    return list(zip(lora_runs(runs), [folder for _, folder in runs]))


@pytest.mark.parametrize(
    "case",
    range(len(UNSUPPORTED)),
    ids=[extra.strip().replace("\n", ", ") for extra, _ in UNSUPPORTED],
)
def test_unsupported_settings_are_refused_before_loading(unsupported_runs, case):
    (proc, folder), message = unsupported_runs[case], UNSUPPORTED[case][1]
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr  # a message, not a stack
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Loading pretrained model" not in proc.stdout
    assert not (folder / "out").exists()


def test_num_layers_beyond_the_model_is_one_line_before_loading(tiny_model, tmp_path):
    """mlx-lm's default of 16 layers on a 2-layer model: upstream's traceback after the
    load, here one line naming the fix."""
    data = write_data(tmp_path / "data", n_train=8, n_valid=4)
    argv = [
        "lora",
        "--model",
        tiny_model,
        "--data",
        data,
        "--train",
        "--loss-type",
        "dpo",
    ]
    proc = run_cli(*argv, "--adapter-path", tmp_path / "out", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"mlx_lm_pref: error: --num-layers 16 (mlx-lm's default is 16) but {tiny_model} "
        "has 2 layers: pass --num-layers -1 to train all of them, or at most 2."
    )
    assert "Loading pretrained model" not in proc.stdout
    assert not (tmp_path / "out").exists()


def test_sft_data_with_dpo_and_preference_data_with_sft(tiny_model, tmp_path):
    write_jsonl(tmp_path / "sft" / "train.jsonl", [{"text": "hello"}] * 8)
    proc = run_cli(
        "lora",
        "--model",
        tiny_model,
        "--data",
        tmp_path / "sft",
        "--loss-type",
        "dpo",
        "--adapter-path",
        tmp_path / "o",
        *TRAIN,
        check=False,
    )
    assert (
        proc.returncode != 0
        and "train.jsonl:1: field 'chosen' is missing" in proc.stderr
    )
    data = write_data(tmp_path / "pref")
    proc = lora(
        tiny_model,
        data,
        tmp_path / "o",
        *TRAIN,
        check=False,
    )
    assert (
        proc.returncode != 0
        and "train on them with --loss-type dpo or orpo" in proc.stderr
    )


def parse_metrics(text):
    """``name value  name value`` -> {name: float}."""
    words = text.split()
    return {k: float(v.replace(",", "")) for k, v in zip(words[::2], words[1::2])}


@pytest.mark.parametrize("loss_type,shown", [("dpo", "compact"), ("orpo", "all")])
def test_reports_are_short_plain_and_end_with_a_summary(
    tiny_model, tmp_path, loss_type, shown
):
    """Piped output: no escape codes; the report lines hold the headline metrics (all of
    them with --report-metrics all) within 120 columns; validation counts the tokens of
    every step before it (as TRL); the summary block names the adapter and repeats the
    last record of each split in metrics.jsonl."""
    data = write_data(tmp_path / "data")
    adapters = tmp_path / "adapters"
    args = [
        *TRAIN,
        "--iters",
        "20",
        "--steps-per-report",
        "10",
        "--steps-per-eval",
        "15",
    ]
    proc = lora(tiny_model, data, adapters, "--loss-type", loss_type, "--test",
                "--report-metrics", shown, *args)  # fmt: skip
    assert "\x1b" not in proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    reports = [
        l for l in lines if l.startswith(("        train ", "        val ", "Test "))
    ]
    assert len(reports) == 2 + 3 + 1  # train at 10, 20; val at 0, 14, 19; test
    # The time left ends the second training report (the pace since the first).
    train = [l for l in reports if l.startswith("        train ")]
    assert "ETA" not in train[0] and "ETA" not in train[1]  # 20 of 20: none left
    for line in reports:
        line = line.split("  · ETA ")[0]
        assert len(line) <= 120 or shown == "all", line
        assert ("logps/chosen" in line) == (shown == "all"), line
        assert "rewards/margins" in line and ("nll_loss" in line) == (
            loss_type == "orpo"
        )
    records = read_metrics(adapters)
    if loss_type == "dpo":  # TRL's ORPO has no num_tokens
        tokens = {(m["split"], m["iteration"]): m["num_tokens"] for m in records}
        assert tokens[("val", 0)] == 0
        assert tokens[("train", 10)] < tokens[("val", 14)] < tokens[("train", 20)]

    summary = lines[lines.index("[mlx_lm_pref] run summary") :]
    assert summary[1].split()[1] == str(adapters / "adapters.safetensors")
    assert (adapters / "adapters.safetensors").exists()
    assert summary[3].split()[1:3] == ["20", "iterations,"]
    assert int(summary[3].split()[3].replace(",", "")) > 0  # tokens (ORPO too)
    last = {m["split"]: m for m in records}
    for split, iteration in (("train", 20), ("val", 19), ("test", 20)):
        (row,) = [l for l in summary if l.split()[0] == split]
        assert row.split()[1] == f"@{iteration}" == f"@{last[split]['iteration']}"
        printed = parse_metrics(" ".join(row.split()[2:]))
        assert len(printed) >= 3
        for name, value in printed.items():
            assert value == float(f"{last[split][name]:.4g}"), (split, name)


def test_the_commands_list_every_method_and_close_help_with_examples():
    proc = run_cli(check=False)
    assert proc.returncode == 2
    for name in (
        "dpo",
        "orpo",
        "cpo",
        "simpo",
        "kto",
        "grpo",
        "rloo",
        "evaluate",
        "demo",
    ):
        assert name in proc.stderr, name
    help_text = run_cli("lora", "--help").stdout
    examples = help_text[help_text.index("starting points that worked") :]
    for flags in ("--loss-type dpo --rpo-alpha 1", "--loss-type orpo", "--loss-type kto",
                  "--loss-type grpo", "--log-completions", "--resume"):  # fmt: skip
        assert flags in examples, flags


def test_training_reports_end_with_the_time_left():
    from mlx_lm_pref.metrics import Eta

    times = iter([100.0, 130.0, 160.0, 1000.0, 2000.0])
    eta = Eta(100, clock=lambda: next(times))
    assert eta(10) == ""  # the first report: its pace includes compiling the step
    assert eta(20) == "  · ETA 4m00s"  # 30 s per 10 iterations, 80 left
    assert eta(95) == "  · ETA 4s"  # 60 s for 85 iterations, 5 left: 3.5 s
    assert eta(100) == ""  # done
