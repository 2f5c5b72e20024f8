"""The gate (``mlx_lm_pref/gate.py``): bad input is one line naming the file, line and field
(or the option), exit 2, before the model loads and with nothing written; through the real
command line in a fresh interpreter (``helpers.run_cli_many``: one interpreter runs every
case, as the console script would). ``--test`` alone scores an adapter as it was trained.
"""

import dataclasses
import json
import os
from types import SimpleNamespace

import pytest
from helpers import lora, make_rows, read_metrics, run_cli_many, write_data, write_jsonl

from mlx_lm_pref import gate
from mlx_lm_pref.config import (
    READ_BY,
    TRL_NAMES,
    ConfigError,
    PreferenceArgs,
    config_defaults,
)

LONG = "The sea is calm and the sky is bright today. " * 4


def data(root, n_train=8, rows=None, split="train"):
    """A data folder (train, valid, test); ``rows``, if given, are ``split``'s."""
    folder = write_data(root / "data", n_train=n_train, n_valid=4, n_test=4)
    if rows is not None:
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


def unpaired(rows):
    """Each pair as one KTO row, labels alternating."""
    return [
        {"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
        for r, k in zip(rows, ["chosen", "rejected"] * len(rows))
    ]


def prompts(root, n=8):
    """A data folder of prompt-only rows (GRPO, RLOO)."""
    rows = [{"prompt": r["prompt"]} for r in make_rows(max(n, 4), 3)][:n]
    return data(root, rows=rows)


def rewards(root):
    """A reward file's function, as --reward-funcs names it."""
    path = root / "my_rewards.py"
    path.write_text("def brevity(completion_ids, **kwargs):\n"
                    "    return [-len(c) for c in completion_ids]\n")  # fmt: skip
    return f"{path}:brevity"


def yaml_file(root, text):
    path = root / "c.yaml"
    path.write_text(text)
    return path


def fake_adapter(root):
    """An adapter folder trained without preference options."""
    folder = root / "sft_adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora"}))
    (folder / "adapters.safetensors").write_bytes(b"")
    return folder


def identical_pairs(root):
    rows = make_rows(6, 1)
    for row in rows[:3]:
        row["rejected"] = row["chosen"]
    return data(root, rows=rows)


def long_prompts(root):
    rows = make_rows(6, 1)
    for row in rows[:3]:
        row["prompt"] = LONG + row["prompt"]
    return data(root, rows=rows)


