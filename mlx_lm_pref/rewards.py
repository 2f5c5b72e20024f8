"""Reward functions for GRPO/RLOO, called exactly as TRL 1.16's ``_calculate_rewards`` calls them.

A reward function scores a generation batch of N completions (the prompts repeated once per
generation), all at once, by keyword::

    func(prompts=..., completions=..., completion_ids=..., **columns, **extra)
        -> a list of N rewards, each a float or None (None: not scored by this function)

- ``prompts``: N prompts, strings (standard) or lists of ``{"role", "content"}`` messages
  (conversational);
- ``completions``: N completions, strings, or for a conversational dataset one-message lists
  ``[{"role": "assistant", "content": text}]``;
- ``completion_ids``: N lists of token ids (the completion alone, no prompt and no padding);
- ``**columns``: every other dataset column (``solution``, ...) as a list of N values, one per
  completion;
- ``**extra``: what the trainer adds (TRL passes ``trainer_state``, ``log_extra``,
  ``log_metric``), which is why TRL's reward functions all take ``**kwargs``.

None becomes NaN: the function is left out of that completion's weighted sum (TRL's
``nansum``) and of its per-function mean.

Specs (``resolve_reward_func``) name a reward function as one of:

- a built-in, TRL's name, with optional arguments after a colon (comma-separated, in TRL's order
  of the arguments not taken from the options):

  - ``think_format_reward``: 1.0 when the completion is ``<think>...</think>...``, else 0.0;
  - ``soft_overlong_punishment[:SOFT_PUNISH_CACHE]``: DAPO's length penalty,
    ``get_soft_overlong_punishment(options.max_completion_length, SOFT_PUNISH_CACHE)``, the cache
    ``max_completion_length // 4`` when not given (``soft_overlong_punishment:64``);
  - ``repetition_penalty_reward[:NGRAM_SIZE[,MAX_PENALTY]]``: repeated token n-grams,
    ``get_repetition_penalty_reward(ngram_size=3, max_penalty=-1.0)`` by default
    (``repetition_penalty_reward:4,-0.5``);
  - ``accuracy_reward``: math answer checked against the ``solution`` column; needs TRL's
    optional dependency ``math-verify``;

- ``package.module:function`` or ``package.module.function``: imported (the current directory
  is searched too, as TRL's ``grpo`` script does, but only while importing);
- ``path/to/file.py:function``: that file (relative to the current directory), loaded by path.

The built-ins are re-implemented here (same numbers as ``trl.rewards``, checked by
tests/test_rewards.py) because trl is a test extra, not a dependency. One extension: where TRL's
``think_format_reward`` and ``accuracy_reward`` index ``completion[0]["content"]`` and so raise
on a standard (string) completion, these read the string itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import os
import re
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# The columns TRL does not pass on as keywords: they are the positional data themselves.
_NOT_COLUMNS = ("prompt", "completion", "completion_ids")
_ARGUMENTS = ("prompts", "completions", "completion_ids")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class RewardError(ValueError):
    """A reward function that cannot be loaded or that misbehaved: one line naming it."""


def _one_line(text, limit: int = 300) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def callable_name(func: Callable) -> str:
    """TRL's ``get_callable_name``: the name a reward function's metrics are logged under
    (``rewards/{name}/mean``). A ``functools.partial`` is unwrapped; a callable object without
    ``__name__`` is named by its class."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


# --------------------------------------------------------------------------------------------
# Built-ins: trl.rewards, re-implemented.


def _content(completion) -> str:
    """A completion's text: the first message's content (TRL), or the string itself."""
    return completion if isinstance(completion, str) else completion[0]["content"]


def think_format_reward(completions, **kwargs) -> list[float]:
    """TRL's ``think_format_reward``: (N,) 1.0 where the completion opens with ``<think>``,
    closes it with ``</think>`` and opens no second ``<think>`` before that, else 0.0.
    """
    pattern = r"^<think>(?!.*<think>)(.*?)</think>.*$"
    flags = re.DOTALL | re.MULTILINE
    return [1.0 if re.match(pattern, _content(c), flags) else 0.0 for c in completions]


class _RepetitionPenalty:
    """TRL's ``get_repetition_penalty_reward``: (N,) rewards in ``[max_penalty, 0]``, the
    fraction of repeated token n-grams times ``max_penalty``; 0.0 under ``ngram_size`` tokens.
    A class, as in TRL, whose ``__name__`` is the metric name TRL logs."""

    __name__ = "repetition_penalty_reward"

    def __init__(self, ngram_size: int, max_penalty: float):
        self.ngram_size = ngram_size
        self.max_penalty = max_penalty

    def __call__(self, completion_ids, **kwargs) -> list[float]:
        rewards = []
        for ids in completion_ids:
            if len(ids) < self.ngram_size:
                rewards.append(0.0)
                continue
            ngrams = list(zip(*[ids[i:] for i in range(self.ngram_size)]))
            scaling = 1 - len(set(ngrams)) / len(ngrams)
            rewards.append(scaling * self.max_penalty if scaling else 0.0)
        return rewards


