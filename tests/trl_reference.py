"""TRL 1.16 as the yardstick: the same tiny model, adapter and rows, run through TRL.

Helpers for ``test_trl_parity.py`` (and for digging into a mismatch by hand):

- ``load_hf_model``: the tiny mlx-lm model folder (``mlx_lm_pref.demo.tiny.build_model``) opened as a
  float32 ``LlamaForCausalLM``; ``check_hf_matches_mlx`` compares its logits with
  ``mlx_lm.load``'s.
- ``write_lora_pair``: one random LoRA adapter written twice, as an mlx-lm adapter folder
  (``adapter_config.json`` + ``adapters.safetensors``, what ``mlx_lm.lora`` saves and
  ``--adapter-path`` loads) and as a PEFT adapter folder; ``check_adapter_pair`` checks that
  both give the same logits.
- ``trl_eval(method, ...)`` (``trl_dpo_eval`` / ``trl_orpo_eval`` / ``trl_cpo_eval``): TRL's
  ``DPOTrainer.evaluate()`` (reference = the base model, float32, ``bf16=False``),
  ``trl.experimental.orpo.ORPOTrainer.evaluate()`` or ``trl.experimental.cpo.CPOTrainer
  .evaluate()`` on the same rows, with any config option passed through (``loss_type``,
  ``label_smoothing``, ``max_length``, ...), returning TRL's ``eval_*`` metrics with the
  prefix stripped.
- ``trl_tokens``: what TRL feeds the model per pair (ids after TRL's own truncation, and where
  each side's completion starts), the layout of ``mlx_lm_pref.data.Pair``;
  ``trl_sequence_logps``: the per-sequence log-probs TRL gets from them.
- ``trl_eval("kto", ...)`` (``trl_kto_eval``): ``KTOTrainer.evaluate()`` on unpaired rows
  (``parity_kto_rows``) or paired ones (TRL unpairs them), reference = the base model;
  ``trl_kto_tokens`` (through ``trl_tokens``): per row, the ids its collator feeds the model
  and its KL row, the layout of ``mlx_lm_pref.data.Example``.
- ``trl_first_batch_grads``: the LoRA gradient of TRL's ``compute_loss`` on the first
  evaluation batch, in mlx-lm's names and orientation.

Needs torch, transformers, peft and trl (the ``test`` extra plus ``pip install trl peft``); the
mlx side needs mlx-lm. Nothing here imports ``mlx_lm_pref`` except through ``tiny``.

mlx-lm's LoRA layer computes ``y = W x + scale * (x @ lora_a) @ lora_b`` with ``lora_a`` of
shape (in, r) and ``lora_b`` (r, out); PEFT computes ``y = W x + (alpha / r) * B(A(x))`` with
``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r). So ``A = lora_a.T``, ``B = lora_b.T``,
``alpha = scale * r``.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

# mlx-lm's default LoRA targets for Llama: every Linear inside a transformer block
# (``linear_to_lora_layers`` with ``keys=None`` collects them per block).
LLAMA_LORA_KEYS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


# --------------------------------------------------------------------------- models


def load_hf_model(model_path, peft_path=None, trainable=False):
    """The tiny model folder as a float32 ``LlamaForCausalLM`` in eval mode (optionally with a
    PEFT adapter on top, as a ``PeftModel``, whose LoRA weights require grad if ``trainable``).
    """
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    model.eval()
    if peft_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(peft_path), is_trainable=trainable)
        model.eval()
    return model


def load_hf_tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


def hf_logits(model, ids: Sequence[int]) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(ids)]), use_cache=False)
    return out.logits[0].float().numpy()


def mlx_logits(
    model_path, ids: Sequence[int], adapter_path=None, _cache={}
) -> np.ndarray:
    """Logits of ``mlx_lm.load(model_path, adapter_path=...)`` for one sequence."""
    import mlx.core as mx
    from mlx_lm import load

    key = (str(model_path), str(adapter_path))
    if key not in _cache:
        model, _ = load(
            str(model_path),
            adapter_path=None if adapter_path is None else str(adapter_path),
        )
        model.eval()
        _cache[key] = model
    logits = _cache[key](mx.array([list(ids)]))
    return np.array(logits[0].astype(mx.float32))


def sample_sequences(model_path, n=4) -> List[List[int]]:
    """A few token sequences of different lengths (chat-rendered and plain text)."""
    tok = load_hf_tokenizer(model_path)
    texts = [
        "Is the calm sky nice? Yes, the sky is nice.",
        "No, the sea is bad.",
        "leaf sun rose snow",
    ]
    seqs = [tok(t)["input_ids"] for t in texts]
    seqs.append(
        tok.apply_chat_template(
            [
                {"role": "user", "content": "Is the old plum nice?"},
                {"role": "assistant", "content": "Yes."},
            ],
            tokenize=True,
            return_dict=True,
        )["input_ids"]
    )
    return seqs[:n]


def max_logit_diff(
    model_path, adapter_mlx=None, adapter_peft=None, sequences=None
) -> float:
    """Largest |logit_hf - logit_mlx| over ``sequences`` (default: ``sample_sequences``)."""
    sequences = sequences or sample_sequences(model_path)
    hf = load_hf_model(model_path, adapter_peft)
    worst = 0.0
    for ids in sequences:
        a = hf_logits(hf, ids)
        b = mlx_logits(model_path, ids, adapter_mlx)
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


def check_hf_matches_mlx(model_path, tol=1e-4) -> float:
    diff = max_logit_diff(model_path)
    if not diff <= tol:
        raise AssertionError(
            f"HF and mlx-lm logits differ by {diff:.3g} (> {tol}) for {model_path}"
        )
    return diff


# --------------------------------------------------------------------------- adapters


def write_lora_pair(
    model_path,
    out_dir,
    rank: int = 4,
    scale: float = 2.0,
    num_layers: Optional[int] = None,
    seed: int = 0,
    std: float = 0.5,
) -> tuple:
    """One random LoRA adapter in both formats; returns ``(mlx_dir, peft_dir)``.

    ``num_layers`` counts from the last block, as mlx-lm's ``--num-layers`` does (None = all).
    Both ``lora_a`` and ``lora_b`` are random (a fresh mlx-lm/PEFT adapter has B = 0, which
    would make every adapter-vs-base comparison trivial).
    """
    import mlx.core as mx
    from peft import LoraConfig, get_peft_model

    model_path, out_dir = Path(model_path), Path(out_dir)
    config = json.loads((model_path / "config.json").read_text())
    L = config["num_hidden_layers"]
    num_layers = L if num_layers is None or num_layers < 0 else min(num_layers, L)
    layers = list(range(L - num_layers, L))
    rng = np.random.default_rng(seed)

    base = load_hf_model(model_path)
    shapes = {}
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            shapes[name] = (module.in_features, module.out_features)

    mlx_weights, peft_weights = {}, {}
    for i in layers:
        for key in LLAMA_LORA_KEYS:
            name = f"model.layers.{i}.{key}"
            fan_in, fan_out = shapes[name]
            a = (rng.standard_normal((fan_in, rank)) / np.sqrt(fan_in)).astype(
                np.float32
            )
            b = (std * rng.standard_normal((rank, fan_out)) / np.sqrt(rank)).astype(
                np.float32
            )
            mlx_weights[f"{name}.lora_a"] = mx.array(a)
            mlx_weights[f"{name}.lora_b"] = mx.array(b)
            peft_weights[name] = (a.T.copy(), b.T.copy())

    mlx_dir = out_dir / "mlx_adapter"
    mlx_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(mlx_dir / "adapters.safetensors"), mlx_weights)
    (mlx_dir / "adapter_config.json").write_text(
        json.dumps(
            {
                "model": str(model_path),
                "fine_tune_type": "lora",
                "num_layers": num_layers,
                "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0},
            },
            indent=2,
        )
    )

    peft_config = LoraConfig(
        r=rank,
        lora_alpha=scale * rank,
        lora_dropout=0.0,
        bias="none",
        target_modules=sorted({k.split(".")[-1] for k in LLAMA_LORA_KEYS}),
        layers_to_transform=layers if num_layers < L else None,
        task_type="CAUSAL_LM",
        init_lora_weights=True,
    )
    peft_model = get_peft_model(base, peft_config)
    with torch.no_grad():
        seen = 0
        for name, module in peft_model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in getattr(
                module, "lora_A", {}
            ):
                continue
            hf_name = name.split("base_model.model.", 1)[1]
            A, B = peft_weights[hf_name]
            module.lora_A["default"].weight.copy_(torch.from_numpy(A))
            module.lora_B["default"].weight.copy_(torch.from_numpy(B))
            seen += 1
    if seen != len(peft_weights):
        raise AssertionError(f"PEFT adapted {seen} layers, mlx-lm {len(peft_weights)}")
    peft_dir = out_dir / "peft_adapter"
    peft_model.save_pretrained(str(peft_dir))
    return mlx_dir, peft_dir


def check_adapter_pair(model_path, mlx_dir, peft_dir, tol=1e-4) -> dict:
    """Both adapters give the same logits, and they move the logits away from the base."""
    seqs = sample_sequences(model_path)
    diff = max_logit_diff(model_path, mlx_dir, peft_dir, seqs)
    base = load_hf_model(model_path)
    tuned = load_hf_model(model_path, peft_dir)
    moved = max(
        float(np.abs(hf_logits(base, s) - hf_logits(tuned, s)).max()) for s in seqs
    )
    if not diff <= tol:
        raise AssertionError(
            f"mlx-lm and PEFT adapters disagree: max logit diff {diff:.3g} > {tol}"
        )
    if not moved > 10 * tol:
        raise AssertionError(
            f"the random adapter barely changes the logits ({moved:.3g})"
        )
    return {"max_logit_diff": diff, "adapter_effect": moved}


# --------------------------------------------------------------------------- TRL runs


def _dataset(rows):
    from datasets import Dataset

    return Dataset.from_list([dict(r) for r in rows])


def _strip(metrics: dict, prefix="eval_") -> dict:
    out = {}
    for k, v in metrics.items():
        if (
            k.startswith(prefix)
            and k not in (f"{prefix}runtime",)
            and "per_second" not in k
        ):
            out[k[len(prefix) :]] = float(v)
    return out


def _training_args(config_class, output_dir, batch_size, beta, config):
    return config_class(
        output_dir=str(output_dir),
        per_device_eval_batch_size=batch_size,
        per_device_train_batch_size=batch_size,
        bf16=False,
        fp16=False,
        use_cpu=True,
        beta=beta,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **config,
    )


def make_dpo_trainer(
    model_path,
    peft_path,
    rows,
    batch_size=4,
    beta=0.1,
    output_dir=None,
    trainable=False,
    **config,
):
    """``DPOTrainer`` with reference = the base model (``loss_type`` defaults to sigmoid)."""
    from trl import DPOConfig, DPOTrainer

    config.setdefault("loss_type", "sigmoid")
    output_dir = output_dir or tempfile.mkdtemp(prefix="trl_dpo_")
    args = _training_args(DPOConfig, output_dir, batch_size, beta, config)
    policy = load_hf_model(model_path, peft_path, trainable)
    ref = load_hf_model(model_path)
    ds = _dataset(rows)
    return DPOTrainer(
        model=policy,
        ref_model=ref,
        args=args,
        train_dataset=ds,
        eval_dataset=ds,
        processing_class=load_hf_tokenizer(model_path),
    )


def make_orpo_trainer(
    model_path,
    peft_path,
    rows,
    batch_size=4,
    beta=0.1,
    output_dir=None,
    trainable=False,
    **config,
):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    output_dir = output_dir or tempfile.mkdtemp(prefix="trl_orpo_")
    args = _training_args(ORPOConfig, output_dir, batch_size, beta, config)
    ds = _dataset(rows)
    return ORPOTrainer(
        model=load_hf_model(model_path, peft_path, trainable),
        args=args,
        train_dataset=ds,
        eval_dataset=ds,
        processing_class=load_hf_tokenizer(model_path),
    )


def make_cpo_trainer(
    model_path,
    peft_path,
    rows,
    batch_size=4,
    beta=0.1,
    output_dir=None,
    trainable=False,
    **config,
):
    """``trl.experimental.cpo.CPOTrainer`` (``loss_type`` sigmoid, hinge, ipo, simpo or
    alphapo; ``cpo_alpha``, ``simpo_gamma``, ``alpha``, ``label_smoothing``)."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    output_dir = output_dir or tempfile.mkdtemp(prefix="trl_cpo_")
    args = _training_args(CPOConfig, output_dir, batch_size, beta, config)
    ds = _dataset(rows)
    return CPOTrainer(
        model=load_hf_model(model_path, peft_path, trainable),
        args=args,
        train_dataset=ds,
        eval_dataset=ds,
        processing_class=load_hf_tokenizer(model_path),
    )