# name -> (the arguments after --model/--adapter-path, given the case's folder; the lines
# the one error line holds). Odd cases run through plain mlx_lm.lora (the start-up hook).
REFUSED = {
    # 1. a training set smaller than the batch, after the drops; KTO counts rows
    "train-smaller-than-batch": (
        lambda r: ["--data", data(r, n_train=3), "--loss-type", "dpo", "--batch-size", 4],
        ["train.jsonl: 3 pairs to train on, fewer than batch_size 4", "--batch-size"],
    ),
    "kto-rows": (
        lambda r: ["--data", data(r, rows=unpaired(make_rows(3, 1))), "--loss-type",
                   "kto", "--batch-size", 4],
        ["train.jsonl: 3 rows to train on, fewer than batch_size 4"],
    ),
    "kto-unpaired-pairs": (
        lambda r: ["--data", data(r, n_train=3), "--loss-type", "kto", "--batch-size", 8],
        ["train.jsonl: 6 rows to train on, fewer than batch_size 8"],
    ),
    "after-identical-drop": (
        lambda r: ["--data", identical_pairs(r), "--loss-type", "dpo", "--batch-size", 4,
                   "--identical-pairs", "drop"],
        ["3 pairs to train on (after dropping 3 identical pairs), fewer than batch_size 4"],
    ),
    "after-max-seq-length-drop": (
        lambda r: ["--data", long_prompts(r), "--loss-type", "dpo", "--batch-size", 4,
                   "--max-seq-length", 40],
        ["3 pairs to train on (after dropping 3 whose prompt alone reaches "
         "max_seq_length=40)"],
    ),
    # 2. files named by options
    "resume-missing": (
        lambda r: ["--data", data(r), "--loss-type", "dpo", "--resume-adapter-file",
                   r / "nope.safetensors"],
        ["--resume-adapter-file", "nope.safetensors: no such file."],
    ),
    "resume-folder": (
        lambda r: ["--data", data(r), "--loss-type", "orpo", "--resume-adapter-file", r],
        ["--resume-adapter-file", "a folder: name the .safetensors file in it"],
    ),
    # 3. TRL's names, in YAML and on the command line
    "trl-yaml": (
        lambda r: ["--data", data(r), "--config",
                   yaml_file(r, "loss_type: dpo\nmax_prompt_length: 128\n")],
        ["c.yaml: 'max_prompt_length' is TRL's name", "use max_seq_length"],
    ),
    "trl-flag": (
        lambda r: ["--data", data(r), "--loss-type", "dpo", "--max-length", 512],
        ["--max-length is TRL's name, not mlx-lm's; use --max-seq-length"],
    ),
    "trl-flag-underscore": (
        lambda r: ["--data", data(r), "--loss-type", "dpo", "--max_prompt_length=64"],
        ["--max-prompt-length is TRL's name", "use --max-seq-length"],
    ),
    "dpo-max-completion-length": (
        lambda r: ["--data", data(r), "--loss-type", "dpo", "--max-completion-length",
                   64],
        ["max_completion_length limits sampled completions (GRPO, RLOO, and "
         "log_completions' samples); loss_type dpo reads max_seq_length"],
    ),
    "grpo-vllm-yaml": (
        lambda r: ["--data", prompts(r), "--config",
                   yaml_file(r, f"loss_type: grpo\nreward_funcs: [{rewards(r)}]\n"
                             "use_vllm: true\n")],
        ["'use_vllm' is TRL's name", "sampled with mlx-lm's own generation"],
    ),
    "trl-flag-unsupported": (
        lambda r: ["--data", data(r), "--loss-type", "dpo", "--padding-free"],
        ["--padding-free is TRL's name, not mlx-lm's: not supported"],
    ),
    "trl-flag-yaml-only": (
        lambda r: ["--data", data(r), "--loss-type", "kto", "--warmup-steps", 10],
        ["use lr_schedule in a --config YAML file"],
    ),
    # 4. --test alone on an adapter that holds no preference options
    "test-sft-adapter": (
        lambda r: ["--data", data(r), "--test", "--adapter-path", fake_adapter(r)],
        ["test.jsonl: rows with 'chosen' and 'rejected' are preference pairs",
         "was not trained with a preference loss", "score them with --loss-type dpo"],
    ),
    # 5. a conversation whose chosen and rejected differ from the first message on
    "no-prompt-conversation": (
        lambda r: ["--data", data(r, rows=[{
            "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant",
                                                           "content": "Yes."}],
            "rejected": [{"role": "user", "content": "Yo"}, {"role": "assistant",
                                                             "content": "No."}]}]),
            "--loss-type", "orpo"],
        ["train.jsonl:1: no 'prompt' field, and the first messages of 'chosen' and "
         "'rejected' differ", "Add a 'prompt' field."],
    ),
    # 6. another method's rows
    "kto-rows-to-dpo": (
        lambda r: ["--data", data(r, rows=unpaired(make_rows(4, 1))), "--loss-type",
                   "dpo"],
        ["train.jsonl:1: field 'chosen' is missing", "unpaired (KTO) row",
         "--loss-type kto"],
    ),
    "sft-rows-to-kto": (
        lambda r: ["--data", data(r, rows=[{"text": "Hello there."}] * 4),
                   "--loss-type", "kto"],
        ["train.jsonl:1: field 'prompt' is missing", "SFT format (text or messages)",
         "without --loss-type"],
    ),
    "sft-completions-to-simpo": (
        lambda r: ["--data", data(r, rows=[{"prompt": "Hi", "completion": "Yes."}] * 4),
                   "--loss-type", "simpo"],
        ["field 'chosen' is missing", "SFT format (prompt, completion)"],
    ),
    # 7. an option the method's TRL trainer does not have
    "orpo-ld-alpha": (
        lambda r: ["--data", data(r), "--loss-type", "orpo", "--ld-alpha", 0.5],
        ["ld_alpha is a DPO option; TRL's ORPOTrainer has no such option"],
    ),
    "orpo-use-weighting-yaml": (
        lambda r: ["--data", data(r), "--config",
                   yaml_file(r, "loss_type: orpo\nuse_weighting: true\n")],
        ["use_weighting is a DPO option; TRL's ORPOTrainer"],
    ),
    "orpo-label-smoothing": (
        lambda r: ["--data", data(r), "--loss-type", "orpo", "--label-smoothing", 0.1],
        ["label_smoothing is a DPO and CPO option; TRL's ORPOTrainer"],
    ),
    "orpo-loss-weights": (
        lambda r: ["--data", data(r), "--loss-type", "orpo", "--loss-weights", 2],
        ["loss_weights is a DPO option"],
    ),
    "orpo-keep-end-yaml": (
        lambda r: ["--data", data(r), "--config",
                   yaml_file(r, "loss_type: orpo\ntruncation_mode: keep_end\n")],
        ["truncation_mode keep_end: TRL's ORPOTrainer has no truncation_mode"],
    ),
    "simpo-f-divergence": (
        lambda r: ["--data", data(r), "--loss-type", "simpo", "--f-divergence-type",
                   "forward_kl"],
        ["f_divergence_type is a DPO option; TRL's CPOTrainer"],
    ),
    "simpo-rpo-alpha": (
        lambda r: ["--data", data(r), "--loss-type", "simpo", "--rpo-alpha", 1],
        ["rpo_alpha applies to DPO loss types only"],
    ),
    "orpo-reference": (
        lambda r: ["--data", data(r), "--loss-type", "orpo", "--reference",
                   "adapters_off"],
        ["ORPO has no reference model"],
    ),
    "dpo-cpo-alpha": (
        lambda r: ["--data", data(r), "--loss-type", "dpo", "--cpo-alpha", 0.5],
        ["cpo_alpha is a CPO option; TRL's DPOTrainer has no such option (loss_type dpo)"],
    ),
    "kto-label-smoothing": (
        lambda r: ["--data", data(r), "--loss-type", "kto", "--label-smoothing", 0.1],
        ["label_smoothing is a DPO and CPO option; TRL's KTOTrainer"],
    ),
    # ... but a default value (as YAML files often carry) passes: the size check speaks
    "orpo-defaults-pass": (
        lambda r: ["--data", data(r, n_train=3), "--batch-size", 4, "--config",
                   yaml_file(r, "loss_type: orpo\nlabel_smoothing: 0.0\nuse_weighting: "
                             "false\ntruncation_mode: keep_start\ncpo_alpha: 1.0\n")],
        ["3 pairs to train on"],
    ),
    # 7b. GRPO and RLOO
    "grpo-no-rewards": (
        lambda r: ["--data", prompts(r), "--loss-type", "grpo"],
        ["loss_type grpo learns from rewards: give --reward-funcs"],
    ),
    "grpo-reward-missing-file": (
        lambda r: ["--data", prompts(r), "--loss-type", "grpo", "--reward-funcs",
                   r / "nope.py:brevity", "--num-generations", 2],
        ["nope.py"],
    ),
    "grpo-reward-no-function": (
        lambda r: ["--data", prompts(r), "--loss-type", "grpo", "--reward-funcs",
                   f"{rewards(r).split(':')[0]}:nope", "--num-generations", 2],
        ["nope"],
    ),
    "grpo-one-generation": (
        lambda r: ["--data", prompts(r), "--loss-type", "dapo", "--reward-funcs",
                   rewards(r), "--num-generations", 1],
        ["num_generations must be a whole number >= 2, got 1."],
    ),
    "grpo-groups-do-not-divide": (
        lambda r: ["--data", prompts(r), "--loss-type", "grpo", "--reward-funcs",
                   rewards(r), "--num-generations", 3, "--batch-size", 4],
        ["does not hold whole groups of num_generations 3"],
    ),
    "grpo-no-prompt-column": (
        lambda r: ["--data", data(r, rows=[{"text": "hello"}] * 8), "--loss-type",
                   "grpo", "--reward-funcs", rewards(r), "--num-generations", 2],
        ["train.jsonl:1: GRPO and RLOO train on prompt-only rows: expected a "
         "'prompt' field"],
    ),
    "grpo-full-with-kl": (
        lambda r: ["--data", prompts(r), "--loss-type", "grpo", "--reward-funcs",
                   rewards(r), "--beta", 0.04, "--fine-tune-type", "full", "--num-generations", 2],
        ["full fine-tuning has none"],
    ),
    "rloo-scale-rewards": (
        lambda r: ["--data", prompts(r), "--loss-type", "rloo", "--reward-funcs",
                   rewards(r), "--scale-rewards", "batch", "--num-generations", 2],
        ["scale_rewards is a GRPO option; TRL's RLOOTrainer has no such option"],
    ),
    "grpo-too-few-prompts": (
        lambda r: ["--data", prompts(r, 1), "--loss-type", "grpo", "--reward-funcs",
                   rewards(r), "--num-generations", 2, "--batch-size", 4],
        ["1 prompts to train on, fewer than the 2 of a generation batch"],
    ),
    # 8. folders and files
    "data-missing": (
        lambda r: ["--data", r / "nope", "--loss-type", "dpo"],
        ["--data", "nope: no such folder."],
    ),
    "data-without-train": (
        lambda r: ["--data", r, "--loss-type", "dpo"],
        ["no train.jsonl in this folder"],
    ),
    "config-missing": (
        lambda r: ["--data", data(r), "--config", r / "nope.yaml"],
        ["--config", "nope.yaml: No such file or directory."],
    ),
    "test-without-adapter": (
        lambda r: ["--data", data(r), "--loss-type", "dpo", "--test", "--adapter-path",
                   r / "none"],
        ["--adapter-path", "no adapters.safetensors for --test to load"],
    ),
}  # fmt: skip
# Runs of these cases without --train: the rest train.
TEST_ONLY = {"test-sft-adapter", "test-without-adapter"}


