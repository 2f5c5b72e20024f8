"""Preference tuning (DPO, ORPO) for mlx-lm's LoRA tuner, as a patch set.

``import mlx_lm_pref`` patches mlx-lm (whether it was imported before or after) so that
``mlx_lm.lora`` and ``mlx_lm.tuner.trainer.train`` train on preference pairs when a preference
``loss_type`` is set; with the default ``loss_type: sft`` mlx-lm behaves exactly as upstream.
``unpatch()`` puts every original object back; ``patch()`` applies them again.
"""

import importlib.metadata

from .compat import UnsupportedVersionError
from .patches import apply as patch
from .patches import is_applied
from .patches import revert as unpatch

# Activation: checks the mlx-lm version first and raises UnsupportedVersionError, patching
# nothing, outside the supported range.
patch()

from .config import PreferenceArgs  # noqa: E402
from .data import DataError, PreferenceDataset  # noqa: E402
from .reference import adapters_disabled  # noqa: E402

__version__ = importlib.metadata.version("mlx-lm-pref")
__all__ = [
    "DataError",
    "PreferenceArgs",
    "PreferenceDataset",
    "UnsupportedVersionError",
    "adapters_disabled",
    "is_applied",
    "patch",
    "unpatch",
]
