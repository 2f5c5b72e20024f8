"""Checkpoints that hold a whole run, and resuming from one (TRL's ``resume_from_checkpoint``).

A checkpoint is a folder ``<adapter_path>/checkpoints/NNNNNNN/``, beside mlx-lm's own
``NNNNNNN_adapters.safetensors`` (which stay as they are):

- ``adapters.safetensors``: the trainable parameters, as mlx-lm saves them;
- ``optimizer.safetensors``: ``optimizer.state`` flattened (moments, the step count, which is
  the learning-rate schedule's position, and the learning rate);
- ``rank_state.safetensors``: per rank, mlx's random key, numpy's global state and the
  state the batch stream started from (``BatchStream``), and the guard's metrics of the steps
  since the last report;
- ``reference.safetensors``: ``reference: initial_adapter``'s step-0 adapter tensors;
- ``trainer_state.json``: the iteration, the batches drawn, token counts, the reference (its
  strategy, and for ``precomputed`` the cache key of the model it scored), the options.

Rank 0 writes it under a temporary name, each file flushed to disk, then renames the folder:
a process killed during a save leaves the earlier checkpoints as they were, and a folder named
``NNNNNNN`` is always whole. ``save_total_limit`` keeps the newest N.

mlx's random key cannot be assigned, but ``mx.random.seed`` with a 64-bit integer sets the key
to that integer's two 32-bit halves, so the key round-trips exactly.
"""

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .config import ConfigError, PreferenceArgs

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"  # TRL's name for the same record
ADAPTERS = "adapters.safetensors"
OPTIMIZER = "optimizer.safetensors"
RANK_STATE = "rank_state.safetensors"
REFERENCE = "reference.safetensors"
NAME = re.compile(r"^\d{7}$")

# What a resumed run may set otherwise than the run it continues: how long it runs, how
# often it reports, evaluates and saves, where its reports go, and how it computes the same
# numbers. Any other option that differs is refused (it would make another run).
MAY_CHANGE = {
    "iters",
    "steps_per_report",
    "steps_per_eval",
    "save_every",
    "save_total_limit",
    "val_batches",
    "test",
    "test_batches",
    "train",
    "report_to",
    "project_name",
    "wandb",
    "config",
    "adapter_path",
    "resume_from_checkpoint",
    "resume_adapter_file",  # the starting weights, now in the checkpoint
    "report_metrics",
    "log_completions",
    "num_completions_to_print",
    "on_nonfinite",
    "grad_checkpoint",
    "clear_cache_threshold",
    "data",  # compared by its training rows' fingerprint instead
}


# ---- where checkpoints are ----


def checkpoint_folder(adapter_path, iteration: int) -> Path:
    return Path(adapter_path) / CHECKPOINTS / f"{iteration:07d}"


def checkpoints(adapter_path) -> list:
    """The whole checkpoints under ``adapter_path``, oldest first."""
    root = Path(adapter_path) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if NAME.match(p.name) and p.is_dir())


def find_checkpoint(value, adapter_path, option="resume_from_checkpoint") -> Path:
    """The checkpoint ``resume_from_checkpoint`` names: ``true`` (the newest under
    ``adapter_path``) or a checkpoint folder."""
    if value is True or str(value).lower() == "true":
        found = checkpoints(adapter_path)
        if not found:
            raise ConfigError(
                f"{option}: no checkpoint under {Path(adapter_path) / CHECKPOINTS} "
                "(a run writes one every save_every iterations and at its end); name "
                "one with --resume-from-checkpoint PATH."
            )
        return found[-1]
    folder = Path(value)
    if not (folder / STATE_FILE).is_file():
        what = "no such folder" if not folder.exists() else f"no {STATE_FILE} in it"
        raise ConfigError(
            f"{option} {value}: {what}; a checkpoint is a folder "
            f"{CHECKPOINTS}/NNNNNNN under the run's adapter_path."
        )
    return folder


