"""bench.case_study's quick mode: a real ``flwr run`` on the tiny model, and the report's
measures read back from the run folder (accuracy and held-out loss of the last round)."""

import json
from pathlib import Path

import pytest

from bench.case_study import main


@pytest.mark.usefixtures("shared_ray")  # its federations join one Ray head
def test_case_study_quick_mode_reports_the_runs_accuracy_and_heldout_loss(tmp_path: Path) -> None:
    report = main(["--model", "tiny-llama", "--quick", "--rows", "fedit-r8", "--seeds", "0",
                   "--jobs", "1", "--out", str(tmp_path)])  # fmt: skip
    rows = [
        json.loads(line)
        for line in (tmp_path / "runs" / "fedit-r8-s0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[-1]["round"] == 1
    document = json.loads((tmp_path / "case_study.json").read_text())
    result = document["results"]["fedit-r8"]
    assert result["seeds"] == [0]
    # The measures are the run's own last-round numbers, held-out loss included.
    assert result["accuracy"]["values"] == [rows[-1]["eval_adapfu_banking77_accuracy"]]
    assert result["eval_loss"]["values"] == [rows[-1]["eval_adapfu_banking77_loss"]]
    # ... which are those of the per-text scores the run kept (gold-label NLL per token).
    scores = [
        json.loads(line)
        for line in (tmp_path / "runs" / "fedit-r8-s0" / "heldout.jsonl").read_text().splitlines()
    ]
    adapfu = next(r for r in scores if r["variant"] == "adapfu" and r["round"] == 1)
    assert result["eval_loss"]["values"][0] == pytest.approx(
        sum(adapfu["nll"]) / sum(adapfu["tokens"])
    )
    assert "0" in document["settings"]["base_accuracy"]
    text = report.read_text()
    loss = result["eval_loss"]["mean"]
    assert (
        f"| parameter averaging (FedIT, r=8) | {100 * result['accuracy']['mean']:.1f} ± 0.0 % "
        f"| {loss:.3f} ± 0.000 |" in text
    )
    assert "(the three framework rows are not all present)" in text
