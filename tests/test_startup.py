"""The start-up hook (``mlx_lm_pref.pth``): after ``pip install``, plain ``mlx_lm.lora``,
``mlx_lm lora`` and ``python -m mlx_lm lora`` train preferences; ``MLX_LM_PREF_NO_AUTOPATCH=1``
gives upstream; a process that never imports mlx-lm loads nothing of mlx, mlx-lm or wrapt.
Everything runs the console scripts of this test's own environment, in subprocesses."""

import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import read_metrics, write_data

BIN = Path(sys.executable).parent
OFF = {"MLX_LM_PREF_NO_AUTOPATCH": "1"}
TRAIN = ["--train", "--iters", "4", "--batch-size", "4", "--num-layers", "2"]
TRAIN += ["--steps-per-report", "2", "--steps-per-eval", "4", "--val-batches", "2"]


def run(argv, cwd, env=None, check=True):
    """``argv`` with this environment's console scripts first on PATH."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **(env or {}),
    }
    proc = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{argv[:3]} exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


MODULES_AT_START = """
import json, sys
print(json.dumps({"modules": sorted(sys.modules),
                  "finders": [type(f).__name__ for f in sys.meta_path]}))
"""


def started(env=None):
    proc = run([sys.executable, "-c", MODULES_AT_START], cwd=None, env=env)
    return json.loads(proc.stdout)


@pytest.mark.smoke
def test_start_up_loads_only_the_hook():
    """``python -c ...`` with the package installed: the hook's module and its finder, and
    nothing of mlx, mlx-lm, wrapt (which imports asyncio) or this package."""
    state = started()
    assert "mlx_lm_pref_startup" in state["modules"]
    assert "MlxLmFinder" in state["finders"]
    heavy = {
        "mlx",
        "mlx_lm",
        "mlx_lm_pref",
        "wrapt",
        "asyncio",
        "numpy",
        "transformers",
    }
    assert not heavy & {m.split(".")[0] for m in state["modules"]}
    assert "MlxLmFinder" not in started(OFF)["finders"]


COMMANDS = {
    "mlx_lm.lora": ["mlx_lm.lora"],
    "mlx_lm lora": ["mlx_lm", "lora"],  # mlx-lm >= 0.30
    "python -m mlx_lm lora": [sys.executable, "-m", "mlx_lm", "lora"],
}


@pytest.mark.smoke
@pytest.mark.parametrize("command", COMMANDS)
def test_plain_mlx_lm_commands_take_the_preference_options(command, tmp_path):
    """Each command's parser has them; with the off switch it is upstream's. (The combination
    test trains through plain ``mlx_lm.lora``'s ``main`` and ``python -m mlx_lm``.)"""
    argv = COMMANDS[command]
    if not Path(argv[0]).is_absolute() and not (BIN / argv[0]).exists():
        pytest.skip(f"this mlx-lm has no {argv[0]} command")
    assert "--loss-type" in run([*argv, "--help"], tmp_path).stdout
    proc = run(
        [*argv, "--model", "m", "--loss-type", "dpo"], tmp_path, env=OFF, check=False
    )
    assert proc.returncode == 2
    assert "unrecognized arguments: --loss-type dpo" in proc.stderr


@pytest.mark.smoke
def test_plain_mlx_lm_lora_trains_preferences(tiny_model, tmp_path):
    data = write_data(tmp_path / "data", n_train=16, n_valid=8)
    adapters = tmp_path / "adapters"
    args = ["--model", tiny_model, "--data", data, "--adapter-path", adapters, *TRAIN]
    run(["mlx_lm.lora", *args, "--loss-type", "dpo", "--beta", "0.2"], cwd=tmp_path)
    metrics = read_metrics(adapters)
    assert [(m["split"], m["iteration"]) for m in metrics] == [
        ("val", 0),
        ("train", 2),
        ("val", 3),
        ("train", 4),
    ]
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen"} <= set(metrics[-1])
    assert (adapters / "adapters.safetensors").stat().st_size > 0


@pytest.mark.smoke
def test_plain_mlx_lm_lora_takes_the_preference_keys_of_a_yaml_config(
    tiny_model, tmp_path
):
    data = write_data(tmp_path / "data", n_train=16, n_valid=8)
    adapters = tmp_path / "adapters"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model: {tiny_model}\ndata: {data}\nadapter_path: {adapters}\n"
        "train: true\niters: 4\nbatch_size: 4\nnum_layers: 2\nsteps_per_report: 2\n"
        "steps_per_eval: 4\nval_batches: 2\nloss_type: orpo\nbeta: 0.2\n"
    )
    run(["mlx_lm.lora", "-c", config], cwd=tmp_path)
    last = [m for m in read_metrics(adapters) if m["split"] == "val"][-1]
    assert last["iteration"] == 3
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(last)


def test_an_unsupported_mlx_lm_gets_one_line_and_upstream(mlx_lm_release, tmp_path):
    """mlx-lm 0.27.1 under the hook: one line on stderr naming the supported range, then
    upstream's own command, untouched."""
    env = {"PYTHONPATH": str(mlx_lm_release("0.27.1"))}
    proc = run(["mlx_lm.lora", "--help"], tmp_path, env=env)
    lines = [l for l in proc.stderr.splitlines() if "mlx_lm_pref" in l]
    assert len(lines) == 1, proc.stderr
    assert "supports mlx-lm >=0.28.4,<0.33 but found mlx-lm 0.27.1" in lines[0]
    assert (
        "nothing was patched" in lines[0] and "MLX_LM_PREF_NO_AUTOPATCH=1" in lines[0]
    )
    assert "--loss-type" not in proc.stdout and "--adapter-path" in proc.stdout
    assert (
        "mlx_lm_pref"
        not in run(["mlx_lm.lora", "--help"], tmp_path, {**env, **OFF}).stderr
    )


@pytest.mark.skipif(
    int(importlib.metadata.version("transformers").split(".")[0]) < 5,
    reason="transformers < 5 is what mlx-lm < 0.30 needs",
)
def test_mlx_lm_before_0_30_with_transformers_5_is_refused(mlx_lm_release):
    env = {**os.environ, **OFF, "PYTHONPATH": str(mlx_lm_release("0.28.4"))}
    code = (
        "import sys\ntry:\n    import mlx_lm_pref\nexcept ImportError as e:\n"
        "    print(type(e).__name__, e)\n"
        "print(sys.modules['mlx_lm_pref.patches'].applied())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(
        "UnsupportedVersionError mlx-lm 0.28.4 needs transformers"
    )
    assert "pip install 'transformers<5'" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "{}"  # nothing patched


def test_the_wheel_ships_the_hook(tmp_path):
    """A regular (non-editable) wheel puts the .pth at the top of site-packages, and site
    runs it from there."""
    root = Path(__file__).parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(root)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("mlx_lm_pref-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("mlx_lm_pref.pth") == b"import mlx_lm_pref_startup\n"
        zf.extractall(tmp_path / "site")
    code = (
        f"import site, sys; site.addsitedir({str(tmp_path / 'site')!r}); "
        "m = sys.modules['mlx_lm_pref_startup']; "
        "print(m.__file__, [type(f).__name__ for f in sys.meta_path])"
    )
    # -S: none of this environment's own .pth files run, only the wheel's
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(str(tmp_path / "site"))
    assert "MlxLmFinder" in proc.stdout


def test_version_is_the_package_metadata():
    import mlx_lm_pref

    assert mlx_lm_pref.__version__ == importlib.metadata.version("mlx-lm-pref")