@pytest.fixture(scope="module")
def refusals(tiny_model, tmp_path_factory):
    """Every case of REFUSED, one after another in one interpreter: name -> (exit code,
    stdout, stderr, the case's folder)."""
    jobs, roots = [], []
    for k, (name, (make, _)) in enumerate(REFUSED.items()):
        root = tmp_path_factory.mktemp(name)
        argv = ["--model", tiny_model, "--adapter-path", root / "out"]
        argv += ["--num-layers", 2, "--iters", 1] + make(root)
        if name not in TEST_ONLY:
            argv.append("--train")
        entry = ("mlx_lm_pref.lora", "mlx_lm.lora")[k % 2]
        jobs.append((argv, root, {}, entry))
        roots.append(root)
    results = run_cli_many(jobs)
    return {
        name: (*result, root) for name, result, root in zip(REFUSED, results, roots)
    }


@pytest.mark.parametrize("name", REFUSED)
def test_bad_input_is_one_line_before_the_model_loads(refusals, name):
    code, out, err, root = refusals[name]
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("mlx_lm_pref: error: "), lines
    for expected in REFUSED[name][1]:
        assert expected in lines[0], lines[0]
    assert "Loading pretrained model" not in out
    assert not (root / "out").exists()


def sft_with_preference_keys(root):
    rows = [{"text": r["prompt"] + r["chosen"]} for r in make_rows(8, 5)]
    for split in ("train", "valid"):
        write_jsonl(root / "sft" / f"{split}.jsonl", rows)
    config = yaml_file(root, "rpo_alpha: 1.0\nlabel_smoothing: 0.3\nmax_length: 5\n")
    return ["--data", root / "sft", "--config", config]


