"""KTO (``loss_type: kto`` / ``apo_zero_unpaired``): unpaired rows, the KL rows, the loss
and metrics against their formulas, the layouts and references agreeing, bad input refused
in one line, and the CLI learning on 1 and 2 ranks. TRL parity lives in
``test_trl_parity.py``.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import (
    NOISE,
    free_port_pair,
    lora,
    make_rows,
    read_metrics,
    run_cli,
    run_cli_many,
    tiny_lora_model,
    write_jsonl,
)

from mlx_lm_pref.batching import (
    _kto_batches,
    iterate_eval_batches,
    iterate_preference_batches,
    make_batch,
)
from mlx_lm_pref.config import PreferenceArgs
from mlx_lm_pref.data import (
    DataError,
    Example,
    PreferenceDataset,
    kl_rotation,
    label_balance,
    tokenize_dpo,
)
from mlx_lm_pref.losses import kto_losses
from mlx_lm_pref.metrics import average_metrics, metric_values, pack_metrics
from mlx_lm_pref.objective import PreferenceLoss, metric_names, sequence_logps_dpo
from mlx_lm_pref.reference import adapters_disabled

# Numbers compared at float32-noise tolerances: run with and without OpenBLAS (.ci/run).
pytestmark = pytest.mark.numerics

KTO = PreferenceArgs(loss_type="kto")
APO = PreferenceArgs(loss_type="apo_zero_unpaired")


def unpaired(rows, pattern=(True, False, True)):
    """Each pair as one KTO row: its chosen answer (label true) or rejected (false)."""
    out = []
    for i, row in enumerate(rows):
        label = pattern[i % len(pattern)]
        completion = row["chosen"] if label else row["rejected"]
        out.append({"prompt": row["prompt"], "completion": completion, "label": label})
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model)


# ---- data ----


@pytest.mark.parametrize("conversational", [False, True])
def test_a_row_tokenizes_as_one_side_of_a_dpo_pair(tokenizer, conversational):
    pairs = make_rows(4, 1, conversational)
    rows = unpaired(pairs)
    dataset = PreferenceDataset(rows, tokenizer, KTO)
    for row, pair, example in zip(rows, pairs, dataset):
        side = "chosen" if row["label"] else "rejected"
        other = "rejected" if row["label"] else "chosen"
        dpo = tokenize_dpo(
            tokenizer, pair["prompt"], pair[side], pair[other], conversational, pair
        )
        assert example.sequence == dpo.chosen and example.label is row["label"]
        assert (
            example.start <= dpo.chosen_start + 1
        )  # TRL: where the two streams diverge
        if not conversational:
            assert example.sequence[-1] == tokenizer.eos_token_id  # EOS appended


def test_pairs_are_unpaired_chosen_first_as_trl(tokenizer):
    pairs = make_rows(3, 2)
    dataset = PreferenceDataset(pairs, tokenizer, KTO)
    assert dataset.labels == [True] * 3 + [False] * 3
    by_side = [
        PreferenceDataset(unpaired(pairs, (s,)), tokenizer, KTO) for s in (True, False)
    ]
    expected = [e.sequence for d in by_side for e in d]
    assert [e.sequence for e in dataset] == expected
    # the implicit prompt is extracted first, as TRL's extract_prompt
    implicit = PreferenceDataset(make_rows(3, 2, prompt=False), tokenizer, KTO)
    assert implicit.labels == dataset.labels and len(implicit) == 6


def test_kl_rows_rotate_within_each_batch_as_trl():
    assert kl_rotation(5, 2) == [1, 0, 3, 2, 4]  # the ragged last chunk keeps its own
    assert kl_rotation(4, 4) == [3, 0, 1, 2]


def test_kl_rows_take_the_prompt_and_another_completion(tokenizer):
    rows = unpaired(make_rows(5, 3))
    full = PreferenceDataset(rows, tokenizer, KTO)
    cut = max(e.start for e in full) + 2  # every row kept, some cut
    dataset = PreferenceDataset(rows, tokenizer, KTO, max_seq_length=cut)
    dataset = dataset.with_kl(2)
    assert any(len(e.sequence) < len(f.sequence) for e, f in zip(dataset, full))
    for k, (e, j) in enumerate(zip(dataset, kl_rotation(5, 2))):
        own, other = full[k], full[j]
        kl = own.sequence[: own.start] + other.sequence[other.start :]
        assert e.kl_sequence == kl[:cut] and e.sequence == own.sequence[:cut]
    apo = PreferenceDataset(rows, tokenizer, APO)
    apo = apo.with_kl(2)
    assert all(e.kl_sequence is None for e in apo)


def test_datasets_are_never_changed_in_place(tokenizer):
    """KL rows and precomputed references come as new datasets; a dataset holding
    references refuses KL rows of another batch size rather than drop them (they used to
    be dropped silently, and the run failed later, inside the loss)."""
    dataset = PreferenceDataset(unpaired(make_rows(6, 3)), tokenizer, KTO)
    with_kl = dataset.with_kl(2)
    assert with_kl is not dataset and all(e.kl_sequence is None for e in dataset)
    assert with_kl.with_kl(2) is with_kl  # already of that chunk
    scored = with_kl.with_reference([(-1.0 - k, -2.0) for k in range(len(dataset))])
    assert all(e.reference is None for e in with_kl)
    assert [e.reference for e in scored][:2] == [(-1.0, -2.0), (-2.0, -2.0)]
    assert scored.with_kl(2) is scored
    with pytest.raises(ValueError, match="batches of 2 rows, not 3"):
        scored.with_kl(3)


def test_rows_whose_prompt_fills_the_window_are_dropped(tokenizer):
    rows = unpaired(make_rows(4, 4))
    starts = [e.start for e in PreferenceDataset(rows, tokenizer, KTO)]
    cut = sorted(starts)[1] + 1  # at least one prompt reaches it, at least one does not
    dataset = PreferenceDataset(rows, tokenizer, KTO, max_seq_length=cut)
    assert len(dataset) == sum(s < cut for s in starts) and dataset.dropped > 0
    assert all(len(e.sequence) <= cut and len(e.sequence) > e.start for e in dataset)


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "Hi", "completion": "Yes."}, "field 'label' is missing"),
        ({"prompt": "Hi", "completion": "Yes.", "label": 1}, "must be true"),
        ({"prompt": "Hi", "completion": "Yes.", "label": "true"}, "without quotes"),
        ({"completion": "Yes.", "label": True}, "field 'prompt' is missing"),
        ({"prompt": "Hi", "completion": "Yes.", "lable": True}, "did you mean 'label'"),
        ({"prompt": "Hi", "completion": "", "label": True}, "'completion' is empty"),
        ({"prompt": [{"role": "user", "content": "Hi"}], "completion": "Yes.",
          "label": True}, "must be a list of messages"),
    ],
)  # fmt: skip
def test_bad_rows_name_the_line_and_field(tokenizer, row, message):
    good = {"prompt": "Hi", "completion": "Yes.", "label": True}
    with pytest.raises(DataError, match=message) as e:
        PreferenceDataset([good, row], tokenizer, KTO, source="train.jsonl")
    assert str(e.value).startswith("train.jsonl:2: ")


def test_label_balance_says_what_trl_warns(tokenizer):
    rows = [{"prompt": "Hi", "completion": "Yes.", "label": i < 3} for i in range(4)]
    lines = label_balance(PreferenceDataset(rows, tokenizer, KTO), KTO)
    assert "3 desirable and 1 undesirable" in lines[0]
    # TRL's range (KTO paper, eq. 8): desirable_weight in [0.33, 0.44] or undesirable in
    # [2.26, 3.0]
    assert "[0.33, 0.44]" in lines[-1] and "[2.26, 3.0]" in lines[-1]
    inside = KTO.replace(undesirable_weight=2.5)
    assert len(label_balance(PreferenceDataset(rows, tokenizer, inside), inside)) == 1
    one = [dict(r, label=True) for r in rows]
    assert (
        "never reported"
        in label_balance(PreferenceDataset(one, tokenizer, KTO), KTO)[1]
    )
    # all undesirable: TRL counts 1 desirable and 4 - 1 undesirable rows
    none = [dict(r, label=False) for r in rows]
    lines = label_balance(PreferenceDataset(none, tokenizer, KTO), KTO)
    assert "never reported" in lines[1]
    assert "[3.0, 3.99]" in lines[-1] and "[0.25, 0.33]" in lines[-1]


# ---- the loss and its metrics ----


def test_losses_are_the_papers_formulas():
    r = np.array([-1.5, 0.3, 2.0, -0.2], np.float32)
    good = np.array([1, 0, 1, 0], np.float32)
    beta, kl, w_d, w_u = 0.5, 0.7, 1.3, 0.6
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    kto = np.where(
        good > 0, w_d * (1 - sig(beta * (r - kl))), w_u * (1 - sig(beta * (kl - r)))
    )
    apo = np.where(good > 0, w_d * (1 - sig(beta * r)), w_u * sig(beta * r))
    for name, expected in (("kto", kto), ("apo_zero_unpaired", apo)):
        got = kto_losses(
            mx.array(r), mx.array(good), mx.array(kl), name, beta, w_d, w_u
        )
        np.testing.assert_allclose(np.array(got), expected, rtol=1e-6)


def random_examples(n, seed, labels, kl=True):
    rng = np.random.default_rng(seed)
    prompts = [[1] + list(rng.integers(3, 50, rng.integers(2, 6))) for _ in range(n)]
    completions = [list(rng.integers(3, 50, rng.integers(1, 7))) for _ in range(n)]
    out = []
    for k in range(n):
        kl_row = prompts[k] + completions[k - 1] if kl else None
        out.append(
            Example(prompts[k] + completions[k], len(prompts[k]), labels[k], kl_row)
        )
    return out


def _metrics(loss, model, batch):
    value, _, metrics = loss.metrics(model, batch)
    return metric_values(metrics)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_metrics_are_trls_reductions(loss_type):
    """Loss, KL and every metric recomputed from the per-row log-probs, as TRL's
    ``_compute_loss``: sums per label divided by the label's count."""
    model = tiny_lora_model()
    options = PreferenceArgs(loss_type=loss_type, beta=0.3, undesirable_weight=1.7)
    labels = [True, False, False, True, False]
    batch = make_batch(random_examples(5, 0, labels, kl=options.kl_term), 2048)
    m = _metrics(
        PreferenceLoss(options.replace(reference="adapters_off")), model, batch
    )
    policy = np.array(sequence_logps_dpo(model, batch, options))
    with adapters_disabled(model):
        ref = np.array(sequence_logps_dpo(model, batch, options))
    good = np.array(labels)
    r = policy[:5] - ref[:5]
    kl = max((policy[5:] - ref[5:]).mean(), 0.0) if options.kl_term else 0.0
    losses = kto_losses(mx.array(r), mx.array(good.astype(np.float32)), mx.array(kl),
                        loss_type, 0.3, 1.0, 1.7)  # fmt: skip
    assert m["loss"] == pytest.approx(float(np.array(losses).mean()), abs=1e-6)
    assert m["kl"] == pytest.approx(kl, abs=1e-5)
    assert m["rewards/chosen"] == pytest.approx(0.3 * r[good].mean(), abs=1e-5)
    assert m["rewards/rejected"] == pytest.approx(0.3 * r[~good].mean(), abs=1e-5)
    assert m["rewards/margins"] == pytest.approx(
        m["rewards/chosen"] - m["rewards/rejected"], abs=1e-6
    )
    assert m["logps/chosen"] == pytest.approx(policy[:5][good].mean(), abs=1e-4)
    assert m["num_tokens"] == float(sum(len(e) for e in batch_rows(batch)))


