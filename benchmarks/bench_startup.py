"""What the start-up hook (mlx_lm_pref.pth) costs a Python process that never imports mlx-lm.

Two numbers, each measured in this run with this environment's interpreter:
1. ``python -c pass``: the time ``-X importtime`` attributes to ``mlx_lm_pref_startup`` (all
   the hook does at start-up, besides one ``sys.meta_path`` insert), against the wall time of
   the whole start-up.
2. A process importing much of the standard library, with the hook's finder in
   ``sys.meta_path`` (consulted once per import) and without it (MLX_LM_PREF_NO_AUTOPATCH=1):
   the ratio of their wall times.

    .venv/bin/python benchmarks/bench_startup.py [--runs 40]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

STDLIB = (
    "import argparse, asyncio, csv, dataclasses, decimal, email.mime.multipart, fractions, "
    "http.client, json, logging.handlers, multiprocessing, pathlib, sqlite3, statistics, "
    "tarfile, unittest, urllib.request, uuid, xml.etree.ElementTree, zipfile"
)


def wall(argv, env, runs):
    times = []
    for _ in range(runs):
        tic = time.perf_counter()
        subprocess.run(argv, env=env, check=True)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def hook_import_us(runs):
    """Median cumulative microseconds of ``import mlx_lm_pref_startup`` at start-up."""
    found = []
    for _ in range(runs):
        err = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "pass"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        m = re.search(r"\|\s*(\d+) \|\s*mlx_lm_pref_startup$", err, re.M)
        if m is None:
            sys.exit("mlx_lm_pref_startup is not imported at start-up: is it installed?")
        found.append(int(m.group(1)))
    return statistics.median(found)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    runs = parser.parse_args().runs
    on = {k: v for k, v in os.environ.items() if k != "MLX_LM_PREF_NO_AUTOPATCH"}
    off = {**on, "MLX_LM_PREF_NO_AUTOPATCH": "1"}

    start = wall([sys.executable, "-c", "pass"], on, runs)
    hook = hook_import_us(runs) / 1e6
    print(f"python -c pass: {start * 1e3:.1f} ms wall; the hook's import: "
          f"{hook * 1e3:.2f} ms = {hook / start:.3f} of it")  # fmt: skip

    wall([sys.executable, "-c", STDLIB], on, 3)  # warm the bytecode caches
    with_finder = wall([sys.executable, "-c", STDLIB], on, runs)
    without = wall([sys.executable, "-c", STDLIB], off, runs)
    print(f"importing 20 stdlib packages: {with_finder * 1e3:.1f} ms with the finder, "
          f"{without * 1e3:.1f} ms without: ratio {with_finder / without:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
