"""Times mlx-lm-lora's own GRPO trainer on given prompts:
``python worker_mlx_lm_lora_grpo.py JOB.json OUT.json``, in the peer venv (setup_peers.sh).

Everything that runs is mlx-lm-lora 5.10.2's code, as its CLI (``mlx_lm_lora.train``,
``--train-mode grpo``) sets it up: ``mlx_lm_lora.utils.from_pretrained`` (the model with LoRA
on every layer, as ``worker_mlx_lm_lora.load_policy``), ``mlx_lm_lora.train.
load_reference_model`` (a second full copy of the model, frozen: its CLI loads it for GRPO
whatever ``--beta``; with beta 0 its loss never runs it), and ``trainer.grpo_trainer.
train_grpo`` with its own ``iterate_grpo_batches``, ``generate_grpo`` (each prompt prefilled
once, the group decoded by mlx-lm's ``BatchGenerator``), rewards and advantages, and
``grpo_loss`` (reference and policy forward over whole rows, the whole logits, one
microbatch of ``batch_size`` completions at a time).

The job's prompts are the dataset (``(prompt ids, [], prompt text, answer)`` tuples, the
layout its ``GRPODataset`` produces), ``batch_size`` = their number, so every iteration is one
generation batch of all of them x ``group_size`` completions.

What the worker changes, so that both sides do the same work:

- the stop tokens: the tokenizer's EOS set is replaced by ``{-1}`` and ``end_answer_token``
  is ``""``, so every completion runs to ``max_completion_length`` tokens (the completion
  lengths it reports are returned as a check);
- the reward: bench_grpo.py's (its own defaults parse R1-style tags, which random weights
  never produce);
- ``generate_grpo`` and ``_rollout_rewards`` are wrapped (looked up as module globals by
  ``train_grpo``) to time them; the training pass is the rest of the step.

Step times are those its loop measures (``steps_per_report=1``: ``iterations_per_second``
around generation + rewards + the training step + its ``mx.eval``), peaks are
``mx.get_peak_memory()`` per step (reset after each report). No device-info shim is needed:
``train_grpo`` does not call ``mx.set_wired_limit`` (its SFT trainer does).
"""

import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from bench_common import LEARNING_RATE, LORA, read_json, write_json  # noqa: E402

NO_STOP = -1  # an id no sampler returns


def bench_reward(prompts, completions, answer, types=None, **_):
    """bench_grpo.py's reward: a spread inside each group, cheap, deterministic, the same
    numbers on both sides (random weights sample ids past the tokenizer's 4096, which
    decode to nothing, so a function of the text would give every completion the same).
    """
    return np.random.default_rng(len(completions)).random(len(completions)).tolist()


class Recorder:
    """A TrainingCallback keeping each report's step time and peak; resets the peak so
    that each step's is its own."""

    def __init__(self):
        self.seconds, self.peaks, self.losses = [], [], []

    def on_train_loss_report(self, info):
        self.seconds.append(1.0 / info["iterations_per_second"])
        self.peaks.append(info["peak_memory"])
        self.losses.append(info["train_loss"])
        mx.reset_peak_memory()

    def on_val_loss_report(self, info):
        pass


def timed(fn, log):
    def wrapper(*args, **kwargs):
        tic = time.perf_counter()
        out = fn(*args, **kwargs)
        log.append((time.perf_counter() - tic, out))
        return out

    return wrapper


def run(job, tmp):
    from mlx_lm_lora.train import load_reference_model
    from mlx_lm_lora.trainer import grpo_trainer
    from mlx_lm_lora.utils import from_pretrained

    cfg = read_json(Path(job["model"]) / "config.json")
    mx.random.seed(0)
    model, tokenizer, _ = from_pretrained(
        model=job["model"],
        lora_config={
            **LORA,
            "use_dora": False,
            "num_layers": cfg["num_hidden_layers"],
        },
    )
    ref = load_reference_model(
        SimpleNamespace(reference_model_path=None, model=job["model"])
    )
    mx.eval(model.parameters(), ref.parameters())
    weights_gb = mx.get_active_memory() / 1e9
    tokenizer.eos_token_ids = {NO_STOP}
    prompts = job["prompts"]
    data = [(p, [], f"prompt {k}", "answer") for k, p in enumerate(prompts)]
    generations, rewards = [], []
    grpo_trainer.generate_grpo = timed(grpo_trainer.generate_grpo, generations)
    grpo_trainer._rollout_rewards = timed(grpo_trainer._rollout_rewards, rewards)
    args = grpo_trainer.GRPOTrainingArgs(
        batch_size=len(prompts),
        iters=job["warmup"] + job["steps"],
        steps_per_report=1,
        steps_per_eval=10**9,
        steps_per_save=10**9,
        max_seq_length=1 << 16,
        adapter_file=str(Path(tmp) / "adapters.safetensors"),
        group_size=job["G"],
        beta=job["beta"],
        max_completion_length=job["completion"],
        temperature=job["temperature"],
        top_p=job["top_p"],
        top_k=job["top_k"],
        min_p=job["min_p"],
        grpo_loss_type=job["loss_type"],
    )
    rec = Recorder()
    mx.reset_peak_memory()
    grpo_trainer.train_grpo(
        model=model,
        ref_model=ref,
        tokenizer=tokenizer,
        optimizer=optim.Adam(learning_rate=LEARNING_RATE),
        train_dataset=data,
        val_dataset=None,
        reward_funcs=[bench_reward],
        args=args,
        training_callback=rec,
        end_answer_token="",
    )
    w = job["warmup"]
    sampling = [s for s, _ in generations]
    scoring = [s for s, _ in rewards]
    lengths = [sum(c.size for c in out[0]) / len(out[0]) for _, out in generations[w:]]
    return {
        "step_s": rec.seconds[w:],
        "sampling_s": sampling[w:],
        "rewards_s": scoring[w:],
        "pass_s": [
            t - s - r for t, s, r in zip(rec.seconds[w:], sampling[w:], scoring[w:])
        ],
        "peak_gb": rec.peaks[w:],
        "first_peak_gb": rec.peaks[0],
        "weights_gb": weights_gb,
        "mean_completion": lengths,
        "completions": len(generations[-1][1][0]),
        "losses": rec.losses,
        "reference": "second full model copy (load_reference_model)",
    }


def main():
    job = read_json(sys.argv[1])
    from importlib.metadata import version

    import mlx_lm

    out = {
        "tool": "mlx-lm-lora",
        "versions": {
            "mlx": mx.__version__,
            "mlx_lm": mlx_lm.__version__,
            "mlx_lm_lora": version("mlx-lm-lora"),
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        try:
            out.update(run(job, tmp))
        except Exception as e:
            import traceback

            traceback.print_exc()
            out["error"] = f"{type(e).__name__}: {e}"
    write_json(sys.argv[2], out)


if __name__ == "__main__":
    main()
