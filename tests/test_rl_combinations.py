"""GRPO's and RLOO's options, every pair of values, through the real CLI: a pairwise covering
design over the RL options (``covering.py``), each case a short training run in a
subprocess with completions sampled from the tiny model and scored by two reward functions.

Each case runs again as its twin with the options that claim not to change the numbers put
back: prompt sharing off (each prompt run once for its group vs whole rows) and the whole
logits instead of the output layer in tiles. Sampling draws the same random numbers either
way, so the twin samples the same completions, and the metrics (the sampling's and the
loss's) and the adapters must agree within float32 noise. ``test_combinations`` has GRPO and
RLOO in its design over the options every method shares (references, fine-tuning types,
data sources, accumulation, the two entry points).
"""

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
from covering import coverable_pairs, covering, pairs_of
from helpers import NOISE, make_rows, run_cli_many, write_jsonl
from test_combinations import (
    REWARD_FILE,
    assert_same,
    collect,
    key_of,
    launch_prefix,
)

pytestmark = pytest.mark.numerics

FACTORS = {
    "loss": ["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "rloo"],
    "beta": [0.0, 0.04],
    "level": ["token", "sequence"],  # importance_sampling_level
    "scale": ["group", "batch", "none"],  # scale_rewards
    "sharing": ["auto", "true"],
    "head": ["0", "64"],  # head_chunk_size (the tiny model's vocabulary: 300)
    "iterations": [1, 2],  # num_iterations: the sampling-time log-probs as old
    "mask_truncated": [False, True],
    "rows": ["standard", "conversational"],
    "test": [False, True],
    "log": [False, True],  # log_completions
}


def valid(case) -> bool:
    """RLOO reads no importance_sampling_level nor scale_rewards: they stay default."""
    if case["loss"] == "rloo" and (case["level"], case["scale"]) != ("token", "group"):
        return False
    return True


CASES = covering(FACTORS, valid, seed=0)
G = 2  # completions per prompt
B = 4  # completions per batch


def test_the_design_covers_every_valid_pair():
    covered = set().union(*(pairs_of(c, list(FACTORS)) for c in CASES))
    assert coverable_pairs(FACTORS, valid) <= covered
    assert len(CASES) <= 24  # the suite's time


def twin_of(case) -> dict:
    return dict(case, sharing="false", head="0", log=False)


def command(case, root, model) -> list:
    rows = make_rows(3 * B // G, 5, case["rows"] == "conversational")
    for split in ("train", "valid", "test"):
        write_jsonl(root / "data" / f"{split}.jsonl", rows)
    (root / "rewards.py").write_text(REWARD_FILE)
    reward = root / "rewards.py"
    args = ["--train", "--adapter-path", root / "out", "--model", model]
    args += ["--data", root / "data", "--iters", 2 * case["iterations"]]
    args += ["--batch-size", B, "--steps-per-report", 1, "--steps-per-eval", 100]
    args += ["--val-batches", -1, "--num-layers", 2, "--seed", 0, "--save-every", 100]
    args += ["--optimizer", "sgd", "--learning-rate", 0.5, "--max-seq-length", 512]
    args += ["--prompt-sharing", case["sharing"], "--head-chunk-size", case["head"]]
    args += ["--loss-type", case["loss"], "--beta", case["beta"]]
    args += ["--reward-funcs", f"{reward}:short,{reward}:echo"]
    args += ["--reward-weights", "1,0.5", "--num-generations", G]
    args += ["--max-completion-length", 6, "--num-iterations", case["iterations"]]
    args += ["--temperature", 0.8, "--report-metrics", "all"]
    if case["loss"] != "rloo":
        args += ["--importance-sampling-level", case["level"]]
        args += ["--scale-rewards", case["scale"]]
    if case["mask_truncated"]:
        args.append("--mask-truncated-completions")
    if case["test"]:
        args.append("--test")
    if case["log"]:
        args.append("--log-completions")
    return args


@pytest.fixture(scope="module")
def outcomes(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_combinations")
    jobs, keys, seen = [], [], set()
    for i, case in enumerate(CASES + DISTRIBUTED):
        for j, run in enumerate((case, twin_of(case))):
            if key_of(run) in seen:
                continue
            seen.add(key_of(run))
            where = root / f"case{i}" / f"run{j}"
            where.mkdir(parents=True)
            jobs.append(
                (command(run, where, tiny_model), where, {}, "mlx_lm_pref.lora")
            )
            keys.append((key_of(run), where))
    half = len(jobs) // 2  # two interpreters side by side
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(run_cli_many, [jobs[:half], jobs[half:]]))
        distributed = [
            pool.submit(run_two_ranks, case, root / f"ranks{i}", tiny_model)
            for i, case in enumerate(DISTRIBUTED)
        ]
        two = {
            key_of(case) + "@2": f.result() for case, f in zip(DISTRIBUTED, distributed)
        }
    results = parts[0] + parts[1]
    one = {key: collect(where, *r) for (key, where), r in zip(keys, results)}
    return {**one, **two}


# Also on 2 ranks: each samples whole groups of its share of the prompts (from seeds of
# their places in the generation batch: the samples of one process), the rewards gathered.
DISTRIBUTED = [
    dict(CASES[0], loss="dapo", beta=0.04, scale="batch", iterations=1, test=True),
    dict(CASES[1], loss="rloo", beta=0.04, level="token", scale="group", iterations=2),
]


def run_two_ranks(case, root, model):
    import os
    import subprocess

    root.mkdir(parents=True)
    args = ["lora"] + [str(a) for a in command(case, root, model)]
    proc = subprocess.run(
        launch_prefix(2) + args,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    return collect(root, proc.returncode, proc.stdout, proc.stderr)


def case_id(case):
    return "-".join(f"{v}" for v in case.values())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_case_trains_and_equals_its_twin(outcomes, case):
    result = outcomes[key_of(case)]
    assert result["returncode"] == 0, (
        result["stdout"][-3000:] + result["stderr"][-3000:]
    )
    metrics = result["metrics"]
    splits = [m["split"] for m in metrics]
    assert splits[0] == "val" and splits.count("train") == 2 * case["iterations"]
    assert (splits[-1] == "test") == case["test"]
    for m in metrics:
        assert all(math.isfinite(v) for k, v in m.items() if k != "split"), m
        if "entropy" in m:  # a token in the loss (mask_truncated may leave none)
            assert ("cispo_clip_ratio" in m) == (case["loss"] == "cispo")
            if case["loss"] != "rloo":  # GRPO's kl is the loss's
                assert ("kl" in m) == (case["beta"] > 0)
        if "reward" in m:  # a step that sampled (and evaluation)
            assert m["completions/max_length"] <= 6
            assert {"rewards/short/mean", "rewards/short/std"} <= set(m)
            if case["loss"] == "rloo":  # RLOO's kl is the sampling's
                assert ("kl" in m) == (case["beta"] > 0)
    train = [m for m in metrics if m["split"] == "train"]
    if case["iterations"] == 2:
        # the sampling's metrics once per generation batch: every other step has none
        assert "reward" in train[0] and "reward" not in train[1]
    completions = result["stdout"].count("        sample ")
    assert (completions > 0) == case["log"]
    twin = outcomes[key_of(twin_of(case))]
    assert twin["returncode"] == 0, twin["stderr"][-3000:]
    assert_same(result, twin, label="twin", tolerance=NOISE)


@pytest.mark.parametrize("case", DISTRIBUTED, ids=case_id)
def test_two_ranks_equal_one_process(outcomes, case):
    two, one = outcomes[key_of(case) + "@2"], outcomes[key_of(case)]
    assert two["returncode"] == 0, two["stdout"][-3000:] + two["stderr"][-3000:]
    assert_same(two, one, label="2 ranks", tolerance=NOISE)
