"""Fixtures: tiny HF-format Llama chat models, built locally (no hub), once per session.
Shared helpers are in ``helpers.py``."""

import subprocess
import sys

import pytest
from helpers import corpus


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from mlx_lm_pref.demo.tiny import build_model

    return build_model(
        tmp_path_factory.mktemp("models") / "tiny", corpus(), vocab_size=300
    )


@pytest.fixture(scope="session")
def tiny_model_nobos(tmp_path_factory):
    from mlx_lm_pref.demo.tiny import build_model

    return build_model(
        tmp_path_factory.mktemp("models") / "tiny_nobos",
        corpus(),
        vocab_size=300,
        bos=False,
    )


@pytest.fixture(scope="session")
def mlx_lm_release(tmp_path_factory):
    """``install(version)``: a folder holding that mlx-lm release alone (``pip --target``,
    no dependencies), to put in front of the installed one with PYTHONPATH."""
    folders = {}

    def install(version):
        if version not in folders:
            target = tmp_path_factory.mktemp(f"mlx_lm_{version}")
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                 str(target), f"mlx-lm=={version}"],
                check=True,
                capture_output=True,
                timeout=300,
            )  # fmt: skip
            folders[version] = target
        return folders[version]

    return install
