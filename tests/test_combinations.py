"""Every pair of option values, through the real CLI: a pairwise covering design over the
options users combine (``covering.py``), each case a short training run in a subprocess.

A case either trains and meets its equivalence, or is refused with one line and exit 2
before the model loads. The equivalences: each case runs again as its *twin*, the same run
with every option that claims not to change the numbers put back to its plain value
(prompt sharing off, a live reference instead of a precomputed one, no gradient
checkpointing, one batch of 2B pairs instead of two accumulated batches of B, the whole
logits instead of the output layer in tiles, the reference through every layer), and the two must agree within float32 noise
(``TOLERANCE``). A few cases also run on 2 ranks (``mlx.launch``, ring backend, loopback)
against their one-process run.

The cases run one after another in a few interpreters (``helpers.run_cli_many``: the
command's own code, ``mlx_lm_pref.cli.lora``, with its argv), each case followed by its
twin, two interpreters at a time: the model is tiny, so an interpreter's start (importing
mlx-lm and transformers) costs as much as a case.
"""

import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from covering import coverable_pairs, covering, pairs_of
from helpers import (
    ADAPTER_NOISE,
    NOISE,
    assert_adapters_equal,
    free_port_pair,
    make_rows,
    read_metrics,
    run_cli_many,
    write_jsonl,
)

# Numbers compared at float32-noise tolerances: run with and without OpenBLAS (.ci/run).
pytestmark = pytest.mark.numerics

DPO_LOSSES = ("sigmoid", "sigmoid,sft", "ipo")
# Losses with a reference model; KTO's cases get the pairs, which it unpairs (as TRL): a
# batch then holds one label, and its KL rows the other rows' completions.
REFERENCE_LOSSES = DPO_LOSSES + ("kto",)
# GRPO (loss_type dapo, with a KL term: beta 0.04) and RLOO (its default beta 0.05) sample
# their completions from the model and score them with REWARD_FILE's functions; the pairs'
# prompts are theirs, the other columns go to the reward functions.
RL_LOSSES = ("dapo", "rloo")
FACTORS = {
    "loss": ["sigmoid", "sigmoid,sft", "ipo", "orpo", "simpo", "cpo_hinge", "kto"]
    + list(RL_LOSSES),
    "reference": ["auto", "adapters_off", "initial_adapter", "precomputed", "none"],
    "sharing": ["auto", "true", "false"],
    "prompts": ["short", "long"],
    "fine_tune": ["lora", "dora", "full"],
    "source": ["local", "hf1", "hf2"],
    "rows": ["standard", "conversational", "implicit", "multiturn"],
    "checkpoint": [False, True],
    "accumulate": [1, 2],
    "test": [False, True],
    "head": ["auto", "0", "64"],  # head_chunk_size (the tiny model's vocabulary: 300)
    # the command: ours, or plain mlx_lm.lora patched by the start-up hook
    "entry": ["mlx_lm_pref.lora", "mlx_lm.lora"],
    "report": ["compact", "all"],  # report_metrics: what the report lines show
    # checkpoints: every one kept; the newest one (save_every 1, save_total_limit 1); none
    # (save_only_model); or the run trained in two halves, the second --resume'd
    "save": ["all", "limit", "model_only", "resumed"],
    # log_completions: samples while training (the sampled ones in RL; greedy answers to 2
    # validation prompts at each validation otherwise), which must change no number
    "samples": [False, True],
    # share_frozen_layers: the reference pass on the policy's layer below the adapters
    # (LoRA on the top 1 of the tiny model's 2 layers), or through every layer
    "frozen": ["auto", "false"],
}
# What the product refuses, one pair of values each, and the line that says so.
REFUSED = [
    (dict(loss="orpo", reference="precomputed"), "ORPO has no reference model"),
    (dict(loss="simpo", reference="adapters_off"), "CPO has no reference model"),
    (dict(loss="cpo_hinge", reference="none"), "CPO has no reference model"),
    (dict(fine_tune="full", reference="adapters_off"), "full fine-tuning has none"),
    (dict(fine_tune="full", reference="initial_adapter"), "full fine-tuning has none"),
    (dict(checkpoint=True, sharing="true"), "gradient checkpointing"),
    (dict(loss="kto", reference="none"), "always has a reference model"),
    (dict(loss="rloo", reference="precomputed"), "the reference scores them live"),
    (dict(loss="dapo", fine_tune="full"), "full fine-tuning has none"),
    (dict(loss="rloo", rows="implicit"), "expected a 'prompt' field"),
]


