"""The demo's task on a real instruct model: answer an open question in one sentence.

Small instruct models answer "Tell me about volcanoes." with a paragraph, cut off at the
token limit (SmolLM2-135M-Instruct: 0 of 30 held-out questions answered in one sentence, 52
words on average). The preference data is built from the model's own greedy answers: chosen =
the answer's first sentence, rejected = the whole answer. Nothing is written by hand, so the
task runs on any chat model (``--model``): only its own answers are ever trained on.

Success on a held-out question (topics never seen in training) = one sentence, finished, and
fluent: the base model's mean log-loss per token of the answer stays under ``FLUENT`` nats
(the base's own greedy first sentences: ~0.5; the degenerate answers of DPO without an SFT
term, "policym interpre cult [ FIU ...", ~4.9). A collapsed answer that happens to be short
fails.
"""

import json
import re
from pathlib import Path

TEMPLATES = [
    "Tell me about {t}.",
    "What can you tell me about {t}?",
    "Explain {t}.",
    "What is interesting about {t}?",
    "What should I know about {t}?",
]
TOPICS = [
    "volcanoes", "photosynthesis", "the moon", "honey bees", "rainbows", "black holes",
    "the Roman Empire", "coffee", "jazz music", "the human heart", "glaciers",
    "electric cars", "chess", "the Great Wall of China", "sleep", "octopuses",
    "solar power", "the printing press", "tea", "earthquakes", "vaccines", "the internet",
    "dinosaurs", "ocean tides", "baking bread", "penguins", "the Olympic Games",
    "democracy", "recycling", "the water cycle", "the Amazon rainforest", "mushrooms",
    "the piano", "gravity", "the stock market", "bicycles", "the Sahara desert",
    "dolphins", "composting", "telescopes", "origami", "thunderstorms",
    "the French Revolution", "yoga", "coral reefs", "cheese", "the immune system",
    "wind turbines", "the violin", "ancient Egypt", "butterflies", "the speed of light",
    "chocolate", "hurricanes", "Mount Everest", "the brain", "elephants", "paper",
    "the moon landing", "rice", "the solar system", "owls", "DNA", "the Renaissance",
    "maple syrup", "lightning", "soccer", "the Nile", "bamboo", "comets", "wolves",
    "cameras", "salt", "the Arctic", "trains", "spiders", "pottery", "deserts",
]  # fmt: skip
# Topics never trained on: held-out questions (judged before and after) and validation.
HELD_OUT_TOPICS = 6  # x 5 templates = 30 questions
VALID_TOPICS = 4  # 20 validation pairs
MAX_TOKENS = 64  # the base answers' length: most are cut here, mid-paragraph
FLUENT = 2.0  # nats per token under the base model (see the module's docstring)

SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def questions(topics) -> list:
    return [t.format(t=topic) for topic in topics for t in TEMPLATES]


def split() -> dict:
    """``{"held_out", "valid", "train"}`` -> questions, split by topic (fixed)."""
    held, valid = HELD_OUT_TOPICS, HELD_OUT_TOPICS + VALID_TOPICS
    return {
        "held_out": questions(TOPICS[:held]),
        "valid": questions(TOPICS[held:valid]),
        "train": questions(TOPICS[valid:]),
    }


def first_sentence(text: str):
    """The text up to its first sentence end, or None if it has none."""
    match = SENTENCE_END.search(text.strip())
    return text.strip()[: match.end()] if match else None


def one_sentence(text: str) -> bool:
    """One finished sentence of at least three words, on one line."""
    text = text.strip()
    return "\n" not in text and first_sentence(text) == text and len(text.split()) >= 3


def judge_reward(prompts, completions, completion_ids=None, **kwargs) -> list:
    """1.0 for a one-sentence answer, else 0.0: the GRPO reward / ``evaluate`` judge
    signature (fluency is the demo's second check, on the base model's log-loss)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(one_sentence(t)) for t in texts]


def pairs(questions_, answers: dict) -> list:
    """Preference rows (conversational) from the base model's answers: chosen = the first
    sentence, rejected = the whole answer. Answers already one sentence teach nothing, and a
    first sentence that is a fragment ("The volcano.") is no example: both are left out.
    """
    rows = []
    for q in questions_:
        answer = answers[q].strip()
        chosen = first_sentence(answer)
        if chosen is None or chosen == answer or not one_sentence(chosen):
            continue
        rows.append(
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": answer}],
            }
        )
    return rows


def unpaired(rows: list) -> list:
    """KTO rows: each pair's chosen (desirable) and rejected (undesirable)."""
    out = []
    for row in rows:
        for key, label in (("chosen", True), ("rejected", False)):
            out.append(
                {"prompt": row["prompt"], "completion": row[key], "label": label}
            )
    return out


def write_data(folder: Path, rows: dict, kto: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, split_rows in rows.items():
        split_rows = unpaired(split_rows) if kto else split_rows
        text = "".join(json.dumps(r) + "\n" for r in split_rows)
        (folder / f"{name}.jsonl").write_text(text)
    return folder
