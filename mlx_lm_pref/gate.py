"""The gate: everything a user typed, checked before the model loads.

``mlx_lm.lora`` merges its command line, a YAML file and ``CONFIG_DEFAULTS``, loads the model,
then the data; upstream, a mistake found after the load costs a model load and a traceback.
Here bad input costs one line naming the file, line and field (or the option) and exit 2,
and nothing is written. ``patches/lora.py`` calls the gate at three points:

- ``command_line(argv)`` around upstream's ``main``: the YAML file is read and a mapping,
  TRL's option names on the command line get the name to use (argparse would only say
  "unrecognized arguments"), and what the user typed is recorded, since after ``main`` every
  option has a value and ``--test`` must tell a typed one from a default;
- ``check(ns)`` where ``run`` starts: ``--test`` alone takes the preference options of the
  adapter it scores, then the YAML keys, the files the options name, the preference options
  (``PreferenceArgs``) and their combinations with mlx-lm's;
- ``load_datasets(ns)``: every row checked and tokenized with the tokenizer alone
  (``data.py``'s row checks), what is left of each split against the batch size and the
  ranks, and ``--num-layers`` against the model's layers.

Where the refusals live: ``PreferenceArgs`` (``config.py``) refuses every combination of
preference options among themselves, whoever builds them (CLI, YAML, a script's own
``PreferenceArgs``), with ``READ_BY`` saying which trainer reads which option; the gate
refuses what involves anything else: mlx-lm's options, the files, the data, the ranks.

An SFT run (no ``loss_type``) gets only the checks whose input upstream would fail on too
(files that are not there, preference pairs in its data), and stays upstream's otherwise.
"""

import json
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import yaml

from .batching import preference_dataset_of
from .checkpoint import (
    MAY_CHANGE,
    file_fingerprint,
    find_checkpoint,
    read_state,
    refuse_differences,
)
from .compat import resumable_loop
from .config import (
    TRL_NAMES,
    YAML_ONLY,
    ConfigError,
    PreferenceArgs,
    close_match,
    config_defaults,
    trl_hint,
)
from .console import log
from .data import DataError, is_preference_row, read_jsonl
from .rewards import RewardError, check_reward_funcs
from .sharing import CHECKPOINTING

FEATURES = {f"{n}_feature" for n in ("prompt", "completion", "chat", "text")}
FEATURES |= {"chosen_feature", "rejected_feature"}
HF_DATASET_KEYS = {"path", "train_split", "valid_split", "test_split", "config"}
HF_DATASET_KEYS |= FEATURES | {"mask_prompt"}
# What --test alone does not take from the adapter's options: how a run computes (the same
# numbers either way) and reports. ``reference`` is taken only when it is none (the loss
# has no reference): the trained adapter cannot be its own initial_adapter, and a
# precomputed reference scores the model as training starts.
RUN_MECHANICS = {"prompt_sharing", "head_chunk_size", "on_nonfinite", "report_metrics"}
RUN_MECHANICS |= {"resume_from_checkpoint", "save_total_limit", "save_only_model"}
RUN_MECHANICS |= {"share_frozen_layers"}

# The option names given on the command line or in YAML, while upstream's ``main`` runs (it
# parses the command line and calls ``run`` with no argument that could carry them).
_typed: ContextVar = ContextVar("mlx_lm_pref_typed", default=None)


# ---- the command line ----


@contextmanager
def command_line(argv):
    """Check ``argv`` where upstream's ``main`` would read it, and record what it gives."""
    from mlx_lm import lora as lora_cli

    given, extras = lora_cli.build_parser().parse_known_args(argv)
    check_trl_flags(extras)
    config = read_config(given.config) if given.config else {}
    typed_now = {k for k, v in vars(given).items() if v is not None} | set(config)
    token = _typed.set(typed_now)
    try:
        yield
    finally:
        _typed.reset(token)


def check_trl_flags(extras):
    """A TRL option name among the arguments argparse does not know gets the name to use
    (argparse exits on any unknown one after this: nothing else changes)."""
    for arg in extras:
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        if name in TRL_NAMES:
            raise ConfigError(trl_hint(name, cli=True))


def read_config(path) -> dict:
    """The YAML file ``--config`` names, as a mapping."""
    from mlx_lm import lora as lora_cli

    try:
        with open(path) as fid:
            values = yaml.load(fid, lora_cli.yaml_loader)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e}).".replace("\n", " ")) from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values.")
    return values