def batch_rows(batch):
    spans = np.array(batch.spans)[: batch.pairs]
    return [range(end) for _, end in spans]


def test_a_batch_of_one_label_reports_no_margin():
    model = tiny_lora_model()
    loss = PreferenceLoss(KTO.replace(reference="adapters_off"))
    batch = make_batch(random_examples(3, 1, [True] * 3), 2048)
    _, _, metrics = loss.metrics(model, batch)
    m = metric_values(metrics)
    assert math.isfinite(m["loss"]) and "rewards/chosen" in m
    assert "rewards/rejected" not in m and "rewards/margins" not in m
    # reports average a label's metrics over the steps that had it, as TRL's log()
    names = metric_names(KTO)
    step = np.array(pack_metrics(names, metrics), np.float64)
    other = step.copy()
    other[names.index("rewards/rejected")] = (-4.0, 2.0)  # a step with 2 rejected rows
    averaged = average_metrics(names, np.stack([step, other]))
    assert averaged["rewards/rejected"] == -2.0
    assert averaged["rewards/chosen"] == pytest.approx(m["rewards/chosen"])
    assert "rewards/margins" not in averaged


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_layouts_give_the_same_loss_metrics_and_gradient(loss_type):
    """Shared prompts (the rows and their KL rows share one) and the output layer in tiles
    equal the whole rows and logits."""
    options = PreferenceArgs(loss_type=loss_type, reference="adapters_off")
    model = tiny_lora_model(vocab_size=1000)
    examples = random_examples(4, 2, [True, False, True, True], options.kl_term)
    results = []
    for sharing, chunks in (
        ("false", "0"),
        ("true", "0"),
        ("false", "64"),
        ("true", "64"),
    ):
        batch = make_batch(examples, 2048, prompt_sharing=sharing)
        assert batch.shared == (sharing == "true" and options.kl_term)
        loss = PreferenceLoss(options.replace(head_chunk_size=chunks))
        grad_fn = nn.value_and_grad(model, lambda m, b: loss.metrics(m, b)[0])
        value, grads = grad_fn(model, batch)
        flat = np.concatenate([np.array(g).ravel() for _, g in _flatten(grads)])
        results.append((float(value), _metrics(loss, model, batch), flat))
    for value, metrics, grads in results[1:]:
        assert value == pytest.approx(results[0][0], **NOISE)
        for name, v in metrics.items():
            assert v == pytest.approx(results[0][1][name], **NOISE), name
        np.testing.assert_allclose(grads, results[0][2], rtol=1e-3, atol=1e-6)


