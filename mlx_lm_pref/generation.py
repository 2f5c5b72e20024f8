"""Sampling a GRPO group: G completions of one prompt, the prompt run through the model once.

The prompt is prefilled once into mlx-lm's own KV cache (``make_prompt_cache``), its keys and
values are repeated for the G rows, and the G rows decode together, one token per step, with
mlx-lm's samplers (``sample_utils.make_sampler``: temperature, top_p, top_k, min_p) and its
repetition penalty. A row ends at its first EOS token, which it keeps (TRL's completions end
with EOS and the loss reads it), or at ``max_completion_length`` tokens (truncated). The
model runs as it trains (the adapters on) without dropout (``evaluation_mode``).

A cache that is not a plain ``KVCache`` (a rotating window, a state-space layer) is not
repeated: the G rows then prefill the prompt each, with the same numbers.
"""

from typing import List, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .data import _hf
from .reference import evaluation_mode


def eos_token_ids(tokenizer) -> list:
    """The ids that end a completion: mlx-lm's wrapper's ``eos_token_ids``, else the Hugging
    Face tokenizer's ``eos_token_id``."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    if not ids:
        ids = [_hf(tokenizer).eos_token_id]
    return [i for i in ids if i is not None]


def make_sampling(options):
    """``(sampler, logits processors)`` for the run's sampling options."""
    sampler = make_sampler(
        temp=options.temperature,
        top_p=options.top_p,
        min_p=options.min_p or 0.0,
        top_k=options.top_k,
    )
    penalty = options.repetition_penalty
    processors = make_logits_processors(
        repetition_penalty=penalty if penalty != 1.0 else None
    )
    return sampler, processors


def _repeat(cache, G) -> bool:
    """Repeat each layer's prompt keys and values for G rows; False where a layer's cache
    is not a plain KVCache."""
    if not all(type(c) is KVCache for c in cache):
        return False
    for c in cache:
        c.keys = mx.repeat(c.keys[..., : c.offset, :], G, axis=0)
        c.values = mx.repeat(c.values[..., : c.offset, :], G, axis=0)
    return True


def sample_group(
    model,
    prompt: Sequence[int],
    G: int,
    max_tokens: int,
    eos_ids,
    sampler,
    processors=(),
) -> List[List[int]]:
    """G completions of ``prompt`` (token ids), each ending at its first EOS (kept) or at
    ``max_tokens``."""
    cache = make_prompt_cache(model)
    ids = mx.array(prompt)[None]
    logits = _prefill(model, ids, cache)
    if _repeat(cache, G):
        logits = mx.repeat(logits, G, axis=0)
    else:
        cache = make_prompt_cache(model)
        logits = _prefill(model, mx.repeat(ids, G, axis=0), cache)
    rows = [[] for _ in range(G)]
    done = [False] * G
    for _ in range(max_tokens):
        logits = logits.astype(mx.float32)
        if processors:  # mlx-lm's processors read one row's history at a time
            logits = mx.concatenate(
                [
                    _process(processors, list(prompt) + rows[g], logits[g : g + 1])
                    for g in range(G)
                ]
            )
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = sampler(logprobs)
        for g, token in enumerate(tokens.tolist()):
            if not done[g]:
                rows[g].append(token)
                done[g] = token in eos_ids
        if all(done):
            break
        logits = model(tokens[:, None], cache=cache)[:, -1]
    return rows


def _prefill(model, ids, cache):
    """The last position's logits of ``ids`` (R, P), the cache filled: the positions before
    it only into the cache (as mlx-lm's ``generate_step``), so the output layer runs on one
    position, not the prompt's P (on a 152k vocabulary, 600 kB each)."""
    if ids.shape[1] > 1:
        model(ids[:, :-1], cache=cache)
        mx.eval([c.state for c in cache])
    return model(ids[:, -1:], cache=cache)[:, -1]


def _process(processors, history, logits):
    history = mx.array(history)
    for processor in processors:
        logits = processor(history, logits)
    return logits


def greedy_completions(model, prompts, max_tokens: int, eos_ids, done=None) -> list:
    """The greedy completion (token ids, without its EOS) of each of ``prompts`` (token id
    lists), dropout off; ``done(k)`` after the k-th. Greedy decoding draws no random
    number."""
    greedy, stop = make_sampler(temp=0.0), set(eos_ids)
    completions = []
    with evaluation_mode(model):
        for k, prompt in enumerate(prompts, start=1):
            (ids,) = sample_group(model, prompt, 1, max_tokens, stop, greedy)
            completions.append(ids[:-1] if ids and ids[-1] in stop else ids)
            if done is not None:
                done(k)
    return completions


def sample_completions(
    model, prompts, G, options, eos_ids, seeds=None
) -> List[List[int]]:
    """G completions of each of ``prompts`` (token id lists), in order: prompt 0's G, then
    prompt 1's, ...; ``seeds``: one per prompt, the random state its group is sampled from
    (a group's samples then do not depend on which process samples it)."""
    sampler, processors = make_sampling(options)
    completions = []
    with evaluation_mode(model):
        for k, prompt in enumerate(prompts):
            if seeds is not None:
                mx.random.seed(seeds[k])
            completions += sample_group(
                model,
                prompt,
                G,
                options.max_completion_length,
                set(eos_ids),
                sampler,
                processors,
            )
    return completions
