"""Console entry points: ``mlx_lm_pref.lora`` and ``mlx_lm_pref <command>``."""

import sys

COMMANDS = ("lora", "demo", "evaluate")


def lora():
    """``mlx_lm.lora`` with the preference options: every upstream flag works unchanged
    (its ``main`` is patched: our errors are one line and an exit code)."""
    from mlx_lm import lora as mlx_lm_lora

    import mlx_lm_pref  # noqa: F401  (activation)

    mlx_lm_lora.main()


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(
            f"usage: mlx_lm_pref {{{','.join(COMMANDS)}}} [options]\n"
            "  lora      mlx_lm.lora with --loss-type: dpo (and TRL's DPO loss family), "
            "orpo, cpo, simpo, kto, grpo, rloo\n"
            "  demo      a method end to end on a built-in tiny model (--model smollm2: on a "
            "real one)\n"
            "  evaluate  an adapter's answers and the model's without it, scored by your "
            "judge function\n"
            "(each: mlx_lm_pref COMMAND --help)",
            file=sys.stderr,
        )
        sys.exit(2)
    command = sys.argv.pop(1)
    sys.argv[0] = f"mlx_lm_pref {command}"
    {
        "lora": lora,
        # Imported on use, like lora's mlx_lm.lora.
        "demo": lambda: __import__("mlx_lm_pref.demo", fromlist=["main"]).main(),
        "evaluate": lambda: __import__("mlx_lm_pref.judge", fromlist=["main"]).main(),
    }[command]()
