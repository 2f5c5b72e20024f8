"""What this package prints: one line at a time, from rank 0 only (every rank runs the same
code; a message printed by each of them says nothing more)."""

from contextlib import contextmanager

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


@contextmanager
def plain_console():
    """mlx-lm >= 0.32 prints through one shared rich Console (``cli_ui.make_console``,
    cached) that forces truecolor, so a log redirected to a file fills with escape codes.
    While a preference run's stdout is not a terminal, that console has no colour system
    (rich then writes plain text); afterwards it is as it was. (mlx-lm < 0.32 prints plain.)
    """
    try:
        from mlx_lm.cli_ui import make_console
    except ImportError:
        yield
        return
    console = make_console()
    if console.is_terminal:
        yield
        return
    # rich has no public setter for the colour system it was built with.
    saved, console._color_system = console._color_system, None
    try:
        yield
    finally:
        console._color_system = saved