class _SoftOverlongPunishment:
    """TRL's ``get_soft_overlong_punishment`` (DAPO eq. 13): (N,) rewards, 0.0 up to
    ``max_completion_len - soft_punish_cache`` tokens, then falling linearly to -1.0 at
    ``max_completion_len``, and -1.0 beyond it."""

    __name__ = "soft_overlong_punishment_reward"

    def __init__(self, max_completion_len: int, soft_punish_cache: int):
        self.max_completion_len = max_completion_len
        self.soft_punish_cache = soft_punish_cache

    def __call__(self, completion_ids, **kwargs) -> list[float]:
        free = self.max_completion_len - self.soft_punish_cache
        rewards = []
        for ids in completion_ids:
            length = len(ids)
            if length <= free:
                rewards.append(0.0)
            elif length <= self.max_completion_len:
                rewards.append((free - length) / self.soft_punish_cache)
            else:
                rewards.append(-1.0)
        return rewards


def accuracy_reward(
    completions, solution, log_extra=None, **kwargs
) -> list[float | None]:
    """TRL's ``accuracy_reward``: (N,) 1.0 where math_verify finds the completion's (boxed,
    LaTeX) answer equal to the ``solution`` column's, else 0.0; None where the solution does not
    parse (that completion is then not scored by this function)."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    # math_verify times out with signal.alarm(), which only the main thread may use.
    main = threading.current_thread() is threading.main_thread()
    parsing_timeout, verify_timeout = (10, 5) if main else (None, None)
    if not main:
        logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
        logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
    extraction = [
        LatexExtractionConfig(
            normalization_config=NormalizationConfig(units=True),
            boxed_match_priority=0,  # \boxed{} first
            try_extract_without_anchor=False,
        )
    ]
    rewards, gold_strs, answer_strs = [], [], []
    for completion, sol in zip(completions, solution, strict=True):
        gold = parse(sol, parsing_timeout=parsing_timeout)
        if len(gold) == 0:
            rewards.append(None)
            gold_strs.append("[unparseable]")
            answer_strs.append("[skipped]")
            continue
        answer = parse(
            _content(completion),
            extraction_config=extraction,
            extraction_mode="first_match",
            parsing_timeout=parsing_timeout,
        )
        rewards.append(float(verify(gold, answer, timeout_seconds=verify_timeout)))
        gold_strs.append(str(gold))
        answer_strs.append(str(answer) if answer else "[unparseable]")
    if log_extra is not None:
        log_extra("solution", list(solution))
        log_extra("gold_parsed", gold_strs)
        log_extra("answer_parsed", answer_strs)
    return rewards


def _option(options, key):
    if isinstance(options, dict):
        return options.get(key)
    return getattr(options, key, None)


def _number(name: str, text: str, kind: type, test, wanted: str):
    """One built-in argument from the spec: ``kind(text)`` if it passes ``test``."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not test(value):
        raise RewardError(f"reward function {name!r}: {text!r} is not {wanted}.")
    return value


def _arguments(name: str, args: tuple, most: int) -> None:
    if len(args) > most:
        took = f"at most {most} arguments" if most else "no arguments"
        raise RewardError(
            f"reward function {name!r} takes {took}, got {','.join(args)!r}."
        )


def _think_format(options, *args):
    _arguments("think_format_reward", args, 0)
    return think_format_reward


def _soft_overlong(options, *args):
    name = "soft_overlong_punishment"
    _arguments(name, args, 1)
    limit = _option(options, "max_completion_length")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise RewardError(
            f"reward function {name!r} needs max_completion_length (a positive integer), "
            f"got {limit!r}."
        )
    cache = limit // 4
    if args:
        cache = _number(
            name, args[0], int, lambda c: c >= 0, "a soft_punish_cache >= 0"
        )
    return _SoftOverlongPunishment(limit, cache)


def _repetition(options, *args):
    name = "repetition_penalty_reward"
    _arguments(name, args, 2)
    ngram_size, max_penalty = 3, -1.0
    if args:
        ngram_size = _number(name, args[0], int, lambda n: n >= 1, "an ngram_size >= 1")
    if len(args) > 1:
        # TRL refuses a positive max_penalty (it would reward repetition).
        max_penalty = _number(
            name,
            args[1],
            float,
            lambda p: p <= 0 and math.isfinite(p),
            "a max_penalty <= 0",
        )
    return _RepetitionPenalty(ngram_size, max_penalty)


