"""GRPO's and RLOO's batches: prompts sampled, completions scored, advantages, in mlx-lm's
``iterate_batches`` protocol.

``Rollouts`` is bound to a run's model and options (``session`` hands it to mlx-lm's
``train()`` as ``iterate_batches``), so mlx-lm's loop, its reports, checkpoints and callbacks
stay as they are: generation happens where the loop asks for its next batch.

Training (``loop=True``), as TRL's ``_prepare_inputs``: a generation batch is ``batch_size``
x ``steps_per_generation`` completions (TRL's ``generation_batch_size``), ``num_generations``
(G) of each of its prompts; prompts come in a new random order each epoch (a last
incomplete generation batch of an epoch is left out, as TRL's ``RepeatSampler``). The
generation batch is cut into ``steps_per_generation`` batches of ``batch_size`` completions,
each yielded in turn, the whole round ``num_iterations`` times. Unlike TRL the completions
are not shuffled before the cut: a batch holds whole groups, so each prompt runs through the
model once for its group (the shared layout, ``sharing``). An optimizer step's gradient
does not depend on the cut for every ``loss_type`` but bnpo (a token mean per batch) and
``top_entropy_quantile`` (a quantile per batch).

Evaluation (validation, ``--test``): the prompts in file order, ``batch_size / G`` per batch
(the last holding the rest), each batch its own generation batch, as TRL's evaluation.

With several ranks each rank samples whole groups of its own share of the prompts; rewards,
lengths and token counts are gathered, so the advantages (a batch-wide std too) and the
sampling's metrics are the whole generation batch's, as TRL gathers them.
"""

import json
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import numpy as np

from .batching import SHARE_BELOW, SharedTokens, _padded, preference_dataset_of
from .data import _hf
from .forward import run_model
from .generation import eos_token_ids, sample_completions
from .grpo import (
    RolloutBatch,
    group_advantages,
    nanstd,
    rloo_advantages,
    weighted_rewards,
)
from .logps import span_mask
from .reference import evaluation_mode, reference_context
from .rewards import score_completions

COMPLETIONS_FILE = "completions.jsonl"


def _gather(values) -> np.ndarray:
    """``values`` (n, ...) of every rank, concatenated in rank order."""
    array = mx.array(np.asarray(values, np.float32))
    if mx.distributed.init().size() > 1:
        array = mx.distributed.all_gather(array, stream=mx.cpu)
    return np.array(array, np.float64)


