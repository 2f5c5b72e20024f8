"""Times TRL's DPOTrainer / ORPOTrainer on given token ids (torch CPU, float32):
``python worker_trl.py JOB.json OUT.json``, in the TRL venv (/tmp/venv_trl).

The synthetic Llama folder is opened by ``transformers`` (``LlamaForCausalLM``, float32) and
trained with a PEFT LoRA of the same shape as the MLX runs (rank 8, alpha = scale x rank, every
linear layer of every block). DPO's reference is TRL's own PEFT path (``ref_model=None``: the
adapters are disabled for the reference forward, no second copy). The tokens are exactly the
given ones: TRL's tokenization is bypassed (``DPOTrainer._prepare_dataset`` returns the
``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` columns as they are; ``ORPOTrainer.tokenize_row``
returns the given ids, with the prompt labels at -100), everything after it (collators,
``training_step``, losses, optimizer) is TRL's and transformers' own. ``trainer.train()`` runs
``max_steps`` = warmup + timed steps on a dataset holding exactly the B pairs; a callback times
``on_step_begin`` -> ``on_step_end`` (forward, backward, optimizer step; the collation happens
before). ``bf16=False``, ``fp16=False``, ``use_cpu=True``, ``gradient_checkpointing=False``
(TRL 1.16's DPOConfig/ORPOConfig default it to True; mlx-lm does not checkpoint). Torch
threads: the job's ``threads`` (bench_peers.py passes 1 by default), else one per core.
"""

import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
from bench_common import (  # noqa: E402
    BETA,
    LEARNING_RATE,
    LORA,
    batch_stats,
    cpu_seconds,
    read_json,
    rss_mb,
    rss_peak_mb,
    rss_reset,
    trim_heap,
    write_json,
)

LORA_TARGETS = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]


def peft_config():
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["rank"],
        lora_alpha=LORA["scale"] * LORA["rank"],
        lora_dropout=LORA["dropout"],
        bias="none",
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )


def load_model(path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def common_args(B, iters, out_dir, gradient_checkpointing):
    return dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=B,
        max_steps=iters,
        learning_rate=LEARNING_RATE,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=gradient_checkpointing,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
        beta=BETA,
        max_length=4096,
    )


def make_callback():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.cpu, self.losses = [], [], []
            self.t = self.c = None

        def on_step_begin(self, args, state, control, **kw):
            self.c, self.t = cpu_seconds(), time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.t)
            self.cpu.append(cpu_seconds() - self.c)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def dpo_trainer(model, tok, pairs, targs, callback):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    rows = [
        {
            "prompt_ids": p["chosen"][: p["chosen_start"]],
            "chosen_ids": p["chosen"][p["chosen_start"] :],
            "rejected_ids": p["rejected"][p["rejected_start"] :],
        }
        for p in pairs
    ]
    args = DPOConfig(loss_type="sigmoid", **targs)
    return PreTokenizedDPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=peft_config(),
        callbacks=[callback],
    )


def orpo_trainer(model, tok, pairs, targs, callback):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    class PreTokenizedORPOTrainer(ORPOTrainer):
        def tokenize_row(self, feature, model=None):
            p = json.loads(feature["ids"])
            out = {}
            for side in ("chosen", "rejected"):
                ids, start = p[side], p[f"{side}_start"]
                out[f"{side}_input_ids"] = ids
                out[f"{side}_attention_mask"] = [1] * len(ids)
                out[f"{side}_labels"] = [-100] * start + ids[start:]
            prompt = p["chosen"][: p["chosen_start"]]
            out["prompt_input_ids"] = prompt
            out["prompt_attention_mask"] = [1] * len(prompt)
            return out

    rows = [
        {"prompt": "p", "chosen": "c", "rejected": "r", "ids": json.dumps(p)}
        for p in pairs
    ]
    args = ORPOConfig(**targs)
    return PreTokenizedORPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=peft_config(),
        callbacks=[callback],
    )


def collated_shape(trainer, method):
    """The (rows, width) TRL's collator + concatenation feed the model."""
    ds = trainer.train_dataset
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    if method == "dpo":
        return tuple(batch["input_ids"].shape)
    c, r = batch["chosen_input_ids"].shape, batch["rejected_input_ids"].shape
    return (c[0] + r[0], max(c[1], r[1]))


def time_method(method, job, tmp, gradient_checkpointing=False):
    from transformers import AutoTokenizer

    pairs = job["pairs"]
    B = len(pairs)
    gc.collect()
    tok = AutoTokenizer.from_pretrained(job["model"])
    model = load_model(job["model"])
    cb = make_callback()
    targs = common_args(
        B, job["warmup"] + job["steps"], Path(tmp) / method, gradient_checkpointing
    )
    make = dpo_trainer if method == "dpo" else orpo_trainer
    trainer = make(model, tok, pairs, targs, cb)
    rows, width = collated_shape(trainer, method)
    lengths = [len(p["chosen"]) for p in pairs] + [len(p["rejected"]) for p in pairs]
    stats = batch_stats(lengths, rows, width)
    trim_heap()
    rss_before = rss_mb()
    rss_reset()
    t = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t
    result = {
        "first_step_ms": cb.seconds[0] * 1e3,
        "first_loss": cb.losses[0] if cb.losses else None,
        "times_ms": [s * 1e3 for s in cb.seconds[job["warmup"] :]],
        "cpu_ms": [s * 1e3 for s in cb.cpu[job["warmup"] :]],
        "rss_before_mb": rss_before,
        "rss_peak_mb": rss_peak_mb(),
        "wall_s": wall,
        "gradient_checkpointing": gradient_checkpointing,
        "reference": (
            "PEFT adapters disabled (ref_model=None)" if method == "dpo" else None
        ),
        **stats,
    }
    del trainer, model
    return result


def main():
    job = read_json(sys.argv[1])
    import peft
    import transformers
    import trl

    torch.set_num_threads(int(job.get("threads") or os.cpu_count() or 1))
    out = {
        "tool": "trl",
        "methods": {},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
            "torch_threads": torch.get_num_threads(),
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        for method in job["methods"]:
            gcp = method.endswith("+gc")
            name = method.split("+")[0]
            try:
                r = time_method(name, job, tmp, gradient_checkpointing=gcp)
            except Exception as e:
                import traceback

                traceback.print_exc()
                r = {"error": f"{type(e).__name__}: {e}"}
            out["methods"][method] = r
            print(
                f"[trl] {method}: "
                + (
                    f"{sorted(r['times_ms'])[len(r['times_ms']) // 2]:.0f} ms"
                    if "times_ms" in r
                    else r["error"]
                ),
                file=sys.stderr,
                flush=True,
            )
            write_json(sys.argv[2], out)


if __name__ == "__main__":
    main()