def _accuracy(options, *args):
    _arguments("accuracy_reward", args, 0)
    try:
        import latex2sympy2_extended  # noqa: F401
        import math_verify  # noqa: F401
    except ImportError as e:
        raise RewardError(
            "reward function 'accuracy_reward' needs TRL's optional dependency math_verify: "
            f"pip install 'math-verify>=0.5.2' ({_one_line(e)})."
        ) from None
    return accuracy_reward


# name -> factory(options, *args): args are the spec's strings after "name:", split on ",".
BUILTINS: dict[str, Callable] = {
    "think_format_reward": _think_format,
    "soft_overlong_punishment": _soft_overlong,
    "repetition_penalty_reward": _repetition,
    "accuracy_reward": _accuracy,
}


# --------------------------------------------------------------------------------------------
# Loading.


@contextlib.contextmanager
def _on_sys_path(folder: str):
    """``folder`` first on sys.path while the block runs (so a reward module can import its
    neighbours), then gone again: loading a reward function leaves the import path as it was.
    """
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def _load_file(spec: str, path_text: str):
    path = Path(path_text).expanduser()
    path = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if not path.is_file():
        raise RewardError(f"reward function {spec!r}: no such file {str(path)!r}.")
    # One module per file, named after its path: loading the same file twice (the input gate,
    # then training) runs it once, and pickle finds its functions through sys.modules.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"_mlx_lm_pref_reward_{stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None:
        raise RewardError(f"reward function {spec!r}: {str(path)!r} is not a .py file.")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        with _on_sys_path(str(path.parent)):
            module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise RewardError(
            f"reward function {spec!r}: loading {path.name} raised {type(e).__name__}: "
            f"{_one_line(e)}"
        ) from None
    return module


def _import(spec: str, module_name: str):
    try:
        with _on_sys_path(os.getcwd()):
            return importlib.import_module(module_name)
    except Exception as e:
        what = "cannot import" if isinstance(e, ImportError) else "importing raised"
        raise RewardError(
            f"reward function {spec!r}: {what} {module_name!r}: {type(e).__name__}: "
            f"{_one_line(e)}"
        ) from None


def _check_signature(spec: str, func: Callable) -> None:
    """Refuse, before any model loads, a function that cannot take TRL's three keywords."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return  # some built-in callables have none: the first call will tell
    try:
        signature.bind_partial(**dict.fromkeys(_ARGUMENTS))
    except TypeError as e:
        raise RewardError(
            f"reward function {spec!r} cannot be called with prompts=, completions=, "
            f"completion_ids= ({_one_line(e)}); a reward function takes them and **kwargs."
        ) from None


def resolve_reward_func(spec: str, options=None) -> tuple[str, Callable]:
    """One spec -> ``(name, func)``.

    spec: a built-in (``BUILTINS``, with optional ``:args``), ``package.module:function``,
    ``package.module.function`` or ``path/to/file.py:function`` (module docstring).
    options: read by the built-ins (``max_completion_length``): an object or a dict.
    name: TRL's ``reward_func_names`` entry (``callable_name``), the key of the function's
    metrics. Raises RewardError, one line naming the spec, for anything that is not a callable.
    A script may give the function itself.
    """
    if callable(spec):
        _check_signature(callable_name(spec), spec)
        return callable_name(spec), spec
    spec = spec.strip()
    head, colon, rest = spec.partition(":")
    if head in BUILTINS:
        args = tuple(a.strip() for a in rest.split(",")) if colon else ()
        func = BUILTINS[head](options, *args)
        return callable_name(func), func

    if ":" in spec:
        where, attribute = spec.rsplit(":", 1)
        if where.endswith(".py") or "/" in where or os.sep in where:
            module = _load_file(spec, where)
        else:
            module = _import(spec, where) if where else None
    elif "." in spec and not spec.endswith(".py"):
        where, attribute = spec.rsplit(".", 1)
        module = _import(spec, where)
    else:
        hint = f"; name the function: '{spec}:function'" if spec.endswith(".py") else ""
        raise RewardError(
            f"reward function {spec!r}: expected a built-in ({', '.join(BUILTINS)}), "
            f"'package.module:function' or 'file.py:function'{hint}."
        )
    if module is None or not attribute:
        raise RewardError(f"reward function {spec!r}: expected 'module:function'.")

    func = module
    # "file.py:Class.method" reaches an attribute's own attribute.
    for part in attribute.split("."):
        if not hasattr(func, part):
            raise RewardError(
                f"reward function {spec!r}: {where!r} has no attribute {attribute!r}."
            )
        func = getattr(func, part)
    if not callable(func):
        raise RewardError(
            f"reward function {spec!r}: {attribute!r} is a {type(func).__name__}, "
            "not a function."
        )
    _check_signature(spec, func)
    return callable_name(func), func


def check_reward_funcs(specs, options=None) -> list[tuple[str, Callable]]:
    """Every spec resolved, in order (the input gate calls this before the model loads).
    Two functions with one name are kept, as TRL keeps them: their metrics share a key.
    """
    return [resolve_reward_func(spec, options) for spec in specs]


# --------------------------------------------------------------------------------------------
# Scoring.


def _raised_at(e: BaseException) -> str:
    """`` (file.py:12)``: where the reward function raised, its innermost frame."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return ""
    return f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})"


