"""A script that drives mlx-lm's Python API itself only adds ``import mlx_lm_pref`` (before it
binds mlx-lm functions by name): the upstream ``load_dataset`` and ``train`` become
preference-aware, the metrics reach the
script's own TrainingCallback, and ``mlx_lm.fuse`` fuses the adapter unchanged."""

import subprocess
import sys
import textwrap

import pytest
from helpers import run_cli, write_data

SCRIPT = """
import json, sys, types
import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten
import mlx_lm.tuner.datasets as datasets
import mlx_lm.tuner.trainer as trainer  # mlx_lm first, on purpose: order does not matter
from mlx_lm import load
from mlx_lm.tuner.datasets import CacheDataset
from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback
from mlx_lm.tuner.utils import linear_to_lora_layers
import mlx_lm_pref

model_path, data, adapters = sys.argv[1:4]
model, tokenizer = load(model_path)
args = types.SimpleNamespace(data=data, train=True, test=False, loss_type="dpo", beta=0.1,
                             max_seq_length=512)
train_set, valid_set, _ = datasets.load_dataset(args, tokenizer)
model.freeze()
linear_to_lora_layers(model, 2, {"rank": 8, "dropout": 0.0, "scale": 20.0})

class Recorder(TrainingCallback):
    def __init__(self):
        self.train, self.val = [], []
    def on_train_loss_report(self, info):
        self.train.append(info)
    def on_val_loss_report(self, info):
        self.val.append(info)

recorder = Recorder()
trainer.train(model, optim.Adam(learning_rate=1e-3), CacheDataset(train_set), CacheDataset(valid_set),
      args=TrainingArgs(batch_size=4, iters=20, steps_per_report=10, steps_per_eval=20,
                        val_batches=-1, adapter_file=f"{adapters}/adapters.safetensors"),
      training_callback=recorder)
assert not [k for k, _ in tree_flatten(model.state) if "_pref" in k]  # nothing left
json.dump({"train": recorder.train, "val": recorder.val}, sys.stdout, default=float)
"""


def test_script_api_and_fuse(tiny_model, tmp_path):
    data = write_data(tmp_path / "data")
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(SCRIPT),
            str(tiny_model),
            str(data),
            str(adapters),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [t["iteration"] for t in seen["train"]] == [10, 20]
    for info in seen["train"]:
        assert {
            "train_loss",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
        } <= set(info)
        assert abs(info["train_loss"] - info["loss"]) < 1e-6
    first, last = seen["val"][0], seen["val"][-1]
    assert {"val_loss", "val_rewards/accuracies", "val_rewards/margins"} <= set(first)
    assert last["val_rewards/accuracies"] > first["val_rewards/accuracies"]
    assert (adapters / "metrics.jsonl").exists()

    # mlx_lm.fuse takes the adapter as is (it needs the adapter_config.json mlx_lm.lora writes)
    (adapters / "adapter_config.json").write_text(
        json.dumps(
            {
                "fine_tune_type": "lora",
                "num_layers": 2,
                "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
            }
        )
    )
    run_cli(
        "fuse",
        "--model",
        tiny_model,
        "--adapter-path",
        adapters,
        "--save-path",
        tmp_path / "fused",
        module="mlx_lm",
    )
    import mlx.core as mx
    from mlx_lm import load

    tokens = mx.array([[1, 20, 30, 40, 50]])
    with_adapter, _ = load(str(tiny_model), adapter_path=str(adapters))
    fused, _ = load(str(tmp_path / "fused"))
    base, _ = load(str(tiny_model))
    assert mx.abs(with_adapter(tokens) - base(tokens)).max().item() > 1e-3
    assert mx.allclose(with_adapter(tokens), fused(tokens), atol=1e-4).item()


