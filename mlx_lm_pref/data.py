"""Preference rows -> token ids, with TRL 1.16's semantics for each trainer.

A row is ``{"prompt", "chosen", "rejected"}`` (``prompt`` may be left out: the shared prefix of
chosen and rejected is the prompt), either *standard* (strings) or *conversational* (lists of
``{"role", "content"}`` messages). Optional per-row ``tools`` and ``chat_template_kwargs`` go to
the chat template.

``options.method`` picks the tokenization, because TRL's trainers disagree:

DPO (``DPOTrainer._prepare_dataset`` and ``DataCollatorForPreference``):
- standard: the EOS string is appended to each completion unless already there; prompt and
  prompt+completion are tokenized with the tokenizer's special tokens (a BOS tokenizer puts BOS
  first, exactly once);
- conversational: the chat template tokenizes the prompt with the generation prompt, and
  prompt+completion without it; no EOS is added (the template's end-of-turn is the end);
- the completion starts where the token streams of prompt and prompt+completion diverge (the
  minimum over chosen and rejected), which is not always ``len(prompt_ids)``;
- ``truncation_mode`` keep_start keeps the first ``max_seq_length`` tokens of each sequence and
  drops (and counts) the pairs whose prompt alone fills the window; keep_end keeps the last
  ``max_seq_length`` tokens of each sequence, the completion start moving left with the cut
  (so chosen and rejected may then start at different positions), and drops nothing.

ORPO and CPO (``tokenize_row``/``build_tokenized_answer`` of ``trl.experimental.orpo`` and
``trl.experimental.cpo``, which are identical):
- conversational rows are first rendered to text by the chat template (as TRL's
  ``maybe_apply_chat_template``: the prompt with the generation prompt, or continuing a final
  assistant message, cut back to the characters it shares with both rendered conversations);
- prompt and prompt+answer are tokenized without special tokens; the answer starts at
  ``len(prompt_ids)``, one earlier when the prompt's last token merged into the answer; each
  side keeps its own start;
- BOS is prepended when the tokenizer has a ``bos_token_id`` and the sequence does not already
  start with it; the EOS id is appended when the last token is not EOS (so a ChatML template
  ends in ``<|im_end|>\\n`` + EOS);
- only the answer is truncated, to ``max_seq_length - len(prompt)``. TRL keeps a pair whose
  prompt alone fills the window (its completion is empty and its loss NaN); here such pairs are
  dropped and counted, as for DPO.

KTO (``KTOTrainer._prepare_dataset`` and ``DataCollatorForUnpairedPreference``) trains on
unpaired rows ``{"prompt", "completion", "label"}`` (``label`` true for a desirable completion,
false for an undesirable one), standard or conversational. Paired rows are unpaired as TRL's
``unpair_preference_dataset`` does (the prompt extracted first when implicit): per block of
``UNPAIR_BLOCK`` pairs, every chosen completion (label true), then every rejected one. Each row
is tokenized as one DPO side (EOS appended to standard completions; the completion starts where
prompt and prompt+completion diverge); a row whose prompt alone reaches ``max_seq_length`` is
dropped and counted, the others are cut to ``max_seq_length``. The KL rows (``with_kl``) pair
each row's prompt with the completion of the row before it within consecutive chunks of the
batch size (the first row of a chunk takes the last row's), as TRL's
``add_kl_completion_ids``, and are cut the same way.

Every row is checked before anything is tokenized; a bad row raises ``DataError`` naming the
source (file), the line and the field.
"""

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .compat import token_ids
from .config import PreferenceArgs, close_match
from .console import log


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Pair:
    """One tokenized pair. ``chosen``/``rejected`` are whole sequences (prompt included); the
    completions are ``chosen[chosen_start:]`` and ``rejected[rejected_start:]``.

    ``rejected_start`` defaults to ``chosen_start`` (DPO pairs always share it).
    ``reference`` holds precomputed reference log-probs ``(chosen, rejected)``, if any.
    """

    chosen: List[int]
    rejected: List[int]
    chosen_start: int
    rejected_start: Optional[int] = None
    reference: Optional[Tuple[float, float]] = None

    def __post_init__(self):
        if self.rejected_start is None:
            object.__setattr__(self, "rejected_start", self.chosen_start)

    def __len__(self):
        return max(len(self.chosen), len(self.rejected))

    def __getitem__(self, index):
        # Only mlx-lm's original iterate_batches slices dataset items.
        raise TypeError(
            "A preference pair reached mlx-lm's unpatched batching. Import mlx_lm_pref "
            "before binding mlx-lm functions by name (`from mlx_lm.tuner.trainer import "
            "train` done earlier keeps the original), or call them as module attributes."
        )


