"""Tiny Llama chat models in mlx-lm's HF-style folder layout, built offline.

Used by the tests and the demo: a byte-level BPE tokenizer trained with ``tokenizers`` on a
given corpus, with a ChatML chat template, and random Llama weights from mlx-lm's own model
class. ``mlx_lm.load(folder)`` opens the result like any downloaded model.
"""

import json
from pathlib import Path
from typing import Iterable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512, bos: bool = True):
    """A fast BPE tokenizer with BOS/EOS/pad and a ChatML template.

    With ``bos=True`` encoding text adds ``<s>`` in front (like Llama); with ``bos=False`` the
    tokenizer adds nothing (like Qwen) and has no BOS token.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A",
            pair="<s> $A $B",
            special_tokens=[("<s>", tok.token_to_id("<s>"))],
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>" if bos else None,
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def model_config(
    vocab_size: int, hidden_size=64, layers=2, heads=4, kv_heads=2, ffn=128
) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "intermediate_size": ffn,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }


def build_model(
    path,
    corpus: Iterable[str],
    vocab_size: int = 512,
    bos: bool = True,
    seed: int = 0,
    config: Optional[dict] = None,
    dtype=mx.float32,
) -> Path:
    """Write a tokenizer and random Llama weights to ``path``; returns the path."""
    from mlx_lm.models import llama

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus, vocab_size, bos)
    tokenizer.save_pretrained(path)
    config = {**model_config(len(tokenizer)), **(config or {})}
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = {k: v.astype(dtype) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
