"""bench.round_cost's quick mode: one real ``flwr run`` on the tiny model whose metrics rows
carry each phase's seconds (configure, the slowest client's training, client evaluation,
checkpoint, and the row's clock time), split into a table whose parts add up to each round's
wall time and to the bench's own clock."""

import json
from pathlib import Path

import pytest

from bench.round_cost import PHASES, main


@pytest.mark.usefixtures("shared_ray")  # its federations join one Ray head
def test_round_cost_accounts_for_every_second_of_a_real_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "round_cost.json"
    document = main(["--quick", "--model", "tiny-llama", "--supernodes", "2",
                     "--out", str(tmp_path), "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == document
    rounds = document["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        named = sum(r[f"{phase}_s"] for phase in PHASES if phase != "other")
        assert named + r["other_s"] == pytest.approx(r["wall_s"])
        # What no key records (Flower's loop, screening, the row's own writes) is small.
        assert abs(r["other_s"]) <= max(1.0, 0.05 * r["wall_s"]), r
    assert rounds[0]["distillation_s"] > 0 and rounds[0]["server_eval_s"] > 0  # pre-alignment
    for r in rounds[1:]:
        for phase in PHASES[:-1]:
            assert r[f"{phase}_s"] > 0, (r["round"], phase)
        assert r["wall_over_work"] >= r["wall_over_work_without_eval"] > 1
        # Every client's training is at least the slowest one's.
        assert r["wall_over_work_without_eval"] >= r["wall_over_all_clients_work_without_eval"] > 0
    parts = document["startup_s"] + sum(r["wall_s"] for r in rounds) + document["finish_s"]
    assert document["startup_s"] > 0 and document["finish_s"] > 0
    assert parts == pytest.approx(document["total_wall_s"])
    assert document["training_and_distilling_share"] < 1
    assert 0 < document["model_shipping_s"] < rounds[1]["wall_s"]

    # The printed table holds the JSON's numbers, every phase a column.
    printed = capsys.readouterr().out
    table = {
        cells[0]: cells[1:]
        for line in printed.splitlines()
        if line.startswith("| ") and not line.startswith("| ---")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert len(table["round"]) == len(PHASES) + 3
    for r in rounds:
        expected = [r["wall_s"], *(r[f"{phase}_s"] for phase in PHASES)]
        expected += [r.get("wall_over_work"), r.get("wall_over_work_without_eval")]
        assert table[str(r["round"])] == ["–" if v is None else f"{v:.2f}" for v in expected]
    for name, key in (("start-up", "startup_s"), ("finish", "finish_s"), ("total", "total_wall_s")):
        assert table[name][0] == f"{document[key]:.2f}"
    for name, target in document["targets"].items():
        assert f"{name}: {target['value']:.2f} ({'met' if target['met'] else 'NOT met'})" in printed