@dataclass(frozen=True)
class Example:
    """One tokenized unpaired (KTO) row: ``sequence`` is prompt + completion, the completion
    ``sequence[start:]``; ``kl_sequence`` is the same prompt followed by another row's
    completion (its completion also from ``start``), None until ``with_kl`` or without a KL
    term. ``reference`` holds precomputed reference log-probs ``(row, KL row)``, if any.
    """

    sequence: List[int]
    start: int
    label: bool
    kl_sequence: Optional[List[int]] = None
    reference: Optional[Tuple[float, float]] = None

    def __len__(self):
        return max(len(self.sequence), len(self.kl_sequence or ()))

    __getitem__ = Pair.__getitem__


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
    backing off a trailing space) is the prompt; where nothing is shared, it is empty.
    (TRL's back-off then reads ``chosen[-1]``: a chosen ending with a space would become the
    prompt but for its last character, ``'Sure thing. '`` and ``'Nope'`` turning into
    ``'Sure thing.'``, ``' '`` and ``'e'``. Here they stay whole, as TRL keeps
    ``'Sure thing.'`` and ``'Nope'``.)"""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx > 0 and isinstance(chosen, str) and chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


FIELDS = ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs")
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
COLUMNS = {name: name for name in ("prompt", "chosen", "rejected", "completion")}
KTO_FIELDS = ("prompt", "completion", "label", "tools", "chat_template_kwargs")
# datasets.Dataset.map's default batch_size: the block TRL's unpair_preference_dataset puts
# every chosen completion of, then every rejected one.
UNPAIR_BLOCK = 1000


def _check_row(row, where: str, columns=COLUMNS) -> tuple:
    """Validate one row and return ``(prompt, chosen, rejected, conversational)``.

    ``columns`` maps ``prompt``, ``chosen`` and ``rejected`` to the row's own column names
    (mlx-lm's ``prompt_feature`` convention); messages name the row's columns.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    known = [columns.get(f, f) for f in FIELDS]
    for key in row:
        # Extra columns are fine ('id', 'score_chosen', ...), a misspelt field is not: a
        # 'promt' would silently turn into an implicit prompt.
        guess = close_match(key, known) if key not in known else None
        if guess:
            raise DataError(
                f"{where}: field '{key}' is not a preference field; did you mean "
                f"'{guess}'?"
            )
    prompt_key, chosen_key, rejected_key = (
        columns[k] for k in ("prompt", "chosen", "rejected")
    )
    for key in (chosen_key, rejected_key):
        if key not in row:
            raise DataError(
                f"{where}: field '{key}' is missing (found {sorted(map(str, row))}); "
                f"preference rows need '{chosen_key}' and '{rejected_key}' (and usually "
                f"'{prompt_key}')." + _format_hint(row, columns)
            )
    # The prompt (or, without one, chosen) sets the format the other fields must follow.
    conversational = _is_messages(row.get(prompt_key, row[chosen_key]))
    if prompt_key in row:
        prompt, chosen, rejected = row[prompt_key], row[chosen_key], row[rejected_key]
        _check_field(prompt, prompt_key, conversational, where)
    else:
        _check_field(row[chosen_key], chosen_key, conversational, where)
        _check_field(row[rejected_key], rejected_key, conversational, where)
        prompt, chosen, rejected = extract_prompt(row[chosen_key], row[rejected_key])
        if conversational and not prompt:  # a chat template needs a message to answer
            raise DataError(
                f"{where}: no '{prompt_key}' field, and the first messages of "
                f"'{chosen_key}' and '{rejected_key}' differ: the conversation has no "
                f"prompt. Add a '{prompt_key}' field."
            )
    _check_field(chosen, chosen_key, conversational, where)
    _check_field(rejected, rejected_key, conversational, where)
    for key in ("tools", "chat_template_kwargs"):
        _check_extra(row.get(key), key, where)
    return prompt, chosen, rejected, conversational


def _check_unpaired_row(row, where: str, columns=COLUMNS) -> tuple:
    """Validate one unpaired row and return ``(prompt, completion, label, conversational)``."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    known = [columns.get(f, f) for f in KTO_FIELDS]
    for key in row:
        guess = close_match(key, known) if key not in known else None
        if guess:
            raise DataError(
                f"{where}: field '{key}' is not a KTO field; did you mean '{guess}'?"
            )
    prompt_key, completion_key = columns["prompt"], columns["completion"]
    for key in (prompt_key, completion_key, "label"):
        if key not in row:
            raise DataError(
                f"{where}: field '{key}' is missing (found {sorted(map(str, row))}); KTO "
                f"rows need '{prompt_key}', '{completion_key}' and 'label' (or preference "
                "pairs with 'chosen' and 'rejected', which are unpaired)."
                + _format_hint(row, columns, unpaired=True)
            )
    label = row["label"]
    if not isinstance(label, bool):
        hint = " (a string: write it without quotes)" if isinstance(label, str) else ""
        raise DataError(
            f"{where}: field 'label' must be true (desirable) or false (undesirable), got "
            f"{label!r}{hint}."
        )
    conversational = _is_messages(row[prompt_key])
    _check_field(row[prompt_key], prompt_key, conversational, where)
    _check_field(row[completion_key], completion_key, conversational, where)
    for key in ("tools", "chat_template_kwargs"):
        _check_extra(row.get(key), key, where)
    return row[prompt_key], row[completion_key], label, conversational


def _format_hint(row, columns, unpaired=False) -> str:
    """What a row lacking this method's fields is, where it is another method's: KTO's
    unpaired rows given to DPO, ORPO or CPO, or mlx-lm's SFT rows given to any of them.
    """
    keys = set(map(str, row))
    completion = columns["completion"]
    if keys & {columns["chosen"], columns["rejected"]}:
        return ""
    if not unpaired and {completion, "label"} <= keys:
        return (
            " It is an unpaired (KTO) row: train on such rows with --loss-type kto (or "
            "apo_zero_unpaired)."
        )
    if not unpaired and {columns["prompt"], completion} <= keys:
        return (
            " It is in mlx-lm's SFT format (prompt, completion): train on it without "
            "--loss-type, or give each row a boolean 'label' and use --loss-type kto."
        )
    if keys & {"text", "messages"} and completion not in keys:
        return (
            " It is in mlx-lm's SFT format (text or messages): train on it without "
            "--loss-type."
        )
    return ""


def _check_extra(value, key, where):
    """``tools`` (a list, or its JSON text) and ``chat_template_kwargs`` (an object)."""
    if value is None:
        return
    if key == "tools" and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: field 'tools' is not valid JSON: {e.msg}."
            ) from None
    wanted = list if key == "tools" else dict
    if not isinstance(value, wanted):
        kind = "a list of tools" if key == "tools" else "an object"
        raise DataError(
            f"{where}: field '{key}' must be {kind}, got {type(value).__name__}."
        )


def _check_field(value, name: str, conversational: bool, where: str):
    kind = "a list of messages" if conversational else "a string"
    if conversational:
        if not _is_messages(value):
            raise DataError(
                f"{where}: field '{name}' must be {kind} (the row is conversational), "
                f"got {type(value).__name__}."
            )
        for i, message in enumerate(value):
            role = message.get("role")
            if not isinstance(role, str):
                raise DataError(f"{where}: field '{name}'[{i}] has no 'role'.")
            if role not in ROLES:
                guess = close_match(role, ROLES)
                hint = f"did you mean '{guess}'? " if guess else ""
                raise DataError(
                    f"{where}: field '{name}'[{i}] has unknown role '{role}'; {hint}"
                    f"roles are {', '.join(ROLES)}."
                )
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
    if empty:
        raise DataError(f"{where}: field '{name}' is empty.")


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _hf(tokenizer):
    """The Hugging Face tokenizer behind mlx-lm's ``TokenizerWrapper`` (TRL calls it directly;
    the wrapper's ``apply_chat_template`` adds a thinking flag of its own)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return (
        tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer
    )


