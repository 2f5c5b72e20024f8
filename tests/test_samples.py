"""Samples while training (``log_completions``) in the methods that train on given
completions: greedy answers to the first few validation prompts at each validation, printed
under the report and written to ``completions.jsonl``, changing no number of the run."""

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import lora, read_metrics, write_data, write_jsonl

RUN = ["--train", "--iters", 4, "--batch-size", 4, "--steps-per-eval", 2]
RUN += ["--steps-per-report", 2, "--val-batches", 1, "--num-layers", -1, "--seed", 0]
RUN += ["--learning-rate", 1e-3]


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


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    folder = write_data(root / "data", conversational=True)
    # the first validation prompts repeat: the samples answer distinct ones
    rows = [json.loads(l) for l in (folder / "valid.jsonl").read_text().splitlines()]
    write_jsonl(folder / "valid.jsonl", [rows[0], rows[0]] + rows[1:])
    return root, folder


def test_dpo_answers_fixed_validation_prompts_and_changes_nothing(tiny_model, data):
    root, folder = data
    args = RUN + ["--loss-type", "dpo", "--log-completions"]
    args += ["--num-completions-to-print", 3, "--max-completion-length", 8]
    proc = lora(tiny_model, folder, root / "dpo", *args)
    plain = lora(tiny_model, folder, root / "dpo_plain", *RUN, "--loss-type", "dpo")
    samples = read_samples(root / "dpo")
    validations = [
        m["iteration"] for m in read_metrics(root / "dpo") if m["split"] == "val"
    ]
    assert len(validations) == 3  # before step 1, after step 2, at the end
    assert [s["iteration"] for s in samples] == [
        i for i in validations for _ in range(3)
    ]
    expected = distinct_prompts(folder / "valid.jsonl", 3)
    for k in range(0, len(samples), 3):
        assert [s["prompt"] for s in samples[k : k + 3]] == expected
    assert all(
        s["split"] == "val" and isinstance(s["completion"], str) for s in samples
    )
    # printed under each validation report, a line each
    assert proc.stdout.count("        sample ") == len(samples)
    # the answers are greedy and draw no random state: the run is the run without them
    a = mx.load(str(root / "dpo" / "adapters.safetensors"))
    b = mx.load(str(root / "dpo_plain" / "adapters.safetensors"))
    for name in a:
        assert np.array_equal(np.array(a[name]), np.array(b[name])), name
    assert read_metrics(root / "dpo") == read_metrics(root / "dpo_plain")
    assert not (root / "dpo_plain" / "completions.jsonl").exists()


@pytest.mark.parametrize("loss_type", ["orpo", "kto"])
def test_every_method_writes_the_configured_count(tiny_model, data, loss_type):
    root, folder = data
    out = root / loss_type
    lora(tiny_model, folder, out, *RUN, "--loss-type", loss_type, "--log-completions",
         "--num-completions-to-print", 2, "--max-completion-length", 4)  # fmt: skip
    samples = read_samples(out)
    assert len(samples) == 3 * 2
    assert [s["prompt"] for s in samples[:2]] == distinct_prompts(
        folder / "valid.jsonl", 2
    )


def test_the_default_count_and_a_yaml_config(tiny_model, data):
    root, folder = data
    config = root / "samples.yaml"
    config.write_text(
        "loss_type: simpo\nlog_completions: true\nmax_completion_length: 4\n"
    )
    lora(tiny_model, folder, root / "simpo", *RUN, "--config", config)
    samples = read_samples(root / "simpo")
    assert len(samples) == 3 * 4  # 4 prompts by default


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_samples")
    for name, n in (("train", 16), ("valid", 8)):
        chat = [
            {"messages": [{"role": "user", "content": f"Is the sea {k % 3} nice?"},
                          {"role": "assistant", "content": "Yes, it is nice."}]}
            for k in range(n)
        ]  # fmt: skip
        write_jsonl(root / "chat" / f"{name}.jsonl", chat)
        write_jsonl(root / "text" / f"{name}.jsonl", [{"text": "Yes."}] * n)
    return root


def test_sft_answers_its_validation_prompts_and_stays_upstream(tiny_model, sft_data):
    root = sft_data
    sft = ["--train", "--iters", 4, "--batch-size", 4, "--steps-per-eval", 2]
    sft += ["--val-batches", 1, "--num-layers", -1, "--seed", 0]
    proc = lora(tiny_model, root / "chat", root / "s", *sft, "--log-completions",
                "--max-completion-length", 4)  # fmt: skip
    plain = lora(tiny_model, root / "chat", root / "plain", *sft)
    samples = read_samples(root / "s")
    # 3 distinct prompts among the 8 rows (4 by default), at each of 3 validations
    assert [s["iteration"] for s in samples] == [0] * 3 + [1] * 3 + [3] * 3
    assert [s["prompt"][0]["content"] for s in samples[:3]] == [
        f"Is the sea {k} nice?" for k in range(3)
    ]
    assert proc.stdout.count("        sample ") == 9
    assert "sample " not in plain.stdout
    a = mx.load(str(root / "s" / "adapters.safetensors"))
    b = mx.load(str(root / "plain" / "adapters.safetensors"))
    for name in a:
        assert np.array_equal(np.array(a[name]), np.array(b[name])), name


def test_text_rows_have_no_prompt_to_answer(tiny_model, sft_data):
    root = sft_data
    proc = lora(tiny_model, root / "text", root / "t", "--train", "--iters", 1,
                "--num-layers", -1, "--log-completions", check=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"mlx_lm_pref: error: log_completions: {root / 'text' / 'valid.jsonl'}:1 is a "
        "text row, with no prompt to answer; give chat rows ('messages') or "
        "prompt/completion rows, or remove log_completions."
    ]