def nothing_shared(root):
    """TRL's back-off turned these into a chosen of ' ' and a rejected of 'e'."""
    rows = make_rows(3, 1) + [{"chosen": "Sure thing. ", "rejected": "Nope"}]
    return ["--data", data(root, rows=rows), "--loss-type", "dpo"]


# name -> the arguments of a run the gate lets through (they train).
ACCEPTED = {
    # An SFT run's YAML may carry preference and TRL keys: upstream ignores them, and
    # without loss_type the run is upstream's.
    "sft-with-preference-keys": sft_with_preference_keys,
    # 5. chosen and rejected that share nothing: the prompt is empty, as TRL's
    "nothing-shared": nothing_shared,
}


@pytest.fixture(scope="module")
def accepted(tiny_model, tmp_path_factory):
    jobs, roots = [], []
    for name, make in ACCEPTED.items():
        root = tmp_path_factory.mktemp(name)
        argv = ["--model", tiny_model, "--adapter-path", root / "out", "--train"]
        argv += ["--num-layers", 2, "--iters", 1, "--batch-size", 2] + make(root)
        jobs.append((argv, root, {}))
        roots.append(root)
    results = run_cli_many(jobs)
    return {name: (*r, root) for name, r, root in zip(ACCEPTED, results, roots)}