def _template_args(tokenizer, row) -> tuple:
    """``(apply_chat_template, tools, chat_template_kwargs)`` for a conversational row."""
    hf = _hf(tokenizer)
    if getattr(hf, "chat_template", None) is not None:
        apply = hf.apply_chat_template
    elif (
        getattr(tokenizer, "_chat_template", None) is not None
    ):  # mlx-lm's own template
        apply = tokenizer.apply_chat_template
    else:
        raise DataError(
            "conversational rows need a tokenizer with a chat template, and this "
            "tokenizer has none."
        )
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return apply, tools, row.get("chat_template_kwargs") or {}


def tokenize_dpo(tokenizer, prompt, chosen, rejected, conversational, row) -> Pair:
    """TRL 1.16 ``DPOTrainer._prepare_dataset``'s tokenization (no truncation)."""
    hf = _hf(tokenizer)
    if conversational:
        apply, tools, kwargs = _template_args(tokenizer, row)

        def encode(messages, **extra):
            return token_ids(
                apply(
                    messages,
                    tools=tools,
                    tokenize=True,
                    return_dict=False,
                    **extra,
                    **kwargs,
                )
            )

        prompt_ids = encode(prompt, add_generation_prompt=True)
        chosen_ids = encode(prompt + chosen)
        rejected_ids = encode(prompt + rejected)
    else:
        eos = hf.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = token_ids(hf(prompt))
        chosen_ids = token_ids(hf(prompt + chosen))
        rejected_ids = token_ids(hf(prompt + rejected))
    start = min(
        common_prefix_length(prompt_ids, chosen_ids),
        common_prefix_length(prompt_ids, rejected_ids),
    )
    return Pair(chosen_ids, rejected_ids, start, start)