def typed(ns) -> set:
    """The option names the user gave: recorded by ``command_line``, or, for a script that
    calls ``run`` itself, those whose value is not their default."""
    if _typed.get() is not None:
        return _typed.get()
    defaults = config_defaults()
    return {k for k, v in defaults.items() if getattr(ns, k, v) not in (None, v)}


# ---- the run, before anything loads ----


def check(ns) -> PreferenceArgs:
    """Every check that needs neither the tokenizer nor the model; the run's options."""
    notes = take_adapter_options(ns)
    options = PreferenceArgs.from_namespace(ns)
    check_config_keys(ns, options)
    if options.is_preference:
        check_run(options, ns)
    check_files(ns)
    if not options.is_preference:
        check_sft_data(ns)
        if options.log_completions:
            check_sft_samples(ns)
    for note in notes:  # --test alone: the options given otherwise than trained
        log(note)
    if options.is_preference and ns.train:
        options = continue_adapter(options, ns)
    return check_resume(options, ns)


# ---- resuming ----


def run_identity(ns) -> dict:
    """What a checkpoint records of an ``mlx_lm.lora`` run besides the preference options,
    for a resumed run to be compared with: every option as given, and the training rows:
    a local train.jsonl's bytes (its folder may move), else the Hugging Face dataset's
    name (``hf_dataset`` entries are among the options)."""
    args = json.loads(json.dumps(vars(ns), default=str))
    train = Path(ns.data or "") / "train.jsonl"
    if getattr(ns, "hf_dataset", None):
        rows = None
    elif train.is_file():
        rows = file_fingerprint(train)
    else:
        rows = f"data {ns.data}"
    return {"args": args, "train_data": rows}


def check_resume(options, ns) -> PreferenceArgs:
    """``resume_from_checkpoint``: the checkpoint exists and holds this run (the same
    options but those that may change, the same training rows); returns the options with
    the checkpoint's folder in place of ``true``. Says what changed that may."""
    value = options.resume_from_checkpoint
    if not value:
        return options
    if not ns.train:
        raise ConfigError("resume_from_checkpoint continues training: give --train.")
    if options.save_only_model:
        raise ConfigError(
            "resume_from_checkpoint with save_only_model: a resumed run writes "
            "checkpoints; remove save_only_model."
        )
    if getattr(ns, "resume_adapter_file", None):
        raise ConfigError(
            "resume_from_checkpoint with --resume-adapter-file: the checkpoint holds the "
            "weights to continue from; give one of them."
        )
    if not resumable_loop():
        raise ConfigError(
            "resume_from_checkpoint: this mlx-lm's training loop does not count its "
            "iterations as the supported releases do; a resumed run cannot start "
            "mid-way in it."
        )
    folder = find_checkpoint(value, ns.adapter_path)
    state = read_state(folder)
    now = run_identity(ns)
    refuse_differences(folder, state.get("args", {}), now["args"])
    if state.get("train_data") != now["train_data"]:
        raise ConfigError(
            f"resume_from_checkpoint {folder}: the training data differ from the run it "
            f"holds (--data {ns.data}: its train.jsonl or name changed): its data "
            "position would point elsewhere. Resume with the run's data, or start a new "
            "run."
        )
    if state["iteration"] >= ns.iters:
        raise ConfigError(
            f"resume_from_checkpoint {folder}: the run is at iteration "
            f"{state['iteration']} and iters is {ns.iters}: nothing is left to train; "
            "raise iters to train on."
        )
    saved = state.get("args", {})
    changed = [
        f"{n} {plain(now['args'][n])} (was {plain(saved[n])})"
        for n in sorted(MAY_CHANGE & set(saved) & set(now["args"]) - IGNORED)
        if saved[n] != now["args"][n]
    ]
    if changed:
        log(f"resuming with {', '.join(changed)}")
    return options.replace(resume_from_checkpoint=str(folder))


