"""Preference rows: validation errors name file, line and field; tokenization follows TRL."""

import json

import pytest
from mlx_lm.utils import load_tokenizer

import mlx_lm_pref  # noqa: F401
from mlx_lm_pref.config import PreferenceArgs
from mlx_lm_pref.data import DataError, PreferenceDataset, extract_prompt, read_jsonl

DPO = PreferenceArgs(loss_type="dpo")
ORPO = PreferenceArgs(loss_type="orpo")
CPO = PreferenceArgs(loss_type="cpo")
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
        (
            {"promt": "Is it?", "chosen": " Yes.", "rejected": " No."},
            r"train.jsonl:3: field 'promt' is not a preference field; did you mean 'prompt'\?",
        ),
        (
            {"prompt": "Is it?", "chosen": " Yes.", "rejeced": " No."},
            r"train.jsonl:3: field 'rejeced' is not a preference field; did you mean 'rejected'\?",
        ),
        (
            {
                "prompt": [MSG("usr", "hi")],
                "chosen": [MSG("assistant", "a")],
                "rejected": [MSG("assistant", "b")],
            },
            r"train.jsonl:3: field 'prompt'\[0\] has unknown role 'usr'; did you mean 'user'\?",
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
        assert pair.chosen_start == pair.rejected_start
        assert pair.chosen[: pair.chosen_start] == tokenizer.encode(GOOD["prompt"])
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
    assert pair.chosen == list(full) and pair.chosen_start == len(prompt_ids)
    assert pair.rejected_start == pair.chosen_start
    assert tokenizer.eos_token_id not in pair.chosen
    assert tokenizer.decode(pair.chosen[pair.chosen_start :]) == "Hello.<|im_end|>\n"


def test_completion_starts_where_token_streams_diverge(tmp_path, tokenizer):
    # The prompt's trailing space merges into " Yes"/" No" across the boundary: the
    # completion must start at the first differing token, not at len(prompt_ids).
    row = {"prompt": "Is the sky nice? ", "chosen": "Yes.", "rejected": "No."}
    pair = load(tmp_path, tokenizer, [row])[0]
    prompt_ids = tokenizer.encode(row["prompt"])
    start = pair.chosen_start
    assert pair.rejected_start == start < len(prompt_ids)
    assert pair.chosen[:start] == pair.rejected[:start] == prompt_ids[:start]
    assert pair.chosen[start] != prompt_ids[start]


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


def test_implicit_prompt_with_nothing_shared_is_empty(tmp_path, tokenizer, capsys):
    """Where chosen and rejected share nothing the prompt is empty, as TRL's (whose back-off
    would read chosen[-1]: a chosen of ' ' and a rejected of 'e' from ('Sure thing. ',
    'Nope')); the pairs are counted. A conversation must have a prompt message."""
    assert extract_prompt("Sure thing. ", "Nope") == ("", "Sure thing. ", "Nope")
    assert extract_prompt(" Yes", " No") == ("", " Yes", " No")
    ds = load(
        tmp_path, tokenizer, [{"chosen": "Sure thing. ", "rejected": "Nope"}, GOOD]
    )
    assert ds.promptless == 1 and len(ds) == 2
    chosen = tokenizer.decode(ds[0].chosen[ds[0].chosen_start :])
    assert chosen.startswith("Sure thing. ")
    assert "1 of 2 pairs have no prompt" in capsys.readouterr().out
    row = {
        "chosen": [MSG("user", "a"), MSG("assistant", "b")],
        "rejected": [MSG("user", "c"), MSG("assistant", "b")],
    }
    refused = "train.jsonl:1: no 'prompt' field, and the first messages of 'chosen'"
    with pytest.raises(DataError, match=refused):
        load(tmp_path, tokenizer, [row])


@pytest.mark.parametrize(
    "row,hint",
    [
        ({"prompt": "Hi", "completion": "Yes.", "label": True}, "--loss-type kto"),
        ({"prompt": "Hi", "completion": "Yes."}, "SFT format (prompt, completion)"),
        ({"messages": [MSG("user", "Hi")]}, "SFT format (text or messages)"),
        ({"prompt": "Hi", "chosen": "Yes."}, None),  # a pair short of a field
    ],
)
def test_another_methods_rows_are_named(tmp_path, tokenizer, row, hint):
    with pytest.raises(DataError, match="train.jsonl:1: field .* is missing") as error:
        load(tmp_path, tokenizer, [row])
    if hint:
        assert hint in str(error.value)
    else:  # no other format to name
        assert " It is " not in str(error.value)


def test_prompt_filling_max_length_is_dropped_and_counted(tokenizer, capsys):
    rows = [GOOD, {**GOOD, "prompt": "Is the sky nice? " * 20}]
    ds = PreferenceDataset(rows, tokenizer, DPO, source="x.jsonl", max_seq_length=16)
    assert len(ds) == 1 and ds.dropped == 1
    assert "dropped 1 of 2 pairs" in capsys.readouterr().out
    assert all(len(s) <= 16 for s in (ds[0].chosen, ds[0].rejected))


def test_nothing_left_for_two_reasons_names_both(tokenizer):
    long = {**GOOD, "prompt": "Is the sky nice? " * 20}
    rows = [{**GOOD, "rejected": GOOD["chosen"]}, long]
    options = PreferenceArgs(loss_type="dpo", identical_pairs="drop")
    with pytest.raises(
        DataError,
        match="1 have chosen identical to rejected .*, the "
        "other 1 a prompt that alone reaches max_seq_length=16",
    ):
        PreferenceDataset(rows, tokenizer, options, source="x", max_seq_length=16)
    with pytest.raises(DataError, match="every prompt alone reaches max_seq_length"):
        PreferenceDataset([long], tokenizer, options, source="x", max_seq_length=16)


def test_pairs_in_unpatched_batching_fail_with_a_clear_message(tmp_path, tokenizer):
    import mlx_lm.tuner.trainer as trainer
    from mlx_lm.tuner.datasets import CacheDataset

    ds = CacheDataset(load(tmp_path, tokenizer, [GOOD, GOOD]))
    original = trainer.iterate_batches.__wrapped__
    with pytest.raises(
        TypeError, match="Import mlx_lm_pref before binding mlx-lm functions"
    ):
        next(original(ds, batch_size=2, max_seq_length=64))
    (batch,) = next(trainer.iterate_batches(ds, batch_size=2, max_seq_length=64))
    assert batch.tokens.shape[0] == 4
    assert batch.spans.tolist()[0][0] == ds[0].chosen_start


# --------------------------------------------------------------------------- ORPO / CPO
# TRL's ORPOTrainer and CPOTrainer share tokenize_row: text tokenized without special
# tokens, per-side prompt boundary, BOS/EOS ids added when missing, answers truncated.


@pytest.fixture(scope="module")
def tokenizer_nobos(tiny_model_nobos):
    return load_tokenizer(tiny_model_nobos)


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


MERGE = {"prompt": "Is the sky nice? ", "chosen": "Yes.", "rejected": " No."}


@pytest.mark.parametrize("options", [ORPO, CPO], ids=["orpo", "cpo"])
def test_orpo_standard_rows_bos_prepended_eos_id_appended(tokenizer, options):
    ds = PreferenceDataset([GOOD, {**GOOD, "chosen": " Yes.</s>"}], tokenizer, options)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt = encode(tokenizer, GOOD["prompt"])
    for pair in ds:
        for seq, start in (
            (pair.chosen, pair.chosen_start),
            (pair.rejected, pair.rejected_start),
        ):
            # encoded without special tokens, then BOS put in front exactly once
            assert seq[0] == bos and seq.count(bos) == 1
            assert seq[1:start] == prompt[: start - 1]
            # the EOS *id* is appended (no EOS string), never twice
            assert seq[-1] == eos and seq.count(eos) == 1
    assert ds[0].chosen == [bos] + encode(
        tokenizer, GOOD["prompt"] + GOOD["chosen"]
    ) + [eos]
    assert ds[1].chosen == ds[0].chosen


def test_orpo_without_bos_token_adds_none(tokenizer_nobos):
    pair = PreferenceDataset([GOOD], tokenizer_nobos, ORPO)[0]
    eos = tokenizer_nobos.eos_token_id
    assert tokenizer_nobos.bos_token_id is None
    assert pair.chosen == encode(tokenizer_nobos, GOOD["prompt"] + GOOD["chosen"]) + [
        eos
    ]


def test_orpo_dpo_differ_on_the_same_row(tokenizer):
    # DPO appends the EOS *string* and tokenizes with special tokens: the same ids here, but
    # the ORPO path must not go through the DPO one (explicit per-method dispatch).
    dpo = PreferenceDataset([MERGE], tokenizer, DPO)[0]
    orpo = PreferenceDataset([MERGE], tokenizer, ORPO)[0]
    assert dpo.chosen_start == dpo.rejected_start
    assert orpo.chosen_start != orpo.rejected_start


@pytest.mark.parametrize("options", [ORPO, CPO], ids=["orpo", "cpo"])
def test_orpo_per_side_prompt_boundary(tokenizer, options):
    # "? " + "Yes." merges the space into " Yes" (the prompt's last token changes): chosen
    # starts one token earlier; " No." keeps the space token, so rejected does not.
    pair = PreferenceDataset([MERGE], tokenizer, options)[0]
    prompt = encode(tokenizer, MERGE["prompt"])
    chosen_full = encode(tokenizer, MERGE["prompt"] + MERGE["chosen"])
    rejected_full = encode(tokenizer, MERGE["prompt"] + MERGE["rejected"])
    assert chosen_full[: len(prompt)] != prompt
    assert rejected_full[: len(prompt)] == prompt
    assert (
        pair.chosen_start == 1 + len(prompt) - 1
    )  # BOS, then the prompt less one token
    assert pair.rejected_start == 1 + len(prompt)
    assert tokenizer.decode(pair.chosen[pair.chosen_start :]) == " Yes.</s>"
    assert tokenizer.decode(pair.rejected[pair.rejected_start :]) == " No.</s>"


@pytest.mark.parametrize("options", [ORPO, CPO], ids=["orpo", "cpo"])
@pytest.mark.parametrize("bos", [True, False])
def test_orpo_conversational_renders_text_then_eos_after_template_end(
    tokenizer, tokenizer_nobos, bos, options
):
    tok = tokenizer if bos else tokenizer_nobos
    row = {
        "prompt": [MSG("system", "Be kind."), MSG("user", "Hi?")],
        "chosen": [MSG("assistant", "Hello.")],
        "rejected": [MSG("assistant", "Go away.")],
    }
    pair = PreferenceDataset([row], tok, options)[0]
    text = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    prompt = tok.apply_chat_template(
        row["prompt"], add_generation_prompt=True, tokenize=False
    )
    eos = tok.eos_token_id
    # the rendered template is tokenized as text: a template that renders the BOS token
    # keeps it once (not prepended again), one that renders none gets none
    assert pair.chosen == encode(tok, text) + [eos]
    assert pair.chosen.count(tok.bos_token_id) == (1 if bos else 0)
    assert pair.chosen_start == pair.rejected_start == len(encode(tok, prompt))
    # the template's end of turn, then the EOS id TRL appends
    assert tok.decode(pair.chosen[pair.chosen_start :]) == "Hello.<|im_end|>\n</s>"
    assert (
        tok.decode(pair.rejected[pair.rejected_start :]) == "Go away.<|im_end|>\n</s>"
    )


def test_orpo_conversational_prompt_ending_with_assistant_continues_it(tokenizer):
    # maybe_apply_chat_template: continue_final_message, and the prompt text is cut back to
    # what both rendered conversations share
    row = {
        "prompt": [MSG("user", "Hi?"), MSG("assistant", "Hel")],
        "chosen": [MSG("assistant", "lo.")],
        "rejected": [MSG("assistant", "p!")],
    }
    pair = PreferenceDataset([row], tokenizer, ORPO)[0]
    text = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    assert pair.chosen == encode(tokenizer, text) + [tokenizer.eos_token_id]
    assert "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHel<|im_end|>" in (
        tokenizer.decode(pair.chosen)
    )
    # the prompt stops inside the final message: its end of turn belongs to the completion
    assert tokenizer.decode(pair.chosen[: pair.chosen_start]).endswith("assistant\nHel")
    assert tokenizer.decode(pair.chosen[pair.chosen_start :]).startswith("<|im_end|>")
    with pytest.raises(DataError, match="last message has role 'system'"):
        PreferenceDataset(
            [
                {
                    "prompt": [MSG("system", "x")],
                    "chosen": row["chosen"],
                    "rejected": row["rejected"],
                }
            ],
            tokenizer,
            ORPO,
        )


def test_orpo_prompt_cut_back_to_what_the_conversations_share(tokenizer):
    # A template whose generation prompt is not what the conversation renders (DeepSeek-R1's
    # "<think>"): TRL keeps the common characters as the prompt, the rest is completion.
    hf = tokenizer._tokenizer
    template = hf.chat_template
    hf.chat_template = template.replace(
        "<|im_start|>assistant\n{% endif %}",
        "<|im_start|>assistant\n<think>{% endif %}",
    )
    try:
        row = {"prompt": [MSG("user", "Hi?")], "chosen": [MSG("assistant", "Hello.")]}
        row["rejected"] = [MSG("assistant", "Go away.")]
        pair = PreferenceDataset([row], tokenizer, ORPO)[0]
    finally:
        hf.chat_template = template
    assert tokenizer.decode(pair.chosen[: pair.chosen_start]).endswith("assistant\n")
    assert (
        tokenizer.decode(pair.chosen[pair.chosen_start :]) == "Hello.<|im_end|>\n</s>"
    )
    assert "<think>" not in tokenizer.decode(pair.chosen)


def test_orpo_chat_template_kwargs_per_row(tokenizer):
    # a template variable passed through chat_template_kwargs reaches the renderer
    hf = tokenizer._tokenizer
    template = hf.chat_template
    hf.chat_template = "{% if shout %}LOUD {% endif %}" + template
    try:
        row = {"prompt": [MSG("user", "Hi?")], "chosen": [MSG("assistant", "a")]}
        row["rejected"] = [MSG("assistant", "b")]
        quiet, loud = PreferenceDataset(
            [row, {**row, "chat_template_kwargs": {"shout": True}}], tokenizer, ORPO
        )
    finally:
        hf.chat_template = template
    assert "LOUD" not in tokenizer.decode(quiet.chosen)
    assert "LOUD" in tokenizer.decode(loud.chosen)


@pytest.mark.parametrize("options", [DPO, ORPO], ids=["dpo", "orpo"])
def test_tools_per_row_reach_the_template(tokenizer, options):
    # a row's tools (a list, or a JSON string of one) are rendered; ORPO/CPO pass an empty
    # list as None, as TRL's apply_chat_template
    hf = tokenizer._tokenizer
    template = hf.chat_template
    hf.chat_template = (
        "{% if tools is not none %}TOOLS{{ tools | length }} {% endif %}" + (template)
    )
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    try:
        row = {"prompt": [MSG("user", "Hi?")], "chosen": [MSG("assistant", "a")]}
        row["rejected"] = [MSG("assistant", "b")]
        pairs = PreferenceDataset(
            [row, {**row, "tools": [tool]}, {**row, "tools": json.dumps([tool])}],
            tokenizer,
            options,
        )
        empty = PreferenceDataset([{**row, "tools": []}], tokenizer, options)[0]
    finally:
        hf.chat_template = template
    texts = [tokenizer.decode(p.chosen) for p in pairs]
    assert "TOOLS" not in texts[0] and "TOOLS1" in texts[1] and "TOOLS1" in texts[2]
    assert ("TOOLS0" in tokenizer.decode(empty.chosen)) == (options is DPO)


def test_orpo_truncates_only_the_answer_and_drops_full_prompts(tokenizer, capsys):
    long_answer = {
        **GOOD,
        "chosen": " Yes, the sky is nice and the sea is calm and old.",
    }
    long_prompt = {**GOOD, "prompt": "Is the sky nice? " * 20}
    ds = PreferenceDataset(
        [long_answer, long_prompt], tokenizer, ORPO, source="x.jsonl", max_seq_length=10
    )
    assert len(ds) == 1 and ds.dropped == 1
    assert "dropped 1 of 2 pairs" in capsys.readouterr().out
    full = PreferenceDataset([long_answer], tokenizer, ORPO)[0]
    pair = ds[0]
    assert len(full.chosen) > 10 and len(pair.chosen) == 10
    # prompt intact, the answer cut to max_length - len(prompt), its EOS cut with it
    assert pair.chosen == full.chosen[:10] and pair.chosen_start == full.chosen_start
    assert pair.chosen[-1] != tokenizer.eos_token_id
    assert pair.rejected == full.rejected  # short enough: untouched


def test_orpo_rejects_a_tokenizer_without_chat_template_for_messages(tokenizer):
    hf = tokenizer._tokenizer
    template, hf.chat_template = hf.chat_template, None
    row = {"prompt": [MSG("user", "Hi?")], "chosen": [MSG("assistant", "a")]}
    try:
        with pytest.raises(
            DataError, match="data:1: .*no(ne)? chat template|chat template"
        ):
            PreferenceDataset(
                [{**row, "rejected": [MSG("assistant", "b")]}], tokenizer, ORPO
            )
    finally:
        hf.chat_template = template


# --------------------------------------------------------------------------- truncation


def test_keep_end_keeps_the_tail_and_moves_the_start(tokenizer):
    options = DPO.replace(truncation_mode="keep_end")
    row = {**GOOD, "prompt": "Is the sky nice? " * 4, "chosen": "Yes, the sky is nice."}
    full = PreferenceDataset([row], tokenizer, DPO)[0]
    pair = PreferenceDataset([row], tokenizer, options, max_seq_length=12)[0]
    assert len(full.chosen) > 12 and len(full.rejected) > 12
    assert len(full.chosen) != len(full.rejected)
    for whole, cut, start, new_start in (
        (full.chosen, pair.chosen, full.chosen_start, pair.chosen_start),
        (full.rejected, pair.rejected, full.rejected_start, pair.rejected_start),
    ):
        assert cut == whole[-12:]
        assert new_start == max(0, start - (len(whole) - 12))
        assert cut[new_start:] == whole[start:][-len(cut[new_start:]) :]
    # per side: the sequences are cut by different amounts
    assert pair.chosen_start != pair.rejected_start


def test_keep_end_drops_nothing_keep_start_drops_full_prompts(tokenizer):
    rows = [GOOD, {**GOOD, "prompt": "Is the sky nice? " * 20}]
    keep_end = DPO.replace(truncation_mode="keep_end")
    ds = PreferenceDataset(rows, tokenizer, keep_end, max_seq_length=16)
    assert len(ds) == 2 and ds.dropped == 0
    # the window is the head-cut prompt and the whole completion
    full = PreferenceDataset(rows[1:], tokenizer, DPO)[0]
    pair = ds[1]
    assert len(pair.chosen) == 16 and pair.chosen == full.chosen[-16:]
    assert 0 < pair.chosen_start < full.chosen_start
    assert pair.chosen[pair.chosen_start :] == full.chosen[full.chosen_start :]
    ds = PreferenceDataset(rows, tokenizer, DPO, max_seq_length=16)
    assert len(ds) == 1 and ds.dropped == 1


def test_extra_columns_are_fine(tmp_path, tokenizer):
    row = {**GOOD, "id": 7, "prompt_id": "abc", "score_chosen": 9.0, "source": "x"}
    assert len(load(tmp_path, tokenizer, [row])) == 1


def test_mixed_formats_in_one_file(tmp_path, tokenizer):
    chat = {
        "prompt": [MSG("user", "hi")],
        "chosen": [MSG("assistant", "a")],
        "rejected": [MSG("assistant", "b")],
    }
    with pytest.raises(
        DataError,
        match=r"train.jsonl:2: the row is conversational but .*train.jsonl:1 is standard",
    ):
        load(tmp_path, tokenizer, [GOOD, chat])


@pytest.mark.parametrize("policy,kept", [("keep", 3), ("drop", 2)])
def test_identical_pairs_are_counted_and_kept_or_dropped(
    tmp_path, tokenizer, capsys, policy, kept
):
    path = tmp_path / "train.jsonl"
    path.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [GOOD, {**GOOD, "rejected": GOOD["chosen"]}, GOOD]
        )
    )
    rows, lines = read_jsonl(path)
    ds = PreferenceDataset(
        rows,
        tokenizer,
        PreferenceArgs(loss_type="dpo", identical_pairs=policy),
        lines=lines,
    )
    assert len(ds) == kept and ds.identical == 1
    assert (
        f"1 of 3 pairs have chosen identical to rejected ({dict(keep='kept', drop='dropped')[policy]};"
        in capsys.readouterr().out
    )


def test_conversational_rows_need_a_chat_template(tmp_path, tokenizer):
    hf = tokenizer._tokenizer
    template, hf.chat_template = hf.chat_template, None
    try:
        chat = {
            "prompt": [MSG("user", "hi")],
            "chosen": [MSG("assistant", "a")],
            "rejected": [MSG("assistant", "b")],
        }
        with pytest.raises(
            DataError, match=r"train.jsonl:1: .*need a tokenizer with a chat template"
        ):
            load(tmp_path, tokenizer, [chat])
        assert len(load(tmp_path, tokenizer, [GOOD])) == 1  # standard rows do not
    finally:
        hf.chat_template = template
