"""Patches for ``mlx_lm.tuner``, which re-exports ``train`` and ``evaluate`` by name."""

from . import function_wrapper
from . import trainer as trainer_patches

PATCHES = [
    ("train", function_wrapper(trainer_patches.train)),
    ("evaluate", function_wrapper(trainer_patches.evaluate)),
]
