"""reference: precomputed: a disk cache that is reused until the model, the data or the max
length changes, and full fine-tuning. (That it gives the live reference's numbers, in
every combination of options, is in ``test_combinations``.)"""

import math

import mlx.core as mx
import numpy as np
import pytest
from helpers import lora, read_metrics, write_data

COMMON = [
    "--train",
    "--batch-size",
    "4",
    "--num-layers",
    "2",
    "--learning-rate",
    "1e-3",
    "--seed",
    "0",
    "--iters",
    "6",
    "--steps-per-report",
    "1",
    "--steps-per-eval",
    "3",
    "--val-batches",
    "-1",
    "--loss-type",
    "dpo",
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_LM_PREF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "reference"


def test_cache_is_reused_until_an_input_changes(
    tiny_model, tiny_model_nobos, tmp_path, cache
):
    data = write_data(tmp_path / "data")

    def run(model=tiny_model, extra=()):
        proc = lora(
            model,
            data,
            tmp_path / "a",
            "--reference",
            "precomputed",
            *COMMON,
            "--iters",
            "1",
            *extra,
        )
        return [
            l.rsplit(": ", 1)[1]
            for l in proc.stdout.splitlines()
            if "reference log-probs of" in l
        ]

    assert run() == ["computed", "computed"]  # train and valid
    assert run() == ["loaded", "loaded"]
    entries = len(list(cache.glob("*.safetensors")))
    assert entries == 2 and not list(cache.glob("*tmp*"))
    assert run(extra=["--max-seq-length", "24"]) == ["computed", "computed"]
    assert run(model=tiny_model_nobos) == ["computed", "computed"]
    lines = (data / "valid.jsonl").read_text().splitlines()
    (data / "valid.jsonl").write_text("\n".join(lines[1:]) + "\n")
    assert run() == ["loaded", "computed"]  # only the changed split


def test_full_fine_tuning_uses_a_precomputed_reference(tiny_model, tmp_path, cache):
    data = write_data(tmp_path / "data")
    out = tmp_path / "full"
    proc = lora(
        tiny_model,
        data,
        out,
        "--fine-tune-type",
        "full",
        *COMMON,
    )
    assert "dpo reference: precomputed" in proc.stdout
    metrics = read_metrics(out)
    first_train = [m for m in metrics if m["split"] == "train"][0]
    assert (
        abs(first_train["loss"] - math.log(2)) < 1e-5
    )  # policy == reference at step 0
    last_val = [m for m in metrics if m["split"] == "val"][-1]
    assert last_val["rewards/margins"] > 0.1

    # The cached values equal a frozen copy of the initial model scored by this test.
    from mlx_lm import load
    from mlx_lm.utils import load_tokenizer

    import mlx_lm_pref  # noqa: F401
    from mlx_lm_pref.batching import PreferenceBatch, collate
    from mlx_lm_pref.config import PreferenceArgs
    from mlx_lm_pref.data import PreferenceDataset, read_jsonl
    from mlx_lm_pref.objective import sequence_logps_dpo
    from mlx_lm_pref.precompute import cache_key, model_fingerprint

    frozen, _ = load(str(tiny_model))
    rows, lines = read_jsonl(data / "train.jsonl")
    pairs = PreferenceDataset(
        rows,
        load_tokenizer(tiny_model),
        PreferenceArgs(loss_type="dpo"),
        lines=lines,
        max_seq_length=2048,
    )
    key = cache_key(
        model_fingerprint(frozen), pairs, PreferenceArgs(loss_type="dpo"), 2048
    )
    cached = np.array(mx.load(str(cache / f"{key}.safetensors"))["reference"])
    for i in range(0, 8, 2):
        batch = PreferenceBatch(*collate([pairs[i], pairs[i + 1]], 2048))
        ours = np.array(sequence_logps_dpo(frozen, batch, PreferenceArgs("dpo")))
        np.testing.assert_allclose(cached[i : i + 2].T.reshape(-1), ours, atol=1e-5)