def valid(case) -> bool:
    """What the product trains (REFUSED has one example of each rule broken)."""
    if case["loss"] in RL_LOSSES:
        return (
            case["reference"] in ("auto", "adapters_off", "initial_adapter")
            and case["fine_tune"] != "full"
            and case["rows"] != "implicit"
            and not (case["checkpoint"] and case["sharing"] == "true")
        )
    reference_free = case["loss"] not in REFERENCE_LOSSES
    if reference_free and case["reference"] not in ("auto", "initial_adapter"):
        return False  # initial_adapter: resumed from an adapter, no --reference
    if case["loss"] == "kto" and case["reference"] == "none":
        return False
    if case["fine_tune"] == "full" and case["reference"] in (
        "adapters_off",
        "initial_adapter",
    ):
        return False
    return not (case["checkpoint"] and case["sharing"] == "true")


CASES = covering(FACTORS, valid, seed=8, prune=True)
# Float32 noise (helpers.NOISE), measured over this design with OpenBLAS and with mlx's
# bundled BLAS: metrics up to 1.6e-4 relative (2.3e-5 absolute: IPO's rewards/margins, a
# difference of two log-ratios of ~65 nats each), adapter entries up to 4e-5 of the tensor's
# largest entry (IPO again: its target 1/(2 beta) = 5 makes the largest steps). Real
# differences are larger: accumulating a token-mean term over two batches of other lengths
# moves the adapters by 8e-4 to 1e-1 of their largest entry, the gradient lost through the
# prompt cache under checkpointing by 1e-1.
TOLERANCE = NOISE
# IPO's test split, scored after the last step (validation comes before it): its rewards
# moved by up to 2.4e-4 absolute (1.9e-3 relative) with nothing but the summation order
# changed (case ipo-precomputed-...-implicit: the whole logits with OpenBLAS -0.126123, with
# mlx's BLAS -0.125885; tiles of 64 / 128 / 256 rows -0.125994 / -0.126110 / -0.125904), from
# adapters 3e-5 apart after two steps towards IPO's target of 5.
# Case ipo-precomputed-false-short-lora-hf2-multiturn (accumulation 2, tiles of 64): the test
# split's rewards/chosen -0.059480 against -0.058918 for one batch of 4 pairs (5.6e-4; the
# same case trained in one go and resumed half-way are bit-identical).
IPO_TOLERANCE = dict(rel=NOISE["rel"], abs=1e-3)
# IPO's adapters after accumulating two micro-batches vs one batch of both: 4.6e-4 and 4.9e-4
# of the largest entry (case ipo-auto-auto-long-..., mlx 0.32.4 with OpenBLAS; the same with
# the code before the vocabulary-blocked reductions), against 4e-5 for the other losses: its
# squared error towards a target of 1 / (2 beta) = 5 amplifies the summation order's noise.
IPO_ADAPTER_NOISE = 1e-3
B = 2  # pairs per batch
RANKS = 2


def test_the_design_covers_every_valid_pair():
    coverable = coverable_pairs(FACTORS, valid)
    covered = set().union(*(pairs_of(c, list(FACTORS)) for c in CASES))
    assert coverable <= covered
    assert all(valid(c) for c in CASES)
    assert len(CASES) <= 44  # the suite's time


# ---- data and CLI arguments of a case ----

CONTEXT = "The sea is calm and the sky is bright today. " * 6


