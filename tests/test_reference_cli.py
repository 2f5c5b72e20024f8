"""DPO after SFT: resuming from an SFT adapter, the reference is that adapter (TRL's frozen
initial adapter), not the base model, unless asked otherwise."""

import math

from helpers import make_rows, read_metrics, run_cli, write_data, write_jsonl

COMMON = [
    "--batch-size",
    "4",
    "--num-layers",
    "2",
    "--learning-rate",
    "1e-3",
    "--seed",
    "0",
]


def test_resume_from_sft_adapter(tiny_model, tmp_path):
    sft = tmp_path / "sft"
    rows = [{"text": r["prompt"] + r["chosen"]} for r in make_rows(64, 9)]
    for split in ("train", "valid"):
        write_jsonl(sft / f"{split}.jsonl", rows)
    run_cli(
        "lora",
        "--model",
        tiny_model,
        "--train",
        "--data",
        sft,
        "--iters",
        "30",
        "--adapter-path",
        tmp_path / "sft_adapter",
        *COMMON,
    )
    data = write_data(tmp_path / "prefs")
    resume = [
        "--resume-adapter-file",
        tmp_path / "sft_adapter" / "adapters.safetensors",
    ]

    def first_val(*extra):
        out = tmp_path / ("dpo" + "_".join(map(str, extra)))
        proc = run_cli(
            "lora",
            "--model",
            tiny_model,
            "--train",
            "--data",
            data,
            "--loss-type",
            "dpo",
            "--iters",
            "2",
            "--steps-per-eval",
            "2",
            "--val-batches",
            "-1",
            "--adapter-path",
            out,
            *resume,
            *COMMON,
            *extra,
        )
        return proc.stdout, [m for m in read_metrics(out) if m["split"] == "val"][0]

    stdout, auto = first_val()
    assert "reference: initial_adapter" in stdout  # one line says which reference
    assert abs(auto["loss"] - math.log(2)) < 1e-6  # policy == reference at step 0
    assert auto["rewards/chosen"] == 0.0 and auto["rewards/rejected"] == 0.0

    stdout, base = first_val("--reference", "adapters_off")
    assert "reference: adapters_off" in stdout
    assert abs(base["loss"] - math.log(2)) > 1e-3  # the SFT adapter vs the base model
    assert base["rewards/chosen"] != 0.0

    _, free = first_val("--reference", "none")
    # reference log-probs are 0: rewards are beta x the policy's own log-probs
    assert abs(free["rewards/chosen"] - 0.1 * free["logps/chosen"]) < 1e-4
