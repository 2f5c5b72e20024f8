"""The reference pass on the policy's frozen layers (``frozen``): the same losses, metrics and
gradients as the whole reference pass, bit for bit, over objectives x layouts x adapter kinds,
with the layers below the first adapter run once instead of twice; the probe accepts the
architectures it reproduces and turns the sharing off for the others. (Through the CLI, in
every combination of options and on 2 ranks: ``test_combinations``'s ``frozen`` factor.)
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import (
    TILED,
    random_batch,
    read_metrics,
    run_cli_many,
    shared_layout,
    tiny_model_of,
    write_data,
)
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama
from mlx_lm.models.base import create_attention_mask
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_lm_pref.batching import make_batch
from mlx_lm_pref.config import PreferenceArgs
from mlx_lm_pref.data import Example
from mlx_lm_pref.frozen import (
    first_adapted_layer,
    frozen_layers_problem,
    resolve_frozen_layers,
)
from mlx_lm_pref.objective import PreferenceLoss
from mlx_lm_pref.reference import InitialAdapter

LAYERS, ADAPTED = 4, 2  # LoRA on the top 2 of 4 layers: layers 0 and 1 are shared


def model_with(adapter="lora", vocab_size=50, seed=0):
    """A 4-layer Llama, LoRA (or DoRA, or LoRA on a 4-bit base) on its top 2 layers, the
    adapter moved away from 0 as training would move it."""
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=LAYERS,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab_size,
    )
    model = llama.Model(args)
    if adapter == "quantized":
        nn.quantize(model, group_size=32, bits=4)
    model.freeze()
    params = {"rank": 4, "dropout": 0.0, "scale": 2.0}
    linear_to_lora_layers(model, ADAPTED, params, use_dora=adapter == "dora")
    moved = [
        (k, v + mx.random.normal(v.shape) * 0.05)
        for k, v in tree_flatten(model.trainable_parameters())
    ]
    model.update(tree_unflatten(moved))
    mx.eval(model.parameters())
    return model


def kto_batch(layout):
    rng = np.random.default_rng(3)
    examples = []
    for k, label in enumerate([True, False, False, True]):
        prompt = [1] + rng.integers(3, 50, rng.integers(2, 6)).tolist()
        completion = rng.integers(3, 50, rng.integers(1, 7)).tolist()
        kl = rng.integers(3, 50, rng.integers(1, 7)).tolist()
        examples.append(Example(prompt + completion, len(prompt), label, prompt + kl))
    return make_batch(examples, 2048, "x", "true" if layout == "shared" else "false")


class LayerCalls:
    """Counts the calls of the model's decoder layers."""

    def __init__(self, monkeypatch):
        self.count = 0
        call = llama.TransformerBlock.__call__

        def counted(layer, *args, **kwargs):
            self.count += 1
            return call(layer, *args, **kwargs)

        monkeypatch.setattr(llama.TransformerBlock, "__call__", counted)


OBJECTIVES = {
    "dpo": dict(loss_type="dpo"),
    "ipo+sft-ld": dict(loss_type="ipo,sft", loss_weights="1.0,0.5", ld_alpha=0.5),
    "wpo-js": dict(
        loss_type="dpo", use_weighting=True, f_divergence_type="js_divergence"
    ),
    "initial_adapter": dict(loss_type="dpo", reference="initial_adapter"),
    "kto": dict(loss_type="kto"),
    "apo_zero_unpaired": dict(loss_type="apo_zero_unpaired"),
}


