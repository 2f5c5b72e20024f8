"""Patches for ``mlx_lm.tuner.datasets``: preference rows become a ``PreferenceDataset``.

With the default ``loss_type: sft`` the originals run untouched, except that preference rows
(which upstream rejects as an unsupported format) get an error saying which option to set.
"""

import inspect
from pathlib import Path

from mlx_lm_pref.config import options_for
from mlx_lm_pref.data import DataError, PreferenceDataset, is_preference_row, read_jsonl

from . import function_wrapper


def _source(config) -> str:
    return str(getattr(config, "path", None) or getattr(config, "data", "data"))


def create_dataset(wrapped, instance, args, kwargs):
    a = inspect.signature(wrapped).bind(*args, **kwargs).arguments
    data, tokenizer, config = a["data"], a["tokenizer"], a["config"]
    options = options_for(config)
    if not options.is_preference:
        if len(data) and is_preference_row(data[0]):
            raise DataError(
                f"{_source(config)}: rows with 'chosen' and 'rejected' are preference pairs; "
                "train on them with --loss-type dpo or orpo (YAML: loss_type: dpo)."
            )
        return wrapped(*args, **kwargs)
    return PreferenceDataset(
        data,
        tokenizer,
        options,
        source=_source(config),
        max_seq_length=getattr(config, "max_seq_length", None),
    )


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
            PreferenceDataset(
                rows,
                tokenizer,
                options,
                source=str(path),
                lines=lines,
                max_seq_length=getattr(config, "max_seq_length", None),
            )
            if rows
            else []
        )
    return tuple(splits)


PATCHES = [
    ("create_dataset", function_wrapper(create_dataset)),
    ("load_local_dataset", function_wrapper(load_local_dataset)),
]
