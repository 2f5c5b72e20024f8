"""Console entry points: ``mlx_lm_pref.lora`` and ``mlx_lm_pref <command>``."""

import sys

COMMANDS = ("lora", "demo")


def lora():
    """``mlx_lm.lora`` with the preference options: every upstream flag works unchanged."""
    from mlx_lm import lora as mlx_lm_lora

    import mlx_lm_pref  # noqa: F401  (activation)
    from mlx_lm_pref.config import ConfigError
    from mlx_lm_pref.data import DataError
    from mlx_lm_pref.safety import NonFiniteError

    # Our own errors say what to fix and what is on disk; a traceback would bury that.
    try:
        mlx_lm_lora.main()
    except (ConfigError, DataError) as e:
        print(f"mlx_lm_pref: error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"mlx_lm_pref: training stopped: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)  # the trainer already said what was saved


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(
            f"usage: mlx_lm_pref {{{','.join(COMMANDS)}}} [options]\n"
            "  lora   mlx_lm.lora with --loss-type dpo|orpo (see mlx_lm_pref lora --help)\n"
            "  demo   DPO/ORPO end to end on a built-in tiny model (see mlx_lm_pref demo --help)",
            file=sys.stderr,
        )
        sys.exit(2)
    command = sys.argv.pop(1)
    sys.argv[0] = f"mlx_lm_pref {command}"
    {
        "lora": lora,
        # Imported on use, like lora's mlx_lm.lora.
        "demo": lambda: __import__("mlx_lm_pref.demo", fromlist=["main"]).main(),
    }[command]()