def rows_of(kind, prompts, n, seed):
    conversational = kind in ("conversational", "multiturn")
    rows = make_rows(n, seed, conversational, prompt=kind != "implicit")
    context = CONTEXT if prompts == "long" else ""
    for k, row in enumerate(rows):
        if kind == "implicit":
            row["chosen"], row["rejected"] = (
                context + row["chosen"],
                context + row["rejected"],
            )
        elif conversational:
            turns = row["prompt"]
            turns[0]["content"] = context + turns[0]["content"]
            if kind == "multiturn":
                turns[:0] = [
                    {"role": "system", "content": "You answer in one sentence."},
                    {"role": "user", "content": f"Hello {k}?"},
                    {"role": "assistant", "content": "Hello, the sky is calm."},
                ]
        else:
            row["prompt"] = context + row["prompt"]
    return rows


def write_case_data(root, case):
    """Folders of train/valid/test.jsonl: one, or for ``hf2`` two halves."""
    splits = {"train": 2 * B, "valid": 2 * B, "test": 2 * B}
    rows = {
        split: rows_of(case["rows"], case["prompts"], n, seed)
        for seed, (split, n) in enumerate(splits.items(), start=1)
    }
    parts = 2 if case["source"] == "hf2" else 1
    folders = []
    for k in range(parts):
        folder = root / f"data{k}"
        for split, r in rows.items():
            size = len(r) // parts
            write_jsonl(folder / f"{split}.jsonl", r[k * size : (k + 1) * size])
        folders.append(folder)
    return folders


PAIR_MEAN_LOSSES = ("sigmoid", "ipo")  # no token mean: accumulation is exact


def twin_of(case) -> dict:
    """The same run with every number-preserving option at its plain value (auto keeps
    short prompts unshared: nothing to put back there; the output layer whole: auto is
    the whole logits already on the tiny 300-entry vocabulary). Two accumulated batches
    of B pairs equal one of 2B for a mean over pairs; a token mean (ORPO's and CPO's NLL,
    the sft term) weighs the two batches' tokens otherwise (``test_scale`` checks those
    on data of equal lengths)."""
    twin = dict(case, checkpoint=False, entry="mlx_lm_pref.lora", report="compact")
    twin.update(save="all", samples=False, frozen="false")
    if case["head"] == "64":
        twin["head"] = "0"
    if case["sharing"] == "true" or case["prompts"] == "long":
        twin["sharing"] = "false"
    if case["accumulate"] == 2 and case["loss"] in PAIR_MEAN_LOSSES + RL_LOSSES:
        # RL: dapo's token mean is over the whole generation batch, RLOO's a mean over
        # sequences: two accumulated batches of one generation batch are one batch of both
        twin.update(accumulate=1, batch=2 * B)
    if case["reference"] == "precomputed" and case["fine_tune"] != "full":
        twin["reference"] = "adapters_off"
    return twin


