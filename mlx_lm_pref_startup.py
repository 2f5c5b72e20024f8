"""Run at interpreter start-up by ``mlx_lm_pref.pth``: makes plain ``mlx_lm.lora``,
``mlx_lm lora`` and ``python -m mlx_lm lora`` accept the preference options, with no import
line in anyone's script.

A process that never imports mlx_lm pays one ``sys.meta_path`` entry and nothing else: this
module imports only os and sys. (wrapt itself, which imports asyncio, costs tens of ms; it is
imported only once mlx_lm is.) On the first import of ``mlx_lm``, a wrapt post-import hook is
registered for ``mlx_lm.lora``, the module every one of those commands imports by name; when
it has been imported, the hook imports mlx_lm_pref, which patches mlx-lm (an mlx-lm outside
the supported range: one line on stderr and nothing patched).

``MLX_LM_PREF_NO_AUTOPATCH=1`` turns this off: mlx-lm is then exactly upstream unless a script
imports mlx_lm_pref itself.
"""

import os
import sys

OFF_SWITCH = "MLX_LM_PREF_NO_AUTOPATCH"


def activate(module) -> None:
    """The post-import hook for ``mlx_lm.lora``. Whatever stops mlx_lm_pref from importing
    (an mlx-lm outside the supported range, most likely) is one line on stderr, and mlx-lm
    goes on as upstream: the hook must never break a plain mlx-lm command."""
    try:
        import mlx_lm_pref  # noqa: F401  (importing it applies the patches)
    except Exception as error:
        # mlx_lm_pref.compat.UnsupportedVersionError says it all; anything else is ours.
        said = (
            str(error)
            if type(error).__name__ == "UnsupportedVersionError"
            else (
                f"not activated ({type(error).__name__}: {error}); mlx-lm runs as upstream."
            )
        )
        print(f"[mlx_lm_pref] {said} ({OFF_SWITCH}=1 skips this.)", file=sys.stderr)


class MlxLmFinder:
    """A meta-path finder that finds nothing: it notices the first import of mlx_lm."""

    def __init__(self):
        self.seen = False

    def find_spec(self, name, path=None, target=None):
        if name == "mlx_lm" and not self.seen:
            # Stays in sys.meta_path (removing it now would skip the next finder of the
            # import in progress); from here on it returns at once.
            self.seen = True
            import wrapt

            wrapt.register_post_import_hook(activate, "mlx_lm.lora")
        return None


def install() -> None:
    if os.environ.get(OFF_SWITCH, "") in ("", "0"):
        sys.meta_path.insert(0, MlxLmFinder())


install()
