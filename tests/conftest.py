"""Shared fixtures: a tiny HF-format Llama chat model and preference data folders, built
locally (no hub). Tests that depend on patch state run the CLI in a subprocess."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

# A Llama small enough to build in-process in milliseconds (tests of pure functions).
TINY_LLAMA = dict(
    model_type="llama",
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=50,
)
NOUNS = ["sky", "sea", "leaf", "sun", "rose", "snow", "coal", "lime", "plum", "sand"]
ADJ = ["calm", "bright", "small", "old", "quiet", "cold", "warm", "tall"]


def make_rows(n, seed, conversational=False, prompt=True):
    """Pairs whose chosen answer always says 'yes', learnt in a few dozen steps. The rejected
    answer names another noun, so an untrained model's preferences vary from pair to pair.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        noun, adj = rng.choice(NOUNS), rng.choice(ADJ)
        q = f"Is the {adj} {noun} nice?"
        good, bad = (
            f"Yes, the {noun} is nice.",
            f"No, the {rng.choice(NOUNS)} is {rng.choice(ADJ)}.",
        )
        if conversational:
            p = [{"role": "user", "content": q}]
            c = [{"role": "assistant", "content": good}]
            r = [{"role": "assistant", "content": bad}]
            rows.append(
                {"prompt": p, "chosen": c, "rejected": r}
                if prompt
                else {"chosen": p + c, "rejected": p + r}
            )
        else:
            rows.append(
                {"prompt": q + " ", "chosen": good, "rejected": bad}
                if prompt
                else {"chosen": f"{q} {good}", "rejected": f"{q} {bad}"}
            )
    return rows


def corpus():
    rows = make_rows(200, 123)
    return [r["prompt"] + r["chosen"] + " " + r["rejected"] for r in rows]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_data(
    folder, conversational=False, n_train=64, n_valid=16, n_test=16, prompt=True
):
    folder = Path(folder)
    for name, n, seed in (
        ("train", n_train, 1),
        ("valid", n_valid, 2),
        ("test", n_test, 3),
    ):
        write_jsonl(
            folder / f"{name}.jsonl", make_rows(n, seed, conversational, prompt)
        )
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from mlx_lm_pref.tiny import build_model

    return build_model(
        tmp_path_factory.mktemp("models") / "tiny", corpus(), vocab_size=300
    )


@pytest.fixture(scope="session")
def tiny_model_nobos(tmp_path_factory):
    from mlx_lm_pref.tiny import build_model

    return build_model(
        tmp_path_factory.mktemp("models") / "tiny_nobos",
        corpus(),
        vocab_size=300,
        bos=False,
    )


def run_cli(*args, cwd=None, check=True, module="mlx_lm_pref", timeout=600):
    """Run ``python -m <module> ...`` in a fresh interpreter (patch state cannot leak)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
        )
    return proc


def lora(model, data, adapter_path, *args, **kwargs):
    """``mlx_lm_pref lora --model M --data D --adapter-path A ...`` in a fresh interpreter."""
    return run_cli(
        "lora",
        "--model",
        model,
        "--data",
        data,
        "--adapter-path",
        adapter_path,
        *args,
        **kwargs,
    )


def read_metrics(adapter_path):
    return [
        json.loads(l)
        for l in (Path(adapter_path) / "metrics.jsonl").read_text().splitlines()
    ]


def whole_rows(tokens, spans):
    """A preference batch's ``(tokens, spans)`` as numpy in the concatenated layout, whichever
    layout it came in (see ``mlx_lm_pref.batching``)."""
    import numpy as np

    spans = np.array(spans)
    if not isinstance(tokens, (tuple, list)):
        return np.array(tokens), spans
    prompts, lengths, continuations = (np.array(t) for t in tokens)
    B = len(prompts)
    P = np.concatenate([lengths, lengths])
    rows = [
        prompts[k % B, : P[k]].tolist() + continuations[k, : spans[k, 1]].tolist()
        for k in range(2 * B)
    ]
    out = np.zeros((2 * B, max(map(len, rows))), np.int32)
    for k, row in enumerate(rows):
        out[k, : len(row)] = row
    return out, spans + P[:, None]