def test_sft_ignores_preference_keys_as_upstream(accepted):
    code, out, err, root = accepted["sft-with-preference-keys"]
    assert code == 0, err[-3000:]
    saved = json.loads((root / "out" / "adapter_config.json").read_text())
    assert "rpo_alpha" not in saved and saved["max_length"] == 5  # upstream's record


def test_chosen_and_rejected_sharing_nothing_train_whole(accepted):
    code, out, err, root = accepted["nothing-shared"]
    assert code == 0, err[-3000:]
    assert "train.jsonl: 1 of 4 pairs have no prompt" in out


# ---- --test alone reads the adapter's options ----


def test_test_alone_scores_the_adapter_as_trained(tiny_model, tmp_path):
    data = write_data(tmp_path / "data", n_train=8, n_valid=4, n_test=6)
    adapters = tmp_path / "adapters"
    lora(tiny_model, data, adapters, "--train", "--loss-type", "dpo", "--beta", 0.3,
         "--iters", 4, "--batch-size", 2, "--num-layers", 2, "--learning-rate", 1e-2,
         "--identical-pairs", "drop")  # fmt: skip
    common = ["--model", tiny_model, "--data", data, "--adapter-path", adapters,
              "--test", "--batch-size", 2]  # fmt: skip
    runs = [[], ["--loss-type", "dpo", "--beta", 0.3], ["--beta", 0.2]]
    results = run_cli_many([(common + extra, tmp_path, {}) for extra in runs])
    for code, out, err in results:
        assert code == 0, err[-3000:]
    (_, plain, _), (_, explicit, _), (_, other, _) = results
    note = "[mlx_lm_pref] --test: beta 0.2 (the adapter was trained with 0.3)"
    assert note in other and "--test:" not in plain + explicit
    assert "Loading pretrained model" in other.split(note)[1]  # said before the load
    tests = [m for m in read_metrics(adapters) if m["split"] == "test"]
    assert len(tests) == 3
    assert tests[0] == tests[1]  # as trained: beta 0.3, without repeating it
    assert tests[2]["loss"] != tests[0]["loss"]  # the beta given wins


def test_given_options_are_told_from_defaults(tmp_path):
    """After mlx-lm's ``main`` every option has a value; the command line and the YAML
    file say which the user gave."""
    ns = SimpleNamespace(**{**config_defaults(), "ld_alpha": 0.5})
    assert gate.typed(ns) == {"ld_alpha"}  # a script's namespace: not the default
    ours = set(config_defaults())
    with gate.command_line(["--beta", "0.1"]):
        assert gate.typed(ns) & ours == {"beta"}  # the command line said --beta 0.1
    config = tmp_path / "c.yaml"
    config.write_text("loss_type: dpo\n")
    with gate.command_line(["--beta", "0.1", "--config", str(config)]):
        assert gate.typed(ns) & ours == {"beta", "loss_type"}
    assert gate.typed(ns) == {"ld_alpha"}  # and forgotten after


def test_differs_compares_what_is_scored():
    saved = {"loss_type": "dpo", "beta": 0.1}
    assert not gate.differs(saved, "loss_type", "sigmoid")
    assert not gate.differs(saved, "beta", "0.1")
    assert gate.differs(saved, "beta", 0.2)
    assert gate.differs(saved, "loss_type", "orpo")


# ---- the tables, against TRL and the options ----


def trl_configs():
    """The fields each TRL preference config declares itself, by method."""
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from transformers import TrainingArguments
    from trl import DPOConfig, GRPOConfig, KTOConfig, RLOOConfig
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    common = {f.name for f in dataclasses.fields(TrainingArguments)}
    configs = {"dpo": DPOConfig, "orpo": ORPOConfig, "cpo": CPOConfig, "kto": KTOConfig}
    configs |= {"grpo": GRPOConfig, "rloo": RLOOConfig}
    return {
        method: {f.name for f in dataclasses.fields(c)} - common
        for method, c in configs.items()
    }


