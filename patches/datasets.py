"""Patches for ``mlx_lm.tuner.datasets``: preference rows become a ``PreferenceDataset``.

The options come with the ``config`` mlx-lm passes to its loaders: the ``mlx_lm.lora``
namespace for ``--data``, or, for ``hf_dataset`` entries, the entry itself, which
``load_custom_hf_dataset`` completes with the run's options and ``max_seq_length`` (upstream
passes the entry alone). Several entries make one ``PreferenceDataset`` per split (upstream's
``ConcatenatedDataset`` tags every row with a dict key, which a tokenized pair has not).

With the default ``loss_type: sft`` the originals run untouched, except that preference rows
(which upstream rejects as an unsupported format) get an error saying which option to set.
"""

import inspect
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

from mlx_lm.tuner.datasets import ConcatenatedDataset

from mlx_lm_pref.config import PreferenceArgs
from mlx_lm_pref.data import DataError, PreferenceDataset, is_preference_row, read_jsonl
from mlx_lm_pref.prompts import PromptDataset

from . import function_wrapper

# What every hf_dataset entry shares with the run (mlx-lm passes each entry as the config).
RUN_WIDE = tuple(f.name for f in fields(PreferenceArgs)) + ("max_seq_length",)
FEATURES = (
    "prompt_feature",
    "chosen_feature",
    "rejected_feature",
    "completion_feature",
)


def options_for(config) -> PreferenceArgs:
    """The options a dataset config asks for (mlx-lm's SFT when it names none)."""
    if getattr(config, "loss_type", None) is None:
        return PreferenceArgs()
    return PreferenceArgs.from_namespace(config)


def _source(config, data=None) -> str:
    source = str(getattr(config, "path", None) or getattr(config, "data", "data"))
    split = getattr(data, "split", None)  # a Hugging Face Dataset knows its split
    return f"{source} ({split})" if split else source


def _build(rows, tokenizer, config, options, source, lines=None):
    dataset = PromptDataset if options.generates else PreferenceDataset
    return dataset(
        rows,
        tokenizer,
        options,
        source=source,
        lines=lines,
        max_seq_length=getattr(config, "max_seq_length", None),
        columns=columns(config),
    )


def columns(config) -> dict:
    """mlx-lm's column mapping (``prompt_feature``, ...) for preference rows."""
    return {
        name: getattr(config, f"{name}_feature", None) or name
        for name in ("prompt", "chosen", "rejected", "completion")
    }


def create_dataset(wrapped, instance, args, kwargs):
    a = inspect.signature(wrapped).bind(*args, **kwargs).arguments
    data, tokenizer, config = a["data"], a["tokenizer"], a["config"]
    options = options_for(config)
    if not options.is_preference:
        if len(data) and is_preference_row(data[0]):
            raise DataError(
                f"{_source(config, data)}: rows with 'chosen' and 'rejected' are "
                "preference pairs; train on them with --loss-type dpo or orpo (YAML: "
                "loss_type: dpo)."
            )
        return wrapped(*args, **kwargs)
    return _build(data, tokenizer, config, options, _source(config, data))


def load_local_dataset(wrapped, instance, args, kwargs):
    a = inspect.signature(wrapped).bind(*args, **kwargs).arguments
    data_path, tokenizer, config = Path(a["data_path"]), a["tokenizer"], a["config"]
    options = options_for(config)
    if not options.is_preference:
        return wrapped(*args, **kwargs)
    splits = []
    for name in ("train", "valid", "test"):
        path = data_path / f"{name}.jsonl"
        rows, lines = read_jsonl(path) if path.exists() else ([], [])
        splits.append(
            _build(rows, tokenizer, config, options, str(path), lines) if rows else []
        )
    return tuple(splits)


def load_custom_hf_dataset(wrapped, instance, args, kwargs):
    a = inspect.signature(wrapped).bind(*args, **kwargs).arguments
    ns = a["args"]
    if not options_for(ns).is_preference:
        return wrapped(*args, **kwargs)
    entries = ns.hf_dataset if isinstance(ns.hf_dataset, list) else [ns.hf_dataset]
    run_wide = {k: getattr(ns, k) for k in RUN_WIDE if hasattr(ns, k)}
    # Column names given at the top level are every entry's unless it names its own.
    features = {k: getattr(ns, k) for k in FEATURES if getattr(ns, k, None)}
    completed = SimpleNamespace(**vars(ns))
    completed.hf_dataset = [{**features, **entry, **run_wide} for entry in entries]
    splits = wrapped(completed, a["tokenizer"])
    return tuple(_one_dataset(split) for split in splits)


def _one_dataset(split):
    """A split of several hf_dataset entries as one PreferenceDataset."""
    if not isinstance(split, ConcatenatedDataset):
        return split
    parts = [p for p in split._data if len(p)]
    if not parts:
        return []
    if not all(isinstance(p, PreferenceDataset) for p in parts):
        return split
    return type(parts[0]).concatenate(parts)


PATCHES = [
    ("create_dataset", function_wrapper(create_dataset)),
    ("load_local_dataset", function_wrapper(load_local_dataset)),
    ("load_custom_hf_dataset", function_wrapper(load_custom_hf_dataset)),
]