def tokenize_kto(tokenizer, prompt, completion, label, conversational, row) -> Example:
    """TRL 1.16 ``KTOTrainer._prepare_dataset``'s tokenization (no truncation): one side of
    ``tokenize_dpo``."""
    hf = _hf(tokenizer)
    if conversational:
        apply, tools, kwargs = _template_args(tokenizer, row)

        def encode(messages, **extra):
            return token_ids(
                apply(
                    messages,
                    tools=tools,
                    tokenize=True,
                    return_dict=False,
                    **extra,
                    **kwargs,
                )
            )

        prompt_ids = encode(prompt, add_generation_prompt=True)
        sequence = encode(prompt + completion)
    else:
        eos = hf.eos_token
        completion = completion if completion.endswith(eos) else completion + eos
        prompt_ids = token_ids(hf(prompt))
        sequence = token_ids(hf(prompt + completion))
    return Example(sequence, common_prefix_length(prompt_ids, sequence), label)


def unpair(pairs: list) -> list:
    """TRL's ``unpair_preference_dataset`` on checked pairs ``(where, row, (prompt, chosen,
    rejected, conversational))``: ``(where, row, (prompt, completion, label,
    conversational))``, per block of ``UNPAIR_BLOCK`` pairs the chosen sides first."""
    out = []
    for first in range(0, len(pairs), UNPAIR_BLOCK):
        block = pairs[first : first + UNPAIR_BLOCK]
        for side, label in ((1, True), (2, False)):
            for where, row, checked in block:
                prompt, conversational = checked[0], checked[3]
                out.append((where, row, (prompt, checked[side], label, conversational)))
    return out