@pytest.mark.numerics
@pytest.mark.parametrize("adapter", ["lora", "dora", "quantized", "tiles"])
@pytest.mark.parametrize("layout", ["whole", "shared"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_same_numbers_bit_for_bit(objective, layout, adapter, monkeypatch):
    case = OBJECTIVES[objective]
    tiles = adapter == "tiles"
    model = model_with("lora" if tiles else adapter, TILED["vocab"] if tiles else 50)
    initial = InitialAdapter(model) if "reference" in case else None
    if initial is not None:  # the policy moves on from its step-0 adapter
        moved = [(k, v * 1.5) for k, v in tree_flatten(model.trainable_parameters())]
        model.update(tree_unflatten(moved))
    if "kto" in case["loss_type"] or "unpaired" in case["loss_type"]:
        batch = kto_batch(layout)
    else:
        batch = random_batch(5)
        batch = shared_layout(batch) if layout == "shared" else batch
    assert first_adapted_layer(model) == LAYERS - ADAPTED
    calls = LayerCalls(monkeypatch)
    results = {}
    for share in ("auto", "false"):
        options = PreferenceArgs(**case, share_frozen_layers=share)
        options = options.replace(
            head_chunk_size=TILED["head_chunk_size"] if tiles else "0"
        )
        loss_and_grad = nn.value_and_grad(model, PreferenceLoss(options, initial))
        calls.count = 0
        (loss, ntoks), grads = loss_and_grad(model, batch)
        mx.eval(loss, grads, model._pref_metrics)
        results[share] = (
            loss,
            model._pref_metrics,
            dict(tree_flatten(grads)),
            calls.count,
        )
    (loss, metrics, grads, calls_shared), (w_loss, w_metrics, w_grads, calls_whole) = (
        results["auto"],
        results["false"],
    )
    # bit for bit: the layers from the first adapter up see exactly the same input
    assert loss.item() == w_loss.item()
    assert np.array_equal(np.array(metrics), np.array(w_metrics))
    assert grads.keys() == w_grads.keys() and grads
    assert max(mx.abs(g).max().item() for g in grads.values()) > 0
    for name, g in grads.items():
        assert mx.array_equal(g, w_grads[name]).item(), name
    # the reference ran only the adapted layers (a model call per layout part)
    passes = 2 if layout == "shared" else 1
    assert calls_whole == 2 * LAYERS * passes
    assert calls_shared == (2 * LAYERS - (LAYERS - ADAPTED)) * passes


def test_which_layers_are_shared():
    model = model_with()
    assert first_adapted_layer(model) == 2
    every = tiny_model_of("llama")
    every.freeze()
    linear_to_lora_layers(every, 2, {"rank": 2, "dropout": 0.0, "scale": 1.0})
    assert first_adapted_layer(every) == 0  # an adapter in layer 0: nothing to share
    full = tiny_model_of("llama")  # no adapter: full fine-tuning trains every layer
    assert first_adapted_layer(full) == 0
    embedded = model_with()
    embedded.model.embed_tokens = nn.Embedding(50, 64)
    from mlx_lm.tuner.lora import LoRAEmbedding

    embedded.model.embed_tokens = LoRAEmbedding.from_base(embedded.model.embed_tokens)
    assert (
        first_adapted_layer(embedded) == 0
    )  # the embedding changes every layer's input
    # only the output layer adapted: every layer is frozen
    headed = tiny_model_of("llama", tie_word_embeddings=False)
    headed.freeze()
    linear_to_lora_layers(headed, 0, {"rank": 2, "dropout": 0.0, "scale": 1.0,
                                      "keys": []})  # fmt: skip
    from mlx_lm.tuner.lora import LoRALinear

    headed.lm_head = LoRALinear.from_base(headed.lm_head, r=2)
    assert first_adapted_layer(headed) == 2


ARCHITECTURES = [
    ("llama", {}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("gemma", {}),
    ("phi3", {}),
    ("olmo2", {}),
    ("starcoder2", {}),
    ("gemma3_text", {}),  # sliding-window layers, a per-layer mask
    ("cohere2", {}),
    ("mixtral", {}),
    ("gemma2", {}),
    ("gpt2", dict(n_embd=32, n_head=4, n_layer=2, n_ctx=256, n_positions=256)),
]


@pytest.mark.parametrize("model_type,overrides", ARCHITECTURES)
def test_probe_accepts_architectures_it_reproduces(model_type, overrides):
    model = tiny_model_of(model_type, **overrides)
    model.freeze()
    linear_to_lora_layers(model, 1, {"rank": 2, "dropout": 0.0, "scale": 1.0})
    assert first_adapted_layer(model) == 1
    shared = model_type != "gemma2"  # gemma2 cannot share prompts (test_sharing)
    assert frozen_layers_problem(model, shared) is None


class RunningSum(llama.LlamaModel):
    """A Llama whose output adds up every layer's output (a hybrid residual stream): the
    stand-ins' pass-through would count the embedding instead."""

    def __call__(self, inputs, cache=None, input_embeddings=None):
        h = self.embed_tokens(inputs)
        cache = cache or [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        total = mx.zeros_like(h)
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, cache=c)
            total = total + h
        return self.norm(total)


def test_probe_turns_the_sharing_off_where_it_would_be_wrong(capsys):
    model = model_with()
    summed = RunningSum(model.args)
    for name in ("embed_tokens", "layers", "norm"):
        summed[name] = model.model[name]
    model.model = summed
    assert "differs from the whole one" in frozen_layers_problem(model, True)
    options = resolve_frozen_layers(model, PreferenceArgs(loss_type="dpo"))
    assert options.share_frozen_layers == "false"
    assert "frozen layers not shared with the reference" in capsys.readouterr().out


def test_cli_training_and_test_alone_say_so_and_equal_false(tiny_model, tmp_path):
    """Training (validation included) and --test alone, with LoRA on the top 1 of the tiny
    model's 2 layers: the line, and the same metrics as with the option off."""
    data = write_data(tmp_path / "data", n_train=8, n_valid=4, n_test=4)
    said = "reference pass from layer 1 of 2: the 1 frozen layers below"
    jobs = []
    for share in ("auto", "false"):
        common = ["--model", tiny_model, "--data", data, "--adapter-path", tmp_path / share,
                  "--batch-size", 2, "--share-frozen-layers", share]  # fmt: skip
        jobs.append((common + ["--train", "--loss-type", "dpo", "--num-layers", 1,
                               "--iters", 2, "--steps-per-eval", 2, "--val-batches", -1],
                     tmp_path, {}))  # fmt: skip
        jobs.append((common + ["--test"], tmp_path, {}))
    results = run_cli_many(jobs)
    for code, out, err in results:
        assert code == 0, err[-3000:]
    assert said in results[0][1] and said not in results[2][1]
    runs = {share: read_metrics(tmp_path / share) for share in ("auto", "false")}
    splits = [m["split"] for m in runs["auto"]]
    assert splits.count("val") == 2 and "train" in splits and splits[-1] == "test"
    assert runs["auto"] == runs["false"]


@pytest.mark.numerics
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_reference_in_the_step_bit_for_bit(loss_type, monkeypatch):
    """GRPO's reference runs in the training step, on the policy pass's frozen layers."""
    from mlx_lm_pref.grpo import RolloutBatch, rl_objective, rollout_metric_names

    model = model_with()
    rng = np.random.default_rng(4)
    tokens = mx.array(rng.integers(3, 50, (4, 12)), mx.int32)
    spans = mx.array([[5, 12], [5, 9], [7, 12], [7, 10]], mx.int32)
    calls = LayerCalls(monkeypatch)
    results = {}
    for share in ("auto", "false"):
        o = PreferenceArgs(loss_type=loss_type, beta=0.04, share_frozen_layers=share,
                           reward_funcs="think_format_reward")  # fmt: skip
        o = o.replace(reference="adapters_off")
        batch = RolloutBatch(
            tokens=tokens,
            spans=spans,
            advantages=mx.array([1.0, -1.0, 0.5, -0.5]),
            kept=mx.ones((4,)),
            normalizer=mx.array(20.0),
            rollout=mx.zeros((len(rollout_metric_names(o)), 2)),
        )
        objective = lambda model: rl_objective(model, batch, o)[0]  # noqa: E731
        calls.count = 0
        loss, grads = nn.value_and_grad(model, objective)(model)
        _, metrics = rl_objective(model, batch, o)
        results[share] = (
            loss,
            metrics["kl"][0],
            dict(tree_flatten(grads)),
            calls.count,
        )
    (loss, kl, grads, shared), (w_loss, w_kl, w_grads, whole) = results.values()
    assert loss.item() == w_loss.item() and kl.item() == w_kl.item() and kl.item() > 0
    for name, g in grads.items():
        assert mx.array_equal(g, w_grads[name]).item(), name
    assert (shared, whole) == (2 * (2 * LAYERS - ADAPTED), 2 * 2 * LAYERS)
