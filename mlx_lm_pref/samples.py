"""``log_completions`` for the methods that train on given completions (DPO, ORPO, CPO,
KTO): at each validation, the model's greedy answers to a few fixed validation prompts.

The prompts are the first ``num_completions_to_print`` distinct ones of the validation set,
in file order, as the loss sees them (the tokens before each pair's completion), so every
validation answers the same ones and a run's samples read as a progression. mlx-lm
validates before the first step, so the first samples are the starting model's (with
LoRA's zero-initialised B, the reference's). Decoding is greedy (no random state is drawn)
with dropout off, up to ``max_completion_length`` tokens or the first EOS. GRPO and RLOO
log the completions they sample instead (``rollout.Rollouts``); both write
``completions.jsonl`` and print (and log to wandb) through ``metrics.report_samples``.
"""

import json
from pathlib import Path
from typing import List, Optional

from .console import is_main_rank
from .data import Pair, _hf
from .generation import eos_token_ids, greedy_completions

DEFAULT_COUNT = 4  # prompts, where num_completions_to_print is not given


def prompt_tokens(item) -> List[int]:
    """The tokens before the completion of a ``Pair`` or an ``Example`` (KTO)."""
    if isinstance(item, Pair):
        return list(item.chosen[: item.chosen_start])
    return list(item.sequence[: item.start])


def preference_prompts(dataset, count: int) -> list:
    """``[(prompt, tokens)]``: the first ``count`` distinct prompts of a preference
    dataset, as the loss sees them."""
    return _distinct(
        ((dataset.prompts[k], prompt_tokens(dataset[k])) for k in range(len(dataset))),
        count,
    )


def sft_prompts(dataset, count: int) -> Optional[tuple]:
    """``([(prompt, tokens)], tokenizer)``: the first ``count`` distinct prompts of
    mlx-lm's SFT dataset (chat rows: the messages before the last assistant turn;
    prompt/completion rows: the prompt as a user turn, as mlx-lm templates it) and the
    tokenizer that templated them; None for text rows."""
    if type(dataset).__name__ == "CacheDataset":
        dataset = dataset._data
    parts = (
        dataset._data if type(dataset).__name__ == "ConcatenatedDataset" else [dataset]
    )
    if not all(hasattr(p, "chat_key") or hasattr(p, "prompt_key") for p in parts):
        return None

    def rows():
        for part in parts:
            template = part.tokenizer.apply_chat_template
            for k in range(len(part)):
                row = part[k]
                if hasattr(part, "chat_key"):
                    prompt = row[part.chat_key]
                    if prompt and prompt[-1].get("role") == "assistant":
                        prompt = prompt[:-1]
                    messages = prompt
                else:
                    prompt = row[part.prompt_key]
                    messages = [{"role": "user", "content": prompt}]
                tokens = template(
                    messages,
                    tools=row.get("tools"),
                    add_generation_prompt=True,
                    return_dict=False,
                )
                yield prompt, list(tokens)

    return _distinct(rows(), count), parts[0].tokenizer


def _distinct(pairs, count: int) -> list:
    seen, kept = set(), []
    for prompt, tokens in pairs:
        if len(kept) == count:
            break
        if tuple(tokens) not in seen:
            seen.add(tuple(tokens))
            kept.append((prompt, tokens))
    return kept


def sample_count(options) -> int:
    count = options.num_completions_to_print
    return DEFAULT_COUNT if count is None else count


class ValidationSamples:
    """Greedy answers to fixed validation prompts ``[(prompt, tokens)]``, appended to
    ``path`` as ``{"split": "val", "iteration", "prompt", "completion"}`` records."""

    def __init__(self, prompts, tokenizer, max_tokens: int, path: Optional[Path]):
        self.prompts, self.tokenizer = prompts, tokenizer
        self.max_tokens, self.path = max_tokens, path

    def __call__(self, model, iteration: int) -> list:
        """The samples at this validation (rank 0 generates and writes; others: [])."""
        if not is_main_rank():
            return []
        hf = _hf(self.tokenizer)
        completions = greedy_completions(
            model,
            [tokens for _, tokens in self.prompts],
            self.max_tokens,
            eos_token_ids(self.tokenizer),
        )
        samples = [
            {
                "split": "val",
                "iteration": iteration,
                "prompt": prompt,
                "completion": hf.decode(ids, skip_special_tokens=True),
            }
            for (prompt, _), ids in zip(self.prompts, completions)
        ]
        if self.path is not None:
            with open(self.path, "a") as fid:
                for sample in samples:
                    fid.write(json.dumps(sample) + "\n")
        return samples
