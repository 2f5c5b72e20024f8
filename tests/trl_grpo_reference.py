"""TRL 1.16's ``GRPOTrainer`` and ``RLOOTrainer`` as the yardstick for one GRPO/RLOO step.

Helpers for ``test_grpo_parity.py``: the same prompts, completions (token ids fixed in
advance, not sampled) and reward functions go through TRL and through ``mlx_lm_pref``.

- ``prompt_rows``: prompt-only rows, standard or conversational, with the extra columns the
  reward function reads (``target``: a wanted completion length; None for the third
  prompt, whose group is then scored flat, reward std 0, unless ``flat=False``).
- ``make_completions``: G completions per prompt as token-id lists, of ragged lengths, most
  ending with EOS, the last of the first group cut at ``max_completion_length`` without one
  (truncated), and texts chosen so that the reward functions return None for some of them
  (one completion is scored by no function at all).
- ``length_reward`` / ``yes_reward``: the reward functions, importable as
  ``trl_grpo_reference:length_reward`` (tests/ is on sys.path under pytest), so TRL and our
  ``reward_funcs`` spec call the very same callables.
- ``make_trainer``: a ``GRPOTrainer`` / ``RLOOTrainer`` on the tiny model with the PEFT
  adapter of ``trl_reference.write_lora_pair``, whose generation returns the given
  completions (``_generate_single_turn`` overridden); ``trl_step``: one step of it:
  ``_generate_and_score_completions`` on the rows repeated G times (as TRL's
  ``RepeatSampler`` hands them), optionally a perturbation of the adapter (the model moved
  since sampling), then ``compute_loss`` and its backward: loss, ``_metrics["train"]``, the
  LoRA gradient in mlx-lm's names and orientation, and the prompt ids TRL tokenized.
- ``perturbation``: one deterministic change of every LoRA tensor, in mlx-lm's orientation
  (``lora_a`` (in, r), ``lora_b`` (r, out)); ``perturb_peft`` applies it to the PEFT model.

Nothing here imports ``mlx_lm_pref``; ``trl_reference`` loads the HF model and tokenizer.
"""

import tempfile
from typing import Dict, List, Optional

import numpy as np
import torch
import trl_reference as R

# --------------------------------------------------------------------------- data

QUESTIONS = [
    "Is the calm sky nice?",
    "Is the old plum nice and cold and tall?",
    "Is the bright sea nice and warm?",
]
# Per prompt, G = 4 answers. yes_reward scores "Yes..." 1 and "No..." 0 and leaves anything
# else unscored (None); length_reward leaves "Maybe..." unscored: "Maybe." is scored by no
# function (TRL's unscorable row: NaN reward, advantage 0).
ANSWERS = [
    [
        "Yes, the sky is nice.",
        "No.",
        "Perhaps the sea is cold.",
        "Yes, the sky is nice, the sun is warm, the leaf is small, the rose is old.",
    ],
    ["Yes, the plum is nice.", "No, the sand is bright.", "Maybe.", "Yes."],
    # target column None: length_reward scores this group flat (reward std 0 under
    # sum_then_normalize only when yes_reward is flat too, hence all "Yes")
    ["Yes, the sea.", "Yes, the sea is nice and warm.", "Yes.", "Yes, it is."],
]
TARGETS = [6, 3, None]


def prompt_rows(conversational: bool, flat: bool = True) -> List[dict]:
    """The three prompts; ``flat=False`` gives the third a target, so no group is scored
    flat (under normalize_then_sum a flat group's advantages are 0 only up to float32
    round-off, whose sign would decide TRL's clip ratios: a tie, not a difference)."""
    rows = []
    for q, target in zip(QUESTIONS, TARGETS):
        if target is None and not flat:
            target = 5
        prompt = [{"role": "user", "content": q}] if conversational else q + " "
        rows.append({"prompt": prompt, "target": target})
    return rows


def make_completions(tokenizer, G: int, max_completion_length: int):
    """G completions per prompt (token ids, the EOS id last unless truncated); the fourth
    completion of the first prompt is cut at ``max_completion_length`` tokens, no EOS.
    """
    eos = tokenizer.eos_token_id
    out = []
    for i, answers in enumerate(ANSWERS):
        for j in range(G):
            ids = tokenizer(answers[j % len(answers)], add_special_tokens=False)[
                "input_ids"
            ]
            if i == 0 and j == 3:
                if len(ids) < max_completion_length:
                    raise AssertionError("the long answer is too short to truncate")
                ids = ids[:max_completion_length]
            else:
                ids = ids[: max_completion_length - 1] + [eos]
            out.append(ids)
    return out


# --------------------------------------------------------------------------- rewards


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


def length_reward(prompts, completions, completion_ids, target, **kwargs):
    """-|tokens - target| / 4; 0.5 for a prompt without a target (a flat group); None for
    an answer starting with "Maybe"."""
    out = []
    for completion, ids, want in zip(completions, completion_ids, target):
        if _text(completion).startswith("Maybe"):
            out.append(None)
        elif want is None:
            out.append(0.5)
        else:
            out.append(-abs(len(ids) - want) / 4.0)
    return out


def yes_reward(prompts, completions, completion_ids, **kwargs):
    """1 for "Yes...", 0 for "No...", None (not scored) for anything else."""
    out = []
    for completion in completions:
        text = _text(completion)
        out.append(
            1.0 if text.startswith("Yes") else 0.0 if text.startswith("No") else None
        )
    return out


FUNCS = {"length_reward": length_reward, "yes_reward": yes_reward}


# --------------------------------------------------------------------------- perturbation


