"""``reference: precomputed``: reference log-probs from one pass before training.

The model as it is when training starts (the base model under a fresh adapter, the loaded
adapter when resuming, the initial weights of full fine-tuning) scores every pair once; the
values ride along in the batches, so no training step runs a reference forward and full
fine-tuning gets a reference without a second copy of the weights.

The values are cached on disk under ``$MLX_LM_PREF_CACHE`` (default ``~/.cache/mlx_lm_pref``)
in ``reference/<key>.safetensors``, where the key hashes every weight of the model (adapter
tensors and scales included), every token id and completion boundary of the pairs (so the
tokenizer, the data, the truncation and ``max_seq_length``; for KTO the KL rows too, so the
per-rank batch size they rotate within), and the options that change a log-prob
(``ld_alpha``). Any change recomputes; an unchanged rerun loads.
"""

import hashlib
import os

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from .batching import iterate_eval_batches, kl_chunk
from .config import ConfigError
from .console import is_main_rank
from .data import Example
from .env import cache_root
from .objective import sequence_logps_dpo
from .reference import adapter_layers

CACHE_VERSION = b"mlx_lm_pref reference v1"


def _hasher():
    try:
        import xxhash  # a dependency of datasets; ~10x faster than sha256 on weights

        return xxhash.xxh3_128()
    except ImportError:
        return hashlib.blake2b(digest_size=16)


def model_fingerprint(model) -> str:
    """A hash of every weight and adapter scale, one tensor in host memory at a time."""
    h = _hasher()
    for name, array in tree_flatten(model.parameters()):
        h.update(f"{name}:{array.dtype}:{array.shape}".encode())
        h.update(np.array(array.reshape(-1).view(mx.uint8), copy=False).tobytes())
    h.update(repr([layer.scale for layer in adapter_layers(model)]).encode())
    return h.hexdigest()


def cache_key(model_hash: str, pairs, options, max_seq_length: int) -> str:
    h = _hasher()
    h.update(CACHE_VERSION)
    h.update(f"{model_hash}:{options.ld_alpha}:{max_seq_length}".encode())
    for p in pairs:
        if isinstance(p, Example):
            ids, starts = p.sequence + [-1] + (p.kl_sequence or []), f"{p.start}"
        else:
            ids, starts = (
                p.chosen + [-1] + p.rejected,
                f"{p.chosen_start},{p.rejected_start}",
            )
        h.update(np.asarray(ids, np.int32).tobytes())
        h.update(f"{starts};".encode())
    return h.hexdigest()


def precompute_reference(
    model,
    pairs,
    options,
    batch_size,
    max_seq_length,
    model_hash=None,
    cached_only=None,
):
    """``pairs`` (a PreferenceDataset) with reference log-probs on every pair, scored in
    the layout ``options.prompt_sharing`` asks for (resolved for this model).
    ``cached_only``: the checkpoint a resumed run continues, whose model is no longer the
    one to score: the values must be in the cache.

    Returns ``(dataset, status)``, status ``"loaded"`` or ``"computed"``.
    """
    model_hash = model_hash or model_fingerprint(model)
    if pairs.options.method == "kto":  # the KL rows, as training will batch them
        pairs = pairs.with_kl(kl_chunk(batch_size))
    key = cache_key(model_hash, pairs, options, max_seq_length)
    path = cache_root() / "reference" / f"{key}.safetensors"
    if path.exists():
        values = np.array(mx.load(str(path))["reference"])
        status = "loaded"
    elif cached_only:
        raise ConfigError(
            f"resume_from_checkpoint {cached_only}: the run's precomputed reference "
            f"log-probs of {pairs.source} are gone from {path.parent} (the trained "
            "weights cannot score them again); start the run anew."
        )
    else:
        values = _score(model, pairs, options, batch_size, max_seq_length)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.safetensors")
        mx.save_safetensors(str(tmp), {"reference": mx.array(values)})
        os.replace(tmp, path)  # never a half-written cache entry
        status = "computed"
    return pairs.with_reference(values), status


def _score(model, pairs, options, batch_size, max_seq_length) -> np.ndarray:
    """(N, 2) reference log-probs, chosen and rejected (KTO: the row and its KL row, 0
    without one), in dataset order."""
    was_training = model.training
    model.eval()
    values = []
    batches = iterate_eval_batches(
        pairs, batch_size, max_seq_length, prompt_sharing=options.prompt_sharing
    )
    total = -(-len(pairs) // batch_size)
    try:
        desc = f"Reference log-probs {pairs.source}"
        quiet = not is_main_rank()  # every rank scores; one bar
        for (batch,) in tqdm(batches, total=total, desc=desc, disable=quiet):
            logps = np.array(sequence_logps_dpo(model, batch, options))
            b = batch.pairs
            second = logps[b:] if len(logps) > b else np.zeros(b, np.float32)
            values.append(np.stack([logps[:b], second], axis=1))
    finally:
        model.train(was_training)
    return np.concatenate(values).astype(np.float32)