def continue_adapter(options, ns) -> PreferenceArgs:
    """``--resume-adapter-file`` keeps mlx-lm's meaning (start from these weights) and, with
    ``reference: auto``, this rule: an adapter a preference run trained keeps that run's
    reference (continuing DPO does not re-anchor on its own checkpoint); an SFT adapter
    becomes the reference (TRL's DPO after SFT). Sets ``ns.reference`` (and
    ``ns.reference_adapter_file``, the adapter whose tensors are the reference), which
    mlx-lm records in adapter_config.json for the next continuation; says which and why.
    """
    path = getattr(ns, "resume_adapter_file", None)
    if not path or not options.needs_reference or options.reference != "auto":
        return options
    config = Path(path).parent / "adapter_config.json"
    saved = {}
    if config.is_file():
        try:
            saved = json.loads(config.read_text())
            trained = PreferenceArgs.from_namespace(SimpleNamespace(**saved))
        except (ValueError, TypeError):
            saved, trained = {}, None
    if not saved or trained is None or not trained.needs_reference:
        if ns.fine_tune_type != "full":
            log(
                f"reference: initial_adapter, the adapter of --resume-adapter-file {path} "
                "(not trained with a reference: DPO after SFT)"
            )
        return options
    if ns.fine_tune_type == "full" or saved.get("fine_tune_type") == "full":
        raise ConfigError(
            f"--resume-adapter-file {path}: weights a {trained.method} run fine-tuned in "
            "full; its reference was the model before that run, which is gone. Continue "
            "the run with --resume, or give --reference precomputed to start anew from "
            "these weights."
        )
    strategy = saved.get("reference", "auto")
    origin = saved.get("reference_adapter_file") or saved.get("resume_adapter_file")
    if strategy == "auto":
        strategy = "initial_adapter" if origin else "adapters_off"
    if strategy == "precomputed":  # scored the model that run started from
        strategy = "initial_adapter" if origin else "adapters_off"
    why = f"{path} was trained by a {trained.method} run with that reference"
    if strategy == "initial_adapter":
        if not origin or not Path(origin).is_file():
            raise ConfigError(
                f"--resume-adapter-file {path}: its {trained.method} run's reference was "
                f"the adapter it started from, {origin}, which is not there any more. "
                "Give --reference adapters_off or initial_adapter."
            )
        ns.reference_adapter_file = origin
        log(f"reference: initial_adapter from {origin} ({why}; continuing keeps it)")
    else:
        log(f"reference: {strategy} ({why}; continuing keeps it)")
    ns.reference = strategy
    return options.replace(reference=strategy)


# Options whose change is not worth a line when resuming.
IGNORED = {"resume_from_checkpoint", "config", "train", "test"}


def take_adapter_options(ns) -> list:
    """``--test`` without ``--train`` scores an adapter trained with a preference loss as it
    was trained: the preference options the user did not give come from the adapter's
    ``adapter_config.json`` (mlx-lm saves the run's options there, ours included); the ones
    given otherwise win and are named. Returns those lines."""
    config = Path(ns.adapter_path or "") / "adapter_config.json"
    if not ns.test or ns.train or not ns.adapter_path or not config.is_file():
        return []
    try:
        saved = json.loads(config.read_text())
        trained = PreferenceArgs.from_namespace(SimpleNamespace(**saved))
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"{config}: cannot read the adapter's options ({e})"
        ) from None
    given = typed(ns) & set(config_defaults())
    if "loss_type" in given:
        method = PreferenceArgs.from_namespace(ns).method
    else:
        method = trained.method
    if not trained.is_preference or method == "sft":
        return []
    notes = []
    for name, default in config_defaults().items():
        value = saved.get(name, default)
        if name in given:
            if name not in RUN_MECHANICS and differs(saved, name, getattr(ns, name)):
                notes.append(
                    f"--test: {name} {plain(getattr(ns, name))} (the adapter was trained "
                    f"with {plain(value)})"
                )
        elif method == trained.method and taken(name, value):
            setattr(ns, name, value)
    return notes


def taken(name, value) -> bool:
    """Whether --test alone takes the adapter's ``value`` of option ``name`` (of the
    adapter's method: another method's options stay defaults)."""
    if name in RUN_MECHANICS:
        return False
    return name != "reference" or value == "none"


def differs(saved: dict, name, value) -> bool:
    """Whether ``value`` of ``name`` scores otherwise than the adapter's options (``dpo``
    and ``sigmoid`` do not)."""
    values = {f.name: saved.get(f.name) for f in fields(PreferenceArgs)}
    before = PreferenceArgs.from_namespace(SimpleNamespace(**values))
    try:
        after = PreferenceArgs.from_namespace(
            SimpleNamespace(**{**values, name: value})
        )
    except ConfigError:
        return True
    return before != after


