"""``mlx_lm_pref demo``: the task's guarantees, the BLAS choice, and the quick demo end to end
in subprocesses (model build included), which must show the improvement it was designed for.
"""

import json
import os
import sys

import pytest
from helpers import read_metrics, run_cli

from mlx_lm_pref.demo import command as demo
from mlx_lm_pref.demo import task


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_held_out_prompts_are_never_trained_on(tmp_path):
    held = {p.text for p in task.held_out_prompts()}
    sft = task.sft_rows(task.SFT["rows"], seed=task.SFT["data_seed"])
    sft_prompts = {row["messages"][0]["content"] for row in sft}
    data = task.write_preference_data(tmp_path / "data")
    pairs = read_jsonl(data / "train.jsonl") + read_jsonl(data / "valid.jsonl")
    pair_prompts = {row["prompt"][0]["content"] for row in pairs}
    assert held and sft_prompts and pair_prompts
    assert not held & sft_prompts and not held & pair_prompts
    # GRPO's and RLOO's prompt-only rows are the pairs' prompts, in the same format.
    data = task.write_prompt_data(tmp_path / "prompts")
    rows = read_jsonl(data / "train.jsonl") + read_jsonl(data / "valid.jsonl")
    assert rows == [{"prompt": row["prompt"]} for row in pairs]


def test_held_out_prompts_keep_templates_balanced():
    for per_template in (1, 5, task.HELD_OUT_PER_TEMPLATE):
        prompts = task.held_out_prompts(per_template)
        counts = [
            sum(p.template == t for p in prompts) for t in range(len(task.REQUESTS))
        ]
        assert counts == [per_template] * len(task.REQUESTS)


def test_judge():
    p = task.Prompt(template=3, obj="red key")
    assert task.judge(p, "Of course! Here is the red key.")
    assert task.judge(p, " Sure, here is the red key. Enjoy!")
    assert not task.judge(p, "Ugh. Get the red key yourself.")
    assert not task.judge(p, "Of course! Here is the blue key.")  # wrong object
    assert not task.judge(
        p, "Of course! Get the red key yourself."
    )  # polite, then rude


def test_judge_reward_is_the_judge_as_trl_calls_a_reward_function():
    prompts = task.held_out_prompts(2)
    answers = [
        "Of course! Here is the {x}.", "Ugh. Get the {x} yourself.",
        "Of course! Here is the red drum.", "Sure, here is the {x}. Enjoy!",
    ]  # fmt: skip
    texts = [answers[i % len(answers)].format(x=p.obj) for i, p in enumerate(prompts)]
    expected = [float(task.judge(p, t)) for p, t in zip(prompts, texts)]
    assert 0.0 in expected and 1.0 in expected
    ids = [[1, 2, 3]] * len(prompts)
    # Conversational (the demo's data), then standard; TRL adds keywords of its own.
    rewards = task.judge_reward(
        prompts=[p.messages() for p in prompts],
        completions=[[{"role": "assistant", "content": t}] for t in texts],
        completion_ids=ids,
        trainer_state=None,
    )
    assert rewards == expected and all(type(r) is float for r in rewards)
    assert task.judge_reward([p.text for p in prompts], texts, ids) == expected
    for p in task.all_prompts():
        assert task.prompt_of(p.text) == p


def test_kto_rows_are_the_pairs_unpaired():
    pairs = task.preference_rows(8, seed=3)
    rows = task.unpaired_rows(pairs, seed=0)
    assert sorted(json.dumps(r, sort_keys=True) for r in rows) == sorted(
        json.dumps({"prompt": p["prompt"], "completion": p[side], "label": label},
                   sort_keys=True)
        for p in pairs
        for side, label in (("chosen", True), ("rejected", False))
    )  # fmt: skip
    labels = [r["label"] for r in rows]
    assert labels != sorted(labels)  # shuffled: batches hold both labels


def test_preference_pairs_differ_in_tone_only():
    objects = {p.obj for p in task.all_prompts()}
    for row in task.preference_rows(64, seed=3):
        text = row["prompt"][0]["content"]
        (obj,) = [o for o in objects if f"the {o}" in text]
        prompt = task.Prompt(template=0, obj=obj)
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert task.judge(prompt, chosen) and not task.judge(prompt, rejected)
        assert f"the {obj}" in rejected


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")
def test_openblas_is_preloaded_only_when_nothing_else_is(tmp_path):
    library = tmp_path / "libopenblas.so.0"
    assert demo.openblas_preload({}, library) is None  # not installed
    library.touch()
    assert demo.openblas_preload({}, library) == str(library)
    # A user's own LD_PRELOAD (even an empty one) is left alone, and so is an opt-out.
    assert demo.openblas_preload({"LD_PRELOAD": ""}, library) is None
    assert demo.openblas_preload({"LD_PRELOAD": "/x/libfoo.so"}, library) is None
    assert demo.openblas_preload({demo.NO_OPENBLAS: "1"}, library) is None


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """One model cache for the module: the first demo run builds the model into it, over
    what an interrupted build of an earlier version left there (a folder with a config and
    no weights), which must not pass for a model."""
    cache = tmp_path_factory.mktemp("demo_cache")
    half = cache / task.MODEL_NAME
    half.mkdir()
    (half / "config.json").write_text("{}")
    (half / task.RECIPE).write_text('{"sha256": "0"}')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_LM_PREF_CACHE", str(cache))
        yield cache


