#!/usr/bin/env bash
# Installs the peers that benchmarks/bench_peers.py compares against, each in its own venv
# (they are never dependencies of mlx_lm_pref):
#   /tmp/venv_peer : mlx[cpu] + mlx-lm-lora (+ matplotlib for the charts)
#   /tmp/venv_trl  : torch 2.13.0 (CPU) + trl 1.16.0 + peft (+ transformers, datasets)
# Override the locations with BENCH_VENV_PEER / BENCH_VENV_TRL. Safe to re-run.
set -euo pipefail
PEER="${BENCH_VENV_PEER:-/tmp/venv_peer}"
TRL="${BENCH_VENV_TRL:-/tmp/venv_trl}"
PY="${PYTHON:-python3}"

if [ ! -x "$PEER/bin/python" ]; then
    "$PY" -m venv "$PEER"
fi
# mlx-lm-lora 5.10.2 asks for mlx_lm>=0.32.0: pin the mlx-lm that mlx_lm_pref supports
"$PEER/bin/pip" install -q "mlx[cpu]" "mlx-lm==${MLX_LM_VERSION:-0.32.2}" \
    "mlx-lm-lora==${MLX_LM_LORA_VERSION:-5.10.2}" matplotlib
echo "== $PEER"
"$PEER/bin/python" - <<'PYEOF'
from importlib.metadata import version
for name in ("mlx", "mlx-lm", "mlx-lm-lora", "matplotlib"):
    print(f"  {name} {version(name)}")
PYEOF

if [ ! -x "$TRL/bin/python" ]; then
    "$PY" -m venv "$TRL"
fi
if ! "$TRL/bin/python" -c "import torch, trl, peft, transformers, datasets" 2>/dev/null; then
    "$TRL/bin/pip" install -q torch==2.13.0
    "$TRL/bin/pip" install -q trl==1.16.0 peft
fi
echo "== $TRL"
"$TRL/bin/python" - <<'PYEOF'
from importlib.metadata import version
for name in ("torch", "transformers", "trl", "peft", "datasets"):
    print(f"  {name} {version(name)}")
PYEOF