def make_kto_trainer(
    model_path,
    peft_path,
    rows,
    batch_size=4,
    beta=0.1,
    output_dir=None,
    trainable=False,
    **config,
):
    """``KTOTrainer`` (``loss_type`` kto or apo_zero_unpaired; ``desirable_weight``,
    ``undesirable_weight``) with reference = the base model, passed explicitly: given a
    ``PeftModel`` and no ``ref_model``, TRL would copy the loaded adapter as a "ref" adapter
    and use that as the reference (ours is the base model, LoRA scales 0).

    ``rows`` are unpaired (``prompt``, ``completion``, ``label``) or paired (``chosen``,
    ``rejected``, optional ``prompt``; TRL extracts the prompt and unpairs them itself). The
    KL rows rotate within chunks of ``per_device_train_batch_size`` (= ``batch_size``, the
    evaluation batch too); ``train_sampling_strategy`` stays KTOConfig's "sequential".
    """
    from trl import KTOConfig, KTOTrainer

    config.setdefault("loss_type", "kto")
    output_dir = output_dir or tempfile.mkdtemp(prefix="trl_kto_")
    args = _training_args(KTOConfig, output_dir, batch_size, beta, config)
    if args.train_sampling_strategy != "sequential":
        raise AssertionError("KTO's KL rows need train_sampling_strategy='sequential'")
    policy = load_hf_model(model_path, peft_path, trainable)
    ref = load_hf_model(model_path)
    ds = _dataset(rows)
    return KTOTrainer(
        model=policy,
        ref_model=ref,
        args=args,
        train_dataset=ds,
        eval_dataset=ds,
        processing_class=load_hf_tokenizer(model_path),
    )