def plain(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_config_keys(ns, options):
    """A misspelt YAML key would be ignored (mlx-lm reads only the keys it knows) and the
    run go on without it: refuse the keys that are one or two edits from a known one, and
    TRL's names. For an SFT run only the misspellings of preference options (upstream's
    own keys are upstream's business)."""
    if not getattr(ns, "config", None):
        return
    from mlx_lm import lora as lora_cli

    config = read_config(ns.config)
    preference = options.is_preference
    ours = set(config_defaults())
    known = set(lora_cli.CONFIG_DEFAULTS) | YAML_ONLY | FEATURES | ours
    known |= {a.dest for a in lora_cli.build_parser()._actions}
    entries = config.get("hf_dataset") or []
    entries = [entries] if isinstance(entries, dict) else entries
    if not isinstance(entries, list):
        raise ConfigError(
            f"{ns.config}: hf_dataset must be a mapping (path, train_split, ...) or a "
            "list of them."
        )
    checks = [(config, known, "")]
    checks += [(e, HF_DATASET_KEYS, f"hf_dataset[{i}].") for i, e in enumerate(entries)]
    for mapping, names, where in checks:
        if not isinstance(mapping, dict):
            raise ConfigError(f"{ns.config}: {where.rstrip('.')} must be a mapping.")
        if where and preference and not mapping.get("path"):
            raise ConfigError(
                f"{ns.config}: {where}path is missing: the dataset's name or folder."
            )
        for key in mapping:
            if key in names:
                continue
            if preference and not where and key in TRL_NAMES:
                raise ConfigError(f"{ns.config}: {trl_hint(key)}")
            guess = close_match(key, names)
            if guess and (preference or guess in ours):
                raise ConfigError(
                    f"{ns.config}: unknown key '{where}{key}'; did you mean '{guess}'?"
                )


def check_files(ns):
    """The files and folders the options name exist (upstream fails on each of these too,
    after the model loaded)."""
    if not ns.train and not ns.test:
        raise ConfigError(
            "give --train, --test or both (YAML: train: true, test: true)."
        )
    resume = getattr(ns, "resume_adapter_file", None)
    if resume and not Path(resume).is_file():
        what = (
            "a folder: name the .safetensors file in it"
            if Path(resume).is_dir()
            else "no such file"
        )
        raise ConfigError(f"--resume-adapter-file {resume}: {what}.")
    if not getattr(ns, "hf_dataset", None):
        check_data_folder(ns)
    if ns.test and not ns.train and ns.adapter_path:
        adapters = Path(ns.adapter_path)
        for name in ("adapters.safetensors", "adapter_config.json"):
            if not (adapters / name).is_file():
                raise ConfigError(
                    f"--adapter-path {adapters}: no {name} for --test to load (train "
                    'one with --train, or pass --adapter-path "" to test the model '
                    "alone)."
                )


def check_data_folder(ns):
    """``--data`` names a local folder, or (a name, owner/name) a Hugging Face dataset."""
    data = Path(ns.data)
    if not data.exists():
        if looks_like_a_path(ns.data):
            raise ConfigError(f"--data {ns.data}: no such folder.")
        return  # a Hugging Face dataset: datasets says if it is not there
    if not data.is_dir():
        raise ConfigError(
            f"--data {ns.data}: not a folder; --data names a folder holding train.jsonl, "
            "valid.jsonl and test.jsonl."
        )
    wanted = [("train", ns.train), ("test", ns.test)]
    for split in (split for split, asked in wanted if asked):
        if not (data / f"{split}.jsonl").is_file():
            raise ConfigError(
                f"--data {ns.data}: no {split}.jsonl in this folder (--{split} reads it; "
                "validation reads valid.jsonl)."
            )


def looks_like_a_path(data: str) -> bool:
    """Not a Hugging Face dataset's ``name``, ``owner/name`` or URL."""
    if "://" in data:
        return False
    return data.startswith(("/", ".", "~")) or data.count("/") > 1 or "\\" in data


def check_sft_data(ns):
    """Preference pairs in an SFT run's local data (``loss_type`` forgotten or misspelt)
    fail in upstream's loader after the model loaded; say so before."""
    if getattr(ns, "hf_dataset", None) or not Path(ns.data).is_dir():
        return
    split = "train" if ns.train else "test"  # --test alone reads test.jsonl only
    path = Path(ns.data) / f"{split}.jsonl"
    if not path.is_file():
        return
    with open(path, "rb") as fid:
        first = next((line for line in fid if line.strip()), b"")
    try:
        row = json.loads(first)
    except ValueError:
        return  # upstream's loader reports it
    if not is_preference_row(row):
        return
    if ns.train:
        raise DataError(
            f"{path}: rows with 'chosen' and 'rejected' are preference pairs; train on "
            "them with --loss-type dpo or orpo (YAML: loss_type: dpo)."
        )
    raise DataError(
        f"{path}: rows with 'chosen' and 'rejected' are preference pairs, and "
        f"{ns.adapter_path or 'the model'} was not trained with a preference loss: "
        "score them with --loss-type dpo (or orpo, cpo, kto, ...)."
    )


def check_sft_samples(ns):
    """log_completions answers the validation prompts: text rows have none."""
    path = Path(ns.data) / "valid.jsonl"
    if getattr(ns, "hf_dataset", None) or not ns.train or not path.is_file():
        return
    rows, lines = read_jsonl(path)
    features = {getattr(ns, "chat_feature", None) or "messages"}
    features.add(getattr(ns, "prompt_feature", None) or "prompt")
    if rows and isinstance(rows[0], dict) and not features & set(rows[0]):
        raise ConfigError(
            f"log_completions: {path}:{lines[0]} is a text row, with no prompt to "
            "answer; give chat rows ('messages') or prompt/completion rows, or remove "
            "log_completions."
        )


def check_run(options, ns):
    """Refuse, before anything is loaded or written, the preference options that
    mlx-lm's options (or the ranks) make impossible."""
    losses = ",".join(options.loss_type)
    for name, least in (("max_seq_length", 2), ("batch_size", 1), ("iters", 0)):
        value = getattr(ns, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(
                f"{name} must be a whole number >= {least}, got {value!r}."
            )
    live_reference = options.reference in ("adapters_off", "initial_adapter")
    if options.needs_reference and live_reference and ns.fine_tune_type == "full":
        raise ConfigError(
            f"--loss-type {losses} with --fine-tune-type full: the reference "
            f"({options.reference}) comes from the LoRA adapters, and full fine-tuning has "
            "none. Use --reference precomputed (the default there), --fine-tune-type lora "
            "(or dora), or a reference-free loss (orpo, simpo)."
        )
    if getattr(ns, "mask_prompt", False):
        raise ConfigError(
            f"--mask-prompt with --loss-type {losses}: preference losses score the "
            "completions only (ORPO's NLL covers the prompt too, as TRL's): the option "
            "would change nothing. Remove --mask-prompt (YAML: mask_prompt)."
        )
    if options.needs_reference and options.reference == "precomputed":
        if ns.test and not ns.train:
            raise ConfigError(
                "--reference precomputed scores the pairs with the model as training "
                "starts, and --test without --train trains nothing. Use --reference auto "
                "(the base model) or adapters_off."
            )
    if options.prompt_sharing == "true" and getattr(ns, "grad_checkpoint", False):
        raise ConfigError(
            f"prompt_sharing true: {CHECKPOINTING}. Set prompt_sharing auto."
        )
    check_batch_size(options, ns)


def check_batch_size(options, ns):
    """What a batch needs: a share for every rank, and the rows the loss compares."""
    ranks = mx.distributed.init().size()
    if ns.batch_size % ranks:
        raise ConfigError(
            f"--batch-size {ns.batch_size} with {ranks} processes: the batch is split "
            f"across them, so it must divide by {ranks}."
        )
    if options.generates:
        check_generation(options, ns, ranks)
    if options.kl_term and ns.batch_size < 2:
        raise ConfigError(
            "loss_type kto estimates its KL term from each row's prompt with another "
            "row's completion in the same batch: with batch_size 1 it would equal the "
            "reward (TRL refuses it too). Use --batch-size 2 or more, or --loss-type "
            "apo_zero_unpaired (no KL term)."
        )
    pairs_per_rank = ns.batch_size // ranks
    if set(options.loss_type) & {"aot", "aot_unpaired"} and pairs_per_rank < 2:
        raise ConfigError(
            "loss_type aot/aot_unpaired sorts log-ratios across the pairs of a batch: "
            f"batch_size {ns.batch_size} gives {pairs_per_rank} pair per rank. Use "
            "--batch-size 2 or more per rank."
        )


def steps_per_generation(options, ns) -> int:
    return options.generation_steps(
        ns.batch_size, getattr(ns, "grad_accumulation_steps", 1)
    )


def check_generation(options, ns, ranks):
    """GRPO's and RLOO's batches: whole groups of completions on every rank, and reward
    functions that load (TRL's GRPOConfig checks, before the model loads)."""
    G, losses = options.num_generations, options.loss_type[0]
    size = options.generation_batch_size
    if size and size % ns.batch_size:
        raise ConfigError(
            f"generation_batch_size {size} must be a multiple of --batch-size "
            f"{ns.batch_size} (each generation batch is cut into batches)."
        )
    completions = ns.batch_size * steps_per_generation(options, ns)
    if completions % (G * ranks):
        ranks_text = f" x {ranks} processes" if ranks > 1 else ""
        raise ConfigError(
            f"loss_type {losses}: a generation batch of {completions} completions "
            f"(batch_size {ns.batch_size} x steps_per_generation "
            f"{completions // ns.batch_size}) does not hold whole groups of "
            f"num_generations {G}{ranks_text}: make batch_size x steps_per_generation a "
            f"multiple of {G * ranks} (e.g. --batch-size {G * ranks}), or change "
            "--num-generations."
        )
    if ns.fine_tune_type == "full" and options.beta > 0:
        raise ConfigError(
            f"--loss-type {losses} with beta {options.beta:g} and --fine-tune-type full: "
            "the KL term's reference is the model with its LoRA adapters off, and full "
            "fine-tuning has none. Use --beta 0 (TRL's GRPO default) or LoRA."
        )
    try:
        check_reward_funcs(options.reward_funcs, options)
    except RewardError as e:
        raise ConfigError(str(e)) from None


# ---- the data, with the tokenizer alone ----


def load_datasets(ns) -> tuple:
    """The (train, valid, test) datasets, built with the model's tokenizer alone, every
    row checked; then what is left of the training set, and the model's layers."""
    import mlx_lm.lora
    from mlx_lm.utils import _download, load_config, load_tokenizer

    try:
        model_path = _download(ns.model)
        config = load_config(model_path)
        tokenizer = load_tokenizer(
            model_path,
            {"trust_remote_code": getattr(ns, "trust_remote_code", False)},
            eos_token_ids=config.get("eos_token_id"),
        )
    except Exception as e:  # what mlx-lm's load would fail on next
        raise ConfigError(f"--model {ns.model}: cannot load it ({e}).") from None
    splits = mlx_lm.lora.load_dataset(ns, tokenizer)
    if ns.train:
        check_train_size(splits[0], ns.batch_size, ns)
    check_num_layers(ns, config)
    return splits


def check_train_size(train, batch_size, ns=None):
    """A training batch is ``batch_size`` pairs (KTO: rows) of the training set, after the
    pairs dropped for max_seq_length and identical_pairs: drop; GRPO's and RLOO's
    generation batch needs ``batch_size x steps_per_generation / num_generations``
    prompts. (Validation and --test keep a last smaller batch: any size evaluates.)"""
    dataset = preference_dataset_of(train)
    if dataset is not None and dataset.options.generates:
        o = dataset.options
        needed = batch_size * steps_per_generation(o, ns) // o.num_generations
        if len(dataset) < needed:
            raise DataError(
                f"{dataset.source}: {len(dataset)} prompts to train on, fewer than the "
                f"{needed} of a generation batch (batch_size {batch_size} x "
                f"steps_per_generation / num_generations {o.num_generations}): add "
                "prompts or lower --batch-size."
            )
        return
    if dataset is None or len(dataset) >= batch_size:
        return
    dropped = []
    if dataset.dropped:
        dropped.append(
            f"{dataset.dropped} whose prompt alone reaches "
            f"max_seq_length={dataset.max_seq_length}"
        )
    if dataset.identical and dataset.options.identical_pairs == "drop":
        dropped.append(f"{dataset.identical} identical pairs")
    after = f" (after dropping {' and '.join(dropped)})" if dropped else ""
    raise DataError(
        f"{dataset.source}: {len(dataset)} {dataset.unit} to train on{after}, fewer than "
        f"batch_size {batch_size}: lower --batch-size (YAML: batch_size) to at most "
        f"{max(len(dataset), 1)}, or add data."
    )


def check_num_layers(ns, config: dict) -> None:
    """mlx-lm's default ``num_layers`` of 16 is more than a small model has; upstream says so
    with a traceback once the model is loaded."""
    if not getattr(ns, "train", False):  # --test alone: the adapter's own layers count
        return
    layers = config.get("num_hidden_layers") or config.get("text_config", {}).get(
        "num_hidden_layers"
    )
    wanted = getattr(ns, "num_layers", None)
    if isinstance(layers, int) and isinstance(wanted, int) and wanted > layers:
        raise ConfigError(
            f"--num-layers {wanted} (mlx-lm's default is 16) but {ns.model} has {layers} "
            f"layers: pass --num-layers -1 to train all of them, or at most {layers}."
        )