def perturbation(
    shapes: Dict[str, tuple], scale: float, seed: int = 7
) -> Dict[str, np.ndarray]:
    """A deterministic change of every LoRA tensor (mlx-lm names and orientation):
    ``scale`` x a standard normal draw per entry, divided by sqrt(fan-in)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        out[name] = (scale * rng.standard_normal(shape) / np.sqrt(shape[0])).astype(
            np.float32
        )
    return out


def _lora_params(model, adapter="default"):
    """mlx-lm name -> the PEFT parameter of ``adapter`` (lora_A (r, in), lora_B (out, r))."""
    out = {}
    for name, param in model.named_parameters():
        if f".{adapter}." not in name or "lora_" not in name:
            continue
        hf_name, kind = name.split("base_model.model.", 1)[1].split(".lora_")
        out[f"{hf_name}.lora_{kind.split('.')[0].lower()}"] = param
    return out


def lora_shapes(model) -> Dict[str, tuple]:
    return {k: tuple(p.shape[::-1]) for k, p in _lora_params(model).items()}


def perturb_peft(model, delta: Dict[str, np.ndarray]):
    params = _lora_params(model)
    if sorted(params) != sorted(delta):
        raise AssertionError("the perturbation and the PEFT adapter name other tensors")
    with torch.no_grad():
        for name, param in params.items():
            param.add_(torch.from_numpy(delta[name].T.copy()))


# --------------------------------------------------------------------------- TRL


def _fixed_generation(base, rloo: bool):
    """``base`` (GRPOTrainer or RLOOTrainer) whose generation returns ``self.fixed``, the
    completions given in advance, and keeps the prompt ids TRL tokenized."""

    class Fixed(base):
        fixed: List[List[int]] = []
        seen_prompt_ids: Optional[list] = None

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            self.seen_prompt_ids = [list(map(int, p)) for p in prompt_ids]
            if len(prompt_ids) != len(self.fixed):
                raise AssertionError(
                    f"{len(prompt_ids)} prompts for {len(self.fixed)} completions"
                )
            completions = [list(c) for c in self.fixed]
            return completions if rloo else (completions, None)

    Fixed.__name__ = f"Fixed{base.__name__}"
    return Fixed


def make_trainer(
    method,
    model_path,
    peft_path,
    rows,
    completions,
    num_generations,
    max_completion_length,
    reward_funcs=("length_reward", "yes_reward"),
    reference="ref_adapter",
    **config,
):
    """A TRL ``GRPOTrainer`` (method grpo) or ``RLOOTrainer`` (rloo) on the tiny model with the
    trainable PEFT adapter ``peft_path``, one generation batch of ``len(completions)`` =
    ``per_device_train_batch_size`` completions, that generates ``completions``.

    ``reference`` (beta > 0): "ref_adapter", TRL's own choice for a ``PeftModel`` with an
    adapter, a frozen copy of it made when the trainer is built (our ``initial_adapter``);
    "base": that copy deleted, so TRL disables the adapters for the reference (its path for a
    fresh adapter; our ``adapters_off``).
    """
    from datasets import Dataset

    if method == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    args = Config(
        output_dir=tempfile.mkdtemp(prefix=f"trl_{method}_"),
        per_device_train_batch_size=len(completions),
        num_generations=num_generations,
        max_completion_length=max_completion_length,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **config,
    )
    model = R.load_hf_model(model_path, peft_path, trainable=True)
    trainer = _fixed_generation(Trainer, rloo=method == "rloo")(
        model=model,
        reward_funcs=[FUNCS[name] for name in reward_funcs],
        args=args,
        train_dataset=Dataset.from_list([dict(r) for r in rows]),
        processing_class=R.load_hf_tokenizer(model_path),
    )
    trainer.fixed = completions
    peft_model = trainer.model
    if args.beta and reference == "base":
        if "ref" not in peft_model.peft_config:
            raise AssertionError("TRL made no reference adapter to delete")
        peft_model.delete_adapter("ref")
    return trainer


def trl_step(trainer, rows, num_generations, delta=None) -> dict:
    """One training step of ``trainer`` on ``rows`` (each repeated G times, the order of
    TRL's ``RepeatSampler``): generation (ours, fixed) and scoring, then, given ``delta``, the
    adapter moved by it (the model changed since sampling: set ``num_iterations`` > 1 so TRL
    keeps the sampling-time log-probs), then the loss and its gradient.

    Returns ``{"loss", "metrics" (name -> value), "grads" (mlx-lm name -> array in mlx-lm's
    orientation), "prompt_ids" (TRL's, one per prompt)}``."""
    model = trainer.model
    model.train()  # TRL's mode "train": its metrics land in _metrics["train"]
    trainer.current_gradient_accumulation_steps = 1
    inputs = [dict(r) for r in rows for _ in range(num_generations)]
    out = trainer._generate_and_score_completions(inputs)
    if delta is not None:
        perturb_peft(model, delta)
    model.zero_grad()
    loss = trainer.compute_loss(model, out)
    loss.backward()
    grads = {}
    for name, param in _lora_params(model).items():
        if param.grad is None:
            raise AssertionError(f"{name} got no gradient")
        grads[name] = param.grad.detach().double().numpy().T.copy()
    metrics = {}
    for name, values in trainer._metrics["train"].items():
        if len(values) != 1:
            raise AssertionError(f"TRL logged {name} {len(values)} times: {values}")
        metrics[name] = float(values[0])
    return {
        "loss": float(loss.detach()),
        "metrics": metrics,
        "grads": grads,
        "prompt_ids": trainer.seen_prompt_ids[::num_generations],
    }
