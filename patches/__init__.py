"""The patch table and its lifecycle: ``apply()`` and ``revert()`` walk the same rows.

Each module here targets one mlx-lm module and lists ``PATCHES``: ``(attribute, make)`` rows,
where ``make(original)`` builds the replacement. Functions are wrapped with
``PreferenceWrapper`` (a ``wrapt.FunctionWrapper``) so the original stays reachable through
``__wrapped__``. ``apply()`` registers a wrapt post-import hook per target module, so the order
in which mlx_lm and mlx_lm_pref are imported does not matter.

Activation checks the installed mlx-lm against the supported range first
(``mlx_lm_pref.compat``, which holds every difference between the supported releases).
"""

import builtins
import importlib
import logging
import sys

import wrapt

from mlx_lm_pref.compat import check_version

logger = logging.getLogger("mlx_lm_pref")

# Target mlx-lm module -> the module here that patches it. The patch modules import mlx-lm
# themselves, so they are loaded only after the version check has passed.
TABLE = {
    "mlx_lm.tuner.trainer": "trainer",
    # mlx_lm.tuner re-exports train and evaluate by name.
    "mlx_lm.tuner": "tuner",
    "mlx_lm.tuner.datasets": "datasets",
    "mlx_lm.lora": "lora",
}


def rows(target: str) -> list:
    return importlib.import_module(f"{__name__}.{TABLE[target]}").PATCHES


class PreferenceWrapper(wrapt.FunctionWrapper):
    """Marks the wrappers this package installs."""


def function_wrapper(wrapper):
    """A ``make`` for a table row: wrap the original function with ``wrapper``.

    A reference taken while patched (``from mlx_lm.tuner.trainer import train``) outlives
    revert(); once reverted, such a stale wrapper calls straight through to the original.
    """

    def guarded(wrapped, instance, args, kwargs):
        if not _state["active"]:
            return wrapped(*args, **kwargs)
        return wrapper(wrapped, instance, args, kwargs)

    return lambda original: PreferenceWrapper(original, guarded)


_state = {"active": False, "hooks": False}
# The original of a row whose attribute the module did not have (a builtin it looked up).
ABSENT = object()
# (module, attribute) -> (original, replacement), in the order applied.
_applied = {}


def _patch_module(module) -> None:
    if not _state["active"]:
        return
    for attribute, make in rows(module.__name__):
        key = (module.__name__, attribute)
        if key in _applied:
            continue
        if attribute in vars(module):
            current = getattr(module, attribute)
        else:  # a builtin the module looks up: shadowed here, removed by revert()
            current = getattr(builtins, attribute)
        # A module that imported a name from an already-patched module holds our wrapper:
        # wrap the original beneath it instead, so nothing is wrapped twice and revert()
        # puts the original back here too.
        while isinstance(current, PreferenceWrapper):
            current = current.__wrapped__
        replacement = make(current)
        original = current if attribute in vars(module) else ABSENT
        setattr(module, attribute, replacement)
        _applied[key] = (original, replacement)


def apply() -> bool:
    """Patch mlx-lm (now for imported modules, on import for the rest). True if it did."""
    if _state["active"]:
        logger.debug("mlx_lm_pref patches already applied; nothing to do.")
        return False
    check_version()
    for target in TABLE:  # load the patch modules before any hook can fire
        rows(target)
    _state["active"] = True
    if not _state["hooks"]:
        _state["hooks"] = True
        for name in TABLE:
            wrapt.register_post_import_hook(_patch_module, name)
    else:
        for name in TABLE:
            if name in sys.modules:
                _patch_module(sys.modules[name])
    return True


def revert() -> None:
    """Put every original object back. Hooks stay registered but do nothing until apply()."""
    _state["active"] = False
    for (name, attribute), (original, replacement) in reversed(list(_applied.items())):
        module = sys.modules[name]
        if vars(module).get(attribute) is replacement and original is ABSENT:
            delattr(module, attribute)
        elif vars(module).get(attribute) is replacement:
            setattr(module, attribute, original)
        else:
            logger.warning(
                "%s.%s was replaced by someone else after mlx_lm_pref patched it; "
                "leaving it as it is.",
                name,
                attribute,
            )
    _applied.clear()


def is_applied() -> bool:
    return _state["active"]


def applied() -> dict:
    """``{"module.attribute": (original, replacement)}`` for what is patched now."""
    return {f"{m}.{a}": v for (m, a), v in _applied.items()}