def resume_adapter(root, fine_tune):
    """A trained-looking adapter (nonzero lora_b) of mlx_lm.lora's default shape, to
    resume from: the initial_adapter reference is then not the base model."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    path = root / f"resume_{fine_tune}.safetensors"
    if not path.exists():
        model, _ = load(str(TINY[0]))
        model.freeze()
        params = {"rank": 8, "dropout": 0.0, "scale": 20.0}
        linear_to_lora_layers(model, 1, params, use_dora=fine_tune == "dora")
        mx.random.seed(1)
        trained = [
            (k, mx.random.normal(v.shape) * 0.01)
            for k, v in tree_flatten(model.trainable_parameters())
            if k.endswith("lora_b")
        ]
        model.update(tree_unflatten(trained))
        mx.save_safetensors(str(path), dict(tree_flatten(model.trainable_parameters())))
    return path


def command(case, root) -> list:
    """``mlx_lm_pref lora`` arguments of a case (data from a YAML config for hf_dataset)."""
    out = root / "out"
    batch = case.get("batch", B)
    loss = case["loss"]
    args = ["lora", "--train", "--adapter-path", out, "--model", TINY[0]]
    args += ["--iters", 2 * case["accumulate"], "--batch-size", batch]
    args += ["--grad-accumulation-steps", case["accumulate"]]
    args += ["--steps-per-report", case["accumulate"], "--steps-per-eval", 100]
    args += ["--val-batches", -1, "--num-layers", 1, "--seed", 0, "--save-every", 100]
    args += ["--optimizer", "sgd", "--learning-rate", 0.05, "--max-seq-length", 512]
    args += ["--prompt-sharing", case["sharing"], "--fine-tune-type", case["fine_tune"]]
    args += ["--head-chunk-size", case["head"], "--report-metrics", case["report"]]
    args += ["--share-frozen-layers", case["frozen"]]
    if loss == "cpo_hinge":
        args += ["--loss-type", "cpo", "--cpo-loss-type", "hinge"]
    elif loss in RL_LOSSES:
        reward = root / "rewards.py"
        reward.write_text(REWARD_FILE)
        args += ["--loss-type", loss, "--reward-funcs", f"{reward}:short,{reward}:echo"]
        args += ["--num-generations", 2, "--max-completion-length", 8]
        args += ["--beta", 0.04] if loss == "dapo" else []
    else:
        args += ["--loss-type", loss]
    if case["reference"] == "initial_adapter" and case["fine_tune"] != "full":
        args += [
            "--resume-adapter-file",
            RESUME[case["fine_tune"]],
        ]
        if loss in REFERENCE_LOSSES:
            args += ["--reference", "initial_adapter"]
    elif case["reference"] != "auto":
        args += ["--reference", case["reference"]]
    if case["checkpoint"]:
        args.append("--grad-checkpoint")
    if case["save"] == "limit":
        args += ["--save-every", 1, "--save-total-limit", 1]
    if case["save"] == "model_only":
        args.append("--save-only-model")
    if case["test"]:
        args.append("--test")
    if case["samples"]:
        args += ["--log-completions", "--num-completions-to-print", 2]
        args += [] if loss in RL_LOSSES else ["--max-completion-length", 6]
    folders = write_case_data(root, case)
    if case["source"] == "local":
        args += ["--data", folders[0]]
    else:
        entries = [
            {"path": str(f), "train_split": "train", "valid_split": "validation",
             "test_split": "test"}
            for f in folders
        ]  # fmt: skip
        config = root / "config.yaml"
        config.write_text(json.dumps({"hf_dataset": entries}))  # JSON is YAML
        args += ["--config", config]
    return args


REWARD_FILE = """
def short(completion_ids, **kwargs):
    return [-len(ids) / 8 for ids in completion_ids]


def echo(completions, chosen, **kwargs):
    # the dataset's chosen column as a keyword list; None: no reward for a row
    text = lambda c: c if isinstance(c, str) else c[-1]["content"]
    words = [set(text(c).split()) for c in chosen]
    return [len(set(text(c).split()) & w) or None for c, w in zip(completions, words)]
"""


# ---- running ----

TINY = []  # the session's tiny model path, set by the fixture
RESUME = {}  # fine-tune type -> the adapter initial_adapter cases resume from, likewise


def launch_prefix(ranks, entry="mlx_lm_pref.lora"):
    """``mlx.launch`` on loopback with the ring backend, in front of ``python -m
    mlx_lm_pref`` (or of plain ``python -m mlx_lm``: then the start-up hook patches)."""
    launcher = Path(sys.executable).parent / "mlx.launch"
    module = "mlx_lm" if entry == "mlx_lm.lora" else "mlx_lm_pref"
    return [str(launcher), "-n", str(ranks), "--backend", "ring", "--starting-port",
            str(free_port_pair()), "--", sys.executable, "-m", module]  # fmt: skip


def collect(root, code, stdout, stderr):
    out = root / "out"
    result = {"returncode": code, "stdout": stdout, "stderr": stderr}
    if code == 0:
        result["metrics"] = read_metrics(out)
        samples = out / "completions.jsonl"
        result["samples"] = (
            [json.loads(l) for l in samples.read_text().splitlines()]
            if samples.is_file()
            else []
        )
        folders = (out / "checkpoints").glob("[0-9]*")
        result["checkpoints"] = sorted(int(p.name) for p in folders)
        result["adapter"] = {
            k: np.array(v)
            for k, v in mx.load(str(out / "adapters.safetensors")).items()
        }
    return result


def run_group(group):
    """``[(key, case, root)]`` in one interpreter, one after another."""
    jobs, last = [], []
    for _, case, root in group:
        root.mkdir(parents=True, exist_ok=True)
        env = {"MLX_LM_PREF_CACHE": str(root / "c")}
        for args in halves(case, command(case, root)[1:]):
            jobs.append((args, root, env, case["entry"]))
        last.append(len(jobs) - 1)
    results = run_cli_many(jobs)
    return {key: collect(root, *results[i]) for (key, _, root), i in zip(group, last)}


def halves(case, args) -> list:
    """A case's runs: itself, or (save: resumed) its first half, then the whole resumed
    from that half's checkpoint (which holds the weights --resume-adapter-file gave)."""
    if case["save"] != "resumed":
        return [args]
    at = args.index("--iters") + 1
    first = args[:at] + [args[at] // 2] + args[at + 1 :]
    if "--resume-adapter-file" in args:
        k = args.index("--resume-adapter-file")
        args = args[:k] + args[k + 2 :]
    return [first, args + ["--resume"]]


def run_distributed(case, root):
    import subprocess

    root.mkdir(parents=True, exist_ok=True)
    args = command(case, root)
    for run in halves(case, args[1:]):
        proc = subprocess.run(
            launch_prefix(RANKS, case["entry"]) + [str(a) for a in [args[0], *run]],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=root,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                 "MLX_LM_PREF_CACHE": str(root / "c")},
        )  # fmt: skip
    result = collect(root, proc.returncode, proc.stdout, proc.stderr)
    return {key_of(case) + "@2": result}


