"""Samples while training (``log_completions``) in the methods that train on given
completions: greedy answers to the first few validation prompts at each validation, printed
under the report and written to ``completions.jsonl``, changing no number of the run. Every
run of the file goes through the real command, one after another in one interpreter."""

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import read_metrics, run_cli_many, write_data, write_jsonl

RUN = ["--train", "--iters", 4, "--batch-size", 4, "--steps-per-eval", 2]
RUN += ["--steps-per-report", 2, "--val-batches", 1, "--num-layers", -1, "--seed", 0]
SAMPLES = ["--log-completions", "--max-completion-length", 4]


def read_samples(folder):
    lines = (folder / "completions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def distinct_prompts(path, count):
    prompts = []
    for line in path.read_text().splitlines():
        prompt = json.loads(line)["prompt"]
        if prompt not in prompts:
            prompts.append(prompt)
    return prompts[:count]


def same_adapters(a, b):
    a = mx.load(str(a / "adapters.safetensors"))
    b = mx.load(str(b / "adapters.safetensors"))
    return a.keys() == b.keys() and all(
        np.array_equal(np.array(a[k]), np.array(b[k])) for k in a
    )


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """name -> (exit code, stdout, stderr); the data and outputs under ``root``."""
    root = tmp_path_factory.mktemp("samples")
    pairs = write_data(root / "data", conversational=True)
    # the first validation prompts repeat: the samples answer distinct ones
    rows = [json.loads(l) for l in (pairs / "valid.jsonl").read_text().splitlines()]
    write_jsonl(pairs / "valid.jsonl", [rows[0], rows[0]] + rows[1:])
    for name, n in (("train", 16), ("valid", 8)):
        chat = [
            {"messages": [{"role": "user", "content": f"Is the sea {k % 3} nice?"},
                          {"role": "assistant", "content": "Yes, it is nice."}]}
            for k in range(n)
        ]  # fmt: skip
        write_jsonl(root / "chat" / f"{name}.jsonl", chat)
        write_jsonl(root / "text" / f"{name}.jsonl", [{"text": "Yes."}] * n)
    config = root / "simpo.yaml"
    config.write_text(
        "loss_type: simpo\nlog_completions: true\nmax_completion_length: 4\n"
    )
    lr = ["--learning-rate", 1e-3]
    jobs = {
        "dpo": [pairs, *lr, "--loss-type", "dpo", *SAMPLES, "--num-completions-to-print", 3],
        "dpo_plain": [pairs, *lr, "--loss-type", "dpo"],
        "orpo": [pairs, *lr, "--loss-type", "orpo", *SAMPLES, "--num-completions-to-print", 2],
        "kto": [pairs, *lr, "--loss-type", "kto", *SAMPLES, "--num-completions-to-print", 2],
        "simpo": [pairs, *lr, "--config", config],
        "sft": [root / "chat", *SAMPLES],
        "sft_plain": [root / "chat"],
        "text": [root / "text", *SAMPLES],
        # last: wandb's run ends when the interpreter does (mlx-lm never finishes it)
        "wandb": [pairs, *lr, "--loss-type", "orpo", *SAMPLES,
                  "--num-completions-to-print", 2, "--report-to", "wandb"],
    }  # fmt: skip
    argv = {
        name: [
            "--model",
            tiny_model,
            "--adapter-path",
            root / name,
            "--data",
            *job,
            *RUN,
        ]
        for name, job in jobs.items()
    }
    offline = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env = {name: offline if name == "wandb" else {} for name in jobs}
    results = run_cli_many([(argv[name], root, env[name]) for name in jobs])
    return root, dict(zip(jobs, results))


def test_dpo_answers_fixed_validation_prompts_and_changes_nothing(runs):
    root, results = runs
    code, stdout, _ = results["dpo"]
    assert code == 0
    samples = read_samples(root / "dpo")
    validations = [
        m["iteration"] for m in read_metrics(root / "dpo") if m["split"] == "val"
    ]
    assert len(validations) == 3  # before step 1, after step 2, at the end
    assert [s["iteration"] for s in samples] == [
        i for i in validations for _ in range(3)
    ]
    expected = distinct_prompts(root / "data" / "valid.jsonl", 3)
    for k in range(0, len(samples), 3):
        assert [s["prompt"] for s in samples[k : k + 3]] == expected
    assert all(
        s["split"] == "val" and isinstance(s["completion"], str) for s in samples
    )
    # printed under each validation report, a line each
    assert stdout.count("        sample ") == len(samples)
    # the answers are greedy and draw no random state: the run is the run without them
    assert same_adapters(root / "dpo", root / "dpo_plain")
    assert read_metrics(root / "dpo") == read_metrics(root / "dpo_plain")
    assert not (root / "dpo_plain" / "completions.jsonl").exists()


@pytest.mark.parametrize("name", ["orpo", "kto"])
def test_every_method_writes_the_configured_count(runs, name):
    root, results = runs
    assert results[name][0] == 0
    samples = read_samples(root / name)
    assert len(samples) == 3 * 2
    assert [s["prompt"] for s in samples[:2]] == distinct_prompts(
        root / "data" / "valid.jsonl", 2
    )


def test_the_default_count_and_a_yaml_config(runs):
    root, results = runs
    assert results["simpo"][0] == 0
    assert len(read_samples(root / "simpo")) == 3 * 4  # 4 prompts by default


def test_sft_answers_its_validation_prompts_and_stays_upstream(runs):
    root, results = runs
    code, stdout, _ = results["sft"]
    assert code == 0
    samples = read_samples(root / "sft")
    # 3 distinct prompts among the 8 rows (4 by default), at each of 3 validations
    assert [s["iteration"] for s in samples] == [0] * 3 + [1] * 3 + [3] * 3
    assert [s["prompt"][0]["content"] for s in samples[:3]] == [
        f"Is the sea {k} nice?" for k in range(3)
    ]
    assert stdout.count("        sample ") == 9
    assert "sample " not in results["sft_plain"][1]
    assert same_adapters(root / "sft", root / "sft_plain")


def test_text_rows_have_no_prompt_to_answer(runs):
    root, results = runs
    code, _, stderr = results["text"]
    assert code == 2
    assert stderr.strip().splitlines() == [
        f"mlx_lm_pref: error: log_completions: {root / 'text' / 'valid.jsonl'}:1 is a "
        "text row, with no prompt to answer; give chat rows ('messages') or "
        "prompt/completion rows, or remove log_completions."
    ]


def test_samples_are_a_wandb_table_with_report_to_wandb(runs):
    root, results = runs
    assert results["wandb"][0] == 0, results["wandb"][2][-2000:]
    samples = read_samples(root / "wandb")
    tables = sorted(
        (root / "wandb").glob(
            "wandb/offline-run-*/files/media/table/completions_*.json"
        )
    )
    # one table per validation (TRL's columns), the rows those of completions.jsonl
    assert len(tables) == 3 and len(samples) == 3 * 2
    rows = []
    for path in tables:
        table = json.loads(path.read_text())
        assert table["columns"] == ["step", "prompt", "completion"]
        rows += table["data"]
    expected = [
        [s["iteration"], s["prompt"][-1]["content"], s["completion"]] for s in samples
    ]
    assert sorted(rows) == sorted(expected)