@pytest.mark.numerics  # the demo model is built by training: its weights depend on the BLAS
@pytest.mark.parametrize("loss_type", ["dpo", "orpo", "kto", "grpo", "rloo"])
def test_quick_demo_makes_the_model_polite(demo_cache, tmp_path, loss_type):
    out = tmp_path / "out"
    out.mkdir()
    # A previous run's metrics must not leak into this one's (mlx_lm_pref appends).
    (out / "metrics.jsonl").write_text('{"split": "stale"}\n')

    proc = run_cli(
        "demo", "--quick", "--loss-type", loss_type, "--out", out, cwd=tmp_path
    )

    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["success_before"], summary["success_after"]
    log = proc.stdout
    # The base model mirrors the user's tone: polite on the 3 polite templates out of 7.
    assert 0.25 <= before <= 0.6, log[-3000:]
    val_before, val_after = summary["val_before"], summary["val_after"]
    if loss_type in demo.RL:
        # Sampled completions rewarded by the judge itself (measured: 42.9% -> 100%, the
        # sampled completions' mean reward 0.36 -> 0.96, on both BLAS builds).
        assert after >= before + 0.4, log[-3000:]
        assert "mlx_lm_pref.demo.task:judge_reward" in summary["lora_command"]
        assert val_after["reward"] >= val_before["reward"] + 0.4
        assert val_after["rewards/judge_reward/mean"] == pytest.approx(
            val_after["reward"]
        )
        # Sampled answers end before max_completion_length.
        assert val_after["completions/clipped_ratio"] <= 0.05  # measured: 0 to 1.2%
        assert "rewards/accuracies" not in val_after
        assert f"val reward (iter {val_before['iteration']} ->" in log
    else:
        assert after >= before + 0.3, log[-3000:]
        if loss_type == "kto":  # the same pairs as unpaired rows: no accuracy, a KL
            assert "rewards/accuracies" not in val_after and val_before["kl"] == 0.0
            assert val_after["loss"] < val_before["loss"] == pytest.approx(0.5)
        else:
            assert val_after["rewards/accuracies"] >= val_before["rewards/accuracies"]
        assert val_after["rewards/margins"] > val_before["rewards/margins"]
        # the demo's recipes unlearn nothing (measured: logps/chosen rises)
        assert "validation logps/chosen fell" not in log

    assert task.is_built(demo_cache / task.MODEL_NAME)
    assert (out / "adapters.safetensors").exists()
    metrics = read_metrics(out)
    assert {m["split"] for m in metrics} == {"train", "val"}
    assert max(m["iteration"] for m in metrics) == demo.MODES["quick"]["iters"]

    # The demo restarts itself with OpenBLAS where it can, and keeps a user's LD_PRELOAD.
    preloaded = "openblas" in os.environ.get("LD_PRELOAD", "")
    expected = preloaded or demo.openblas_preload(os.environ) is not None
    assert summary["blas"].startswith("OpenBLAS") == expected, summary["blas"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert summary["chart"] is None and "matplotlib" in summary["chart_skipped"]
        assert "chart.png" in log
    else:
        assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert summary["chart"] == str(out / "chart.png")
    assert "held-out success rate" in log


def test_a_run_that_unlearns_its_chosen_answers_is_warned_about(demo_cache, tmp_path):
    """DPO at TRL's beta 0.1 with lr 1e-3 on the demo's pairs: the margins grow while the
    chosen answers' log-probability collapses (measured: 4.3 nats per chosen token by step
    10) and the greedy answers turn into word salad."""
    model = task.ensure_model()
    data = task.write_preference_data(tmp_path / "data", n_train=64, n_valid=16)
    proc = run_cli("lora", "--model", model, "--data", data, "--train", "--loss-type",
                   "dpo", "--iters", 20, "--batch-size", 8, "--num-layers", -1,
                   "--learning-rate", 1e-3, "--steps-per-eval", 10, "--val-batches", -1,
                   "--adapter-path", tmp_path / "a")  # fmt: skip
    warnings = [l for l in proc.stdout.splitlines() if "logps/chosen fell" in l]
    assert len(warnings) == 1, proc.stdout[-3000:]  # said once
    assert warnings[0].startswith("[mlx_lm_pref] warning: validation logps/chosen fell")
    assert "rpo_alpha: 1" in warnings[0]


def test_the_watch_needs_a_fall_and_growing_margins():
    from mlx_lm_pref.degeneration import DegenerationWatch

    first = {"logps/chosen": -20.0, "rewards/margins": 0.0}
    watch = DegenerationWatch("kto", tokens=10.0)
    assert watch(first) is None  # the first validation is the baseline
    assert watch({"logps/chosen": -29.0, "rewards/margins": 5.0}) is None  # 0.9 a token
    assert watch({"logps/chosen": -40.0, "rewards/margins": -1.0}) is None  # no growth
    warning = watch({"logps/chosen": -40.0, "rewards/margins": 5.0})
    assert "(2 nats per chosen token)" in warning and "rpo_alpha" not in warning
    assert watch({"logps/chosen": -90.0, "rewards/margins": 9.0}) is None  # once
