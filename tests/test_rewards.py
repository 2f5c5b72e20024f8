"""mlx_lm_pref.rewards: the built-ins against trl.rewards' own functions, loading by spec, and
scoring as TRL 1.16's ``_calculate_rewards`` (keywords in, (N, F) float32 out, None as NaN), every
misbehaviour a one-line RewardError naming the function."""

import functools
import logging
import sys
import textwrap

import numpy as np
import pytest
import trl.rewards as trl_rewards

from mlx_lm_pref.rewards import (
    BUILTINS,
    RewardError,
    check_reward_funcs,
    resolve_reward_func,
    score_completions,
    think_format_reward,
)

OPTIONS = {"max_completion_length": 100}

THINK_TEXTS = [
    "<think>\nThis is my reasoning.\n</think>\nThis is my answer.",
    "<think>\nThis is my reasoning.\nThis is my answer.",
    "<think>a</think>",
    " <think>a</think>b",  # must open the completion
    "<think>a<think>b</think>c",  # a second <think> before the close
    "<think>a</think>b<think>c</think>",  # a second <think> after it
    "<think></think>\n\nline\nline",
    "no tags at all",
    "",
]


def conversational(texts):
    return [[{"role": "assistant", "content": t}] for t in texts]


@pytest.fixture
def cleanup_modules():
    """Forget the modules a test imported, so names can be reused across tests."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def write(path, source):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def assert_one_line(err, *fragments):
    """A RewardError whose message is one line holding each fragment, and that would print
    without a chained traceback."""
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "\n" not in message and "Traceback" not in message, message
    assert err.value.__cause__ is None, message
    assert err.value.__context__ is None or err.value.__suppress_context__, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ---------------------------------------------------------------------------------------------
# Built-ins against trl.rewards.


def test_builtin_names_are_trls_reward_func_names():
    from trl.trainer.utils import get_callable_name

    trl_funcs = {
        "think_format_reward": trl_rewards.think_format_reward,
        "soft_overlong_punishment": trl_rewards.get_soft_overlong_punishment(100, 25),
        "repetition_penalty_reward": trl_rewards.get_repetition_penalty_reward(),
        "accuracy_reward": trl_rewards.accuracy_reward,
    }
    assert set(BUILTINS) == set(trl_funcs)
    for spec, trl_func in trl_funcs.items():
        if spec == "accuracy_reward":
            continue  # may need math_verify to load; its name is the function's own
        name, func = resolve_reward_func(spec, OPTIONS)
        assert name == get_callable_name(trl_func), spec
        assert name == get_callable_name(func)
    assert get_callable_name(trl_funcs["accuracy_reward"]) == "accuracy_reward"


def test_think_format_reward_matches_trl():
    name, func = resolve_reward_func("think_format_reward")
    completions = conversational(THINK_TEXTS)
    expected = trl_rewards.think_format_reward(completions)
    assert func(completions=completions) == expected
    assert expected == [
        1.0,
        0.0,
        1.0,
        0.0,
        0.0,
        0.0,
        1.0,
        0.0,
        0.0,
    ]  # both outcomes covered
    # The extension: a standard (string) completion reads as its own text.
    assert func(completions=THINK_TEXTS) == expected


@pytest.mark.parametrize(
    "spec, trl_args",
    [
        ("repetition_penalty_reward", {}),
        ("repetition_penalty_reward:2", {"ngram_size": 2}),
        ("repetition_penalty_reward:4,-0.5", {"ngram_size": 4, "max_penalty": -0.5}),
        ("repetition_penalty_reward: 1 , -2", {"ngram_size": 1, "max_penalty": -2.0}),
    ],
)
def test_repetition_penalty_reward_matches_trl(spec, trl_args):
    rng = np.random.default_rng(0)
    ids = [
        rng.integers(0, 4, size=int(n)).tolist() for n in rng.integers(0, 30, size=40)
    ]
    ids += [[], [7], [5, 5, 5, 5, 5], [1, 2, 3, 4]]
    _, func = resolve_reward_func(spec)
    expected = trl_rewards.get_repetition_penalty_reward(**trl_args)(ids)
    assert func(completion_ids=ids) == expected
    assert min(expected) < 0.0  # some repetition was penalized


@pytest.mark.parametrize(
    "spec, cache",
    [
        ("soft_overlong_punishment", 25),
        ("soft_overlong_punishment:20", 20),
        ("soft_overlong_punishment:0", 0),
    ],
)
def test_soft_overlong_punishment_matches_trl(spec, cache):
    ids = [[1] * n for n in range(0, 131)]
    _, func = resolve_reward_func(spec, OPTIONS)
    expected = trl_rewards.get_soft_overlong_punishment(100, cache)(ids)
    assert func(completion_ids=ids) == expected
    assert expected[-1] == -1.0 and expected[0] == 0.0
    # Also from an options object, not only a dict; the default cache is max // 4.
    options = type("Options", (), {"max_completion_length": 1280})()
    _, default = resolve_reward_func("soft_overlong_punishment", options)
    assert default(completion_ids=[[0] * 1120]) == [-0.5]  # (1280 - 320 - 1120) / 320


def test_accuracy_reward_without_math_verify_names_the_package(monkeypatch):
    monkeypatch.setitem(
        sys.modules, "math_verify", None
    )  # makes `import math_verify` fail
    with pytest.raises(RewardError) as err:
        resolve_reward_func("accuracy_reward")
    assert_one_line(err, "'accuracy_reward'", "pip install 'math-verify")


def test_accuracy_reward_matches_trl():
    pytest.importorskip("math_verify")
    _, func = resolve_reward_func("accuracy_reward")
    completions = conversational(
        [
            r"My answer is \boxed{\frac{1}{3}}",
            r"My answer is \boxed{\frac{1}{2}}",
            "no answer",
        ]
    )
    solution = [r"\frac{1}{3}", r"\frac{1}{3}", "not math at all %%"]
    assert func(
        completions=completions, solution=solution
    ) == trl_rewards.accuracy_reward(completions, solution)


@pytest.mark.parametrize(
    "spec, options, fragment",
    [
        ("soft_overlong_punishment", None, "needs max_completion_length"),
        (
            "soft_overlong_punishment",
            {"max_completion_length": 0},
            "needs max_completion_length",
        ),
        ("soft_overlong_punishment:x", OPTIONS, "'x' is not a soft_punish_cache"),
        ("soft_overlong_punishment:-1", OPTIONS, "is not a soft_punish_cache >= 0"),
        ("soft_overlong_punishment:1,2", OPTIONS, "takes at most 1 arguments"),
        ("repetition_penalty_reward:0", None, "is not an ngram_size >= 1"),
        ("repetition_penalty_reward:3,0.5", None, "is not a max_penalty <= 0"),
        ("repetition_penalty_reward:3,nan", None, "is not a max_penalty <= 0"),
        ("think_format_reward:1", None, "takes no arguments"),
        ("accuracy_reward:1", None, "takes no arguments"),
    ],
)
def test_builtin_argument_errors(spec, options, fragment):
    with pytest.raises(RewardError) as err:
        resolve_reward_func(spec, options)
    assert_one_line(err, repr(spec.partition(":")[0]), fragment)


# ---------------------------------------------------------------------------------------------
# Loading user functions.

GOOD = """
    import functools
    from helper_for_rewards import BONUS  # a neighbour: the file's folder is importable

    CONSTANT = 3

    def length_reward(completions, **kwargs):
        return [float(len(c)) + BONUS for c in completions]

    def bad_signature(completion):
        return [0.0]

    class Scorer:
        def __call__(self, completions, **kwargs):
            return [1.0] * len(completions)

    scorer = Scorer()
    half = functools.partial(length_reward)
