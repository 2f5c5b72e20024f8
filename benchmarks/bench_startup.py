"""What the start-up hook (mlx_lm_pref.pth) costs a Python process that never imports mlx-lm.

Two numbers, each measured in this run with this environment's interpreter:
1. ``python -c pass``: the time ``-X importtime`` attributes to ``mlx_lm_pref_startup`` (all
   the hook does at start-up, besides one ``sys.meta_path`` insert), against the wall time of
   the whole start-up.
2. A process importing much of the standard library, with the hook's finder in
   ``sys.meta_path`` (consulted once per import) and without it (MLX_LM_PREF_NO_AUTOPATCH=1):
   the ratio of their wall times.

    .venv/bin/python benchmarks/bench_startup.py [--runs 60] [--no-write]

Writes the "startup" section of RESULTS.md. An editable install (the README's) finds the
hook's module through setuptools' editable finder, after every sys.path entry: it costs more
there than in a regular install (``pip install .``); run it in both to see both.
"""

import argparse
import importlib.metadata
import json
import os
import re
import statistics
import subprocess
import sys
import time

from bench_common import machine_line, write_section

STDLIB = (
    "import argparse, asyncio, csv, dataclasses, decimal, email.mime.multipart, fractions, "
    "http.client, json, logging.handlers, multiprocessing, pathlib, sqlite3, statistics, "
    "tarfile, unittest, urllib.request, uuid, xml.etree.ElementTree, zipfile"
)


def wall(argv, envs, runs):
    """Median wall time of ``argv`` under each of ``envs``, the runs interleaved (so that
    the machine's drift hits them alike)."""
    times = [[] for _ in envs]
    for _ in range(runs):
        for k, env in enumerate(envs):
            tic = time.perf_counter()
            subprocess.run(argv, env=env, check=True)
            times[k].append(time.perf_counter() - tic)
    return [statistics.median(t) for t in times]


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
            sys.exit(
                "mlx_lm_pref_startup is not imported at start-up: is it installed?"
            )
        found.append(int(m.group(1)))
    return statistics.median(found)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--no-write", action="store_true")
    cli = parser.parse_args()
    runs = cli.runs
    on = {k: v for k, v in os.environ.items() if k != "MLX_LM_PREF_NO_AUTOPATCH"}
    off = {**on, "MLX_LM_PREF_NO_AUTOPATCH": "1"}

    (start,) = wall([sys.executable, "-c", "pass"], [on], runs)
    hook = hook_import_us(runs) / 1e6
    wall([sys.executable, "-c", STDLIB], [on], 3)  # warm the bytecode caches
    with_finder, without = wall([sys.executable, "-c", STDLIB], [on, off], runs)
    editable = is_editable()
    lines = [
        f"`python -c pass`: {start * 1e3:.1f} ms wall; the hook's import "
        f"{hook * 1e3:.2f} ms of it ({hook / start:.3f})",
        f"importing 20 stdlib packages: {with_finder * 1e3:.1f} ms with the finder in "
        f"`sys.meta_path`, {without * 1e3:.1f} ms without: ratio {with_finder / without:.3f}",
    ]
    print("\n".join(lines))
    if not cli.no_write:
        kind = "editable" if editable else "regular"
        body = [
            f"## Start-up hook: what a process that never imports mlx-lm pays ({kind} install)",
            "",
            f"`{' '.join(['python', 'benchmarks/bench_startup.py', '--runs', str(runs)])}`, "
            f"medians of {runs} runs each, interleaved; {machine_line()}.",
            "",
        ] + [f"- {line}" for line in lines]
        write_section(f"startup-{kind}", "\n".join(body))


def is_editable() -> bool:
    """Whether mlx-lm-pref is installed in editable mode (PEP 610's direct_url.json)."""
    text = importlib.metadata.distribution("mlx-lm-pref").read_text("direct_url.json")
    return bool(text) and json.loads(text).get("dir_info", {}).get("editable", False)


if __name__ == "__main__":
    main()
