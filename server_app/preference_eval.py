"""Held-out preference metrics of AdapEmu and AdapFu: DPO loss, reward accuracy, margin.

The implicit reward ``beta * log(pi(y|x) / pi_ref(y|x))`` needs a fixed reference; here it
is the model before any federated training, the frozen network with every LoRA disabled
(the base model for AdapFu, the compressed model for AdapEmu). That keeps "SFT only" and
"SFT then DPO" comparable on one scale, and is the same after a resumed run. Reward
accuracy is the share of held-out pairs whose reward ranks the chosen answer above the
rejected one (ties count half). Each pair's margin goes to ``preference_heldout.jsonl`` so that
two rounds (before and after DPO) or two runs compare on the same pairs
(``python -m bench.alignment_table``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from peft import PeftModel

from federation.preferences import pair_scores as preference_pair_scores
from federation.preferences import preference_metrics, reference_logps, split_shared
from federation.run_config import RunConfig
from models.fedbiot_models import FedBiOTModels
from server_app.evaluation.confidence import Interval, ratio, wilson
from task_data import collate_pairs, tokenize_pairs


class PreferenceEvaluator:
    """Scores the server's models on ``preference-eval-pairs`` held-out pairs."""

    def __init__(self, config: RunConfig, models: FedBiOTModels) -> None:
        self.models = models
        self.beta = config.dpo_beta
        _, held_out = split_shared(config)
        pairs = held_out[: config.preference_eval_pairs]
        examples = tokenize_pairs(models.tokenizer, pairs, config.seq_length)
        pad = models.tokenizer.pad_token_id
        self.batches = [
            collate_pairs(examples[i : i + config.batch_size], pad)
            for i in range(0, len(examples), config.batch_size)
        ]
        self._reference: dict[str, list[torch.Tensor]] = {}

    def _variants(self) -> dict[str, PeftModel]:
        out = {"adapfu": self.models.full.peft}
        if self.models.has_emulator:
            out["adapemu"] = self.models.compressed.peft
        return out

    def __call__(self, server_round: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """``eval_<variant>_pref_{loss,reward_accuracy,reward_margin}`` of the current models,
        the last two with 95 % intervals, and one ``preference_heldout.jsonl`` row per model."""
        out: dict[str, float] = {}
        rows: list[dict[str, Any]] = []
        for name, model in self._variants().items():
            if name not in self._reference:
                with model.disable_adapter(), torch.no_grad():
                    self._reference[name] = reference_logps(model, self.batches)
            with torch.no_grad():
                result = preference_metrics(model, self.batches, self._reference[name], self.beta)
            out[f"eval_{name}_pref_loss"] = result.loss
            out |= accuracy_interval(result.margins).keys(f"eval_{name}_pref_reward_accuracy")
            # The bootstrap's own seed (0), as every interval here and bench.alignment_table
            # use: a run's seed would give the same margins a different interval.
            margin = ratio(result.margins, [1.0] * result.pairs)
            out |= margin.keys(f"eval_{name}_pref_reward_margin")
            rows.append({"round": server_round, "variant": name, "margins": result.margins})
        return out, rows


def pair_scores(margins: Sequence[float]) -> list[float]:
    """``federation.preferences.pair_scores`` on a list of margins (a run's saved rows)."""
    return preference_pair_scores(torch.tensor(margins, dtype=torch.float64)).tolist()


def accuracy_interval(margins: Sequence[float]) -> Interval:
    """Reward accuracy with Wilson's interval; with ties (a model equal to its reference, whose
    margins are all 0) the per-pair scores are not 0/1, so a bootstrap over pairs instead."""
    scores = pair_scores(margins)
    if 0.5 in scores:
        return ratio(scores, [1.0] * len(scores))
    return wilson(int(sum(scores)), len(scores))