def _to_floats(output, n: int, fail: Callable[[str, str], RewardError]) -> np.ndarray:
    """A reward function's output -> (n,) float32, None as NaN; ``fail(problem, detail)``
    builds the error for anything TRL would not turn into a float32 tensor, or inf."""
    if hasattr(output, "ndim") and hasattr(
        output, "tolist"
    ):  # numpy, mlx, torch arrays
        if output.ndim != 1:
            raise fail(
                f"returned a {output.ndim}-d array",
                "expected one reward per completion",
            )
        output = output.tolist()
    if isinstance(output, (str, bytes)) or not isinstance(output, Sequence):
        raise fail(
            f"returned a {type(output).__name__}",
            "expected a list of numbers or None, one per completion",
        )
    if len(output) != n:
        raise fail(
            f"returned {len(output)} rewards",
            f"expected {n}, one per completion",
        )
    values = np.empty(n, np.float32)
    for i, reward in enumerate(output):
        if reward is None:
            values[i] = np.nan
            continue
        # bool counts, as torch.tensor takes it; so does a 0-d array.
        if not isinstance(reward, numbers.Real) and getattr(reward, "ndim", None) != 0:
            raise fail(
                f"returned a {type(reward).__name__}",
                f"reward {i} is {_one_line(repr(reward), 60)}, expected a number or None",
            )
        value = float(reward)
        # A reward of inf, or one past float32's range (inf once stored), would turn the
        # group's advantages into NaN without a word.
        if math.isinf(value) or (math.isfinite(value) and abs(value) > _FLOAT32_MAX):
            raise fail(
                f"returned {value!r}",
                f"reward {i} is not finite in float32 (None or NaN leave a completion unscored)",
            )
        values[i] = value
    return values


async def _awaited(awaitable):
    return await awaitable


def score_completions(
    funcs, prompts, completions, completion_ids, columns: dict, batch: int, **extra
) -> np.ndarray:
    """The rewards of one generation batch, as TRL's ``_calculate_rewards``.

    funcs: F ``(name, func)`` pairs from ``check_reward_funcs``.
    prompts, completions, completion_ids: N each (module docstring).
    columns: the dataset's other columns, each a list of N values (``prompt``, ``completion``
    and ``completion_ids`` are left out, as TRL leaves them out).
    batch: the generation batch's number, for the error message.
    extra: more keywords for every function (``trainer_state``, ``log_extra``, ...).
    Returns (N, F) float32, column j function j's rewards, NaN where it returned None.
    Raises RewardError, one line, for a function that raised or returned anything but N
    numbers-or-None, or an infinite reward. An async function's result is awaited here.
    """
    n = len(prompts)
    if len(completions) != n or len(completion_ids) != n:
        raise ValueError(
            f"{n} prompts, {len(completions)} completions, {len(completion_ids)} completion_ids."
        )
    kwargs = {k: v for k, v in columns.items() if k not in _NOT_COLUMNS}
    for key, values in kwargs.items():
        if key in _ARGUMENTS or key in extra:
            raise RewardError(
                f"dataset column {key!r} has the name of a reward function argument."
            )
        if len(values) != n:
            raise RewardError(
                f"dataset column {key!r} has {len(values)} values for {n} completions."
            )

    rewards = np.empty((n, len(funcs)), np.float32)
    for j, (name, func) in enumerate(funcs):

        def fail(problem: str, detail: str) -> RewardError:
            return RewardError(
                f"reward function {name!r} {problem} at generation batch {batch}: {detail}."
            )

        try:
            output = func(
                prompts=prompts,
                completions=completions,
                completion_ids=completion_ids,
                **kwargs,
                **extra,
            )
            if inspect.isawaitable(output):  # TRL awaits async reward functions too
                output = asyncio.run(_awaited(output))
        except Exception as e:
            raise fail(
                f"raised {type(e).__name__}{_raised_at(e)}", _one_line(e)
            ) from None
        rewards[:, j] = _to_floats(output, n, fail)

    # TRL warns when no function scored a completion (it is then unscorable: left out of its
    # group's baseline, its advantage 0).
    unscored = np.flatnonzero(np.isnan(rewards).all(axis=1)) if funcs else []
    if len(unscored):
        logger.warning(
            "All reward functions returned None for %d of %d completions of generation batch "
            "%d (the first: %s).",
            len(unscored),
            n,
            batch,
            _one_line(repr(completions[unscored[0]]), 120),
        )
    return rewards
