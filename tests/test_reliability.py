"""What users bring, through the real CLI: the combinations that used to crash train, and
every input mistake is one line and exit 2 before the model loads, with nothing written.
"""

import json
import math

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

SHORT = ["--iters", "2", "--batch-size", "2", "--num-layers", "2", "--seed", "0"]
SHORT += ["--steps-per-report", "1", "--val-batches", "-1"]


def multi_turn_rows(n, seed):
    """Conversations with a system message and an earlier exchange before the question."""
    rows = make_rows(n, seed, conversational=True)
    for k, row in enumerate(rows):
        row["prompt"] = [
            {"role": "system", "content": "You answer in one sentence."},
            {"role": "user", "content": f"Hello {k}?"},
            {"role": "assistant", "content": "Hello, the sky is calm."},
        ] + row["prompt"]
    return rows


def write_splits(folder, rows_of, sizes=(("train", 8), ("valid", 4), ("test", 4))):
    for seed, (split, n) in enumerate(sizes, start=1):
        write_jsonl(folder / f"{split}.jsonl", rows_of(n, seed))
    return folder


def test_full_fine_tuning_on_multi_turn_conversations(tiny_model, tmp_path):
    """Full fine-tuning means a precomputed reference; multi-turn prompts are long, so
    prompt sharing (auto) puts the pairs in the shared layout, which scoring the reference
    once must read too. It used to crash on the shared layout."""
    data = write_splits(tmp_path / "data", multi_turn_rows)
    proc = lora(
        tiny_model,
        data,
        tmp_path / "out",
        "--train",
        "--test",
        "--loss-type",
        "dpo",
        "--fine-tune-type",
        "full",
        *SHORT,
        cwd=tmp_path,
        env={"MLX_LM_PREF_CACHE": str(tmp_path / "cache")},
    )
    assert "reference: precomputed" in proc.stdout
    assert "prompt sharing: auto" in proc.stdout
    metrics = read_metrics(tmp_path / "out")
    first = metrics[0]
    assert first["split"] == "val" and abs(first["loss"] - math.log(2)) < 1e-6
    assert [m["split"] for m in metrics][-1] == "test"
    assert all(math.isfinite(v) for m in metrics for v in m.values() if v != m["split"])


def hf_entries(*folders, **extra):
    """hf_dataset entries for local folders of train/valid/test.jsonl."""
    return [
        {
            "path": str(f),
            "train_split": "train",
            "valid_split": "validation",
            "test_split": "test",
            **extra,
        }
        for f in folders
    ]


def write_config(path, **keys):
    path.write_text(json.dumps(keys))  # JSON is YAML
    return path