TRAINERS = {
    "dpo": make_dpo_trainer,
    "orpo": make_orpo_trainer,
    "cpo": make_cpo_trainer,
    "kto": make_kto_trainer,
}


def make_trainer(method, model_path, peft_path, rows, batch_size=4, beta=0.1, **config):
    return TRAINERS[method](model_path, peft_path, rows, batch_size, beta, **config)


def trl_eval(
    method, model_path, peft_path, rows, batch_size=4, beta=0.1, **config
) -> Dict[str, float]:
    """``evaluate()`` of TRL's ``method`` trainer (dpo, orpo, cpo, kto); eval_* metrics with the
    prefix stripped."""
    trainer = make_trainer(
        method, model_path, peft_path, rows, batch_size, beta, **config
    )
    return _strip(trainer.evaluate())


def trl_kto_eval(model_path, peft_path, rows, batch_size=4, beta=0.1, **config):
    return trl_eval("kto", model_path, peft_path, rows, batch_size, beta, **config)


def trl_dpo_eval(model_path, peft_path, rows, batch_size=4, beta=0.1, **config):
    return trl_eval("dpo", model_path, peft_path, rows, batch_size, beta, **config)


def trl_orpo_eval(model_path, peft_path, rows, batch_size=4, beta=0.1, **config):
    return trl_eval("orpo", model_path, peft_path, rows, batch_size, beta, **config)


