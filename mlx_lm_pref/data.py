"""Preference rows -> token ids, with TRL 1.x's semantics.

A row is ``{"prompt", "chosen", "rejected"}`` (``prompt`` may be left out: the shared prefix of
chosen and rejected is the prompt), either *standard* (strings) or *conversational* (lists of
``{"role", "content"}`` messages). Optional per-row ``tools`` and ``chat_template_kwargs`` go to
the chat template.

Tokenization (``DPOTrainer._prepare_dataset`` in TRL 1.16):
- standard: the EOS string is appended to each completion unless already there; prompt and
  prompt+completion are tokenized with the tokenizer's special tokens (a BOS tokenizer puts BOS
  first, exactly once);
- conversational: the chat template renders the prompt with the generation prompt, and
  prompt+completion without it; no EOS is added (the template's end-of-turn is the end);
- the completion starts where the token streams of prompt and prompt+completion diverge (the
  minimum over chosen and rejected), which is not always ``len(prompt_ids)``.

Every row is checked before anything is tokenized; a bad row raises ``DataError`` naming the
source (file), the line and the field.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from .config import PreferenceArgs


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Pair:
    """One tokenized pair. ``chosen``/``rejected`` are whole sequences (prompt included);
    the completion is ``[prompt_length, len)`` of each."""

    chosen: List[int]
    rejected: List[int]
    prompt_length: int

    def __len__(self):
        return max(len(self.chosen), len(self.rejected))

    def __getitem__(self, index):
        # Only mlx-lm's original iterate_batches slices dataset items.
        raise TypeError(
            "A preference pair reached mlx-lm's unpatched batching. Import mlx_lm_pref "
            "before binding mlx-lm functions by name (`from mlx_lm.tuner.trainer import "
            "train` done earlier keeps the original), or call them as module attributes."
        )


def is_preference_row(row) -> bool:
    return isinstance(row, dict) and "chosen" in row and "rejected" in row


def read_jsonl(path: Path) -> tuple:
    """Rows of a JSONL file and their 1-based line numbers; blank lines are skipped."""
    rows, lines = [], []
    with open(path, "rb") as fid:
        for number, raw in enumerate(fid, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{number}: not valid UTF-8 ({e.reason})."
                ) from None
            if not text.strip():
                continue
            try:
                rows.append(json.loads(text))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: invalid JSON: {e.msg}.") from None
            lines.append(number)
    return rows, lines


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def extract_prompt(chosen, rejected) -> tuple:
    """TRL's ``extract_prompt``: the longest shared prefix (of messages, or of characters,
    backing off a trailing space) is the prompt."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if isinstance(chosen, str) and chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _check_row(row, where: str) -> tuple:
    """Validate one row and return ``(prompt, chosen, rejected, conversational)``."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(
                f"{where}: field '{key}' is missing (found {sorted(row)}); preference "
                "rows need 'chosen' and 'rejected' (and usually 'prompt')."
            )
    # The prompt (or, without one, chosen) sets the format the other fields must follow.
    conversational = _is_messages(row.get("prompt", row["chosen"]))
    if "prompt" in row:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        _check_field(prompt, "prompt", conversational, where, allow_empty=False)
    else:
        _check_field(row["chosen"], "chosen", conversational, where)
        _check_field(row["rejected"], "rejected", conversational, where)
        prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
    _check_field(chosen, "chosen", conversational, where)
    _check_field(rejected, "rejected", conversational, where)
    return prompt, chosen, rejected, conversational


def _check_field(value, name: str, conversational: bool, where: str, allow_empty=False):
    kind = "a list of messages" if conversational else "a string"
    if conversational:
        if not _is_messages(value):
            raise DataError(
                f"{where}: field '{name}' must be {kind} (the row is conversational), "
                f"got {type(value).__name__}."
            )
        for i, message in enumerate(value):
            if not isinstance(message.get("role"), str):
                raise DataError(f"{where}: field '{name}'[{i}] has no 'role'.")
            if not isinstance(message.get("content"), str):
                raise DataError(
                    f"{where}: field '{name}'[{i}] 'content' must be a string, "
                    f"got {type(message.get('content')).__name__}."
                )
        empty = not value or all(not m["content"].strip() for m in value)
    else:
        if not isinstance(value, str):
            raise DataError(
                f"{where}: field '{name}' must be {kind} (the row is standard), "
                f"got {type(value).__name__}."
            )
        empty = not value.strip()
    if empty and not allow_empty:
        raise DataError(f"{where}: field '{name}' is empty.")


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode_text(tokenizer, text: str) -> List[int]:
    return list(tokenizer.encode(text))


def _encode_messages(
    tokenizer, messages, tools, template_kwargs, **kwargs
) -> List[int]:
    ids = tokenizer.apply_chat_template(
        messages,
        tools=tools,
        tokenize=True,
        return_dict=False,
        **kwargs,
        **template_kwargs,
    )
    return list(ids)


def tokenize_pair(tokenizer, prompt, chosen, rejected, conversational, row) -> Pair:
    if conversational:
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(
                "conversational rows need a tokenizer with a chat template, and this "
                "tokenizer has none."
            )
        tools = row.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        kwargs = row.get("chat_template_kwargs") or {}
        prompt_ids = _encode_messages(
            tokenizer, prompt, tools, kwargs, add_generation_prompt=True
        )
        chosen_ids = _encode_messages(tokenizer, prompt + chosen, tools, kwargs)
        rejected_ids = _encode_messages(tokenizer, prompt + rejected, tools, kwargs)
    else:
        eos = tokenizer.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = _encode_text(tokenizer, prompt)
        chosen_ids = _encode_text(tokenizer, prompt + chosen)
        rejected_ids = _encode_text(tokenizer, prompt + rejected)
    prompt_length = min(
        common_prefix_length(prompt_ids, chosen_ids),
        common_prefix_length(prompt_ids, rejected_ids),
    )
    return Pair(chosen_ids, rejected_ids, prompt_length)


class PreferenceDataset:
    """Checked and tokenized preference pairs, in mlx-lm's dataset protocol.

    ``dataset[i]`` is a ``Pair`` and ``process`` is the identity, so mlx-lm's ``CacheDataset``
    can wrap it like any other dataset. ``options`` travel with the data: the batches carry
    them to the loss.
    """

    def __init__(
        self,
        rows,
        tokenizer,
        options: PreferenceArgs,
        source: str = "data",
        lines: Optional[Sequence[int]] = None,
        max_seq_length: Optional[int] = None,
    ):
        self.options = options
        self.source = source
        checked = []
        for i, row in enumerate(rows):
            where = f"{source}:{lines[i] if lines else i + 1}"
            checked.append((where, row, _check_row(row, where)))
        self._pairs = []
        self.dropped = 0
        for where, row, (prompt, chosen, rejected, conversational) in checked:
            try:
                pair = tokenize_pair(
                    tokenizer, prompt, chosen, rejected, conversational, row
                )
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
            if max_seq_length is not None:
                # TRL's keep_start truncation: a prompt that fills the window leaves no
                # completion token to learn from, so the row is dropped (and counted).
                if pair.prompt_length >= max_seq_length:
                    self.dropped += 1
                    continue
                pair = Pair(
                    pair.chosen[:max_seq_length],
                    pair.rejected[:max_seq_length],
                    pair.prompt_length,
                )
            self._pairs.append(pair)
        if self.dropped:
            print(
                f"[mlx_lm_pref] {source}: dropped {self.dropped} of {len(checked)} pairs "
                f"whose prompt alone reaches max_seq_length={max_seq_length}."
            )

    def __getitem__(self, idx: int) -> Pair:
        return self._pairs[idx]

    def __len__(self):
        return len(self._pairs)

    def process(self, pair: Pair) -> Pair:
        return pair