def kl_rotation(n: int, chunk: int) -> List[int]:
    """For each of ``n`` rows, the row whose completion its KL row takes: the one before it
    within its chunk of ``chunk`` consecutive rows, the chunk's last for its first (TRL's
    ``add_kl_completion_ids``, a ``map`` with ``batch_size=chunk``)."""
    other = []
    for first in range(0, n, chunk):
        last = min(first + chunk, n) - 1
        other += [last] + list(range(first, last))
    return other


def label_balance(dataset, options) -> List[str]:
    """What to say of a KTO training set's labels: a set with one label only (TRL trains on
    it; no margin can be reported), and TRL's advice (KTO paper, eq. 8) when the weights are
    outside the range its label counts suggest."""
    labels = dataset.labels
    desirable = sum(labels)
    undesirable = len(labels) - desirable
    lines = [
        f"{dataset.source}: {desirable} desirable and {undesirable} undesirable rows "
        f"(weights {options.desirable_weight:g} and {options.undesirable_weight:g})."
    ]
    if not desirable or not undesirable:
        lines.append(
            f"{dataset.source}: every row is {'un' if not desirable else ''}desirable: "
            "KTO trains on it (as TRL), but rewards/margins is never reported."
        )
    # TRL's own arithmetic: an all-undesirable set counts one desirable row, taken from
    # the undesirable count
    n_d = max(desirable, 1)
    n_u = max(len(labels) - n_d, 1)
    if n_d != n_u:
        w_d, w_u = options.desirable_weight, options.undesirable_weight
        d_low, d_high = round(n_u * w_u / n_d, 2), round(n_u * w_u / n_d * 1.33, 2)
        u_low, u_high = round(n_d * w_d / n_u / 1.33, 2), round(n_d * w_d / n_u, 2)
        if not (d_low <= w_d <= d_high or u_low <= w_u <= u_high):
            lines.append(
                "the desirable/undesirable weights are outside the range the label "
                f"counts suggest (TRL's advice): desirable_weight in [{d_low}, {d_high}] "
                f"or undesirable_weight in [{u_low}, {u_high}], not both."
            )
    return lines


def render_conversation(tokenizer, prompt, chosen, rejected, row) -> tuple:
    """TRL's ``maybe_apply_chat_template`` on a preference row: ``(prompt, chosen, rejected)``
    as text. The prompt ends with the generation prompt (last message from user or tool) or
    continues the final assistant message, and is cut back to the characters it shares with
    both rendered conversations."""
    apply, tools, kwargs = _template_args(tokenizer, row)
    tools = tools or None  # as TRL: some templates render tool boilerplate for tools=[]
    last_role = prompt[-1]["role"]
    if last_role in ("user", "tool"):
        generation = dict(add_generation_prompt=True, continue_final_message=False)
    elif last_role == "assistant":
        generation = dict(add_generation_prompt=False, continue_final_message=True)
    else:
        raise DataError(
            f"the prompt's last message has role {last_role!r}; ORPO/CPO need it to be "
            "'user', 'tool' or 'assistant' (as TRL's maybe_apply_chat_template)."
        )
    text = apply(prompt, tools=tools, tokenize=False, **generation, **kwargs)
    prompt_chosen = apply(prompt + chosen, tools=tools, tokenize=False, **kwargs)
    prompt_rejected = apply(prompt + rejected, tools=tools, tokenize=False, **kwargs)
    text = text[: common_prefix_length(text, prompt_chosen)]
    text = text[: common_prefix_length(text, prompt_rejected)]
    return text, prompt_chosen[len(text) :], prompt_rejected[len(text) :]


