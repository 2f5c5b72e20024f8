"""Random rows and random option values through the real loading path of ``mlx_lm_pref
lora``: whatever a user writes, the command trains (exit 0) or says what is wrong (exit 2),
never a traceback, and writes no adapter when it refuses.

The command runs in this process (``helpers.lora_here``: the console script's own code,
``mlx_lm_pref.cli.lora``, with its argv); a subprocess per example would cost seconds.
"""

import json
import os
import string
import tempfile
from pathlib import Path

import yaml
from helpers import lora_here
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

FIELDS = ["prompt", "chosen", "rejected", "tools", "chat_template_kwargs"]
ROLES = ["system", "user", "assistant", "tool", "developer", "usr", "", "bot"]

text = st.text(max_size=40) | st.text(
    alphabet=string.ascii_letters + " ?.,", max_size=40
)
huge = st.integers(1, 12_000).map(lambda n: ("word " * n)[:n])
# text that is not blank, any script
filled = (st.text(min_size=1, max_size=40) | text).filter(str.strip)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | text,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(ROLES), "content": text | huge | json_values}
)
messages = st.lists(message, max_size=3)
field_value = text | huge | messages | json_values
row = st.dictionaries(
    st.sampled_from(FIELDS + ["prompt_", "chosne", "question", "id"]) | text,
    field_value,
    max_size=6,
)
turn = lambda role: st.fixed_dictionaries(  # noqa: E731
    {"role": st.just(role), "content": filled | huge.filter(str.strip)}
)
standard_row = st.fixed_dictionaries(
    {"prompt": filled | huge.filter(str.strip), "chosen": filled, "rejected": filled}
)
conversational_row = st.fixed_dictionaries(
    {
        "prompt": st.lists(turn("user") | turn("system"), min_size=1, max_size=2),
        "chosen": st.lists(turn("assistant"), min_size=1, max_size=1),
        "rejected": st.lists(turn("assistant"), min_size=1, max_size=1),
    }
)
garbage = st.sampled_from(["{not json", "[1, 2]", "null", '"text"', "", "\xff"])
# a file of well-formed rows of one format, or anything at all
lines = (
    st.lists(standard_row.map(json.dumps), max_size=5)
    | st.lists(conversational_row.map(json.dumps), max_size=5)
    | st.lists(
        st.one_of(standard_row, conversational_row, row).map(json.dumps) | garbage,
        max_size=5,
    )
)
option_value = json_values | st.sampled_from(
    ["dpo", "orpo", "simpo", "ipo,sft", "true", "false", "auto", "1e-1", "nan", "inf"]
)
options = st.dictionaries(
    st.sampled_from(
        ["loss_type", "beta", "use_weighting", "reference", "prompt_sharing",
         "loss_weights", "label_smoothing", "ld_alpha", "truncation_mode",
         "identical_pairs", "cpo_alpha", "loss_tpye", "max_seq_length", "batch_size"]
    ),
    option_value,
    max_size=4,
)  # fmt: skip


GOOD = [
    json.dumps(
        {"prompt": "Is the sea calm? ", "chosen": "Yes, it is.", "rejected": "No."}
    ),
    json.dumps(
        {"prompt": "Is the sky old? ", "chosen": "Yes, very.", "rejected": "No!"}
    ),
]


def check(tiny_model, train, valid, config):
    """One run on these lines and YAML keys: exit 0 with an adapter, or exit 2 with one
    line before the model loads and no adapter."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "data").mkdir()
        (tmp / "data" / "train.jsonl").write_text("\n".join(train) + "\n")
        (tmp / "data" / "valid.jsonl").write_text("\n".join(valid) + "\n")
        (tmp / "c.yaml").write_text(yaml.safe_dump(config))
        code, stdout, stderr = lora_here(
            ["--config", tmp / "c.yaml", "--model", tiny_model, "--data", tmp / "data",
             "--adapter-path", tmp / "out", "--train", "--iters", 1, "--batch-size", 1,
             "--num-layers", 2, "--val-batches", 1, "--steps-per-report", 1]
        )  # fmt: skip
        event(f"exit {code}")
        assert code in (0, 2), stdout[-2000:] + stderr[-3000:]
        if code == 2:
            assert not (tmp / "out" / "adapters.safetensors").exists()
            assert stderr.startswith("mlx_lm_pref: error: ") or "usage:" in stderr
            assert len(stderr.strip().splitlines()) == 1 or "usage:" in stderr, stderr
            assert "Loading pretrained model" not in stdout
        else:
            assert (tmp / "out" / "adapters.safetensors").exists()


FUZZ = settings(
    max_examples=int(os.environ.get("MLX_LM_PREF_FUZZ_EXAMPLES", 30)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(
    train=lines,
    valid=lines,
    loss_type=st.sampled_from(["dpo", "orpo", "simpo", "ipo,sft"]),
)
def test_any_rows_train_or_are_refused_in_one_line(tiny_model, train, valid, loss_type):
    check(tiny_model, train, valid, {"loss_type": loss_type})


@FUZZ
@given(config=options)
def test_any_option_values_train_or_are_refused_in_one_line(tiny_model, config):
    check(tiny_model, GOOD, GOOD, {"loss_type": "dpo", **config})
