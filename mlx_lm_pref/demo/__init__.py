"""``mlx_lm_pref demo``: preference tuning end to end on a built-in tiny model.

``command`` is the command, ``task`` the demo's task (prompts, judge, data, the cached demo
model), ``tiny`` the builder of tiny Llama chat models it (and the tests) start from.
"""

from .command import main

__all__ = ["main"]
