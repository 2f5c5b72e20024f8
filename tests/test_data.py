"""Preference rows: validation errors name file, line and field; tokenization follows TRL."""

import json

import pytest
from mlx_lm.utils import load_tokenizer

import mlx_lm_pref  # noqa: F401
from mlx_lm_pref.config import PreferenceArgs
from mlx_lm_pref.data import DataError, PreferenceDataset, extract_prompt, read_jsonl

DPO = PreferenceArgs(loss_type="dpo")
GOOD = {"prompt": "Is the sky nice?", "chosen": " Yes.", "rejected": " No."}
MSG = lambda role, text: {"role": role, "content": text}  # noqa: E731


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


def load(tmp_path, tokenizer, lines):
    path = tmp_path / "train.jsonl"
    path.write_text(
        "".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines)
    )
    rows, numbers = read_jsonl(path)
    return PreferenceDataset(rows, tokenizer, DPO, source=str(path), lines=numbers)


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"prompt": "x", "chosen": "y"}, r"train.jsonl:3: field 'rejected' is missing"),
        ({**GOOD, "chosen": ""}, r"train.jsonl:3: field 'chosen' is empty"),
        ({**GOOD, "rejected": "   "}, r"train.jsonl:3: field 'rejected' is empty"),
        (
            {**GOOD, "chosen": 5},
            r"train.jsonl:3: field 'chosen' must be a string \(the row is standard\), got int",
        ),
        ({**GOOD, "prompt": ""}, r"train.jsonl:3: field 'prompt' is empty"),
        ('{"prompt": "x", "chosen": ', r"train.jsonl:3: invalid JSON"),
        ([1, 2], r"train.jsonl:3: expected a JSON object, got list"),
        (
            {
                "prompt": [MSG("user", "hi")],
                "chosen": [MSG("assistant", 3)],
                "rejected": [MSG("assistant", "no")],
            },
            r"train.jsonl:3: field 'chosen'\[0\] 'content' must be a string, got int",
        ),
        (
            {
                "prompt": [MSG("user", "hi")],
                "chosen": "yes",
                "rejected": [MSG("assistant", "no")],
            },
            r"train.jsonl:3: field 'chosen' must be a list of messages \(the row is conversational\), got str",
        ),
        (
            {
                "prompt": [MSG("user", "hi")],
                "chosen": [MSG("assistant", "yes")],
                "rejected": "no",
            },
            r"train.jsonl:3: field 'rejected' must be a list of messages \(the row is conversational\), got str",
        ),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, tokenizer, bad, message):
    # a blank line 2 is skipped but still counted, so the bad row is line 3
    with pytest.raises(DataError, match=message):
        load(tmp_path, tokenizer, [GOOD, "", bad, GOOD])


def test_non_utf8_bytes(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid UTF-8"):
        read_jsonl(path)


def test_standard_rows_bos_once_eos_appended_once(tmp_path, tokenizer):
    ds = load(tmp_path, tokenizer, [GOOD, {**GOOD, "chosen": " Yes.</s>"}])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for pair in ds:
        for seq in (pair.chosen, pair.rejected):
            assert seq[0] == bos and seq.count(bos) == 1
            assert seq[-1] == eos and seq.count(eos) == 1
        assert pair.chosen[: pair.prompt_length] == tokenizer.encode(GOOD["prompt"])
    assert ds[0].chosen == ds[1].chosen  # EOS already there: not added twice


def test_conversational_rows_use_the_template_without_extra_eos(tmp_path, tokenizer):
    row = {
        "prompt": [MSG("system", "Be kind."), MSG("user", "Hi?")],
        "chosen": [MSG("assistant", "Hello.")],
        "rejected": [MSG("assistant", "Go away.")],
    }
    pair = load(tmp_path, tokenizer, [row])[0]
    prompt_ids = tokenizer.apply_chat_template(
        row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    full = tokenizer.apply_chat_template(
        row["prompt"] + row["chosen"], tokenize=True, return_dict=False
    )
    assert pair.chosen == list(full) and pair.prompt_length == len(prompt_ids)
    assert tokenizer.eos_token_id not in pair.chosen
    assert tokenizer.decode(pair.chosen[pair.prompt_length :]) == "Hello.<|im_end|>\n"


def test_completion_starts_where_token_streams_diverge(tmp_path, tokenizer):
    # "nice?" followed directly by "Yes" may merge across the boundary: the completion
    # must start at the first differing token, not at len(prompt_ids).
    row = {"prompt": "Is the sky nice", "chosen": "? Yes.", "rejected": "? No."}
    pair = load(tmp_path, tokenizer, [row])[0]
    prompt_ids = tokenizer.encode(row["prompt"])
    assert pair.chosen[: pair.prompt_length] == pair.rejected[: pair.prompt_length]
    assert pair.chosen[: pair.prompt_length] == prompt_ids[: pair.prompt_length]


def test_implicit_prompt_as_trl():
    assert extract_prompt("Q: sky? A: blue", "Q: sky? A: red") == (
        "Q: sky? A:",
        " blue",
        " red",
    )
    p, c, r = extract_prompt(
        [MSG("user", "q"), MSG("assistant", "a")],
        [MSG("user", "q"), MSG("assistant", "b")],
    )
    assert (
        p == [MSG("user", "q")]
        and c == [MSG("assistant", "a")]
        and r == [MSG("assistant", "b")]
    )


def test_prompt_filling_max_length_is_dropped_and_counted(tokenizer, capsys):
    rows = [GOOD, {**GOOD, "prompt": "Is the sky nice? " * 20}]
    ds = PreferenceDataset(rows, tokenizer, DPO, source="x.jsonl", max_seq_length=16)
    assert len(ds) == 1 and ds.dropped == 1
    assert "dropped 1 of 2 pairs" in capsys.readouterr().out
    assert all(len(s) <= 16 for s in (ds[0].chosen, ds[0].rejected))


def test_pairs_in_unpatched_batching_fail_with_a_clear_message(tmp_path, tokenizer):
    import mlx_lm.tuner.trainer as trainer
    from mlx_lm.tuner.datasets import CacheDataset

    ds = CacheDataset(load(tmp_path, tokenizer, [GOOD, GOOD]))
    original = trainer.iterate_batches.__wrapped__
    with pytest.raises(
        TypeError, match="Import mlx_lm_pref before binding mlx-lm functions"
    ):
        next(original(ds, batch_size=2, max_seq_length=64))
    tokens, spans, options = next(
        trainer.iterate_batches(ds, batch_size=2, max_seq_length=64)
    )
    assert tokens.shape[0] == 4 and spans.tolist()[0][0] == ds[0].prompt_length
    assert PreferenceArgs(*options) == DPO
