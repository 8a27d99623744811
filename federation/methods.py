"""What each federated method means: its layout, its distillation schedule, its clients.

One place answers, for a ``method`` of the run config, which blocks clients train, whether
the server distils an emulator (before round 1 only, or after every round too), whether the
FedBiOT proximal term applies, how many clients take part and whether they aggregate.
Server and clients both read it, so they never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from federation.run_config import RunConfig
from models.layout import Layout, fedbiot_layout, fedot_layout, full_layout


@dataclass(frozen=True)
class MethodPlan:
    """The behaviour of one method, independent of the model's depth."""

    name: str
    emulated: bool  # clients get a compressed model with an emulator
    distill_every_round: bool  # FedBiOT; FedOT and offsite-tuning distil once, before round 1
    uses_prox_epsilon: bool  # FedBiOT's proximal term on the adapter's effective weights
    single_client: bool  # one client, holding the union of every partition's data
    aggregates: bool  # False: every client keeps its own model (local-only baseline)

    def layout(self, config: RunConfig, num_blocks: int) -> Layout:
        """Adapter, emulator and dropped blocks for a model of ``num_blocks`` blocks."""
        if self.name in ("fedbiot", "fedbialign"):
            return fedbiot_layout(num_blocks, config.adapter_layers, config.drop_rate)
        if self.name in ("fedot", "offsite"):
            return fedot_layout(num_blocks, config.drop_rate)
        return full_layout(num_blocks)


_PLANS = {
    "fedbiot": MethodPlan("fedbiot", True, True, True, False, True),
    # FedBiOT plus DPO after SFT, per-client adapter depth and optional client-level DP.
    "fedbialign": MethodPlan("fedbialign", True, True, True, False, True),
    "fedot": MethodPlan("fedot", True, False, False, False, True),
    "offsite": MethodPlan("offsite", True, False, False, True, True),
    "fedit": MethodPlan("fedit", False, False, False, False, True),
    "local": MethodPlan("local", False, False, False, False, False),
    "central": MethodPlan("central", False, False, False, True, True),
    # Logit exchange and split learning: LoRA on the full model, their own server loops
    # (server_app/kdfed.py, server_app/split_learning.py).
    "kdfed": MethodPlan("kdfed", False, False, False, False, True),
    "split": MethodPlan("split", False, False, False, False, True),
}


def method_plan(config: RunConfig) -> MethodPlan:
    """The plan of ``config.method`` (the run config has already validated the name)."""
    return _PLANS[config.method]
