"""Prompt sharing: the shared layout gives the concatenated forward's losses, metrics and
gradients; the probe accepts the architectures it reproduces and turns sharing off (or
refuses) for the others. (Training through the CLI is the same run either way, in every
combination of options: ``test_combinations``.)"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import (
    lora,
    random_batch,
    read_metrics,
    shared_layout,
    tiny_lora_model,
    tiny_model_of,
    write_jsonl,
)
from mlx.utils import tree_flatten
from mlx_lm.utils import load_tokenizer

import mlx_lm_pref  # noqa: F401
from mlx_lm_pref.batching import (
    SHARE_BELOW,
    PreferenceBatch,
    collate,
    collate_shared,
    iterate_preference_batches,
    make_batch,
    shared_positions,
)
from mlx_lm_pref.config import ConfigError, PreferenceArgs
from mlx_lm_pref.data import Pair, PreferenceDataset
from mlx_lm_pref.objective import PreferenceLoss
from mlx_lm_pref.sharing import prompt_sharing_problem, resolve_prompt_sharing


def long_prompt_batch(seed, pairs=3):
    """Prompts 4-8x the completions, of different lengths per pair."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(pairs):
        prompt = [1] + rng.integers(3, 50, rng.integers(12, 30)).tolist()
        chosen = rng.integers(3, 50, rng.integers(2, 5)).tolist()
        rejected = rng.integers(3, 50, rng.integers(2, 5)).tolist()
        out.append(Pair(prompt + chosen, prompt + rejected, len(prompt)))
    return PreferenceBatch(*collate(out, 2048))


CASES = [
    dict(loss_type="dpo"),
    dict(loss_type="dpo", reference="initial_adapter"),
    dict(loss_type="ipo,sft", loss_weights="1.0,0.5", ld_alpha=0.5),
    dict(loss_type="dpo", use_weighting=True, f_divergence_type="js_divergence"),
    dict(loss_type="orpo"),
    dict(loss_type="cpo"),
    dict(loss_type="simpo"),
]


@pytest.mark.numerics
@pytest.mark.parametrize("batch", ["random", "long_prompts"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_same_loss_metrics_and_gradients(case, batch):
    model = tiny_lora_model()
    initial = None
    if case.get("reference") == "initial_adapter":
        from mlx_lm_pref.reference import InitialAdapter

        initial = InitialAdapter(model)
    rows = random_batch(5) if batch == "random" else long_prompt_batch(5)
    loss_and_grad = nn.value_and_grad(
        model, PreferenceLoss(PreferenceArgs(**case), initial)
    )
    results = []
    for layout in (rows, shared_layout(rows)):
        (loss, ntoks), grads = loss_and_grad(model, layout)
        results.append((loss, ntoks, model._pref_metrics, dict(tree_flatten(grads))))
    (loss, ntoks, metrics, grads), (s_loss, s_ntoks, s_metrics, s_grads) = results
    assert abs(loss.item() - s_loss.item()) <= 1e-5
    assert ntoks.item() == s_ntoks.item()
    assert np.allclose(metrics, s_metrics, atol=1e-5, rtol=1e-5)
    assert grads.keys() == s_grads.keys()
    scale = max(mx.abs(g).max().item() for g in grads.values())
    assert scale > 0  # the comparison means something
    for name, g in grads.items():
        assert mx.abs(g - s_grads[name]).max().item() <= 1e-5 * max(scale, 1.0), name


def test_shared_layout_reads_each_prompt_once():
    chosen = [1, 5, 6, 7, 8, 9, 10]
    pairs = [
        Pair(chosen, [1, 5, 6, 7, 8, 4], 5),  # prompt of 5 tokens
        Pair([1, 9, 9, 9, 2], [1, 9, 9, 3, 3, 3], 3, 3),  # shares 3 tokens
        Pair([1, 2, 3], [4, 2, 3], 1, 1),  # nothing shared past token 0: P = 0
    ]
    (prompts, lengths, continuations), spans = collate_shared(pairs, 2048)
    # P = tokens shared before the earlier completion start, less the last one, which
    # starts both continuations (so both rows predict their first completion token).
    assert lengths.tolist() == [4, 2, 0]
    assert prompts[0, :5].tolist() == [1, 5, 6, 7, 8]
    assert continuations[0, :3].tolist() == [8, 9, 10]
    assert continuations[3, :2].tolist() == [8, 4]
    assert continuations[5, :3].tolist() == [4, 2, 3]
    # spans count in continuation tokens: [start - P, end - P)
    assert spans.tolist() == [[1, 3], [1, 3], [1, 3], [1, 2], [1, 4], [1, 3]]
    assert prompts.shape[1] == continuations.shape[1] == 33  # 1 + a multiple of 32


def test_auto_shares_where_it_computes_fewer_positions():
    long = [Pair([1] + [5] * 100 + [6, 7], [1] + [5] * 100 + [8], 101)]
    short = [Pair([1, 5, 6, 7] + [3] * 40, [1, 5, 8] + [3] * 40, 2)]
    assert shared_positions(long, 2048) < SHARE_BELOW < shared_positions(short, 2048)
    assert shared_positions([Pair([1, 2], [3, 4], 1)], 2048) is None
    assert make_batch(long, 2048, "x", "auto").shared
    assert not make_batch(short, 2048, "x", "auto").shared
    assert make_batch(short, 2048, "x", "true").shared
    assert not make_batch(long, 2048, "x", "false").shared
    assert not make_batch(long, 2048, "x").shared  # whole rows unless asked


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("llama", {}),
        ("llama", {"rope_scaling": LLAMA3_ROPE}),
        ("qwen2", {}),
        ("qwen3", {}),
        ("gemma", {}),
        ("phi3", {}),
        ("olmo2", {}),
        ("starcoder2", {}),
        ("smollm3", {}),
        ("gemma3_text", {}),  # sliding-window layers: the cache's mask has the window
        ("cohere2", {}),
        ("mixtral", {}),
        ("gpt2", dict(n_embd=32, n_head=4, n_layer=2, n_ctx=256, n_positions=256)),
        (
            "gpt_neox",
            dict(rotary_pct=0.5, rotary_emb_base=10000, use_parallel_residual=True),
        ),
    ],
)
def test_probe_accepts_architectures_it_reproduces(model_type, overrides):
    assert prompt_sharing_problem(tiny_model_of(model_type, **overrides)) is None