def trl_cpo_eval(model_path, peft_path, rows, batch_size=4, beta=0.1, **config):
    return trl_eval("cpo", model_path, peft_path, rows, batch_size, beta, **config)


def first_eval_batch(trainer) -> dict:
    """The first batch TRL's evaluation loop feeds ``compute_loss``."""
    return next(iter(trainer.get_eval_dataloader()))


def trl_first_batch_grads(trainer) -> Dict[str, np.ndarray]:
    """d loss / d LoRA weights of ``trainer.compute_loss`` on the first evaluation batch (a
    trainer built with ``trainable=True``), keyed and shaped as mlx-lm's adapter weights:
    ``model.layers.{i}.{module}.lora_a`` (in, r) and ``.lora_b`` (r, out)."""
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, first_eval_batch(trainer))
    loss.backward()
    out = {}
    for name, param in model.named_parameters():
        if "lora_" not in name:
            continue
        if param.grad is None:
            raise AssertionError(f"{name} got no gradient")
        hf_name, kind = name.split("base_model.model.", 1)[1].split(".lora_")
        key = f"{hf_name}.lora_{kind.split('.')[0].lower()}"
        out[key] = param.grad.detach().float().numpy().T.copy()
    return out


# --------------------------------------------------------------------------- diagnostics


def trl_tokens(trainer) -> List[dict]:
    """Per pair, the id sequences TRL's trainer feeds the model (after its truncation) and
    where each side's completion starts: ``{"chosen", "rejected", "chosen_start",
    "rejected_start"}`` (the fields of ``mlx_lm_pref.data.Pair``). DPO is read from its
    collator (which truncates), ORPO/CPO from their tokenized dataset (first label that is
    not -100). KTO: see ``trl_kto_tokens``."""
    if "label" in trainer.eval_dataset.column_names:  # KTOTrainer
        return trl_kto_tokens(trainer)
    if "prompt_ids" in trainer.eval_dataset.column_names:  # DPOTrainer
        out = []
        for ex in trainer.eval_dataset:
            batch = trainer.data_collator([ex])
            row = {}
            for k, side in enumerate(("chosen", "rejected")):
                n = int(batch["attention_mask"][k].sum())
                row[side] = batch["input_ids"][k][:n].tolist()
                mask = batch["completion_mask"][k][:n].tolist()
                row[f"{side}_start"] = mask.index(1) if 1 in mask else n
            out.append(row)
        return out
    out = []
    for ex in trainer.eval_dataset:
        row = {}
        for side in ("chosen", "rejected"):
            labels = ex[f"{side}_labels"]
            row[side] = list(ex[f"{side}_input_ids"])
            row[f"{side}_start"] = next(
                (i for i, l in enumerate(labels) if l != -100), len(labels)
            )
        out.append(row)
    return out