def _flatten(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def test_training_batches_are_consecutive_chunks(tokenizer):
    rows = unpaired(make_rows(10, 5))
    dataset = PreferenceDataset(rows, tokenizer, KTO)
    batches = iterate_preference_batches(dataset, 4, 2048, loop=True, seed=0)
    batches = [next(batches) for _ in range(6)]  # two epochs
    # in dataset order every epoch, the remainder a smaller last batch (TRL's sequential
    # sampler and DataLoader)
    assert [b.labels.shape[0] for (b,) in batches] == [4, 4, 2] * 2
    firsts = [np.array(b.tokens)[0].tolist()[:5] for (b,) in batches]
    assert firsts == [dataset[i].sequence[:5] for i in (0, 4, 8)] * 2
    # two ranks: each its consecutive share of a chunk, a ragged one split 2 + 1
    split = [_kto_batches(11, 4, rank, 2) for rank in (0, 1)]
    assert split == [[[0, 1], [4, 5], [8, 9]], [[2, 3], [6, 7], [10]]]
    assert _kto_batches(9, 4, 1, 2) == [[2, 3], [6, 7]]  # 1 row for 2 ranks: left out
    evaluated = [b.pairs for (b,) in iterate_eval_batches(dataset, 4, 2048)]
    assert evaluated == [4, 4, 2]  # TRL's evaluation keeps the ragged last batch


# ---- the command ----


def kto_data(folder, n_train=48, n_valid=8, conversational=False):
    for name, n, seed in (
        ("train", n_train, 1),
        ("valid", n_valid, 2),
        ("test", n_valid, 3),
    ):
        write_jsonl(
            folder / f"{name}.jsonl", unpaired(make_rows(n, seed, conversational))
        )
    return folder


TRAIN = ["--train", "--iters", 24, "--batch-size", 4, "--num-layers", 2,
         "--learning-rate", 2e-3, "--steps-per-report", 8, "--steps-per-eval", 12,
         "--val-batches", -1, "--seed", 0, "--beta", 0.5]  # fmt: skip


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_cli_learns_and_saves_a_loadable_adapter(tiny_model, tmp_path, loss_type):
    data = kto_data(tmp_path / "data", conversational=loss_type == "kto")
    out = tmp_path / "out"
    proc = lora(tiny_model, data, out, *TRAIN, "--loss-type", loss_type, "--test")
    metrics = read_metrics(out)
    val = [m for m in metrics if m["split"] == "val"]
    assert val[0]["loss"] == pytest.approx(0.5, abs=1e-6) and val[0]["kl"] == 0.0
    assert val[-1]["rewards/margins"] > val[0]["rewards/margins"] + 0.5
    assert val[-1]["loss"] < val[0]["loss"] - 0.05
    assert (val[-1]["kl"] > 0) == (loss_type == "kto")
    test = [m for m in metrics if m["split"] == "test"]
    assert len(test) == 1 and set(test[0]) >= {"kl", "entropy", "logits/rejected"}
    assert (
        "desirable and" in proc.stdout and "kto reference: adapters_off" in proc.stdout
    )
    from mlx_lm import load

    model, _ = load(str(tiny_model), adapter_path=str(out))
    assert any(k.endswith("lora_a") for k, _ in _flatten(model.trainable_parameters()))


def test_yaml_config_through_plain_mlx_lm(tiny_model, tmp_path):
    """TRL's option names as YAML keys, with plain ``mlx_lm lora`` (the start-up hook): the
    weights reach the loss (at step 0 each row's loss is its weight x 1/2)."""
    data = kto_data(tmp_path / "data", n_train=8, n_valid=8)
    config = tmp_path / "kto.yaml"
    config.write_text(
        f"model: {tiny_model}\ntrain: true\ndata: {data}\nadapter_path: {tmp_path / 'out'}\n"
        "loss_type: kto\ndesirable_weight: 1.5\nundesirable_weight: 0.5\nbatch_size: 4\n"
        "iters: 1\nnum_layers: 2\nval_batches: -1\n"
    )
    run_cli("lora", "--config", config, module="mlx_lm")
    labels = [r["label"] for r in unpaired(make_rows(8, 2))]
    expected = 0.5 * sum(1.5 if good else 0.5 for good in labels) / len(labels)
    first = read_metrics(tmp_path / "out")[0]
    assert first["split"] == "val" and first["loss"] == pytest.approx(
        expected, abs=1e-6
    )


REFUSED = [
    (["--batch-size", 1], None, "with batch_size 1 it would equal the reward"),
    (["--reference", "none"], None, "always has a reference model"),
    ([], {"prompt": "Hi", "completion": "Yes."}, "train.jsonl:3: field 'label' is missing"),
    ([], {"prompt": "Hi", "completion": "Yes.", "label": 0}, "must be true (desirable)"),
    (["--truncation-mode", "keep_end"], None, "from the right only"),
]  # fmt: skip


def test_bad_input_is_one_line_before_the_model_loads(tiny_model, tmp_path):
    jobs = []
    for k, (flags, bad_row, _) in enumerate(REFUSED):
        data = kto_data(tmp_path / f"data{k}", n_train=4, n_valid=4)
        if bad_row:
            rows = unpaired(make_rows(4, 1))
            rows[2] = bad_row
            write_jsonl(data / "train.jsonl", rows)
        argv = ["--model", tiny_model, "--data", data, "--adapter-path", tmp_path / f"o{k}",
                "--train", "--iters", 1, "--loss-type", "kto", "--batch-size", 2, *flags]  # fmt: skip
        jobs.append((argv, tmp_path, {}))
    for (code, out, err), (_, _, message) in zip(run_cli_many(jobs), REFUSED):
        lines = err.strip().splitlines()
        assert code == 2 and "Traceback" not in err, err[-2000:]
        assert message in lines[-1], lines[-1:]
        assert "Loading pretrained model" not in out


def test_two_ranks_equal_one_process(tiny_model, tmp_path):
    """The KL estimate, the label sums and the loss's row mean are over the whole batch,
    whatever the ranks, a ragged last batch split unevenly included."""
    # 19 rows: the 5th step's batch is the 3 left, 2 on one rank and 1 on the other
    data = kto_data(tmp_path / "data", n_train=19, n_valid=6)
    argv = ["lora", "--model", tiny_model, "--data", data, "--train", "--iters", 5,
            "--batch-size", 4, "--num-layers", 2, "--steps-per-report", 2,
            "--steps-per-eval", 2, "--val-batches", -1, "--seed", 0, "--loss-type", "kto",
            "--optimizer", "sgd", "--learning-rate", 0.05, "--reference", "precomputed",
            "--prompt-sharing", "true"]  # fmt: skip
    cache = {"MLX_LM_PREF_CACHE": str(tmp_path / "c1")}
    lora(tiny_model, data, tmp_path / "one", *argv[5:], env=cache)
    launcher = [str(Path(sys.executable).parent / "mlx.launch"),
                "-n", "2", "--backend", "ring", "--starting-port", str(free_port_pair()),
                "--", sys.executable, "-m", "mlx_lm_pref"]  # fmt: skip
    proc = subprocess.run(
        launcher + [str(a) for a in argv] + ["--adapter-path", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1",
             "MLX_LM_PREF_CACHE": str(tmp_path / "c2")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["split"] for m in one] == [m["split"] for m in two]
    for a, b in zip(one, two):
        for name, value in a.items():
            if name not in ("split", "iteration"):
                assert b[name] == pytest.approx(value, **NOISE), (a["split"], name)
    # the last step's update (no report reads it) is the whole batch's row mean too
    a, b = (mx.load(str(tmp_path / d / "adapters.safetensors")) for d in ("one", "two"))
    for key in (k for k in a if k.endswith("lora_b")):
        scale = float(mx.abs(a[key]).max())
        assert float(mx.abs(a[key] - b[key]).max()) <= 1e-4 * scale, key