def test_two_hf_dataset_entries_train_as_one_local_folder(tiny_model, tmp_path):
    """mlx-lm concatenates several hf_dataset entries; the pairs of both make one
    dataset, and training on them is training on one folder holding both."""
    rows = {s: make_rows(n, seed) for s, n, seed in (("train", 8, 1), ("valid", 4, 2))}
    rows["test"] = make_rows(4, 3)
    halves = []
    for k in range(2):
        folder = tmp_path / f"part{k}"
        for split, r in rows.items():
            half = len(r) // 2
            write_jsonl(folder / f"{split}.jsonl", r[k * half : (k + 1) * half])
        halves.append(folder)
    whole = tmp_path / "whole"
    for split, r in rows.items():
        write_jsonl(whole / f"{split}.jsonl", r)
    common = dict(model=str(tiny_model), loss_type="dpo", train=True, test=True)
    config = write_config(
        tmp_path / "two.yaml",
        **common,
        adapter_path=str(tmp_path / "two"),
        hf_dataset=hf_entries(*halves),
    )
    run_cli("lora", "--config", config, *SHORT, "--prompt-sharing", "false")
    lora(tiny_model, whole, tmp_path / "one", "--train", "--test", "--loss-type", "dpo",
         *SHORT, "--prompt-sharing", "false")  # fmt: skip
    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert [m["split"] for m in two] == [m["split"] for m in one]
    # The same pairs (file order differs, so validation is compared, not training steps)
    assert two[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("logps/chosen", "logps/rejected", "num_tokens"):
        assert two[0][name] == pytest.approx(one[0][name], rel=1e-5), name


def test_hf_dataset_entries_truncate_and_drop_like_local_data(tiny_model, tmp_path):
    rows = make_rows(8, 1)
    rows[0]["prompt"] = "Is it? " * 40 + rows[0]["prompt"]  # fills max_seq_length alone
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    write_jsonl(tmp_path / "d" / "valid.jsonl", make_rows(4, 2))
    entry = {"path": str(tmp_path / "d"), "train_split": "train"}
    entry["valid_split"] = "validation"
    config = write_config(
        tmp_path / "c.yaml",
        model=str(tiny_model),
        loss_type="dpo",
        train=True,
        max_seq_length=64,
        adapter_path=str(tmp_path / "out"),
        hf_dataset=[entry],
    )
    proc = run_cli("lora", "--config", config, *SHORT)
    assert "dropped 1 of 8 pairs whose prompt alone reaches max_seq_length=64" in (
        proc.stdout
    )


def refused(proc, tmp_path, *expected):
    """Exit 2 with one line on stderr naming the problem, before the model loads, and
    nothing written."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "Loading pretrained model" not in proc.stdout
    assert not (tmp_path / "out").exists()
    for text in expected:
        assert text in lines[-1], lines[-1]
    return lines[-1]


def yaml_config(tiny_model, tmp_path, data, **keys):
    config = tmp_path / "c.yaml"
    lines = [
        f"model: {tiny_model}",
        f"data: {data}",
        f"adapter_path: {tmp_path / 'out'}",
    ]
    lines += [f"{k}: {v}" for k, v in keys.items()]
    config.write_text("\n".join(lines) + "\n")
    return config


def yaml_run(tiny_model, tmp_path, data, **keys):
    config = yaml_config(tiny_model, tmp_path, data, **keys)
    return run_cli("lora", "--config", config, "--train", *SHORT, check=False)


BAD_OPTIONS = {
    "string-bool": (dict(loss_type="dpo", use_weighting='"false"'), ["use_weighting must be true or false", "string"]),
    "float": (dict(loss_type="dpo", beta="abc"), ["beta must be a number, got 'abc'"]),
    "misspelt-key": (dict(loss_tpye="dpo"), ["unknown key 'loss_tpye'; did you mean 'loss_type'?"]),
    "misspelt-upstream-key": (dict(loss_type="dpo", lerning_rate="1e-4"), ["did you mean 'learning_rate'?"]),
    "mask-prompt": (dict(loss_type="dpo", mask_prompt="true"), ["--mask-prompt", "Remove"]),
    "reference-without-one": (dict(loss_type="orpo", reference="precomputed"), ["ORPO has no reference model"]),
    "misspelt-loss": (dict(loss_type="dpoo"), ["Unknown loss_type 'dpoo'", "Did you mean 'dpo'?"]),
    "misspelt-reference": (dict(loss_type="dpo", reference="adapters-off"), ["Did you mean 'adapters_off'?"]),
    "trl-name": (dict(loss_type="kto", max_length=1024), ["'max_length' is TRL's name", "use max_seq_length"]),
}  # fmt: skip
BAD_DATA = {
    "empty": ([], ["Training set not found or empty"]),
    "all-identical": (
        [{"prompt": "Is it? ", "chosen": "Yes.", "rejected": "Yes."}] * 4,
        ["train.jsonl", "all 4 pairs have chosen identical to rejected"],
    ),
    "swapped-letters": (
        [{"prompt": "Is it? ", "chosne": "Yes.", "rejected": "No."}],
        ["train.jsonl:1: field 'chosne'", "did you mean 'chosen'?"],
    ),
}
BAD_HF_DATASET = {
    "a-name": ("orca_dpo_pairs", "hf_dataset must be a mapping (path, train_split, ...) or a list"),
    "no-path": ([{"train_split": "train"}], "hf_dataset[0].path is missing"),
    "a-list-of-names": (["orca_dpo_pairs"], "hf_dataset[0] must be a mapping."),
}  # fmt: skip


@pytest.fixture(scope="module")
def refusals(tiny_model, tmp_path_factory):
    """The refused runs of the cases below, in one interpreter (``lora_runs``): name ->
    (the run, its folder)."""
    root, runs = tmp_path_factory.mktemp("refusals"), {}
    for name, (keys, _) in BAD_OPTIONS.items():
        folder = root / name
        data = write_data(folder / "data", n_train=8, n_valid=4)
        runs[name] = (["--config", yaml_config(tiny_model, folder, data, **keys),
                       "--train", *SHORT], folder)  # fmt: skip
    for name, (rows, _) in BAD_DATA.items():
        folder = root / name
        data = write_data(folder / "data", n_train=8, n_valid=4)
        write_jsonl(data / "train.jsonl", rows)
        runs[name] = (["--model", tiny_model, "--data", data, "--adapter-path",
                       folder / "out", "--train", "--loss-type", "dpo", *SHORT],
                      folder)  # fmt: skip
    for name, (hf_dataset, _) in BAD_HF_DATASET.items():
        folder = root / name
        folder.mkdir()
        config = write_config(folder / "c.yaml", model=str(tiny_model), loss_type="dpo",
                              train=True, adapter_path=str(folder / "out"),
                              hf_dataset=hf_dataset)  # fmt: skip
        runs[name] = (["--config", config, *SHORT], folder)
    procs = lora_runs(list(runs.values()))
    return {
        name: (proc, folder) for (name, (_, folder)), proc in zip(runs.items(), procs)
    }


@pytest.mark.parametrize("name", BAD_OPTIONS)
def test_bad_options_are_one_line(refusals, name):
    refused(*refusals[name], *BAD_OPTIONS[name][1])


def test_a_misspelt_preference_key_is_refused_in_an_sft_run_too(tiny_model, tmp_path):
    """`loss_tpye: dpo` makes the run SFT; it used to fail later, blaming the data."""
    data = write_data(tmp_path / "data", n_train=8, n_valid=4)
    proc = yaml_run(tiny_model, tmp_path, data, loss_tpye="dpo")
    refused(proc, tmp_path, "did you mean 'loss_type'?")


def test_boolean_options_are_flags_like_mlx_lm(tiny_model, tmp_path):
    data = write_data(tmp_path / "data", n_train=8, n_valid=4)
    proc = lora(tiny_model, data, tmp_path / "out", "--train", "--loss-type", "dpo",
                "--use-weighting", "maybe", *SHORT, check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unrecognized arguments: maybe" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
    lora(tiny_model, data, tmp_path / "ok", "--train", "--loss-type", "dpo",
         "--use-weighting", *SHORT)  # fmt: skip
    assert json.loads((tmp_path / "ok" / "adapter_config.json").read_text())[
        "use_weighting"
    ]


@pytest.mark.parametrize("name", BAD_DATA)
def test_bad_data_is_one_line_before_the_model_loads(refusals, name):
    refused(*refusals[name], *BAD_DATA[name][1])


def orca_rows(n):
    """orca_dpo_pairs' columns: system, question, chosen, rejected."""
    return [
        {"system": "Be brief.", "question": r["prompt"], "chosen": r["chosen"],
         "rejected": r["rejected"]}
        for r in make_rows(n, 1)
    ]  # fmt: skip


def test_unused_columns_are_named_and_prompt_feature_maps_one(tiny_model, tmp_path):
    """orca_dpo_pairs has system, question, chosen, rejected: without a mapping the
    question is not read (the implicit prompt is what chosen and rejected share), and the
    user is told so; prompt_feature reads it."""
    rows = orca_rows(8)
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    proc = yaml_run(tiny_model, tmp_path, tmp_path / "d", loss_type="dpo")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ignored columns: question, system (no 'prompt' column" in proc.stdout
    assert proc.stdout.count("ignored columns") == 1
    proc = yaml_run(tiny_model, tmp_path, tmp_path / "d", loss_type="dpo",
                    prompt_feature="question")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ignored columns: system\n" in proc.stdout


@pytest.mark.parametrize("name", BAD_HF_DATASET)
def test_bad_hf_dataset_entries_are_one_line(refusals, name):
    refused(*refusals[name], BAD_HF_DATASET[name][1])


def test_top_level_column_mapping_reaches_hf_dataset_entries(tiny_model, tmp_path):
    rows = orca_rows(8)
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    write_jsonl(tmp_path / "d" / "valid.jsonl", rows[:4])
    config = write_config(tmp_path / "c.yaml", model=str(tiny_model), loss_type="dpo",
                          train=True, adapter_path=str(tmp_path / "out"),
                          prompt_feature="question",
                          hf_dataset=hf_entries(tmp_path / "d"))  # fmt: skip
    proc = run_cli("lora", "--config", config, *SHORT)
    assert "ignored columns: system\n" in proc.stdout


def test_a_non_finite_last_step_is_not_saved(tiny_model, tmp_path):
    """mlx-lm's loop ends without asking for another batch, so the last step is checked
    by the final report and the final save: a huge learning rate blows up step 2 of 2.
    """
    data = write_data(tmp_path / "data", n_train=8, n_valid=4)
    proc = lora(tiny_model, data, tmp_path / "out", "--train", "--loss-type", "dpo",
                "--iters", "2", "--batch-size", "2", "--num-layers", "2",
                "--learning-rate", "1e30", "--optimizer", "sgd", "--steps-per-report",
                "5", "--val-batches", "1", check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "iteration 2: the loss or a metric is not finite" in proc.stderr
    assert not (tmp_path / "out" / "adapters.safetensors").exists()
