"""The demo's synthetic task and the tiny chat model built for it.

The task: a shop assistant hands over objects. A user asks for one, politely ("Could you pass
the red key, please?") or bluntly ("Give me the red key."). The SFT data teaches the model to
mirror the user's tone: polite requests mostly get polite answers, blunt ones mostly rude
answers. Greedy decoding then answers politely only when asked politely, about 3 times in 7.
The preference data always prefers the polite answer, and ``judge`` checks the outcome on
prompts that neither SFT nor preference training ever saw.

The model: a ~100k-parameter Llama with its own BPE tokenizer and ChatML template
(``mlx_lm_pref.demo.tiny``), trained from scratch by mlx-lm's own SFT trainer
(``mlx_lm.tuner.trainer.train``, every weight trainable). Every input comes from fixed seeds,
so a rebuild with the same mlx and BLAS gives the same weights bit for bit.
"""

import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..env import cache_root

ADJECTIVES = ["red", "blue", "green", "old", "new", "small", "big", "gold"]
ITEMS = [
    "key", "book", "lamp", "cup", "hat", "map", "pen", "coat",
    "ring", "bag", "bell", "drum", "sock", "fork", "spoon", "vase",
]  # fmt: skip

# Three polite templates out of seven: the base model's success rate sits near 3/7.
POLITE_REQUESTS = [
    "Could you pass the {x}, please?",
    "May I have the {x}, please?",
    "Please hand me the {x}. Thank you!",
]
BLUNT_REQUESTS = [
    "Give me the {x}.",
    "Pass the {x} now.",
    "I want the {x}. Hurry up.",
    "Where is the {x}? Bring it.",
]
REQUESTS = POLITE_REQUESTS + BLUNT_REQUESTS

POLITE_ANSWERS = ["Of course! Here is the {x}.", "Sure, here is the {x}. Enjoy!"]
RUDE_ANSWERS = ["Ugh. Get the {x} yourself.", "No. Find the {x} yourself."]
POLITE_OPENERS = ("Of course!", "Sure,")
RUDE_MARKERS = re.compile(r"\b(Ugh|No\.|yourself)", re.IGNORECASE)

# How often an SFT answer mirrors the request's tone: below 1 so the base model gives the
# other style some probability (the preference losses have something to move), well above
# 1/2 so greedy decoding follows the tone.
MIRROR_RATE = 0.85
# Held-out prompts per request template. Fixed, because SFT must never see them either.
HELD_OUT_PER_TEMPLATE = 20
SPLIT_SEED = 0


@dataclass(frozen=True)
class Prompt:
    template: int  # index into REQUESTS
    obj: str  # "red key"

    @property
    def polite_request(self) -> bool:
        return self.template < len(POLITE_REQUESTS)

    @property
    def text(self) -> str:
        return REQUESTS[self.template].format(x=self.obj)

    def messages(self) -> list:
        return [{"role": "user", "content": self.text}]


def all_prompts() -> list:
    objects = [f"{a} {i}" for a in ADJECTIVES for i in ITEMS]
    return [Prompt(t, o) for t in range(len(REQUESTS)) for o in objects]


def split_prompts() -> tuple:
    """``(held_out, training)``. ``held_out`` takes one prompt of every template in turn, so
    ``held_out_prompts(n)`` has ``n`` of each template for any ``n``, and the base rate does
    not depend on how many prompts are evaluated."""
    rng = random.Random(SPLIT_SEED)
    prompts = all_prompts()
    per_template = [
        rng.sample([p for p in prompts if p.template == t], HELD_OUT_PER_TEMPLATE)
        for t in range(len(REQUESTS))
    ]
    held_out = [p for row in zip(*per_template) for p in row]
    excluded = set(held_out)
    return held_out, [p for p in prompts if p not in excluded]


def held_out_prompts(per_template: int = HELD_OUT_PER_TEMPLATE) -> list:
    return split_prompts()[0][: per_template * len(REQUESTS)]


def polite_answer(prompt: Prompt, rng: random.Random) -> str:
    return rng.choice(POLITE_ANSWERS).format(x=prompt.obj)


def rude_answer(prompt: Prompt, rng: random.Random) -> str:
    return rng.choice(RUDE_ANSWERS).format(x=prompt.obj)


def sft_rows(n: int, seed: int) -> list:
    """``{"messages": [...]}`` chat rows whose answer mirrors the request's tone."""
    rng = random.Random(seed)
    prompts = split_prompts()[1]
    rows = []
    for _ in range(n):
        p = rng.choice(prompts)
        polite = p.polite_request == (rng.random() < MIRROR_RATE)
        answer = polite_answer(p, rng) if polite else rude_answer(p, rng)
        rows.append(
            {"messages": p.messages() + [{"role": "assistant", "content": answer}]}
        )
    return rows


