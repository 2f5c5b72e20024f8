"""Synthetic models and preference data for the benchmarks (runs in the product's venv).

- ``build_assets(size, root)``: a tokenizer trained by ``mlx_lm_pref.demo.tiny.build_tokenizer`` on a
  pseudo-word corpus and random Llama weights (``mlx_lm.models.llama``) in an HF-style folder
  (``config.json`` + ``model.safetensors`` with HF names), which ``mlx_lm.load``,
  mlx-lm-lora and ``transformers`` all open.
- ``make_rows``: standard ``{"prompt", "chosen", "rejected"}`` text rows whose token lengths
  follow the length mix (every pseudo-word is one token of the trained tokenizer).
- ``sample_batch``: the rows through the product's real data path
  (``mlx_lm_pref.data.PreferenceDataset`` with DPO's TRL tokenization, then
  ``mlx_lm_pref.batching.iterate_preference_batches``), one epoch of batches, of which the batch
  of median width is the one every tool is timed on.
"""

from pathlib import Path

import numpy as np
from bench_common import REAL_MODELS, SIZES

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
TOKENIZER_VOCAB = 4096
N_WORDS = 600


def words(n=N_WORDS, seed=0):
    rng = np.random.default_rng(seed)
    out = set()
    while len(out) < n:
        k = rng.integers(1, 4)
        out.add(
            "".join(
                rng.choice(list(CONSONANTS)) + rng.choice(list(VOWELS))
                for _ in range(k)
            )
        )
    return sorted(out)


def corpus(seed=0):
    vocab = words()
    rng = np.random.default_rng(seed + 1)
    # every word many times, so BPE merges each " word" into one token
    return [" ".join(rng.choice(vocab, 40)) for _ in range(2000)]


def build_assets(size: str, root) -> Path:
    import json

    from mlx_lm_pref.demo.tiny import build_model

    if size in REAL_MODELS:
        path = REAL_MODELS[size]
        if not (path / "model.safetensors").exists():
            raise SystemExit(
                f"{path}: no model there; convert it first: "
                f"python benchmarks/convert_smollm2.py {path}"
            )
        return path
    path = Path(root) / f"llama_{size}"
    try:  # reuse a folder built earlier with the same configuration
        config = json.loads((path / "config.json").read_text())
        if (
            (path / "model.safetensors").exists()
            and (path / "tokenizer.json").exists()
            and all(config.get(k) == v for k, v in SIZES[size].items())
        ):
            return path
    except (OSError, ValueError):
        pass
    return build_model(
        path,
        corpus(),
        vocab_size=TOKENIZER_VOCAB,
        bos=True,
        seed=0,
        config=dict(SIZES[size]),
    )


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def make_rows(n, mix, seed):
    vocab = words()
    rng = np.random.default_rng(seed)

    def text(lo_hi):
        k = int(rng.integers(lo_hi[0], lo_hi[1] + 1))
        return " ".join(rng.choice(vocab, k))

    rows = []
    for _ in range(n):
        # the prompt ends without a space and each completion starts with one, so the
        # prompt/completion boundary is a token boundary (no BPE merge across it)
        rows.append(
            {
                "prompt": text(mix["prompt"]),
                "chosen": " " + text(mix["completion"]),
                "rejected": " " + text(mix["completion"]),
            }
        )
    return rows


def sample_batch(model_path, batch_size, mix, seed=0, pairs_per_batch=8):
    """The timed batch: ``(tokens, spans, info)``; ``info`` has the per-pair token lists
    (for the peers) and the real-token share of this batch and of the whole epoch."""
    import mlx.core as mx

    from mlx_lm_pref.batching import iterate_preference_batches
    from mlx_lm_pref.config import PreferenceArgs
    from mlx_lm_pref.data import PreferenceDataset

    tok = load_tokenizer(model_path)
    rows = make_rows(pairs_per_batch * batch_size, mix, seed)
    max_len = 4096
    # whole rows (the (2B, L) array SFT trains on); the worker lays out its own batches
    options = PreferenceArgs(loss_type="dpo", prompt_sharing="false")
    dataset = PreferenceDataset(
        rows, tok, options, source="bench", max_seq_length=max_len
    )
    batches = [
        (b.tokens, b.spans)
        for (b,) in iterate_preference_batches(dataset, batch_size, max_len, seed=seed)
    ]
    real = sum(int(s[:, 1].sum().item()) for _, s in batches)
    computed = sum(t.shape[0] * t.shape[1] for t, _ in batches)
    order = sorted(range(len(batches)), key=lambda i: batches[i][0].shape[1])
    tokens, spans = batches[order[len(order) // 2]]
    mx.eval(tokens, spans)
    t, s = np.array(tokens), np.array(spans)
    B = t.shape[0] // 2
    pairs = [
        {
            "chosen": t[i, : s[i, 1]].tolist(),
            "rejected": t[B + i, : s[B + i, 1]].tolist(),
            "chosen_start": int(s[i, 0]),
            "rejected_start": int(s[B + i, 0]),
        }
        for i in range(B)
    ]
    auto = PreferenceDataset(
        rows,
        tok,
        PreferenceArgs(loss_type="dpo"),
        source="bench",
        max_seq_length=max_len,
    )
    shared = [
        b.tokens
        for (b,) in iterate_preference_batches(
            auto, batch_size, max_len, seed=seed, prompt_sharing="auto"
        )
    ]
    info = {
        "pairs": pairs,
        # what mx.compile traces per shape: whole rows vs the layouts prompt_sharing auto picks
        "epoch_shapes": len({t.shape for t, _ in batches}),
        "epoch_shapes_auto": len(
            {
                tuple(a.shape for a in t) if isinstance(t, tuple) else t.shape
                for t in shared
            }
        ),
        "epoch_shared_batches": sum(isinstance(t, tuple) for t in shared),
        "epoch_real_fraction": real / computed,
        "epoch_batches": len(batches),
        "prompt_lengths": [p["chosen_start"] for p in pairs],
        "chosen_lengths": [len(p["chosen"]) - p["chosen_start"] for p in pairs],
        "rejected_lengths": [len(p["rejected"]) - p["rejected_start"] for p in pairs],
    }
    return tokens, spans, info