def tokenize_orpo(tokenizer, prompt, chosen, rejected, conversational, row) -> Pair:
    """TRL 1.16 ORPO/CPO ``tokenize_row`` (decoder-only), without the truncation."""
    hf = _hf(tokenizer)
    if conversational:
        prompt, chosen, rejected = render_conversation(
            tokenizer, prompt, chosen, rejected, row
        )

    def encode(text):
        return token_ids(hf(text, add_special_tokens=False))

    prompt_ids = encode(prompt)
    sides = []
    for answer in (chosen, rejected):
        full = encode(prompt + answer)
        if len(prompt_ids) > len(full):
            raise DataError(
                "the tokenized prompt is longer than the tokenized prompt+answer "
                "(TRL: 'Prompt input ids and answer input ids should have the same length')."
            )
        # build_tokenized_answer: the prompt's last token may merge into the answer
        start = len(prompt_ids) - (prompt_ids != full[: len(prompt_ids)])
        sides.append((full, start))
    (chosen_ids, chosen_start), (rejected_ids, rejected_start) = sides
    differing = sum(
        a != b for a, b in zip(chosen_ids[:chosen_start], rejected_ids[:rejected_start])
    )
    if differing > 1 or abs(chosen_start - rejected_start) > 1:
        raise DataError(
            "chosen and rejected tokenize the prompt differently beyond its last token "
            "(TRL refuses such rows)."
        )
    bos, eos = hf.bos_token_id, hf.eos_token_id
    out = []
    for ids, start in sides:
        ids = list(ids)
        if bos is not None and (start == 0 or ids[0] != bos):  # add_bos_token_if_needed
            ids, start = [bos] + ids, start + 1
        if len(ids) == start or ids[-1] != eos:  # add_eos_token_if_needed
            ids = ids + [eos]
        out.append((ids, start))
    return Pair(out[0][0], out[1][0], out[0][1], out[1][1])


def truncate(pair: Pair, max_length: int, method: str, truncation_mode: str):
    """``pair`` cut to ``max_length`` tokens per sequence as TRL does, or None when TRL's
    rule leaves a side with no completion token (the pair is then dropped)."""
    if method in ("orpo", "cpo"):
        # tokenize_row: the prompt is never cut, the answer to max_length - len(prompt)
        if max(pair.chosen_start, pair.rejected_start) >= max_length:
            return None
        return Pair(
            pair.chosen[: max(pair.chosen_start, max_length)],
            pair.rejected[: max(pair.rejected_start, max_length)],
            pair.chosen_start,
            pair.rejected_start,
        )
    if truncation_mode == "keep_end":
        # DataCollatorForPreference: ids[-max_length:] and the completion mask with them
        sides = []
        for ids, start in (
            (pair.chosen, pair.chosen_start),
            (pair.rejected, pair.rejected_start),
        ):
            cut = max(0, len(ids) - max_length)
            sides.append((ids[cut:], max(0, start - cut)))
        return Pair(sides[0][0], sides[1][0], sides[0][1], sides[1][1])
    # keep_start: a prompt that fills the window leaves no completion token to learn from
    if pair.chosen_start >= max_length:
        return None
    return Pair(
        pair.chosen[:max_length],
        pair.rejected[:max_length],
        pair.chosen_start,
        pair.rejected_start,
    )


TOKENIZERS = {"dpo": tokenize_dpo, "orpo": tokenize_orpo, "cpo": tokenize_orpo}


