"""``mlx_lm_pref evaluate``: an adapter's greedy answers and the base model's, scored by a
judge function; the win rate and its interval, against a hand count."""

import json
import math

import pytest
from helpers import lora, run_cli, write_data, write_jsonl

from mlx_lm_pref.judge import main, win_rate

JUDGE = """
def says_yes(completions, **kwargs):
    return [1.0 if c[0]["content"].startswith("Yes") else 0.0 for c in completions]


def broken(completions, **kwargs):
    return [1.0 / 0 for c in completions]


def length(completions, chosen, **kwargs):
    # the rows' other fields arrive by name, one per completion
    assert len(chosen) == len(completions)
    return [float(len(c[0]["content"])) for c in completions]
"""


class Proc:
    """``mlx_lm_pref evaluate ARGV`` run in this process (it patches nothing): its exit
    code and what it printed."""

    def __init__(self, *argv, check=True):
        import contextlib
        import io

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in argv])
                self.returncode = 0
            except SystemExit as e:
                self.returncode = e.code
        self.stdout, self.stderr = out.getvalue(), err.getvalue()
        assert not check or self.returncode == 0, self.stderr


def test_win_rate_counts_ties_as_half_and_leaves_unscored_out():
    result = win_rate([1, 0, 2, math.nan, 1], [0, 0, 3, 1, 2])
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (
        1,
        1,
        2,
        4,
    )
    assert result["win_rate"] == 1.5 / 4
    # Wilson's 95% interval of 5 in 10: 0.2366 to 0.7634 (the textbook value)
    low, high = win_rate([1] * 5 + [0] * 5, [0] * 5 + [1] * 5)["interval"]
    assert (low, high) == (
        pytest.approx(0.2366, abs=1e-4),
        pytest.approx(0.7634, abs=1e-4),
    )


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    data = write_data(root / "data", conversational=True, n_test=6)
    lora(tiny_model, data, root / "a", "--train", "--loss-type", "dpo", "--iters", 6,
         "--batch-size", 4, "--num-layers", -1, "--learning-rate", 3e-3,
         "--steps-per-eval", 100, "--val-batches", 1)  # fmt: skip
    (root / "judge.py").write_text(JUDGE)
    return root, data


def test_evaluate_matches_a_hand_count_and_mlx_lm_generate(tiny_model, trained):
    """The command itself, in a subprocess; the other tests call its main()."""
    from mlx_lm import load, stream_generate

    root, data = trained
    proc = run_cli("evaluate", "--model", tiny_model, "--adapter-path", root / "a",
                   "--data", data, "--judge", f"{root / 'judge.py'}:length",
                   "--max-tokens", 12, "--out", root / "r.json")  # fmt: skip
    result = json.loads((root / "r.json").read_text())
    answers = result["answers"]
    assert len(answers) == 6 == result["prompts"]
    # the judge, by hand, on the printed answers
    adapter = [float(len(a["adapter"])) for a in answers]
    base = [float(len(a["base"])) for a in answers]
    assert len(set(adapter)) > 1  # a count that could come out otherwise
    assert adapter == [a["score_adapter"] for a in answers]
    wins = sum(a > b for a, b in zip(adapter, base))
    ties = sum(a == b for a, b in zip(adapter, base))
    assert result["win_rate"] == pytest.approx((wins + ties / 2) / 6)
    assert result["mean_score"]["adapter"] == pytest.approx(sum(adapter) / 6)
    assert f"win rate     {result['win_rate']:.1%}" in proc.stdout
    assert proc.stdout.count("    with    ") == 3  # samples side by side
    # the answers are mlx-lm's own greedy generations, with and without the adapter
    prompt = json.loads((data / "test.jsonl").read_text().splitlines()[0])["prompt"]
    for side, adapter_path in (("adapter", root / "a"), ("base", None)):
        model, tokenizer = load(str(tiny_model), adapter_path=adapter_path)
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        tokens = [
            r.token for r in stream_generate(model, tokenizer, ids, max_tokens=12)
        ]
        tokens = [t for t in tokens if t not in tokenizer.eos_token_ids]
        text = tokenizer._tokenizer.decode(tokens, skip_special_tokens=True)
        assert text == answers[0][side], side


def test_a_file_the_first_prompts_and_no_samples(tiny_model, trained):
    root, data = trained
    proc = Proc("--model", tiny_model, "--adapter-path", root / "a",
                   "--data", data / "test.jsonl", "--judge", f"{root / 'judge.py'}:says_yes",
                   "--max-tokens", 4, "--num-prompts", 2, "--samples", 0)  # fmt: skip
    assert "2 prompts, judged by" in proc.stdout and "    with " not in proc.stdout


@pytest.mark.parametrize(
    "change, message",
    [
        (["--judge", "nowhere.py:f"], "--judge 'nowhere.py:f'"),
        (["--judge", "JUDGE:missing"], "has no attribute 'missing'"),
        (["--split", "valid", "--data", "EMPTY"], "no valid.jsonl there"),
        (["--adapter-path", "EMPTY"], "no adapters.safetensors there"),
        (["--data", "BAD/test.jsonl"], "test.jsonl:2: "),
        (["--max-tokens", 0], "--max-tokens 0: at least 1"),
        (
            ["--judge", "JUDGE:broken", "--max-tokens", 2],
            "raised ZeroDivisionError (judge",
        ),
    ],
)
def test_bad_input_is_one_line(tiny_model, trained, change, message):
    root, data = trained
    (root / "empty").mkdir(exist_ok=True)
    write_jsonl(root / "bad" / "test.jsonl", [{"prompt": "Hi"}, {"text": "no prompt"}])
    args = {"--model": tiny_model, "--adapter-path": root / "a", "--data": data,
            "--judge": f"{root / 'judge.py'}:says_yes"}  # fmt: skip
    for key, value in zip(change[::2], change[1::2]):
        args[key] = str(value).replace("EMPTY", str(root / "empty"))
        args[key] = args[key].replace("BAD", str(root / "bad"))
        args[key] = args[key].replace("JUDGE", str(root / "judge.py"))
    argv = [x for kv in args.items() for x in kv]
    proc = Proc(*argv, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    lines = [l for l in lines if not l.startswith("[mlx_lm_pref]")]  # progress
    assert len(lines) == 1 and lines[0].startswith("mlx_lm_pref evaluate: error: ")
    assert message in lines[0], lines[0]