def trl_kto_tokens(trainer) -> List[dict]:
    """Per row of a ``KTOTrainer``'s evaluation set (after TRL's unpairing and the drop of
    rows whose prompt fills ``max_length``), what its collator feeds the model:
    ``{"sequence", "start", "label", "kl_sequence"}`` (the fields of
    ``mlx_lm_pref.data.Example``). ``sequence`` is prompt + completion cut at ``max_length``,
    ``start`` the first completion position, ``kl_sequence`` the row's prompt + its KL
    completion (the previous row's within its chunk of ``per_device_train_batch_size``),
    cut the same way, or None for a loss without the KL term (apo_zero_unpaired)."""
    out = []
    for ex in trainer.eval_dataset:
        batch = trainer.data_collator([ex])
        n = int(batch["attention_mask"][0].sum())
        mask = batch["completion_mask"][0][:n].tolist()
        row = {
            "sequence": batch["input_ids"][0][:n].tolist(),
            "start": mask.index(1) if 1 in mask else n,
            "label": bool(batch["label"][0]),
            "kl_sequence": None,
        }
        if "KL_input_ids" in batch:
            m = int(batch["KL_attention_mask"][0].sum())
            row["kl_sequence"] = batch["KL_input_ids"][0][:m].tolist()
            kl_mask = batch["KL_completion_mask"][0][:m].tolist()
            kl_start = kl_mask.index(1) if 1 in kl_mask else m
            if kl_start != min(len(ex["prompt_ids"]), m):
                raise AssertionError(
                    "a KL row's completion does not start after its prompt"
                )
        out.append(row)
    return out