def preference_rows(n: int, seed: int) -> list:
    """Conversational preference pairs on training prompts: the polite answer is chosen."""
    rng = random.Random(seed)
    rows = []
    for p in rng.sample(split_prompts()[1], n):
        rows.append(
            {
                "prompt": p.messages(),
                "chosen": [{"role": "assistant", "content": polite_answer(p, rng)}],
                "rejected": [{"role": "assistant", "content": rude_answer(p, rng)}],
            }
        )
    return rows


def unpaired_rows(pairs: list, seed: int) -> list:
    """KTO's thumbs-up/thumbs-down view of ``pairs``: each pair's polite answer (label true)
    and rude answer (label false) as two rows, shuffled so batches hold both labels."""
    rows = []
    for pair in pairs:
        for side, label in (("chosen", True), ("rejected", False)):
            rows.append(
                {"prompt": pair["prompt"], "completion": pair[side], "label": label}
            )
    random.Random(seed).shuffle(rows)
    return rows


def write_preference_data(
    folder: Path, n_train: int = 256, n_valid: int = 32, unpaired: bool = False
) -> Path:
    """``train.jsonl`` and ``valid.jsonl`` in the layout ``mlx_lm_pref lora --data`` reads:
    preference pairs, or with ``unpaired`` the same pairs as KTO rows."""
    rows = preference_rows(n_train + n_valid, seed=1)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:n_train]), ("valid", rows[n_train:])):
        part = unpaired_rows(part, seed=2) if unpaired else part
        (folder / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in part)
        )
    return folder


def prompt_rows(n: int, seed: int) -> list:
    """GRPO's and RLOO's view of the task: the prompts of ``preference_rows(n, seed)`` alone,
    ``{"prompt": [user message]}``; the answers are sampled while training and scored by
    ``judge_reward``."""
    return [{"prompt": row["prompt"]} for row in preference_rows(n, seed)]


def write_prompt_data(folder: Path, n_train: int = 256, n_valid: int = 32) -> Path:
    """``train.jsonl`` and ``valid.jsonl`` of prompt-only rows: the preference data's prompts
    (the same seed, so the same training prompts as DPO's)."""
    rows = prompt_rows(n_train + n_valid, seed=1)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:n_train]), ("valid", rows[n_train:])):
        (folder / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in part)
        )
    return folder


OBJECT = re.compile(rf"\bthe ((?:{'|'.join(ADJECTIVES)}) (?:{'|'.join(ITEMS)}))\b")


def prompt_of(text: str) -> Prompt:
    """The ``Prompt`` a request's text was made from (the judge reads its object only)."""
    for template, request in enumerate(REQUESTS):
        head, tail = request.split("{x}")
        if text.startswith(head) and text.endswith(tail):
            return Prompt(template, text[len(head) : len(text) - len(tail)])
    match = OBJECT.search(text)
    if match is None:
        raise ValueError(f"not a request of the demo's task: {text!r}")
    return Prompt(0, match.group(1))


def _text(message) -> str:
    """A prompt's or completion's text: a string, or the content of its last message."""
    return message if isinstance(message, str) else message[-1]["content"]


def judge_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """``judge`` as a GRPO/RLOO reward function (TRL's signature, one float per
    completion): 1.0 for a polite answer handing over the requested object, else 0.0.
    ``prompts`` are requests, strings or conversations (the user's request last);
    ``completions`` strings or ``[{"role": "assistant", "content": text}]``.
    ``--reward-funcs mlx_lm_pref.demo.task:judge_reward``."""
    return [
        float(judge(prompt_of(_text(p)), _text(c)))
        for p, c in zip(prompts, completions, strict=True)
    ]


def judge(prompt: Prompt, response: str) -> bool:
    """The preferred behaviour: a polite opener, the requested object, nothing rude."""
    response = response.strip()
    return (
        response.startswith(POLITE_OPENERS)
        and f"the {prompt.obj}" in response
        and not RUDE_MARKERS.search(response)
    )


# ---------------------------------------------------------------------------------------
# The built-in model

# Bump when anything below (or the data above) changes: the cache keeps one folder per name.
MODEL_NAME = "polite-llama-v1"
# BPE stops merging at 417 tokens: every word of the task is then a single token, and the
# longest chat (template included) is 31 tokens, so mlx-lm's batches are 33 wide, not 65.
VOCAB_SIZE = 450
# The answer must copy the requested object from the prompt. Tied embeddings make that copy
# much easier to learn (a head that moves a token's embedding to the output already scores
# that same token): with them, every seed tried learned it within 250 steps; with untied
# ones, some seeds had not after 400.
MODEL_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": True,
}
SFT = {
    "rows": 4000,
    "iters": 250,
    "batch_size": 32,
    "learning_rate": 3e-3,
    "warmup": 20,
    "seed": 0,  # initial weights, batch order
    "data_seed": 1,
}
WEIGHTS = "model.safetensors"
RECIPE = "recipe.json"