class RoPEWithoutOffset(nn.RoPE):
    """Positions counted from 0 in every call, whatever the cache says."""

    def __call__(self, x, offset=0):
        return super().__call__(x, offset=0)


def llama_with_its_own_positions():
    model = tiny_model_of("llama")
    for layer in model.layers:
        layer.self_attn.rope = RoPEWithoutOffset(8)
    return model


@pytest.mark.parametrize(
    "build,problem",
    [
        (lambda: tiny_model_of("gemma2"), "does not accept the shared-prompt cache"),
        (llama_with_its_own_positions, "differs from its own"),
    ],
    ids=["gemma2-own-mask-shape", "own-positions"],
)
def test_probe_turns_sharing_off_where_it_would_be_wrong(build, problem, capsys):
    model = build()
    assert problem in prompt_sharing_problem(model)
    options = resolve_prompt_sharing(model, PreferenceArgs(loss_type="dpo"))
    assert options.prompt_sharing == "false"
    assert "prompt sharing off" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="prompt_sharing true"):
        resolve_prompt_sharing(
            model, PreferenceArgs(loss_type="dpo", prompt_sharing="true")
        )


def long_prompt_rows(n, seed):
    """A long shared context before a short question: prompts ~6x the answers."""
    rng = np.random.default_rng(seed)
    nouns = ["sky", "sea", "leaf", "sun", "rose", "snow", "coal", "lime"]
    rows = []
    for _ in range(n):
        context = " ".join(f"The {rng.choice(nouns)} is calm." for _ in range(10))
        noun = rng.choice(nouns)
        rows.append(
            {
                "prompt": f"{context} Is the {noun} nice? ",
                "chosen": f"Yes, the {noun} is nice.",
                "rejected": f"No, the {rng.choice(nouns)} is old.",
            }
        )
    return rows


def test_auto_shares_every_batch_of_long_prompts(tiny_model):
    pairs = PreferenceDataset(
        long_prompt_rows(16, 1), load_tokenizer(tiny_model), PreferenceArgs("dpo")
    )
    batches = list(iterate_preference_batches(pairs, 2, 2048, prompt_sharing="auto"))
    assert len(batches) == 8 and all(batch.shared for (batch,) in batches)
    batches = list(iterate_preference_batches(pairs, 2, 2048))
    assert not any(batch.shared for (batch,) in batches)


def test_gradient_checkpointing_turns_sharing_off(tiny_model, tmp_path):
    """mlx-lm's grad_checkpoint recomputes a layer without the cache, which would drop the
    gradient through the prompt's keys and values: auto trains unshared, true refuses.
    """
    data = tmp_path / "data"
    for split, n, seed in (("train", 8, 1), ("valid", 4, 2)):
        write_jsonl(data / f"{split}.jsonl", long_prompt_rows(n, seed))
    common = ["--train", "--loss-type", "dpo", "--grad-checkpoint", "--iters", "2"]
    common += ["--batch-size", "2", "--num-layers", "2", "--val-batches", "1"]
    proc = lora(tiny_model, data, tmp_path / "auto", *common)
    assert "prompt sharing off" in proc.stdout and "grad_checkpoint" in proc.stdout
    assert len(read_metrics(tmp_path / "auto")) >= 2
    proc = lora(
        tiny_model,
        data,
        tmp_path / "true",
        *common,
        "--prompt-sharing",
        "true",
        check=False,
    )
    assert proc.returncode == 2 and "gradient checkpointing" in proc.stderr
    assert not (tmp_path / "true" / "adapters.safetensors").exists()


def test_yaml_booleans_and_bad_values():
    assert PreferenceArgs(prompt_sharing=True).prompt_sharing == "true"
    assert PreferenceArgs(prompt_sharing=False).prompt_sharing == "false"
    with pytest.raises(ConfigError, match="Unknown prompt_sharing 'always'"):
        PreferenceArgs(prompt_sharing="always")
