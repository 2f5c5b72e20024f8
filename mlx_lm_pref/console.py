"""What this package prints: one line at a time, from rank 0 only (every rank runs the same
code; a message printed by each of them says nothing more)."""

import mlx.core as mx


def is_main_rank() -> bool:
    return mx.distributed.init().rank() == 0


def rprint(*args, **kwargs) -> None:
    """``print`` on rank 0, as mlx-lm's own ``cli_ui.rprint`` (which mlx-lm < 0.32 lacks)."""
    if is_main_rank():
        print(*args, **kwargs)


def log(message: str) -> None:
    """``[mlx_lm_pref] message`` on rank 0."""
    if is_main_rank():
        print(f"[mlx_lm_pref] {message}", flush=True)