def key_of(case):
    return json.dumps(case, sort_keys=True)


DISTRIBUTED = 4  # cases also run on 2 ranks
INTERPRETERS = 4  # the single-process runs share them, two at a time


@pytest.fixture(scope="module")
def outcomes(tiny_model, tmp_path_factory):
    """Every case with its twin, and the refused cases, in INTERPRETERS interpreters, and
    the distributed runs, two at a time; by key."""
    TINY[:] = [tiny_model]
    root = tmp_path_factory.mktemp("combinations")
    # made here, once: two worker threads drawing from mlx's global random state at once
    # would give each case a different adapter
    RESUME.update({ft: resume_adapter(root, ft) for ft in ("lora", "dora")})
    groups, seen = [], set()
    for i, case in enumerate(CASES):
        group = []
        for j, run in enumerate((case, twin_of(case))):
            if key_of(run) not in seen:
                seen.add(key_of(run))
                group.append((key_of(run), run, root / f"case{i}" / f"run{j}"))
        groups.append(group)
    refused = [refused_case(bad) for bad, _ in REFUSED]
    groups.append(
        [(key_of(c), c, root / "refused" / f"run{i}") for i, c in enumerate(refused)]
    )
    # a few interpreters, each running its share of the groups one after another: an
    # interpreter's start (importing mlx-lm, transformers) costs as much as a case's runs
    groups = [g for g in groups if g]
    chunks = [sum(groups[k::INTERPRETERS], []) for k in range(INTERPRETERS)]
    results = {}
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_group, chunk) for chunk in chunks]
        futures += [
            pool.submit(run_distributed, c, root / f"distributed{i}")
            for i, c in enumerate(distributed_cases())
        ]
        for f in futures:
            results.update(f.result())
    return results


def distributed_cases():
    """Cases with a loss that is a mean over pairs (a token mean, as ORPO's NLL, is one per
    rank with several ranks, and only close): one with shared prompts, one precomputed,
    one from two hf_dataset entries, one whose reference pass starts at the adapted layer
    (share_frozen_layers)."""
    picks = [
        lambda c: c["prompts"] == "long" and c["sharing"] != "false",
        lambda c: c["reference"] == "precomputed",
        lambda c: c["source"] == "hf2",
        lambda c: c["frozen"] == "auto"
        and c["fine_tune"] != "full"
        and c["reference"] in ("auto", "adapters_off", "initial_adapter"),
    ]
    chosen = []
    for pick in picks:
        chosen += [
            next(
                c
                for c in CASES
                if c["loss"] in PAIR_MEAN_LOSSES and pick(c) and c not in chosen
            )
        ]
    return chosen[:DISTRIBUTED]