"""


def test_file_function_loads_relative_to_cwd(tmp_path, monkeypatch, cleanup_modules):
    write(tmp_path / "sub" / "helper_for_rewards.py", "BONUS = 0.5\n")
    write(tmp_path / "sub" / "my-rewards.py", GOOD)
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)

    name, func = resolve_reward_func("sub/my-rewards.py:length_reward")
    assert name == "length_reward"
    assert func(completions=["ab", "abcd"]) == [2.5, 4.5]
    assert sys.path == path_before  # on sys.path only while loading
    # The same file again is the same module (run once), by absolute path too.
    _, again = resolve_reward_func(f"{tmp_path}/sub/my-rewards.py:length_reward")
    assert again is func
    # TRL's names: a callable object by its class, a partial by the wrapped function.
    assert resolve_reward_func("sub/my-rewards.py:scorer")[0] == "Scorer"
    assert resolve_reward_func("sub/my-rewards.py:half")[0] == "length_reward"


def test_module_function_loads_both_spellings(tmp_path, monkeypatch, cleanup_modules):
    write(tmp_path / "helper_for_rewards.py", "BONUS = 1.0\n")
    write(tmp_path / "pkg_for_rewards" / "__init__.py", "")
    write(tmp_path / "pkg_for_rewards" / "mod.py", GOOD)
    monkeypatch.chdir(
        tmp_path
    )  # the current directory is searched, as TRL's script does
    path_before = list(sys.path)

    for spec in (
        "pkg_for_rewards.mod:length_reward",
        "pkg_for_rewards.mod.length_reward",
    ):
        name, func = resolve_reward_func(spec)
        assert name == "length_reward"
        assert func(completions=["abc"]) == [4.0]
    assert sys.path == path_before
    # An installed module, by its dotted name.
    spec = "mlx_lm_pref.rewards:think_format_reward"
    assert resolve_reward_func(spec) == ("think_format_reward", think_format_reward)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("missing.py:f", "no such file"),
        ("broken.py:f", "loading broken.py raised SyntaxError"),
        ("raising.py:f", "loading raising.py raised RuntimeError: at import"),
        (
            "no_such_module_for_rewards:f",
            "cannot import 'no_such_module_for_rewards': ModuleNotFoundError",
        ),
        ("no_such_module_for_rewards.f", "cannot import 'no_such_module_for_rewards'"),
        ("good.py:nothere", "'good.py' has no attribute 'nothere'"),
        ("mlx_lm_pref.rewards:nothere", "has no attribute 'nothere'"),
        ("good.py:CONSTANT", "'CONSTANT' is a int, not a function"),
        (
            "good.py:bad_signature",
            "cannot be called with prompts=, completions=, completion_ids=",
        ),
        ("notes/data.txt:f", "is not a .py file"),
        ("good.py", "; name the function: 'good.py:function'."),
        ("good.py:", "expected 'module:function'"),
        ("nonsense", "expected a built-in (think_format_reward, "),
    ],
)
def test_load_errors_name_the_spec(
    spec, fragment, tmp_path, monkeypatch, cleanup_modules
):
    write(tmp_path / "helper_for_rewards.py", "BONUS = 0.0\n")
    write(tmp_path / "good.py", GOOD)
    write(tmp_path / "broken.py", "def f(:\n")
    write(tmp_path / "notes" / "data.txt", "def f(**kwargs): pass\n")
    write(tmp_path / "raising.py", "raise RuntimeError('at import\\nsecond line')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RewardError) as err:
        resolve_reward_func(spec)
    assert_one_line(err, repr(spec), fragment)


def test_check_reward_funcs_keeps_order_and_duplicates():
    specs = [
        "repetition_penalty_reward",
        "think_format_reward",
        "repetition_penalty_reward:2",
    ]
    resolved = check_reward_funcs(specs)
    names = [name for name, _ in resolved]
    # TRL keeps two functions of one name (their metrics share the key); so do we.
    assert names == [
        "repetition_penalty_reward",
        "think_format_reward",
        "repetition_penalty_reward",
    ]
    assert resolved[2][1](completion_ids=[[1, 1, 1]]) == [-0.5]
    with pytest.raises(RewardError) as err:
        check_reward_funcs(["think_format_reward", "nonsense"])
    assert_one_line(err, "'nonsense'")


# ---------------------------------------------------------------------------------------------
# Scoring.

PROMPTS = ["p0", "p1", "p2"]
COMPLETIONS = ["<think>a</think>b", "b", "<think>c</think>"]
IDS = [[1, 1, 1, 1], [2], [3, 3, 3]]


def score(funcs, columns=None, batch=7, **extra):
    return score_completions(
        funcs, PROMPTS, COMPLETIONS, IDS, columns or {}, batch, **extra
    )


def test_score_completions_is_trls_calculate_rewards():
    """The built-ins and a None-returning function scored as TRL's loop scores them (None ->
    NaN, then a float32 tensor), on conversational completions."""
    import torch

    completions = conversational(COMPLETIONS)

    def sometimes(completions, solution, **kwargs):
        return [None if s == "skip" else 2.0 for s in solution]

    funcs = check_reward_funcs(["think_format_reward", "repetition_penalty_reward:1"])
    funcs.append(("sometimes", sometimes))
    columns = {"solution": ["a", "skip", "c"]}
    ours = score_completions(
        funcs, PROMPTS, completions, IDS, columns, 0, trainer_state=None
    )

    trl_funcs = [
        trl_rewards.think_format_reward,
        trl_rewards.get_repetition_penalty_reward(ngram_size=1),
        sometimes,
    ]
    expected = torch.zeros(3, 3)
    for i, func in enumerate(trl_funcs):
        out = func(
            prompts=PROMPTS,
            completions=completions,
            completion_ids=IDS,
            **columns,
            trainer_state=None,
        )
        out = [r if r is not None else torch.nan for r in out]
        expected[:, i] = torch.tensor(out, dtype=torch.float32)

    assert ours.dtype == np.float32 and ours.shape == (3, 3)
    np.testing.assert_array_equal(
        ours, expected.numpy()
    )  # NaN where None, in the same place
    assert np.isnan(ours[1, 2]) and not np.isnan(ours[0, 2])


def test_score_completions_passes_columns_and_extra_as_keywords():
    seen = {}

    def recorder(prompts, completions, completion_ids, **kwargs):
        seen.update(
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            **kwargs,
        )
        return np.array([0.0, 1.0, 2.0])  # a 1-d array is a sequence of numbers too

    columns = {
        "solution": ["x", "y", "z"],
        "level": [1, 2, 3],
        "prompt": ["dropped"] * 3,
    }
    state = object()
    rewards = score([("recorder", recorder)], columns, trainer_state=state)
    np.testing.assert_array_equal(rewards[:, 0], [0.0, 1.0, 2.0])
    assert seen["prompts"] == PROMPTS and seen["completions"] == COMPLETIONS
    assert seen["completion_ids"] == IDS
    assert seen["solution"] == ["x", "y", "z"] and seen["level"] == [1, 2, 3]
    assert seen["trainer_state"] is state
    assert (
        "prompt" not in seen
    )  # TRL passes prompt/completion/completion_ids columns only as data


def test_score_completions_accepts_bools_nan_and_async():
    async def later(completions, **kwargs):
        return [True, False, float("nan")]

    rewards = score([("later", later)])
    assert rewards[0, 0] == 1.0 and rewards[1, 0] == 0.0 and np.isnan(rewards[2, 0])


def test_all_none_row_warns(caplog):
    funcs = [
        ("a", lambda completions, **k: [None, 1.0, 1.0]),
        ("b", lambda **k: [None, None, 0.0]),
    ]
    with caplog.at_level(logging.WARNING, logger="mlx_lm_pref.rewards"):
        rewards = score(funcs)
    assert np.isnan(rewards[0]).all()
    assert (
        "All reward functions returned None for 1 of 3 completions of generation batch 7"
        in caplog.text
    )


def raising(completions, **kwargs):
    return [1.0 / 0 for _ in completions]


@pytest.mark.parametrize(
    "func, fragments",
    [
        (
            lambda **k: [1.0, 2.0],
            ["returned 2 rewards at generation batch 7", "expected 3"],
        ),
        (
            raising,
            [
                "raised ZeroDivisionError (test_rewards.py:",
                "at generation batch 7: float division by zero.",
            ],
        ),
        (lambda **k: {"a": 1.0}, ["returned a dict at generation batch 7"]),
        (lambda **k: "1.0", ["returned a str at generation batch 7"]),
        (lambda **k: None, ["returned a NoneType"]),
        (lambda **k: 1.0, ["returned a float"]),
        (
            lambda **k: [1.0, "2", 3.0],
            ["returned a str", "reward 1 is '2', expected a number or None"],
        ),
        (lambda **k: [1.0, [2.0], 3.0], ["returned a list", "reward 1 is [2.0]"]),
        (lambda **k: np.zeros((3, 1)), ["returned a 2-d array"]),
        (
            lambda **k: [1.0, float("inf"), 3.0],
            ["returned inf", "reward 1 is not finite"],
        ),
        (
            lambda **k: [1.0, 2.0, -float("inf")],
            ["returned -inf", "reward 2 is not finite"],
        ),
        (
            lambda **k: [1e39, 2.0, 3.0],
            ["returned 1e+39", "reward 0 is not finite in float32"],
        ),
        (
            lambda prompts, completions: [1.0] * 3,
            ["raised TypeError", "unexpected keyword argument 'completion_ids'"],
        ),
    ],
)
def test_misbehaving_function_is_one_line_error(func, fragments):
    with pytest.raises(RewardError) as err:
        score([("think_format_reward", think_format_reward), ("my_reward", func)])
    assert_one_line(err, "reward function 'my_reward' ", *fragments)


def test_raising_function_message_is_one_line():
    def multiline(**kwargs):
        raise ValueError("first\nsecond")

    with pytest.raises(RewardError) as err:
        score([("multiline", multiline)])
    assert_one_line(err, "'multiline' raised ValueError", ": first second.")


@pytest.mark.parametrize(
    "columns, fragment",
    [
        (
            {"completions": [1, 2, 3]},
            "dataset column 'completions' has the name of a reward function argument",
        ),
        ({"trainer_state": [1, 2, 3]}, "dataset column 'trainer_state' has the name"),
        (
            {"solution": ["a"]},
            "dataset column 'solution' has 1 values for 3 completions",
        ),
    ],
)
def test_bad_columns(columns, fragment):
    with pytest.raises(RewardError, match=fragment):
        score([("f", lambda **k: [0.0] * 3)], columns, trainer_state=None)


def test_partial_and_callable_object_names_follow_trl():
    from trl.trainer.utils import get_callable_name

    from mlx_lm_pref.rewards import callable_name

    class Scorer:
        def __call__(self, **kwargs):
            return []

    partial = functools.partial(functools.partial(think_format_reward))
    for func in (partial, Scorer(), think_format_reward, lambda **k: []):
        assert callable_name(func) == get_callable_name(func)
    assert (
        callable_name(partial) == "think_format_reward"
        and callable_name(Scorer()) == "Scorer"
    )