def read_state(folder) -> dict:
    try:
        return json.loads((Path(folder) / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{Path(folder) / STATE_FILE}: cannot be read ({e})."
        ) from None


# ---- what is compared ----


def options_record(options: PreferenceArgs) -> dict:
    """The options as JSON values, field by field."""
    return {f.name: _plain(getattr(options, f.name)) for f in fields(options)}


def _plain(value):
    """A JSON value: tuples as lists, a script's reward function by its name."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if callable(value):
        return f"{value.__module__}:{getattr(value, '__qualname__', repr(value))}"
    if value is None or isinstance(value, (bool, int, float, str, dict)):
        return value
    return str(value)


def differences(saved: dict, now: dict) -> list:
    """The names whose values differ between two records (``MAY_CHANGE`` aside; a name
    only one of them has is not compared: another release's option)."""
    return [
        name
        for name in sorted(set(saved) & set(now) - MAY_CHANGE)
        if _plain(saved[name]) != _plain(now[name])
    ]


def refuse_differences(folder, saved: dict, now: dict) -> None:
    changed = differences(saved, now)
    if not changed:
        return
    shown = ", ".join(
        f"{n} {_short(now[n])} (the checkpoint: {_short(saved[n])})" for n in changed
    )
    raise ConfigError(
        f"resume_from_checkpoint {folder}: these options differ from the run it holds: "
        f"{shown}. Resume with the run's own, or start a new run (--resume-adapter-file "
        f"{Path(folder) / ADAPTERS} starts from its weights)."
    )


def _short(value) -> str:
    text = json.dumps(_plain(value))
    return text if len(text) <= 60 else text[:57] + "..."


def file_fingerprint(path) -> str:
    """A hash of the file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fid:
        for block in iter(lambda: fid.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- random states ----


def pack_numpy_state(state=None) -> np.ndarray:
    """numpy's (MT19937) random state as 628 uint32: key, position, the cached gaussian."""
    name, key, pos, has_gauss, gauss = state or np.random.get_state()
    tail = np.array([gauss], np.float64).view(np.uint32)
    return np.concatenate([key, [pos, has_gauss], tail]).astype(np.uint32)


def unpack_numpy_state(packed) -> tuple:
    packed = np.asarray(packed, np.uint32)
    gauss = float(packed[626:628].view(np.float64)[0])
    return ("MT19937", packed[:624], int(packed[624]), int(packed[625]), gauss)


def mlx_key() -> np.ndarray:
    return np.array(mx.random.state[0], np.uint32)


def set_mlx_key(key) -> None:
    """Set mlx's global random key to ``key`` (2 uint32), where the compiled step reads it."""
    hi, lo = (int(k) for k in np.asarray(key, np.uint64))
    mx.random.seed((hi << 32) | lo)


@contextmanager
def random_states_kept():
    """mlx's and numpy's global random states after the enclosed block as before it.

    Around validation in a run with checkpoints: mlx-lm validates at the last iteration
    before its step, so a run's end-of-training checkpoint would otherwise hold states that
    validation drew from (upstream's SFT batches are shuffled, GRPO's are sampled), which
    the longer run it is resumed into never drew."""
    key, state = mlx_key(), np.random.get_state()
    try:
        yield
    finally:
        set_mlx_key(key)
        np.random.set_state(state)


@contextmanager
def numpy_stream(state):
    """numpy's global random functions draw from ``state`` (a list holding one state,
    updated in place) in the enclosed block, and from their own again after it."""
    saved = np.random.get_state()
    np.random.set_state(state[0])
    try:
        yield
    finally:
        state[0] = np.random.get_state()
        np.random.set_state(saved)


class BatchStream:
    """The training batches on their own numpy random stream, counted.

    mlx-lm's loop draws every epoch's order from numpy's global state, which validation
    (upstream's iterate_batches shuffles every split) and reward functions draw from too,
    and a generator's place cannot be saved. So the training batches draw from a stream of
    their own, started from the global state when training starts; a checkpoint holds that
    start and the number of batches drawn, and a resumed run replays the stream's draws
    (``skip``: without building the batches, for iterators that can) up to there.
    """

    def __init__(self, make, start=None, drawn=0, skips=False):
        """``make(skip)`` returns the batch iterator (``skip`` batches left out when
        ``skips``, else drawn and dropped here)."""
        self.start = start if start is not None else np.random.get_state()
        self.drawn = drawn
        self._state = [self.start]
        with numpy_stream(self._state):
            self._batches = iter(make(drawn) if skips else make(0))
            if not skips:
                for _ in range(drawn):
                    next(self._batches)

    def __iter__(self):
        return self

    def __next__(self):
        with numpy_stream(self._state):
            batch = next(self._batches)
        self.drawn += 1
        return batch


# ---- writing ----


def _gathered(array: mx.array, ranks: int) -> np.ndarray:
    """(ranks, ...) every rank's ``array``, in rank order."""
    if ranks == 1:
        return np.array(array)[None]
    return np.array(mx.distributed.all_gather(array[None], stream=mx.cpu))


def rank_state(stream: Optional[BatchStream], pending: mx.array, ranks: int) -> dict:
    """Every rank's random states and pending step metrics, gathered (a collective: every
    rank calls it at the same step)."""
    start = pack_numpy_state(stream.start if stream else np.random.get_state())
    arrays = {
        "mlx_key": mx.array(mlx_key()),
        "numpy": mx.array(pack_numpy_state()),
        "stream": mx.array(start),
    }
    out = {k: _gathered(v, ranks) for k, v in arrays.items()}
    if pending.shape[0]:
        out["pending"] = _gathered(pending.astype(mx.float32), ranks)
    return out


def write_checkpoint(folder: Path, files: dict, state: dict, keep=None) -> None:
    """Write ``files`` ({name: {key: array}}) and ``state`` (JSON) as the checkpoint
    ``folder``, atomically; then keep the newest ``keep`` checkpoints."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, arrays in files.items():
            path = tmp / name
            mx.save_safetensors(str(path), arrays)
            _flush(path)
        path = tmp / STATE_FILE  # last: a checkpoint's sign that the rest is there
        path.write_text(json.dumps(state, indent=1) + "\n")
        _flush(path)
        if folder.exists():  # the same iteration written again (a resumed run's end)
            shutil.rmtree(folder)
        commit(tmp, folder)
        _flush(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep:
        for old in checkpoints(folder.parent.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def commit(tmp: Path, folder: Path) -> None:
    """The rename that makes a written checkpoint one (a test interrupts a save here)."""
    os.replace(tmp, folder)


def _flush(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a folder on a file system that cannot sync one
        pass
    finally:
        os.close(fd)


def optimizer_arrays(optimizer) -> dict:
    return dict(tree_flatten(optimizer.state))


# ---- reading ----


def load_optimizer_state(folder) -> dict:
    """The optimizer state a checkpoint holds, as ``optimizer.state`` takes it."""
    flat = mx.load(str(Path(folder) / OPTIMIZER))
    return tree_unflatten(list(flat.items()))


def load_rank_state(folder, rank: int) -> dict:
    """This rank's row of the checkpoint's per-rank arrays, as numpy."""
    return {
        k: np.array(v[rank]) for k, v in mx.load(str(Path(folder) / RANK_STATE)).items()
    }