PLAIN = dict(loss="sigmoid", reference="auto", sharing="auto", prompts="short")
PLAIN |= dict(fine_tune="lora", source="local", rows="standard", checkpoint=False)
PLAIN |= dict(accumulate=1, test=False, head="auto", entry="mlx_lm_pref.lora")
PLAIN |= dict(report="compact", save="all", samples=False, frozen="auto")


def refused_case(bad):
    """PLAIN with ``bad``; every other one through plain mlx_lm.lora."""
    index = [b for b, _ in REFUSED].index(bad)
    case = {**PLAIN, **bad, "entry": FACTORS["entry"][index % 2]}
    assert not valid(case)
    return case


def case_id(case):
    return "-".join(f"{v}" for v in case.values())


def assert_same(
    a,
    b,
    names=None,
    label="",
    splits=("train", "val", "test"),
    tolerance=TOLERANCE,
    adapter_noise=ADAPTER_NOISE,
):
    """The same records of ``splits``, in order, with the same metrics (``names``, or
    all), and the same adapter."""
    ra = [m for m in a["metrics"] if m["split"] in splits]
    rb = [m for m in b["metrics"] if m["split"] in splits]
    assert [m["split"] for m in ra] == [m["split"] for m in rb], label
    for i, (x, y) in enumerate(zip(ra, rb)):
        for name, value in x.items():
            if name in ("split", "iteration") or (names and name not in names):
                continue
            assert value == pytest.approx(y[name], **tolerance), (label, i, name)
    assert_adapters_equal(a["adapter"], b["adapter"], label, adapter_noise)


