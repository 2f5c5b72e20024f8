"""Prompt-only rows for GRPO and RLOO, tokenized as TRL 1.16's ``GRPOTrainer._tokenize_prompts``.

A row is ``{"prompt": ...}``, standard (a string) or conversational (a list of messages),
with optional ``tools`` and ``chat_template_kwargs`` for the chat template, as for DPO. Every
other column travels with the prompt and reaches the reward functions as a keyword list
(TRL passes ``reward_func(prompts=, completions=, completion_ids=, **columns)``): a
``solution`` column for an accuracy reward, a ``target_length`` for a length reward.

Tokenization: a conversational prompt through the chat template with the generation prompt
(``add_generation_prompt=True``), a standard one through the tokenizer with its special
tokens (a BOS tokenizer puts BOS first). Nothing is cut: a prompt whose tokens leave fewer
than ``max_completion_length`` of ``max_seq_length`` is dropped and counted, so no sampled
row is ever longer than ``max_seq_length``.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from .compat import token_ids
from .config import PreferenceArgs
from .console import log
from .data import (
    DataError,
    PreferenceDataset,
    _check_extra,
    _check_field,
    _hf,
    _is_messages,
    _template_args,
)

TEMPLATE_FIELDS = ("tools", "chat_template_kwargs")


@dataclass(frozen=True)
class Prompt:
    """One tokenized prompt: ``ids`` its tokens, ``prompt`` the row's value as the reward
    functions see it, ``columns`` the row's other fields, ``where`` its file and line.
    """

    ids: List[int]
    prompt: object
    columns: dict = field(default_factory=dict)
    where: str = ""

    def __len__(self):
        return len(self.ids)


def tokenize_prompt(tokenizer, prompt, conversational, row) -> List[int]:
    """TRL's ``_tokenize_prompts`` for one prompt."""
    if conversational:
        apply, tools, kwargs = _template_args(tokenizer, row)
        return token_ids(
            apply(
                prompt,
                tools=tools or None,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
                **kwargs,
            )
        )
    return token_ids(_hf(tokenizer)(prompt))


def _hint(row) -> str:
    """The end of the message refusing a row without a prompt."""
    if isinstance(row, dict) and set(map(str, row)) & {"text", "messages"}:
        return (
            " (mlx-lm's SFT format: give each row a prompt, or prompt_feature: NAME to "
            "read one from another column)."
        )
    return " (prompt_feature: NAME reads it from another column)."


class PromptDataset(PreferenceDataset):
    """Checked and tokenized prompts in mlx-lm's dataset protocol (``dataset[i]`` is a
    ``Prompt``); a ``PreferenceDataset`` to the code that routes a run (the patches, the
    session), which looks at ``options.method`` for what its rows are. ``tokenizer`` stays
    with the prompts: completions are decoded with it for the reward functions."""

    unit = "prompts"
    paired = False
    identical = 0
    promptless = 0

    def __init__(
        self,
        rows,
        tokenizer,
        options: PreferenceArgs,
        source: str = "data",
        lines: Optional[Sequence[int]] = None,
        max_seq_length: Optional[int] = None,
        columns: Optional[dict] = None,
    ):
        self.options, self.source, self.tokenizer = options, source, tokenizer
        self.max_seq_length = max_seq_length
        key = (columns or {}).get("prompt") or "prompt"
        limit = None
        if max_seq_length is not None:
            limit = max_seq_length - options.max_completion_length
        self._pairs, self.dropped = [], 0
        kind = None
        for i, row in enumerate(rows):
            where = f"{source}:{lines[i] if lines else i + 1}"
            prompt, conversational = self._check(row, where, key)
            if kind is not None and conversational != kind:
                kinds = {True: "conversational", False: "standard"}
                raise DataError(
                    f"{where}: the row is {kinds[conversational]} but the first row is "
                    f"{kinds[kind]}; one dataset, one format."
                )
            kind = conversational
            try:
                ids = tokenize_prompt(tokenizer, prompt, conversational, row)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
            if limit is not None and len(ids) > limit:
                self.dropped += 1
                continue
            others = {k: v for k, v in row.items() if k != key}
            self._pairs.append(Prompt(ids, prompt, others, where))
        if rows and not self._pairs:
            raise DataError(
                f"{source}: no prompt is left of {len(rows)}: each leaves fewer than "
                f"max_completion_length={options.max_completion_length} tokens of "
                f"max_seq_length={max_seq_length}. Raise max_seq_length or lower "
                "max_completion_length."
            )
        if self.dropped:
            log(
                f"{source}: dropped {self.dropped} of {len(rows)} prompts longer than "
                f"{limit} tokens (max_seq_length {max_seq_length} less "
                f"max_completion_length {options.max_completion_length})."
            )

    @staticmethod
    def _check(row, where, key):
        """``(prompt, conversational)`` of a row, or a DataError naming the field."""
        if not isinstance(row, dict) or key not in row:
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(
                f"{where}: GRPO and RLOO train on prompt-only rows: expected a "
                f"'{key}' field, got {got}{_hint(row)}"
            )
        prompt = row[key]
        conversational = _is_messages(prompt)
        _check_field(prompt, key, conversational, where)
        for name in TEMPLATE_FIELDS:
            _check_extra(row.get(name), name, where)
        return prompt, conversational

    @classmethod
    def concatenate(cls, datasets) -> "PromptDataset":
        joined = cls.__new__(cls)
        first = datasets[0]
        joined.options, joined.tokenizer = first.options, first.tokenizer
        joined.max_seq_length = first.max_seq_length
        joined.source = " + ".join(d.source for d in datasets)
        joined._pairs = [p for d in datasets for p in d._pairs]
        joined.dropped = sum(d.dropped for d in datasets)
        return joined

    @property
    def has_reference(self) -> bool:
        return False
