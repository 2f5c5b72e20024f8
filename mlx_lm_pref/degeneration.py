"""A warning when a DPO or KTO run unlearns its chosen answers while its margins grow.

DPO's loss only asks the chosen answer to gain on the rejected one relative to the
reference; it is met as well by pushing both down, and where chosen and rejected share most
of their tokens (chosen a prefix of rejected, answers that differ in a few words) that is
the easy way: the report line looks perfect (loss near 0, accuracies 1, margins growing)
while the model's own answers turn into word salad (Pal et al., 2024, "Smaug: fixing
failure modes of preference optimisation with DPO-positive"; Razin et al., 2024,
"Unintentional unalignment"). KTO can do the same to its desirable rows.

The signal is the validation ``logps/chosen`` against the first validation's (the model as
training starts): the fall per token of the chosen completions. A healthy run moves it by
a fraction of a nat per token; the degenerate runs measured fall by several (the numbers
are in ``FALL_PER_TOKEN``'s comment). A resumed run has no first validation of its own and
is not watched.
"""

from typing import Optional

from .data import Pair

# Nats per chosen token, measured on the built-in demo model (validation every 10 steps,
# fall since the first validation; greedy samples from log_completions):
# - the demo's recipes, 80 steps: DPO (beta 2, lr 3e-5) -0.05 to -0.11 (logps/chosen
#   rises), KTO -0.05 to -0.13; answers stay polite and fluent (100% held-out success);
# - DPO at TRL's beta 0.1 and lr 1e-3, the demo's pairs: 4.3 at step 10 (answers
#   "course course red red red la...", then "OfOfOfOf..."), 3.2 to 4.2 after;
# - the same with rejected = chosen + more words (chosen's end is rejected's middle, as
#   in the failure reported on SmolLM2-135M-Instruct, -21 -> -290 over ~20-token answers,
#   ~13 per token): 5.5 at step 10 (answer "."), 10.9 at step 50 (""); at lr 1e-4 0.08,
#   0.52, then 1.15 at step 30, where the answers began to trail off ("lamp.....") and
#   mean_token_accuracy had fallen from 0.97 to 0.65.
FALL_PER_TOKEN = 1.0
WATCHED = ("dpo", "kto")


def chosen_tokens(dataset) -> float:
    """The mean length in tokens of a validation set's chosen (KTO: desirable)
    completions."""
    lengths = [
        (
            len(item.chosen) - item.chosen_start
            if isinstance(item, Pair)
            else len(item.sequence) - item.start
        )
        for item in (dataset[k] for k in range(len(dataset)))
        if isinstance(item, Pair) or item.label
    ]
    return sum(lengths) / max(len(lengths), 1)


class DegenerationWatch:
    """Called with each validation's metrics; returns the warning, once, when the chosen
    completions' log-probability has fallen by more than ``FALL_PER_TOKEN`` nats per token
    since the first validation while ``rewards/margins`` grew."""

    def __init__(self, method: str, tokens: float):
        self.method, self.tokens = method, max(tokens, 1.0)
        self.first, self.warned = None, False

    def __call__(self, metrics: dict) -> Optional[str]:
        if "logps/chosen" not in metrics or "rewards/margins" not in metrics:
            return None
        if self.first is None:
            self.first = metrics
            return None
        before, now = self.first["logps/chosen"], metrics["logps/chosen"]
        fall = (before - now) / self.tokens
        grew = metrics["rewards/margins"] > self.first["rewards/margins"]
        if self.warned or not grew or not fall > FALL_PER_TOKEN:
            return None
        self.warned = True
        fix = "lower the learning rate or raise beta"
        if self.method == "dpo":
            fix += ", or add an SFT term on the chosen answers (rpo_alpha: 1)"
        return (
            f"warning: validation logps/chosen fell from {before:.4g} to {now:.4g} since "
            f"the first validation ({fall:.2g} nats per chosen token) while "
            f"rewards/margins grew to {metrics['rewards/margins']:.4g}: the run is "
            "unlearning the chosen answers along with the rejected ones, and the model's "
            f"own answers are likely degenerate (log_completions shows them); {fix}."
        )
