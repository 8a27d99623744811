"""bench.fedbiot_claims' quick mode: real ``flwr run`` federations on the tiny model, per-text
scores pooled over seeds, paired claims with intervals and a verdict, and the report."""

import json
from pathlib import Path

import numpy as np

from bench.claims_report import pooled, verdict
from bench.fedbiot_claims import main
from server_app.evaluation.confidence import Interval


def test_claims_quick_mode_pairs_methods_on_the_same_texts(tmp_path: Path) -> None:
    first = ["--model", "tiny-llama", "--quick", "--rows", "fedbiot-b0.2", "split",
             "--partitions", "iid", "--seeds", "0", "--jobs", "2",
             "--out", str(tmp_path)]  # fmt: skip
    main(first)
    # A second part of the grid: its report covers every finished row, not only its own.
    argv = [*first[:3], "--rows", "kdfed", *first[6:]]
    report = main(argv)
    document = json.loads((tmp_path / "claims.json").read_text())
    assert document["command"] == "python -m bench.fedbiot_claims " + " ".join(argv)
    assert sorted(document["rows"]) == ["fedbiot-b0.2", "kdfed", "split"]
    models = {(e["method"], e["model"]): e for e in document["table"]}
    assert set(models) == {("base", "base"), ("fedbiot-b0.2", "adapemu"),
                           ("fedbiot-b0.2", "adapfu"), ("split", "adapfu"),
                           ("kdfed", "adapfu")}  # fmt: skip
    runs = tmp_path / "runs"
    fedbiot = pooled([runs / "fedbiot-b0.2-iid-s0"], "adapfu")
    split = pooled([runs / "split-iid-s0"], "adapfu")
    kd = pooled([runs / "kdfed-iid-s0"], "adapfu")
    assert fedbiot is not None and split is not None and kd is not None
    # The table's loss is the run's own per-token loss; every method scored the same texts.
    entry = models[("fedbiot-b0.2", "adapfu")]
    assert entry["loss"] == fedbiot.nll.sum() / fedbiot.tokens.sum()
    assert entry["texts"] == 6 and entry["ranked_texts"] == 4
    assert np.array_equal(fedbiot.tokens, split.tokens) and np.array_equal(kd.tokens, split.tokens)
    assert entry["bytes_per_client"] > 0 and entry["client_seconds_per_example"] > 0
    # Split learning's clients report client_seconds, and its server half is server compute.
    assert models[("split", "adapfu")]["client_seconds_per_example"] > 0
    assert models[("split", "adapfu")]["server_seconds"] > 0
    assert models[("kdfed", "adapfu")]["server_seconds"] > 0
    verdicts = {c["claim"]: c for c in document["claims"]}
    versus_kd = verdicts["split learning > KD-FedLLM"]
    difference = split.nll.sum() / split.tokens.sum() - kd.nll.sum() / kd.tokens.sum()
    assert versus_kd["loss_difference"] == difference
    low, high = versus_kd["loss_difference_ci_low"], versus_kd["loss_difference_ci_high"]
    assert low <= difference <= high
    expected = "agrees" if high < 0 else "disagrees" if low > 0 else "cannot tell"
    assert versus_kd["verdict_loss"] == expected  # a lower loss is better
    assert verdicts["federated (FedIT) > local-only"]["verdict"] == "not run"
    assert verdicts["FedBiOT AdapFu >= FedOT AdapFu"]["verdict"] == "not run"
    # The untrained model: one row, scored on the same texts, and the claim against it.
    base = pooled([runs / "fedbiot-b0.2-iid-s0"], "base")
    assert base is not None and np.array_equal(base.tokens, fedbiot.tokens)
    assert models[("base", "base")]["loss"] == base.nll.sum() / base.tokens.sum()
    versus_base = verdicts["FedBiOT AdapFu > base (beta 0.2)"]
    to_base = fedbiot.nll.sum() / fedbiot.tokens.sum() - base.nll.sum() / base.tokens.sum()
    assert versus_base["loss_difference"] == to_base
    assert "| split learning > KD-FedLLM | iid |" in report.read_text()


def test_verdict_reads_the_interval_on_the_better_side() -> None:
    assert verdict(Interval(0.05, 0.01, 0.09), higher_is_better=True) == "agrees"
    assert verdict(Interval(0.05, 0.01, 0.09), higher_is_better=False) == "disagrees"
    assert verdict(Interval(-0.2, -0.3, -0.1), higher_is_better=False) == "agrees"
    assert verdict(Interval(0.01, -0.02, 0.04), higher_is_better=True) == "cannot tell"
    assert verdict(Interval(np.nan, np.nan, np.nan), higher_is_better=True) == "cannot tell"


def test_local_only_pools_its_client_models_per_text(tmp_path: Path) -> None:
    """Local-only has one model per client: a text's loss sums their NLL and tokens, and its
    accuracy counts how many of them rank the gold label first."""
    rows = [
        {"round": 2, "variant": "client0", "nll": [1.0, 2.0], "tokens": [1, 2],
         "predicted": ["a", "b"], "gold": ["a", "c"]},
        {"round": 2, "variant": "client1", "nll": [3.0, 4.0], "tokens": [1, 2],
         "predicted": ["a", "c"], "gold": ["a", "c"]},
        {"round": 1, "variant": "client1", "nll": [9.0, 9.0], "tokens": [1, 2],
         "predicted": ["x", "x"], "gold": ["a", "c"]},
    ]  # fmt: skip
    (tmp_path / "heldout.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    local = pooled([tmp_path], "local")
    assert local is not None
    assert local.nll.tolist() == [4.0, 6.0] and local.tokens.tolist() == [2, 4]
    assert local.correct.tolist() == [2, 1] and local.ranked.tolist() == [2, 2]
