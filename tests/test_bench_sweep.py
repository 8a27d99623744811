"""bench.fedbiot_sweep's quick mode: a real ``flwr run`` per point on the tiny model, its
held-out metrics with intervals in sweep.json, and the committed sweep's points kept when the
sweep is extended."""

import json
from pathlib import Path

import pytest

from bench.fedbiot_sweep import COMMON, QUICK, main

REPO = Path(__file__).resolve().parents[1]


def test_sweep_quick_mode_extends_the_committed_sweep(tmp_path: Path) -> None:
    document = json.loads((REPO / "docs" / "fedbiot-recipe" / "sweep.json").read_text())
    with pytest.raises(
        SystemExit, match=r"other settings \(model, batch-size"
    ):  # another model's sweep
        (tmp_path / "sweep.json").write_text(json.dumps(document))
        main(["--model", "tiny-llama", "--quick", "--out", str(tmp_path)])
    assert not (tmp_path / "runs" / "fedit").exists()
    # The committed points, as if measured on the tiny model at the quick sizes.
    document.update(model="tiny-llama", common={**COMMON, **QUICK})
    (tmp_path / "sweep.json").write_text(json.dumps(document))
    committed = document["points"]
    report = main(["--model", "tiny-llama", "--quick", "--points", "b0.5-p20", "--jobs", "1",
                   "--out", str(tmp_path)])  # fmt: skip
    points = json.loads((tmp_path / "sweep.json").read_text())["points"]
    # The new run replaces the committed point of the same name; the others are kept as they were.
    assert points["fedit"] == committed["fedit"]
    assert points["b0.2-p100"] == committed["b0.2-p100"]
    metrics = points["b0.5-p20"]["metrics"]
    assert metrics != committed["b0.5-p20"]["metrics"]
    for variant in ("adapemu", "adapfu"):
        key = f"eval_{variant}_banking77"
        assert metrics[f"{key}_loss_ci_low"] <= metrics[f"{key}_loss"]
        assert metrics[f"{key}_loss"] <= metrics[f"{key}_loss_ci_high"]
        assert metrics[f"{key}_accuracy_examples"] == 4
    rows = [line.split(" | ")[0:2] for line in report.read_text().splitlines()]
    assert ["| b0.5-p20", "adapfu"] in rows and ["| fedit", "adapfu"] in rows
