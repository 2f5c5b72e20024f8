"""Where this package keeps files, and the faster BLAS it can use on Linux."""

import os
from pathlib import Path

# Debian's OpenBLAS (package libopenblas0-pthread). mlx's Linux CPU wheel links the netlib
# reference BLAS; OpenBLAS exports the same cblas_* symbols, so preloading it speeds up every
# matmul (the demo and the benchmarks do, unless MLX_LM_PREF_NO_OPENBLAS=1).
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
NO_OPENBLAS = "MLX_LM_PREF_NO_OPENBLAS"


def cache_root() -> Path:
    """``$MLX_LM_PREF_CACHE``, else ``~/.cache/mlx_lm_pref``: the demo model and the
    precomputed reference log-probs."""
    root = os.environ.get("MLX_LM_PREF_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "mlx_lm_pref"
