"""Patch lifecycle, each case in a fresh interpreter so patches cannot leak between tests:
import order, applying twice, unpatch restoring every original, re-applying, and an
unsupported mlx-lm version. The interpreters run with the start-up hook off
(``MLX_LM_PREF_NO_AUTOPATCH=1``), so that nothing is patched until a test says so; the hook
itself is tested in test_startup.py."""

import os
import subprocess
import sys
import textwrap

import pytest

NO_AUTOPATCH = {"MLX_LM_PREF_NO_AUTOPATCH": "1"}

TARGETS = """
import importlib
TARGETS = {
    "mlx_lm.tuner.trainer": ["default_loss", "iterate_batches", "train", "evaluate", "mx"],
    "mlx_lm.tuner": ["train", "evaluate"],
    "mlx_lm.tuner.datasets": ["create_dataset", "load_local_dataset", "load_custom_hf_dataset"],
    "mlx_lm.lora": ["main", "build_parser", "CONFIG_DEFAULTS", "run", "load_dataset", "train", "evaluate", "evaluate_model"],
}
def snapshot():
    return {(m, a): getattr(importlib.import_module(m), a) for m, ats in TARGETS.items() for a in ats}
"""


def run_python(code, env=None):
    proc = subprocess.run(
        [sys.executable, "-c", TARGETS + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **NO_AUTOPATCH, **(env or {})},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.smoke
def test_import_before_mlx_lm():
    out = run_python("""
        import mlx_lm_pref
        from mlx_lm_pref.patches import PreferenceWrapper, applied
        import mlx_lm.lora
        now = snapshot()
        assert len(applied()) == len(now) + 1 == 19, applied().keys()
        for key, obj in now.items():
            assert applied()[".".join(key)][1] is obj, key
        # the loop's range, which the trainer module looked up among the builtins
        import builtins, mlx_lm.tuner.trainer as trainer
        from mlx_lm_pref import patches
        assert applied()["mlx_lm.tuner.trainer.range"][0] is patches.ABSENT
        assert trainer.range.__wrapped__ is builtins.range
        assert list(trainer.range(1, 4)) == [1, 2, 3]
        assert "loss_type" in mlx_lm.lora.build_parser().parse_args(["--loss-type", "dpo"]).__dict__
        assert mlx_lm.lora.CONFIG_DEFAULTS["loss_type"] == "sft"
        print("ok")
    """)
    assert "ok" in out


@pytest.mark.smoke
def test_import_after_mlx_lm_then_unpatch_and_reapply():
    out = run_python("""
        import mlx_lm.lora
        originals = snapshot()
        import mlx_lm_pref
        from mlx_lm_pref.patches import PreferenceWrapper
        patched = snapshot()
        for key in originals:
            assert patched[key] is not originals[key], key
            if callable(originals[key]):
                assert isinstance(patched[key], PreferenceWrapper)
                # never wrapped twice: directly around the original
                assert patched[key].__wrapped__ is originals[key], key

        assert mlx_lm_pref.patch() is False  # second apply: nothing happens
        assert snapshot() == patched

        mlx_lm_pref.unpatch()
        restored = snapshot()
        for key in originals:
            assert restored[key] is originals[key], key
        assert "range" not in vars(mlx_lm.tuner.trainer)  # the builtin again
        assert "loss_type" not in mlx_lm.lora.CONFIG_DEFAULTS

        assert mlx_lm_pref.patch() is True
        again = snapshot()
        for key in originals:
            assert again[key] is not originals[key]
            if callable(originals[key]):
                assert again[key].__wrapped__ is originals[key], key
        print("ok")
    """)
    assert "ok" in out


@pytest.mark.smoke
def test_stale_reference_falls_through_after_unpatch():
    out = run_python("""
        import mlx_lm_pref
        from mlx_lm.tuner.trainer import default_loss  # taken while patched
        import mlx.core as mx
        from mlx_lm.models import llama
        mlx_lm_pref.unpatch()
        args = llama.ModelArgs(model_type="llama", hidden_size=16, num_hidden_layers=1,
            intermediate_size=32, num_attention_heads=2, rms_norm_eps=1e-5, vocab_size=20)
        model = llama.Model(args)
        batch, lengths = mx.array([[1, 2, 3, 4]]), mx.array([[0, 3]])
        assert default_loss(model, batch, lengths)[0].item() == default_loss.__wrapped__(model, batch, lengths)[0].item()
        print("ok")
    """)
    assert "ok" in out


@pytest.mark.smoke
def test_unsupported_mlx_lm_version_patches_nothing(mlx_lm_release):
    env = {"PYTHONPATH": str(mlx_lm_release("0.27.1"))}
    out = run_python(
        """
        import importlib.metadata, sys
        assert importlib.metadata.version("mlx-lm") == "0.27.1"
        try:
            import mlx_lm_pref
        except ImportError as e:
            print("ERROR:", e)
            assert type(e).__name__ == "UnsupportedVersionError"
        else:
            raise AssertionError("imported with an unsupported mlx-lm")
        patches = sys.modules["mlx_lm_pref.patches"]
        assert not patches.is_applied() and not patches.applied()
        assert not any(m == "mlx_lm" or m.startswith("mlx_lm.") for m in sys.modules), "mlx_lm was imported"
    """,
        env=env,
    )
    assert "supports mlx-lm >=0.28.4,<0.33 but found mlx-lm 0.27.1" in out
    assert "nothing was patched" in out


@pytest.mark.smoke
def test_every_supported_training_loop_can_start_mid_way():
    """A resumed run starts mlx-lm's loop after its checkpoint by the loop's count
    (``patches/trainer.py``'s range): the release installed counts it that way."""
    out = run_python("""
        import mlx_lm_pref
        from mlx_lm_pref.compat import resumable_loop
        assert resumable_loop()
        print("ok")
    """)
    assert "ok" in out
