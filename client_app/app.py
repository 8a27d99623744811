"""The ClientApp: trains the adapter LoRA on the node's own data.

A node receives the frozen weights the first time it is sampled (and stores them in its
cache): the compressed model for FedBiOT, FedOT and offsite-tuning, the full model for the
methods that put LoRA on all of it. Each round it trains the LoRA it receives and returns
only that (``client_app/round_handlers.py``). FedBiAlign asks each node for its memory
budget once and sends it an adapter depth; KD-FedLLM and split learning have message types
of their own (``client_app/exchange.py``).

Each handler imports its module when a message of its kind arrives. A deployed SuperNode
starts a process per message, and the model offer, the run's release and the budget question
load no model: importing torch, transformers, peft and the data libraries for them cost
seconds of CPU per message and node.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from federation.messages import BUDGET_ACTION, OFFER_ACTION, RELEASE_ACTION, budget_reply
from federation.run_config import RunConfig
from models.depth_memory import node_budget_gb, parse_budget_map

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """K local steps (SFT, or DPO in a DPO round) on the trained LoRA; reply with it only."""
    from client_app.round_handlers import train_round

    return train_round(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Response-token loss of the node's model (AdapEmu with an emulator) on its held-out
    split (the union's, for the single-client baselines)."""
    from client_app.round_handlers import evaluate_round

    return evaluate_round(msg, context)


@app.query(BUDGET_ACTION)
def memory_budget(msg: Message, context: Context) -> Message:
    """FedBiAlign asks each node once for its memory budget: node config
    ``memory-budget-gb``, else (simulation) the run config's entry for its partition."""
    config = RunConfig.from_flower(context.run_config)
    budgets = parse_budget_map(config.memory_budgets)
    return budget_reply(msg, node_budget_gb(context.node_config, budgets))


@app.query(OFFER_ACTION)
def model_offer(msg: Message, context: Context) -> Message:
    """The server offers the frozen weights by digest before a node's first message
    (``strategies/shipment.py``, ``client_app/model_offer.py``)."""
    from client_app.model_offer import offer_reply

    return offer_reply(msg, context)


@app.query(RELEASE_ACTION)
def run_release(msg: Message, context: Context) -> Message:
    """The run ended: the node drops the run's marks on its store."""
    from client_app.weight_store import release_reply

    return release_reply(msg, context)


@app.train("kdfed")
def kdfed(msg: Message, context: Context) -> Message:
    """KD-FedLLM: local steps with the KL term, then soft labels on the public texts (never
    parameters)."""
    from client_app.exchange import kdfed_train

    return kdfed_train(msg, context)


@app.train("split")
def split(msg: Message, context: Context) -> Message:
    """Split learning: finish the previous step with the server's gradient, send the next
    activations."""
    from client_app.exchange import split_step

    return split_step(msg, context)