class Rollouts:
    """``iterate_batches`` for GRPO and RLOO, bound to the run (see the module docstring).

    Args:
        model: the model being trained.
        options: the run's options (``reference`` resolved).
        funcs: ``[(name, callable)]`` the reward functions.
        grad_accumulation_steps: mlx-lm's; the default ``steps_per_generation``.
        initial: the step-0 adapter (``reference: initial_adapter``).
        log_path: where ``log_completions`` writes ``completions.jsonl``, if anywhere.
        tokenizer: decodes the completions (by default the dataset's).
    """

    def __init__(
        self,
        model,
        options,
        funcs,
        grad_accumulation_steps=1,
        initial=None,
        log_path: Optional[Path] = None,
        tokenizer=None,
    ):
        self.model, self.options, self.funcs = model, options, funcs
        self.tokenizer = tokenizer
        self.grad_accumulation_steps = grad_accumulation_steps
        self.initial, self.log_path = initial, log_path
        self.generations = 0  # generation batches sampled, for messages
        self.samples: List[dict] = []  # the last generation's, for log_completions

    def __call__(
        self,
        dataset,
        batch_size,
        max_seq_length=None,
        loop=False,
        seed=None,
        comm_group=None,
        skip=0,
        **_,
    ):
        prompts = preference_dataset_of(dataset)
        self.tokenizer = prompts.tokenizer
        if loop:
            return self._training(prompts, batch_size, seed, comm_group, skip)
        return self._evaluation(prompts, batch_size, comm_group)

    def _ranks(self, comm_group):
        return (comm_group.rank(), comm_group.size()) if comm_group else (0, 1)

    def _training(self, prompts, batch_size, seed, comm_group, skip=0):
        """``skip``: batches a resumed run trained on, whole generation batches: their
        prompt orders are drawn again, nothing is sampled."""
        o, (rank, ranks) = self.options, self._ranks(comm_group)
        G, S = o.num_generations, o.generation_steps(
            batch_size, self.grad_accumulation_steps
        )
        per_generation = batch_size * S // G  # prompts, every rank together
        share = per_generation // ranks
        # The model moved since sampling when a generation batch spans optimizer steps:
        # the ratio's denominator is then the sampling-time log-prob (TRL's condition).
        stale = self.grad_accumulation_steps % (S * o.num_iterations) != 0
        if seed is not None:
            np.random.seed(seed)
        while True:
            order = np.random.permutation(len(prompts))
            for first in range(0, len(order) - per_generation + 1, per_generation):
                if skip:
                    skip -= S * o.num_iterations
                    continue
                chunk = order[first : first + per_generation]
                places = range(rank * share, (rank + 1) * share)
                mine = [prompts[int(chunk[j])] for j in places]
                batches = self._rollout(mine, places, S, stale, training=True)
                for iteration in range(o.num_iterations):
                    for batch in batches:
                        if iteration:  # the sampling's metrics once per generation
                            batch = batch._replace(rollout=mx.zeros_like(batch.rollout))
                        yield (batch,)

    def _evaluation(self, prompts, batch_size, comm_group=None):
        """Every rank samples and scores every evaluation batch whole (from the same
        seeds: the same samples), as KTO's evaluation: its sums over the ranks count each
        completion once per rank, which their ratios cancel. Each group is seeded by its
        prompt's place in the evaluation set, so its samples do not depend on the batch
        size either."""
        per_batch = max(batch_size // self.options.num_generations, 1)
        base = int(mx.random.randint(0, 1 << 30, ()).item())
        for first in range(0, len(prompts), per_batch):
            chunk = range(first, min(first + per_batch, len(prompts)))
            mine = [prompts[i] for i in chunk]
            yield (self._rollout(mine, chunk, 1, False, False, base)[0],)

    # ---- one generation batch ----

    def _rollout(
        self, prompts, places, steps, stale, training, base=None
    ) -> List[RolloutBatch]:
        """Sample, score and cut one generation batch (this rank's ``prompts``, at
        ``places`` of the whole generation batch) into ``steps`` batches.

        Each group is sampled from a seed of its place and one number every rank draws
        alike (their random states are in step), or ``base``: a group's samples do not
        depend on the rank that samples it, so 2 ranks sample what one process does.
        After sampling every rank's state is that number's again."""
        if base is None:
            base = int(mx.random.randint(0, 1 << 30, ()).item())
        G = self.options.num_generations
        ids = [p.ids for p in prompts]
        seeds = [base + 1 + place for place in places]
        completions = sample_completions(
            self.model, ids, G, self.options, self._eos_ids(), seeds
        )
        mx.random.seed(base)
        return self.score(prompts, completions, steps, stale, training)

    def score(
        self, prompts, completions, steps=1, stale=False, training=True
    ) -> List[RolloutBatch]:
        """The batches of one generation batch: ``prompts`` (this rank's ``Prompt`` rows)
        and their ``completions`` (token id lists, G per prompt in order), scored by the
        reward functions, cut into ``steps`` batches; ``stale``: the model will have moved
        when they are trained on (their sampling-time log-probs are kept)."""
        o, G = self.options, self.options.num_generations
        self.generations += 1
        eos = set(self._eos_ids())
        rows = [(k // G, prompts[k // G].ids, c) for k, c in enumerate(completions)]
        truncated = np.array([c[-1] not in eos | self._pad() for c in completions])
        kept = np.ones(len(rows), np.float32)
        if o.mask_truncated_completions:
            kept[truncated] = 0.0
        per_step = len(rows) // steps
        cuts = [rows[k * per_step : (k + 1) * per_step] for k in range(steps)]
        layouts = [self._collate(cut) for cut in cuts]
        olds, refs = self._score(layouts, stale or o.method == "rloo" and o.beta > 0)
        texts = self._texts(prompts, completions)
        rewards = self._rewards(prompts, completions, texts)
        lengths = np.array([len(c) for c in completions])
        kl = None
        if o.method == "rloo" and o.beta:
            kl = (
                np.concatenate(
                    [
                        np.array(((old - ref) * _mask(layout)).sum(axis=-1))
                        for old, ref, layout in zip(olds, refs, layouts)
                    ]
                )
                * kept
            )
        gathered = self._gathered(rewards, lengths, truncated, kept, kl, training)
        advantages = self._advantages(gathered)
        metrics = self._metrics(gathered, advantages)
        rank_rows = slice(gathered["offset"], gathered["offset"] + len(rows))
        mine = advantages["advantages"][rank_rows]
        if o.log_completions and training:
            self._log(prompts, texts, gathered["rewards_per_func"][rank_rows], mine)
        normalizer = max(gathered["tokens"], 1.0) / (gathered["ranks"] * steps)
        batches = []
        for k, (layout, cut) in enumerate(zip(layouts, cuts)):
            rows_k = slice(k * per_step, (k + 1) * per_step)
            counts = self._counts(cut) if training else 0.0
            rollout = (
                np.array(metrics, np.float32) if k == 0 else np.zeros_like(metrics)
            )
            rollout[0] = (counts, 1.0)  # num_tokens: every batch's own
            batches.append(
                RolloutBatch(
                    tokens=layout[0],
                    spans=layout[1],
                    advantages=mx.array(mine[rows_k], mx.float32),
                    kept=mx.array(kept[rows_k]),
                    normalizer=mx.array(normalizer, mx.float32),
                    rollout=mx.array(rollout),
                    groups=layout[2],
                    old_logps=olds[k] if stale else None,
                )
            )
        return batches

    def _eos_ids(self):
        return eos_token_ids(self.tokenizer)

    def _pad(self):
        """The pad id, which TRL counts as an end like EOS."""
        pad = getattr(_hf(self.tokenizer), "pad_token_id", None)
        return {pad} if pad is not None else set()

    def _collate(self, rows):
        """``(tokens, spans, groups)`` of ``rows`` [(prompt index, prompt, completion)]: the
        shared layout (each prompt once) where it computes fewer positions and the run
        shares prompts, else whole rows."""
        whole = [p + c for _, p, c in rows]
        width = _padded(max(len(r) for r in whole))
        firsts = sorted({k for k, _, _ in rows})
        where = {k: j for j, k in enumerate(firsts)}
        prompts = {k: p for k, p, _ in rows}
        share = (
            self.options.prompt_sharing != "false"
            and min(map(len, prompts.values())) > 1
        )
        if share:
            # Each prompt's first P = len - 1 tokens are inputs run once; its last token
            # starts the continuations (its logits predict the first completion token).
            pw = _padded(max(len(p) for p in prompts.values()))
            cw = _padded(max(len(c) + 1 for _, _, c in rows))
            positions = len(firsts) * (pw - 1) + len(rows) * (cw - 1)
            share = (
                self.options.prompt_sharing == "true"
                or positions <= SHARE_BELOW * (len(rows) * (width - 1))
            )
        spans = np.zeros((len(rows), 2), np.int32)
        if not share:
            tokens = np.zeros((len(rows), width), np.int32)
            for n, (row, (_, p, c)) in enumerate(zip(whole, rows)):
                tokens[n, : len(row)] = row
                spans[n] = (len(p), len(row))
            return mx.array(tokens), mx.array(spans), None
        prompt_tokens = np.zeros((len(firsts), pw), np.int32)
        lengths = np.zeros(len(firsts), np.int32)
        for k, j in where.items():
            prompt_tokens[j, : len(prompts[k])] = prompts[k]
            lengths[j] = len(prompts[k]) - 1
        continuations = np.zeros((len(rows), cw), np.int32)
        groups = np.zeros(len(rows), np.int32)
        for n, (k, p, c) in enumerate(rows):
            continuations[n, : len(c) + 1] = [p[-1]] + c
            spans[n] = (1, 1 + len(c))
            groups[n] = where[k]
        tokens = SharedTokens(
            mx.array(prompt_tokens), mx.array(lengths), mx.array(continuations)
        )
        return tokens, mx.array(spans), mx.array(groups)

    def _score(self, layouts, old):
        """Per-token log-probs of each batch at sampling time (``old``) and of the
        reference (RLOO with beta > 0), gradient-free: lists of (N, T) arrays (or of
        None)."""
        o = self.options
        olds, refs = [None] * len(layouts), [None] * len(layouts)
        for k, (tokens, spans, groups) in enumerate(layouts):
            batch, policy = _Scored(tokens, spans, groups), None
            if old:
                with evaluation_mode(self.model):
                    olds[k], policy = self._logps(batch)
            if o.beta and o.method == "rloo":  # its rewards hold the KL; on the
                # sampling pass's frozen layers (GRPO's reference runs in the step)
                with reference_context(self.model, o.reference, self.initial):
                    refs[k], _ = self._logps(batch, policy)
        return olds, refs

    def _logps(self, batch, below=None):
        """The batch's per-token log-probs, and its ``Forward``."""
        o = self.options
        f = run_model(self.model, batch, o, o.temperature, below)
        logps = mx.stop_gradient(f.stats(grad=False).logps)
        mx.eval(logps)
        return logps, f

    def _texts(self, prompts, completions):
        hf = _hf(self.tokenizer)
        texts = [hf.decode(c, skip_special_tokens=True) for c in completions]
        if isinstance(prompts[0].prompt, list):  # conversational: TRL's message form
            return [[{"role": "assistant", "content": t}] for t in texts]
        return texts

    def _rewards(self, prompts, completions, texts):
        G = self.options.num_generations
        rows = [p for p in prompts for _ in range(G)]
        keys = [k for k in rows[0].columns if k not in ("completion", "completion_ids")]
        columns = {k: [r.columns.get(k) for r in rows] for k in keys}
        return score_completions(
            self.funcs,
            [r.prompt for r in rows],
            texts,
            completions,
            columns,
            batch=self.generations,
        )

    def _gathered(self, rewards, lengths, truncated, kept, kl, training):
        """What the advantages and metrics need of every rank (rank order) in training;
        in evaluation every rank holds the whole batch."""
        gather = _gather if training else (lambda x: np.asarray(x, np.float64))
        rank_sizes = gather([len(lengths)]).astype(int)
        rank = mx.distributed.init().rank() if training else 0
        out = {
            "rewards_per_func": gather(rewards),
            "lengths": gather(lengths),
            "truncated": gather(truncated).astype(bool),
            "tokens": float(gather([float((lengths * kept).sum())]).sum()),
            "ranks": len(rank_sizes),
            "offset": int(rank_sizes[:rank].sum()),
        }
        out["kl"] = None if kl is None else gather(kl)
        return out

    def _advantages(self, g) -> dict:
        o, G = self.options, self.options.num_generations
        r = g["rewards_per_func"]
        weights = o.reward_weights or (1.0,) * r.shape[1]
        if o.method == "grpo":
            advantages, std = group_advantages(
                r, weights, G, o.scale_rewards, o.multi_objective_aggregation
            )
        else:
            rewards = weighted_rewards(r, weights)
            if o.reward_clip_range:
                rewards = np.clip(rewards, *o.reward_clip_range)
            if g["kl"] is not None:
                rewards = rewards - o.beta * g["kl"]
            advantages = rloo_advantages(rewards, G, o.normalize_advantages)
            std = np.repeat(nanstd(rewards.reshape(-1, G), axis=1), G)
        return {"advantages": advantages, "std": std}

    def _metrics(self, g, advantages) -> list:
        """The sampling's metrics as (numerator, denominator) rows, in
        ``rollout_metric_names`` order (every rank the same values)."""
        lengths, truncated = g["lengths"], g["truncated"]
        terminated = lengths[~truncated] if (~truncated).any() else np.zeros(1)
        values = [
            0.0,  # num_tokens: set per batch
            lengths.mean(),
            lengths.min(),
            lengths.max(),
            truncated.mean(),
            terminated.mean(),
            terminated.min(),
            terminated.max(),
        ]
        r = g["rewards_per_func"]
        for i in range(r.shape[1]):
            values += [_nan(np.nanmean, r[:, i]), float(nanstd(r[:, i]))]
        weights = self.options.reward_weights or (1.0,) * r.shape[1]
        rewards = weighted_rewards(r, weights)
        std = advantages["std"]
        values += [
            _nan(np.nanmean, rewards),
            float(nanstd(rewards)),
            float(np.isclose(np.nan_to_num(std, nan=1.0), 0.0).mean()),
        ]
        if g["kl"] is not None:
            values.append(float(g["kl"].sum() / max(g["tokens"], 1.0)))
        # NaN (every reward None): left out of the report, as TRL's nanmean of nothing
        return [(0.0, 0.0) if np.isnan(v) else (float(v), 1.0) for v in values]

    def _counts(self, cut):
        return float(sum(len(p) + len(c) for _, p, c in cut))

    def _log(self, prompts, texts, rewards, advantages):
        """``log_completions``: this generation's samples, kept for the report and
        appended to ``completions.jsonl``."""
        G = self.options.num_generations
        names = [name for name, _ in self.funcs]
        self.samples = [
            {
                "generation": self.generations,
                "prompt": prompts[k // G].prompt,
                "completion": text,
                **{f"rewards/{n}": _plain(v) for n, v in zip(names, rewards[k])},
                "advantage": float(advantages[k]),
            }
            for k, text in enumerate(texts)
        ]
        if self.log_path is not None and mx.distributed.init().rank() == 0:
            with open(self.log_path, "a") as fid:
                for sample in self.samples:
                    fid.write(json.dumps(sample) + "\n")


class _Scored(tuple):
    """A rollout layout as ``run_model`` reads it (tokens, spans, groups)."""

    def __new__(cls, tokens, spans, groups):
        return super().__new__(cls, (tokens, spans, groups))

    tokens = property(lambda self: self[0])
    spans = property(lambda self: self[1])
    groups = property(lambda self: self[2])
    shared = property(lambda self: isinstance(self[0], SharedTokens))


def _mask(layout):
    tokens, spans, _ = layout
    width = (
        tokens.continuations if isinstance(tokens, SharedTokens) else tokens
    ).shape[1]
    return span_mask(spans, width - 1).astype(mx.float32)


def _nan(reduce, values):
    finite = values[~np.isnan(values)]
    return float(reduce(finite)) if finite.size else float("nan")


def _plain(value):
    return None if np.isnan(value) else float(value)