class PreferenceDataset:
    """Checked and tokenized preference pairs, in mlx-lm's dataset protocol.

    ``dataset[i]`` is a ``Pair`` (KTO: an ``Example``) and ``process`` is the identity, so mlx-lm's ``CacheDataset``
    can wrap it like any other dataset. ``options`` are the ones the pairs were tokenized
    with. Pairs keep the order of the rows (less the dropped ones).
    """

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
        self.options = options
        self.source = source
        self.max_seq_length = max_seq_length
        method = options.method
        if method not in TOKENIZERS and method != "kto":
            raise ValueError(
                f"loss_type {options.loss_type} does not train on preference pairs."
            )
        columns = {**COLUMNS, **(columns or {})}
        # KTO reads unpaired rows, or pairs (unpaired below) when the first row is one.
        paired = method != "kto" or (len(rows) > 0 and is_preference_row(rows[0]))
        check = _check_row if paired else _check_unpaired_row
        checked, seen = [], set()
        for i, row in enumerate(rows):
            where = f"{source}:{lines[i] if lines else i + 1}"
            checked.append((where, row, check(row, where, columns)))
            seen.update(map(str, row))
            if checked[-1][2][3] != checked[0][2][3]:
                kinds = {True: "conversational", False: "standard"}
                raise DataError(
                    f"{where}: the row is {kinds[checked[-1][2][3]]} but {checked[0][0]} "
                    f"is {kinds[checked[0][2][3]]}; one dataset, one format."
                )
        self._pairs = []
        self.prompts = []  # each pair's (row's) prompt as given, for log_completions
        self.tokenizer = tokenizer
        self.dropped = 0
        self.identical = 0
        # pairs whose chosen and rejected share no beginning: trained whole, as TRL does
        self.promptless = sum(1 for item in checked if paired and not item[2][0])
        self.paired = paired
        self.unit = "rows" if method == "kto" else "pairs"
        total = len(checked)
        if paired:
            checked = self._without_identical(checked)
        if method == "kto":
            checked = unpair(checked) if paired else checked
            self._tokenize_unpaired(checked, tokenizer)
        else:
            self._tokenize_pairs(checked, tokenizer)
        self._report(total, len(checked), columns, seen)

    def _without_identical(self, checked):
        """Count the pairs whose chosen equals rejected, and drop them if asked to."""
        kept = []
        for item in checked:
            prompt, chosen, rejected, _ = item[2]
            if chosen == rejected:
                # No preference to learn (DPO's gradient cancels); TRL trains on them.
                self.identical += 1
                if self.options.identical_pairs == "drop":
                    continue
            kept.append(item)
        return kept

    def _tokenize_pairs(self, checked, tokenizer):
        method, max_seq_length = self.options.method, self.max_seq_length
        tokenize = TOKENIZERS[method]
        for where, row, (prompt, chosen, rejected, conversational) in checked:
            try:
                pair = tokenize(
                    tokenizer, prompt, chosen, rejected, conversational, row
                )
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
            if max_seq_length is not None:
                pair = truncate(
                    pair, max_seq_length, method, self.options.truncation_mode
                )
                if pair is None:
                    self.dropped += 1
                    continue
            self._pairs.append(pair)
            self.prompts.append(prompt)

    def _tokenize_unpaired(self, checked, tokenizer):
        """KTO's rows, cut to ``max_seq_length`` as TRL's collator; ``_completions`` keeps
        each row's whole completion for the KL rows."""
        cut = self.max_seq_length
        self._completions = []
        for where, row, (prompt, completion, label, conversational) in checked:
            example = tokenize_kto(
                tokenizer, prompt, completion, label, conversational, row
            )
            if cut is not None and example.start >= cut:
                self.dropped += 1
                continue
            self._completions.append(example.sequence[example.start :])
            self._pairs.append(replace(example, sequence=example.sequence[:cut]))
            self.prompts.append(prompt)
        self.kl_chunk = None

    def _with_pairs(self, pairs, **changes) -> "PreferenceDataset":
        """A copy of this dataset holding ``pairs`` (and ``changes`` to its attributes):
        datasets are never changed once built."""
        other = copy.copy(self)
        other._pairs = pairs
        for name, value in changes.items():
            setattr(other, name, value)
        return other

    @property
    def has_reference(self) -> bool:
        return bool(self._pairs) and self._pairs[0].reference is not None

    def with_kl(self, chunk: int) -> "PreferenceDataset":
        """This dataset with every row's KL row (``kl_rotation`` within chunks of
        ``chunk`` rows, the batch size), for ``loss_type: kto``; itself for a loss without
        the KL term or when its KL rows are already of that chunk. Reference log-probs
        are of the KL rows they were computed with: a dataset holding them refuses
        another chunk rather than drop them."""
        if not self.options.kl_term or self.kl_chunk == chunk:
            return self
        if self.has_reference:
            raise ValueError(
                f"{self.source}: its reference log-probs were computed for the KL rows of "
                f"batches of {self.kl_chunk} rows, not {chunk}: score it with the batch "
                "size it was precomputed with."
            )
        others = kl_rotation(len(self._pairs), chunk)
        pairs = [
            replace(
                e,
                kl_sequence=(e.sequence[: e.start] + self._completions[j])[
                    : self.max_seq_length
                ],
            )
            for e, j in zip(self._pairs, others)
        ]
        return self._with_pairs(pairs, kl_chunk=chunk)

    def with_reference(self, values) -> "PreferenceDataset":
        """This dataset with reference log-probs: ``values`` (N, 2) per pair, chosen and
        rejected (KTO: the row and its KL row)."""
        pairs = [
            replace(p, reference=(float(c), float(r)))
            for p, (c, r) in zip(self._pairs, values)
        ]
        return self._with_pairs(pairs)

    @property
    def labels(self) -> List[bool]:
        """KTO: each row's label."""
        return [e.label for e in self._pairs]

    def _report(self, rows, tokenized, columns, seen):
        """Say once what was dropped, kept alike or not read; refuse a dataset that has
        nothing to learn from. ``rows``: the rows read (pairs when paired); ``tokenized``:
        those that were tokenized (KTO: unpaired)."""
        max_seq_length = self.max_seq_length
        if rows and self.identical == rows:
            raise DataError(
                f"{self.source}: all {rows} pairs have chosen identical to rejected: there "
                "is no preference to learn. Check the chosen/rejected columns "
                f"({columns['chosen']}, {columns['rejected']})."
            )
        if rows and not self._pairs:
            alike = self.identical if self.options.identical_pairs == "drop" else 0
            why = (
                f"{alike} have chosen identical to rejected (identical_pairs: drop), the "
                f"other {self.dropped} a prompt that alone reaches "
                if alike
                else "every prompt alone reaches "
            )
            unit = "pair" if self.paired else "row"
            raise DataError(
                f"{self.source}: no {unit} is left of {rows}: {why}"
                f"max_seq_length={max_seq_length}. Raise max_seq_length or shorten the "
                "prompts."
            )
        if self.dropped:
            log(
                f"{self.source}: dropped {self.dropped} of {tokenized} {self.unit} whose "
                f"prompt alone reaches max_seq_length={max_seq_length}."
            )
        if self.promptless:
            log(
                f"{self.source}: {self.promptless} of {rows} pairs have no prompt: no "
                f"'{columns['prompt']}' field, and chosen and rejected share no beginning "
                "(trained on whole, as TRL does; add a prompt field, or prompt_feature: "
                "NAME to read one)."
            )
        if self.identical:
            done = "dropped" if self.options.identical_pairs == "drop" else "kept"
            log(
                f"{self.source}: {self.identical} of {rows} pairs have chosen identical "
                f"to rejected ({done}; identical_pairs: keep|drop)."
            )
        if not self.paired:
            used = {columns.get(f, f) for f in KTO_FIELDS}
        else:
            used = {columns.get(f, f) for f in FIELDS}
        ignored = sorted(seen - used)
        if ignored:
            hint = ""
            if self.paired and columns["prompt"] not in seen:
                hint = (
                    f" (no '{columns['prompt']}' column: the prompt is the shared start "
                    "of chosen and rejected; prompt_feature: NAME reads it from a column)"
                )
            log(f"{self.source}: ignored columns: {', '.join(ignored)}{hint}")

    @classmethod
    def concatenate(cls, datasets) -> "PreferenceDataset":
        """One dataset of the pairs of ``datasets`` (tokenized with the same options)."""
        joined = cls.__new__(cls)
        joined.options = datasets[0].options
        joined.source = " + ".join(d.source for d in datasets)
        joined._pairs = [p for d in datasets for p in d._pairs]
        joined.prompts = [p for d in datasets for p in d.prompts]
        joined.tokenizer = datasets[0].tokenizer
        joined.dropped = sum(d.dropped for d in datasets)
        joined.identical = sum(d.identical for d in datasets)
        joined.promptless = sum(d.promptless for d in datasets)
        for name in ("max_seq_length", "paired", "unit"):
            setattr(joined, name, getattr(datasets[0], name))
        if joined.options.method == "kto":
            joined._completions = [c for d in datasets for c in d._completions]
            joined.kl_chunk = None
        return joined

    def __getitem__(self, idx: int):
        return self._pairs[idx]

    def __len__(self):
        return len(self._pairs)

    def process(self, pair: Pair) -> Pair:
        return pair
