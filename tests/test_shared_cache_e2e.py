"""Nodes of one host share the frozen weights, end to end: `flwr run` with three simulated
SuperNodes on the session's real SuperLink. The weights cross the wire and land on disk once,
the metrics count what one node per host would have downloaded apart from what was sent, and
an ephemeral run leaves no weights behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.flower_runtime import LocalFederation, tiny_run_config

pytestmark = pytest.mark.xdist_group("shared-cache")
NODES = 3


def _entries(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if not p.name.startswith("."))


def test_nodes_on_one_host_get_the_weights_once_and_an_ephemeral_run_removes_them(
    federation: LocalFederation, tmp_path: Path
) -> None:
    # Krum's end-to-end run (a Flower aggregator behind the same mixin as FedMedian and
    # FedTrimmedAvg, checked against the paper in test_algorithms.py): it keeps one client's
    # update, which must move the delivered model.
    config = tiny_run_config(tmp_path, "shared", num_partitions=NODES, eval_examples=2,
                             algorithm="krum")  # fmt: skip
    rows = federation.run_to_end(config, supernodes=NODES)
    first = rows[1]
    assert first["clients_sampled"] == NODES and first["clients_failed"] == 0
    assert first["eval_adapfu_gsm8k_loss_vs_base"] != 0.0
    per_node = first["bytes_model_download"] / NODES
    assert first["bytes_model_download_sent"] == pytest.approx(per_node, rel=0.01)
    assert first["bytes_model_download_sent"] < first["bytes_model_download"]
    sent = [json.loads(line) for line in (tmp_path / "shared" / "sent_arrays.jsonl").open()]
    assert sum("base" in m["arrays"] for m in sent) == 1  # one message carried the weights
    cache = Path(str(config["cache-dir"]))
    store = cache / "weights"
    (digest,) = _entries(store)  # stored once, for all three nodes
    assert not (cache / "nodes").exists()
    assert not list((store / ".meta" / digest).glob("run-*"))  # the run released it
    assert (store / ".meta" / digest / "last-use").is_file()

    ephemeral = tiny_run_config(tmp_path, "ephemeral", num_partitions=NODES, cache_ephemeral=1)
    rows = federation.run_to_end(ephemeral, supernodes=NODES)
    assert rows[1]["bytes_model_download_sent"] > 0  # a fresh cache: it was shipped
    assert _entries(Path(str(ephemeral["cache-dir"])) / "weights") == []