def test_every_trl_option_is_ours_or_gets_a_hint():
    """A field TRL's preference configs declare themselves is one of our options, one of
    mlx-lm's, or in TRL_NAMES (a new TRL field fails here until it is one of those)."""
    from mlx_lm import lora as lora_cli

    ours = set(config_defaults()) | set(lora_cli.CONFIG_DEFAULTS)
    ours |= {a.dest for a in lora_cli.build_parser()._actions}
    for method, names in trl_configs().items():
        missing = sorted(names - ours - set(TRL_NAMES))
        assert not missing, (method, missing)
    assert not set(TRL_NAMES) & set(config_defaults())


def test_read_by_is_what_trl_configs_declare():
    """Each method-specific option is read by the methods whose TRL config declares it;
    the others (but loss_type, the method itself) by all four."""
    declared = trl_configs()
    ours = set(config_defaults())
    not_trl = {
        "reference",
        "rpo_alpha",
        "cpo_loss_type",
    }  # CPOConfig calls it loss_type
    # ORPOConfig's and CPOConfig's max_completion_length cuts the answer; here
    # max_seq_length does, and the option is refused there saying so
    unread = {"max_completion_length": {"orpo", "cpo"}}
    # GRPO's and RLOO's samples while training, which every method logs here
    everyone = {"log_completions", "num_completions_to_print"}
    assert not everyone & set(READ_BY)
    for name in set().union(*declared.values()) & ours - {"loss_type"} - everyone:
        methods = {m for m, names in declared.items() if name in names}
        methods -= unread.get(name, set())
        assert methods == set(READ_BY.get(name, declared)), name
    assert not_trl <= set(READ_BY)


# A value other than the default for each option (0.25 where not listed).
VALUES = {"loss_weights": (2.0,), "label_smoothing": 0.1, "ld_alpha": 0.5,
          "f_divergence_type": "forward_kl", "use_weighting": True,
          "truncation_mode": "keep_end", "cpo_loss_type": "hinge",
          "reference": "adapters_off", "identical_pairs": "drop",
          "reward_funcs": ("my_rewards.py:brevity",), "reward_weights": (2.0,),
          "num_generations": 4, "max_completion_length": 64, "top_k": 5,
          "steps_per_generation": 2, "generation_batch_size": 8, "num_iterations": 2,
          "delta": 2.0, "scale_rewards": "batch", "importance_sampling_level": "sequence",
          "multi_objective_aggregation": "normalize_then_sum",
          "mask_truncated_completions": True, "log_completions": True,
          "num_completions_to_print": 3, "normalize_advantages": True,
          "reward_clip_range": (0.0, 1.0), "use_bias_correction_kl": False}  # fmt: skip


@pytest.mark.parametrize("name", READ_BY)
@pytest.mark.parametrize("loss_type", ["dpo", "orpo", "simpo", "kto", "dapo", "rloo"])
def test_options_a_method_does_not_read_are_refused(name, loss_type):
    # GRPO and RLOO need reward functions; a KL term (beta > 0) for a reference
    base = {"reward_funcs": VALUES["reward_funcs"], "beta": 0.1}
    base = base if loss_type in ("dapo", "rloo") else {}
    method = PreferenceArgs(loss_type=loss_type, **base).method
    value = VALUES.get(name, 0.25)
    default = {f.name: f.default for f in dataclasses.fields(PreferenceArgs)}[name]
    if name not in base:  # a default is fine
        PreferenceArgs(loss_type=loss_type, **{**base, name: default})
    if method in READ_BY[name]:
        PreferenceArgs(loss_type=loss_type, **{**base, name: value})
    else:
        with pytest.raises(ConfigError, match="Remove it"):
            PreferenceArgs(loss_type=loss_type, **{**base, name: value})


def test_batch_size_divides_by_the_ranks(monkeypatch):
    ranks = SimpleNamespace(size=lambda: 2)
    monkeypatch.setattr(gate.mx.distributed, "init", lambda: ranks)
    ns = SimpleNamespace(batch_size=3)
    with pytest.raises(ConfigError, match="--batch-size 3 with 2 processes"):
        gate.check_batch_size(PreferenceArgs(loss_type="dpo"), ns)
    gate.check_batch_size(
        PreferenceArgs(loss_type="dpo"), SimpleNamespace(batch_size=4)
    )