def model_dir() -> Path:
    return cache_root() / MODEL_NAME


def is_built(path: Path) -> bool:
    """A whole model: its recipe names the sha256 of the weights file that is there."""
    try:
        recipe = json.loads((path / RECIPE).read_text())
        return recipe.get("sha256") == file_sha256(path / WEIGHTS)
    except (OSError, ValueError):
        return False


def tokenizer_corpus() -> list:
    """Every word the chats can contain, the template's role names included."""
    texts = ["user", "assistant"]
    for p in all_prompts():
        texts.append(p.text)
        texts += [a.format(x=p.obj) for a in POLITE_ANSWERS + RUDE_ANSWERS]
    return texts


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def ensure_model(rebuild: bool = False, blas: str = "") -> Path:
    """The cached model folder, built first if missing (or if ``rebuild``)."""
    dest = model_dir()
    if is_built(dest) and not rebuild:
        return dest
    print(
        f"[demo] Building the demo model {MODEL_NAME} in {dest} (one-off SFT from scratch)"
    )
    # Built next to its final place and renamed in one step: an interrupted build leaves
    # no half-written model behind, and a concurrent reader sees either none or a whole one.
    tmp = dest.with_name(f"{dest.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tic = time.perf_counter()
    build_into(tmp, blas)
    if rebuild or not is_built(dest):  # an old or half-written folder goes
        shutil.rmtree(dest, ignore_errors=True)
    try:
        tmp.rename(dest)
    except OSError:  # another process finished first: keep its model
        shutil.rmtree(tmp, ignore_errors=True)
    if not is_built(dest):
        raise RuntimeError(
            f"The demo model in {dest} is incomplete; remove the folder."
        )
    print(f"[demo] Model ready in {time.perf_counter() - tic:.1f} s: {dest}")
    return dest


def build_into(path: Path, blas: str = "") -> None:
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import TrainingArgs, train

    from .tiny import build_model

    build_model(
        path,
        tokenizer_corpus(),
        vocab_size=VOCAB_SIZE,
        seed=SFT["seed"],
        config=MODEL_CONFIG,
    )
    _stop_at_end_of_turn(path)
    model, tokenizer = load(str(path))

    # mask_prompt: the loss covers the answers only. The prompts are random draws the model
    # cannot predict; training on them costs steps and teaches nothing about answering.
    rows = sft_rows(SFT["rows"], seed=SFT["data_seed"])
    dataset = ChatDataset(rows, tokenizer._tokenizer, mask_prompt=True)
    mx.random.seed(SFT["seed"])
    np.random.seed(SFT["seed"])  # mlx-lm's batch order
    model.unfreeze()
    lr, warmup = SFT["learning_rate"], SFT["warmup"]
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(0.0, lr, warmup),
            optim.cosine_decay(lr, SFT["iters"] - warmup, lr / 10),
        ],
        [warmup],
    )
    args = TrainingArgs(
        batch_size=SFT["batch_size"],
        iters=SFT["iters"],
        steps_per_report=50,
        steps_per_eval=SFT["iters"] + 1,
        steps_per_save=SFT["iters"] + 1,
        # With every weight trainable, the "adapter" file mlx-lm writes at the end holds all
        # parameters under their model names: it is the model's weights file.
        adapter_file=str(path / WEIGHTS),
        max_seq_length=64,
        val_batches=1,
    )
    train(
        model=model,
        optimizer=optim.Adam(learning_rate=schedule),
        train_dataset=CacheDataset(dataset),
        # mlx-lm < 0.30 requires a validation set (it validates at the first and last step);
        # scoring one batch changes nothing that is trained.
        val_dataset=CacheDataset(dataset),
        args=args,
    )
    recipe = {
        "name": MODEL_NAME,
        "model_config": MODEL_CONFIG,
        "vocab_size_target": VOCAB_SIZE,
        "sft": SFT,
        "mirror_rate": MIRROR_RATE,
        "blas": blas,
        "mlx": mx.__version__,
        "sha256": file_sha256(path / WEIGHTS),
        "rebuild": "mlx_lm_pref demo --rebuild-model",
    }
    (path / RECIPE).write_text(json.dumps(recipe, indent=2) + "\n")


def _stop_at_end_of_turn(path: Path) -> None:
    """Make generation stop at ``<|im_end|>`` (the chat template's end of turn), as chat
    models do by listing it in ``eos_token_id``; mlx-lm reads that list from config.json.
    """
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = [ids["</s>"], ids["<|im_end|>"]]
    (path / "config.json").write_text(json.dumps(config, indent=2))