def trl_kto_train_batches(trainer) -> List[List[List[int]]]:
    """One epoch of a ``KTOTrainer``'s training batches in the order it trains on them
    (its sequential sampler): per batch, the rows' ids, then their KL rows' ids (right
    padding stripped)."""

    def rows(ids, mask):
        return [r[: int(m.sum())].tolist() for r, m in zip(ids, mask)]

    out = []
    for batch in trainer.get_train_dataloader():
        seqs = rows(batch["input_ids"], batch["attention_mask"])
        if "KL_input_ids" in batch:
            seqs += rows(batch["KL_input_ids"], batch["KL_attention_mask"])
        out.append(seqs)
    return out


def trl_dpo_tokens(trainer) -> List[dict]:
    return trl_tokens(trainer)


def trl_orpo_tokens(trainer) -> List[dict]:
    return trl_tokens(trainer)


def sequence_logps(model, ids: Sequence[int], start: int) -> tuple:
    """(sum, count) of log pi(token_j | prefix) over tokens j in [start, len(ids)); start >= 1."""
    with torch.no_grad():
        logits = (
            model(input_ids=torch.tensor([list(ids)]), use_cache=False)
            .logits[0]
            .float()
        )
    logps = torch.log_softmax(logits[:-1], -1).gather(
        -1, torch.tensor(ids[1:])[:, None]
    )[:, 0]
    picked = logps[max(start, 1) - 1 :]
    return float(picked.sum()), int(picked.numel())


def trl_sequence_logps(model, tokens: List[dict]) -> List[dict]:
    """Summed and mean completion log-probs of each row in ``tokens`` (from ``trl_tokens``)."""
    out = []
    for row in tokens:
        r = {}
        for side in ("chosen", "rejected"):
            start = row[f"{side}_start"]
            s, n = sequence_logps(model, row[side], start)
            r[side] = {"sum": s, "mean": s / n, "n": n}
        out.append(r)
    return out


# --------------------------------------------------------------------------- data

NOUNS = ["sky", "sea", "leaf", "sun", "rose", "snow", "coal", "lime", "plum", "sand"]
ADJ = ["calm", "bright", "small", "old", "quiet", "cold", "warm", "tall"]