# Means over pairs: the same whatever the batch size or the number of ranks.
PAIR_MEANS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies"}
PAIR_MEANS |= {"rewards/margins", "logps/chosen", "logps/rejected", "num_tokens"}
PAIR_MEANS |= {"log_odds_ratio", "log_odds_chosen"}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_case_trains_and_equals_its_twin(outcomes, case):
    result = outcomes[key_of(case)]
    assert result["returncode"] == 0, (
        result["stdout"][-3000:] + result["stderr"][-3000:]
    )
    assert "Traceback" not in result["stderr"]
    metrics = result["metrics"]
    splits = [m["split"] for m in metrics]
    assert splits[0] == "val" and "train" in splits
    assert (splits[-1] == "test") == case["test"]
    for m in metrics:
        assert all(math.isfinite(v) for k, v in m.items() if k not in ("split",)), m
    first = metrics[0]
    fresh_reference = case["reference"] in ("auto", "precomputed", "initial_adapter")
    if case["loss"] in DPO_LOSSES and fresh_reference:
        # the reference is the model as training starts: every pair scores ln 2
        assert first["rewards/margins"] == 0.0
        if case["loss"] == "sigmoid":
            assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    if case["loss"] in RL_LOSSES:
        # the first step's ratio is 1 and the advantages of a group sum to 0
        assert "reward" in first and "completions/mean_length" in first
        assert all(m["completions/max_length"] <= 8 for m in metrics)
    if case["loss"] == "kto" and fresh_reference:
        # every log-ratio and the KL estimate are 0: each row's loss is 1 - sigma(0)
        assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl"] == 0.0
    precomputed = case["loss"] in REFERENCE_LOSSES and (
        case["reference"] == "precomputed"
        or (case["reference"] == "auto" and case["fine_tune"] == "full")
    )
    # train, valid and, for --test, the test split, scored once before step 1
    scored = result["stdout"].count("[mlx_lm_pref] reference log-probs of ")
    assert scored == (2 + case["test"] if precomputed else 0)
    shared = "prompt sharing: auto" in result["stdout"] or case["sharing"] == "true"
    assert ("prompt sharing off" in result["stdout"]) == (
        case["checkpoint"] and case["sharing"] == "auto"
    )
    # the report lines show every metric only with report_metrics: all
    unshown = "clip_ratio/low_min " if case["loss"] in RL_LOSSES else "logps/chosen "
    assert (unshown in result["stdout"]) == (case["report"] == "all")
    if case["samples"] and case["loss"] in RL_LOSSES:
        assert result["samples"] and all("generation" in s for s in result["samples"])
    elif case["samples"]:  # 2 fixed prompts answered at each validation
        validations = [m["iteration"] for m in metrics if m["split"] == "val"]
        answered = [s["iteration"] for s in result["samples"]]
        assert answered == [i for i in validations for _ in range(2)], answered
        assert len({json.dumps(s["prompt"]) for s in result["samples"]}) == 2
    else:
        assert result["samples"] == []
    iters = 2 * case["accumulate"]
    if case["save"] == "resumed":
        n = iters // 2
        assert f"checkpoints/{n:07d}: iteration {n} of {iters} done" in result["stdout"]
        # the first half's own last validation (after iteration n - 1) stays in the record
        metrics[:] = [
            m
            for m in metrics
            if m["split"] != "val" or m["iteration"] != n - 1 or n == 1
        ]
    checkpoints = {
        "all": [iters],
        "limit": [iters],
        "model_only": [],
        "resumed": [iters // 2, iters],
    }
    assert result["checkpoints"] == checkpoints[case["save"]], result["checkpoints"]
    twin = twin_of(case)
    if key_of(twin) != key_of(case):
        other = outcomes[key_of(twin)]
        assert other["returncode"] == 0, other["stderr"][-3000:]
        ipo = case["loss"] == "ipo"
        tolerance = IPO_TOLERANCE if ipo else TOLERANCE
        noise = IPO_ADAPTER_NOISE if ipo else ADAPTER_NOISE
        if twin["accumulate"] != case["accumulate"] and case["loss"] in RL_LOSSES:
            # evaluation batches of one prompt vs two: their means over completions
            assert_same(result, other, {"reward", "completions/mean_length"},
                        "accumulation", splits=("val", "test"))  # fmt: skip
        elif twin["accumulate"] != case["accumulate"]:
            # validation and test batches of B vs 2B pairs: only means over pairs agree;
            # training reports are per micro-batch
            # (num_tokens counts the micro-batches trained on before each validation: the
            # last validation comes before micro-batch 4 of 4 there, before batch 2 of 2 here)
            assert_same(result, other, PAIR_MEANS - {"num_tokens"},
                        f"accumulation (shared: {shared})", splits=("val", "test"),
                        tolerance=tolerance, adapter_noise=noise)  # fmt: skip
        else:
            assert_same(result, other, label=f"twin (shared: {shared})",
                        tolerance=tolerance, adapter_noise=noise)  # fmt: skip


@pytest.mark.parametrize("case", distributed_cases(), ids=case_id)
def test_two_ranks_equal_one_process(outcomes, case):
    two, one = outcomes[key_of(case) + "@2"], outcomes[key_of(case)]
    assert two["returncode"] == 0, two["stdout"][-3000:] + two["stderr"][-3000:]
    # rank 0 alone prints the run's messages
    assert two["stdout"].count("[mlx_lm_pref] ") == one["stdout"].count(
        "[mlx_lm_pref] "
    )
    # rewards/accuracies counts chosen > rejected: at a tie (a fresh adapter against a
    # reference precomputed in other batch shapes) float32 noise decides it, so it is
    # compared where the margin is clear of that noise
    assert_same(two, one, PAIR_MEANS - {"rewards/accuracies"}, "2 ranks")
    for a, b in zip(two["metrics"], one["metrics"]):
        if abs(b.get("rewards/margins", 0.0)) > 1e-4:
            assert a["rewards/accuracies"] == b["rewards/accuracies"], (a, b)


@pytest.mark.parametrize("bad,message", REFUSED, ids=lambda v: str(v))
def test_refused_combinations_are_one_line(outcomes, bad, message):
    result = outcomes[key_of(refused_case(bad))]
    lines = result["stderr"].strip().splitlines()
    assert result["returncode"] == 2, (
        result["stdout"][-2000:] + result["stderr"][-2000:]
    )
    assert "Traceback" not in result["stderr"] and message in lines[-1], lines[-1:]
    assert "Loading pretrained model" not in result["stdout"]