def test_evaluate_gives_a_callers_own_loss_its_own_value(tiny_model):
    """mlx-lm's evaluate with a loss of the caller's: on preference data that loss gets
    each ``PreferenceBatch`` and mlx-lm's own token-weighted average comes back; with the
    default loss, the preference metrics."""
    import math

    import mlx.core as mx
    import mlx_lm.tuner.trainer as trainer
    from helpers import make_rows
    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset

    from mlx_lm_pref import PreferenceArgs, PreferenceDataset
    from mlx_lm_pref.batching import PreferenceBatch

    model, tokenizer = load(str(tiny_model))
    pairs = PreferenceDataset(make_rows(6, 1), tokenizer, PreferenceArgs("dpo"))
    seen = []

    def longest_row(model, batch):
        assert isinstance(batch, PreferenceBatch) and not batch.shared
        seen.append((batch.spans[:, 1].max().item(), batch.num_tokens().item()))
        return batch.spans[:, 1].max().astype(mx.float32), batch.num_tokens()

    value = trainer.evaluate(
        model, CacheDataset(pairs), batch_size=2, num_batches=-1, loss=longest_row
    )
    assert len(seen) == 3  # 6 pairs in file order, batches of 2
    expected = sum(v * n for v, n in seen) / sum(n for _, n in seen)
    assert value == pytest.approx(expected) and not hasattr(value, "metrics")
    default = trainer.evaluate(model, CacheDataset(pairs), batch_size=2, num_batches=-1)
    # a model without adapters is its own reference: every pair scores ln 2
    assert default.metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert default.metrics["rewards/margins"] == 0.0


def test_a_callers_preference_loss_is_checked_for_the_model(tiny_model, tmp_path):
    """``PreferenceLoss(options)`` of a script's own, given to train and evaluate, gets
    what the run's own loss gets: its options checked for this model. On a model whose
    output is not its output layer's alone (Gemma 2's soft cap) the tiles would drop the
    cap; checked, the numbers are the default loss's."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import mlx_lm.tuner.trainer as trainer
    from helpers import make_rows
    from mlx_lm import load
    from mlx_lm.models import gemma2
    from mlx_lm.tuner.datasets import CacheDataset
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlx_lm_pref import PreferenceArgs, PreferenceDataset
    from mlx_lm_pref.objective import PreferenceLoss

    _, tokenizer = load(str(tiny_model))
    pairs = CacheDataset(
        PreferenceDataset(make_rows(4, 1), tokenizer, PreferenceArgs("dpo"))
    )

    def capped():
        mx.random.seed(0)
        args = gemma2.ModelArgs(
            model_type="gemma2", hidden_size=32, num_hidden_layers=1,
            intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, rms_norm_eps=1e-5, vocab_size=8192, final_logit_softcapping=2.0,
            query_pre_attn_scalar=8,
        )  # fmt: skip
        model = gemma2.Model(args)
        model.freeze()
        linear_to_lora_layers(model, 1, {"rank": 4, "dropout": 0.0, "scale": 2.0})
        return model

    def evaluate(loss=None):
        extra = {} if loss is None else {"loss": loss}
        return trainer.evaluate(capped(), pairs, 2, -1, **extra).metrics

    default, own = evaluate(), evaluate(PreferenceLoss(PreferenceArgs("dpo")))
    assert own["logps/chosen"] == pytest.approx(default["logps/chosen"], rel=1e-6)

    class Losses(TrainingCallback):
        def __init__(self):
            self.losses = []

        def on_train_loss_report(self, info):
            self.losses.append(info["train_loss"])

    def train(loss=None):
        import numpy as np

        np.random.seed(0)  # mlx-lm's batch order: the same for both runs
        losses = Losses()
        extra = {} if loss is None else {"loss": loss}
        args = TrainingArgs(batch_size=2, iters=2, steps_per_report=1, steps_per_eval=9,
                            adapter_file=str(tmp_path / "a.safetensors"))  # fmt: skip
        trainer.train(capped(), optim.SGD(learning_rate=0.5), pairs, args=args,
                      training_callback=losses, **extra)  # fmt: skip
        return losses.losses

    assert train(PreferenceLoss(PreferenceArgs("dpo"))) == pytest.approx(train())