def parity_rows(
    n, seed, conversational=False, prompt=True, system_every=0, boundary_every=0
):
    """Preference rows of varied lengths (so that batch composition matters for token-mean
    metrics). Explicit standard prompts end with a space half of the time (a BPE merge across
    the prompt/completion boundary); ``system_every`` > 0 puts a system message on every k-th
    conversational row; ``boundary_every`` > 0 makes every k-th explicit standard row's
    rejected answer start with a space, so the prompt's trailing space merges into the chosen
    answer's first token but not into the rejected one's (chosen and rejected then disagree on
    where the prompt ends)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        noun, adj = rng.choice(NOUNS), rng.choice(ADJ)
        extra = " ".join(rng.choice(ADJ) for _ in range(rng.randint(0, 6)))
        q = f"Is the {adj} {noun} nice{(' and ' + extra) if extra else ''}?"
        tail = " ".join(
            f"the {rng.choice(NOUNS)} is {rng.choice(ADJ)}"
            for _ in range(rng.randint(0, 3))
        )
        good = f"Yes, the {noun} is nice{(', ' + tail) if tail else ''}."
        bad = f"No, the {rng.choice(NOUNS)} is {rng.choice(ADJ)}."
        if conversational:
            p = [{"role": "user", "content": q}]
            if system_every and i % system_every == 0:
                p = [{"role": "system", "content": f"Be {rng.choice(ADJ)}."}] + p
            c = [{"role": "assistant", "content": good}]
            r = [{"role": "assistant", "content": bad}]
            rows.append(
                {"prompt": p, "chosen": c, "rejected": r}
                if prompt
                else {"chosen": p + c, "rejected": p + r}
            )
        else:
            sep = " " if i % 2 else ""
            if boundary_every and i % boundary_every == 0:
                sep, bad = " ", " " + bad
            rows.append(
                {
                    "prompt": q + sep,
                    "chosen": ("" if sep else " ") + good,
                    "rejected": ("" if sep else " ") + bad,
                }
                if prompt
                else {"chosen": f"{q} {good}", "rejected": f"{q} {bad}"}
            )
    return rows


# KTO labels per row (True: the pair's chosen answer, desirable; False: its rejected one), by
# row index modulo 16: in batches of 4, rows 0-3 mixed, 4-7 all undesirable, 8-11 mixed,
# 12-15 all desirable (batches with one label report no rewards/margins in TRL).
KTO_LABELS = (
    [True, False, True, True] + [False] * 4 + [False, True, False, True] + [True] * 4
)


def parity_kto_rows(
    n,
    seed,
    conversational=False,
    prompt=True,
    system_every=0,
    boundary_every=0,
    paired=False,
    labels=KTO_LABELS,
):
    """KTO rows from ``parity_rows(n, ...)``. With an explicit prompt: ``n`` unpaired rows
    ``{"prompt", "completion", "label"}``, row i the chosen answer (label True) or the
    rejected one (False) as ``labels[i % len(labels)]`` says; ``paired=True`` keeps the pairs
    ``{"prompt", "chosen", "rejected"}`` instead. ``prompt=False``: ``n`` paired rows without a
    prompt, ``{"chosen", "rejected"}``. Paired rows are unpaired by TRL (and by us) into
    ``2 n`` rows: per block of 1000 pairs (``datasets``' map batch) every chosen completion
    first, then every rejected one."""
    rows = parity_rows(
        n,
        seed,
        conversational=conversational,
        prompt=prompt,
        system_every=system_every,
        boundary_every=boundary_every,
    )
    if paired or not prompt:
        return rows
    out = []
    for i, row in enumerate(rows):
        label = bool(labels[i % len(labels)])
        out.append(
            {
                "prompt": row["prompt"],
                "completion": row["chosen"] if label else row["rejected"],
                "label": label,
            }
        )
    return out


def hide_bos(model_path):
    """Make a ``bos=False`` tiny model's tokenizer *name* ``<s>`` as its BOS token without
    adding it when encoding (like GPT-2-style tokenizers: a ``bos_token`` that ``encode``
    never inserts). The chat template then renders ``<s>`` as text."""
    path = Path(model_path) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["bos_token"] = "<s>"
    path.write_text(json.dumps(config, indent=2))
    return model_path


def parity_corpus():
    rows = parity_rows(300, 123)
    return [r["prompt"] + r["chosen"] + " " + r["rejected"] for r in rows]


def write_jsonl(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
