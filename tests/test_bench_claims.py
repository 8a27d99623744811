"""bench.fedbiot_claims' quick mode: real ``flwr run`` federations on the tiny model, per-text
scores pooled over seeds, paired claims with intervals and a verdict, and the report."""

import json
from pathlib import Path

import numpy as np
import pytest

from bench.claims_plot import draw, points
from bench.claims_report import (
    claims,
    last_scores,
    model_table,
    pooled,
    run_budget,
    verdict,
    write_report,
)
from bench.fedbiot_claims import main
from server_app.evaluation.confidence import Interval


@pytest.mark.usefixtures("shared_ray")  # its federations join one Ray head
def test_claims_quick_mode_pairs_methods_on_the_same_texts(tmp_path: Path) -> None:
    first = ["--model", "tiny-llama", "--quick", "--rows", "split",
             "--partitions", "iid", "--seeds", "0", "--jobs", "1",
             "--out", str(tmp_path)]  # fmt: skip
    main(first)
    # A second part of the grid: its report covers every finished row, not only its own.
    argv = [*first[:3], "--rows", "fedit", *first[5:]]
    report = main(argv)
    document = json.loads((tmp_path / "claims.json").read_text())
    assert document["command"] == "python -m bench.fedbiot_claims " + " ".join(argv)
    assert sorted(document["rows"]) == ["fedit", "split"]
    models = {(e["method"], e["model"]): e for e in document["table"]}
    assert set(models) == {("base", "base"), ("split", "adapfu"), ("fedit", "adapfu")}
    runs = tmp_path / "runs"
    split = pooled([runs / "split-iid-s0"], "adapfu")
    fedit = pooled([runs / "fedit-iid-s0"], "adapfu")
    assert split is not None and fedit is not None
    # The table's loss is the run's own per-token loss; both methods scored the same texts.
    entry = models[("split", "adapfu")]
    assert entry["loss"] == split.nll.sum() / split.tokens.sum()
    assert entry["texts"] == 6 and entry["ranked_texts"] == 4
    assert np.array_equal(fedit.tokens, split.tokens)
    assert entry["bytes_per_client"] > 0 and entry["client_seconds_per_example"] > 0
    # Split learning's clients report client_seconds, and its server half is server compute.
    assert entry["server_seconds"] > 0
    verdicts = {c["claim"]: c for c in document["claims"]}
    versus_split = verdicts["parameter averaging (FedIT) > split learning"]
    difference = fedit.nll.sum() / fedit.tokens.sum() - split.nll.sum() / split.tokens.sum()
    assert versus_split["loss_difference"] == difference
    low, high = versus_split["loss_difference_ci_low"], versus_split["loss_difference_ci_high"]
    assert low <= difference <= high
    expected = "agrees" if high < 0 else "disagrees" if low > 0 else "cannot tell"
    assert versus_split["verdict_loss"] == expected  # a lower loss is better
    assert verdicts["federated (FedIT) > local-only"]["verdict"] == "not run"
    assert verdicts["split learning > KD-FedLLM"]["verdict"] == "not run"
    # The untrained model: one row, scored on the same texts as every method, and the claim
    # against it paired with the base of FedIT's own run.
    base = pooled([runs / "fedit-iid-s0"], "base")
    assert base is not None and np.array_equal(base.tokens, split.tokens)
    assert models[("base", "base")]["loss"] == base.nll.sum() / base.tokens.sum()
    to_base = fedit.nll.sum() / fedit.tokens.sum() - base.nll.sum() / base.tokens.sum()
    assert verdicts["FedIT AdapFu > base"]["loss_difference"] == to_base
    assert "| parameter averaging (FedIT) > split learning | iid |" in report.read_text()
    # The figure the report shows, beside it.
    assert "![every model with its intervals](claims.png)" in report.read_text()
    assert (tmp_path / "claims.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_figure_draws_each_models_value_and_interval_per_partition() -> None:
    nan = float("nan")
    table = [
        {"method": "base", "partition": "–", "model": "base", "loss": 4.5, "loss_ci_low": 4.4,
         "loss_ci_high": 4.6, "accuracy": 0.24, "accuracy_ci_low": 0.19,
         "accuracy_ci_high": 0.29},
        {"method": "kdfed", "partition": "iid", "model": "adapfu", "loss": 3.5,
         "loss_ci_low": 3.4, "loss_ci_high": 3.7},  # scored for loss, not ranked
        # A bound a rounding error past its value, and a missing one: bars of length 0.
        {"method": "fedit", "partition": "dirichlet", "model": "adapfu", "loss": 1.3,
         "loss_ci_low": 1.3 + 1e-15, "loss_ci_high": 1.4, "accuracy": 0.30,
         "accuracy_ci_low": 0.25, "accuracy_ci_high": nan},
    ]  # fmt: skip
    (ranked,) = [p for p in points(table, "accuracy", 100.0) if p.label == "base · base"]
    assert (ranked.value, ranked.low, ranked.high) == pytest.approx((24.0, 19.0, 29.0))
    figure = draw({"model": "m", "seeds": [0, 1], "table": table})
    loss, accuracy = figure.axes
    assert [t.get_text() for t in loss.get_yticklabels()] == [
        "base · base", "kdfed · adapfu", "fedit · adapfu"
    ]  # fmt: skip
    assert [t.get_text() for t in loss.get_legend().get_texts()] == [
        "none (untrained)", "iid", "dirichlet"
    ]  # fmt: skip

    def bars(axis) -> list[tuple[float, float, float, float]]:
        """(value, row, left end, right end) of every error bar on ``axis``."""
        out = []
        for container in axis.containers:
            line, _, (segments,) = container.lines
            for x, y, seg in zip(line.get_xdata(), line.get_ydata(), segments.get_segments(),
                                 strict=True):  # fmt: skip
                out.append((x, y, seg[0][0], seg[1][0]))
        return out

    # Rows 0, 1, 2; the three partitions a quarter of a row apart within each.
    assert bars(loss) == [pytest.approx(b) for b in [(4.5, -0.25, 4.4, 4.6),
                          (3.5, 1.0, 3.4, 3.7), (1.3, 2.25, 1.3, 1.4)]]  # fmt: skip
    # Percent; the unranked model has no bar; a missing bound draws none.
    assert bars(accuracy) == [pytest.approx(b) for b in [(24.0, -0.25, 19.0, 29.0),
                              (30.0, 2.25, 25.0, 30.0)]]  # fmt: skip


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


def test_a_runs_scores_are_parsed_once_per_file_version_and_shared_read_only(
    tmp_path: Path,
) -> None:
    def write(nll: list[float]) -> None:
        row = {"round": 3, "variant": "adapfu", "nll": nll, "tokens": [1] * len(nll),
               "predicted": [], "gold": []}  # fmt: skip
        (tmp_path / "heldout.jsonl").write_text(json.dumps(row) + "\n")

    write([1.0, 2.0])
    first = last_scores(tmp_path)
    assert last_scores(tmp_path) is first  # cached: the report asks per model and claim
    with pytest.raises(TypeError):
        first["adapfu"]["nll"] = [0.0, 0.0]  # type: ignore[index]
    with pytest.raises(TypeError):
        first["base"] = {}  # type: ignore[index]
    with pytest.raises(AttributeError):
        first["adapfu"]["nll"].append(0.0)  # type: ignore[union-attr]
    write([3.0, 4.0, 5.0])  # a rewritten file (a resumed run) is read again
    assert list(last_scores(tmp_path)["adapfu"]["nll"]) == [3.0, 4.0, 5.0]


def test_fedbiot_rows_pair_adapfu_with_adapemu_and_the_base_of_the_same_runs(
    tmp_path: Path,
) -> None:
    """A FedBiOT cell over two seeds: AdapEmu and AdapFu rows in the table, and its claims
    paired text by text with the AdapEmu and base scored in those runs."""
    dirs = []
    for seed, adapfu_nll in enumerate(([1.0, 1.0, 1.0], [1.0, 2.0, 1.0])):
        run = tmp_path / f"fedbiot-b0.2-iid-s{seed}"
        run.mkdir()
        scores = {"base": [3.0, 3.0, 3.0], "adapemu": [2.0, 2.0, 2.0], "adapfu": adapfu_nll}
        rows = [{"round": 1, "variant": variant, "nll": nll, "tokens": [1, 1, 1],
                 "predicted": ["a", "b", "x"] if variant == "adapfu" else ["x", "x", "x"],
                 "gold": ["a", "b", "c"]} for variant, nll in scores.items()]  # fmt: skip
        (run / "heldout.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        config = {"run_config": {"local-steps": 2, "batch-size": 2}}
        (run / "config.json").write_text(json.dumps(config))
        metrics = [{"round": 0, "time_eval_s": None},
                   {"round": 1, "train_seconds": 1.0, "clients_sampled": 3,
                    "time_eval_s": 30.0 + 10 * seed}]  # fmt: skip
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics))
        dirs.append(run)
    cells = {("fedbiot-b0.2", "iid"): dirs}
    verdicts = {c["claim"]: c for c in claims(cells, ["iid"])}
    to_emu = verdicts["AdapFu > AdapEmu (FedBiOT beta 0.2)"]
    # Per text over both seeds: AdapFu 2, 3, 2 nats against AdapEmu's 4, 4, 4.
    assert to_emu["loss_difference"] == pytest.approx(7 / 6 - 2.0)
    assert to_emu["accuracy_difference"] == pytest.approx(4 / 6)
    assert to_emu["verdict_loss"] == "agrees"
    # Three texts: one resample in 27 draws only the third (a tie), so the interval holds 0.
    assert to_emu["verdict_accuracy"] == "cannot tell"
    to_base = verdicts["FedBiOT AdapFu > base (beta 0.2)"]
    assert to_base["loss_difference"] == pytest.approx(7 / 6 - 3.0)
    assert verdicts["FedBiOT AdapFu >= FedOT AdapFu"]["verdict"] == "not run"
    wall = {"fedbiot-b0.2-iid-s0": 100.0, "fedbiot-b0.2-iid-s1": 140.0}
    table = {(e["method"], e["model"]): e for e in model_table(cells, wall, clients=3)}
    assert set(table) == {("base", "base"), ("fedbiot-b0.2", "adapemu"),
                          ("fedbiot-b0.2", "adapfu")}  # fmt: skip
    assert table[("fedbiot-b0.2", "adapemu")]["loss"] == 2.0
    assert table[("fedbiot-b0.2", "adapfu")]["accuracy"] == pytest.approx(4 / 6)
    assert table[("fedbiot-b0.2", "adapfu")]["seeds"] == 2
    # Costs: means over the two seeds' runs; the budget sums each run once.
    assert table[("fedbiot-b0.2", "adapemu")]["eval_seconds"] == 35.0
    assert table[("fedbiot-b0.2", "adapfu")]["wall_seconds"] == 120.0
    budget = run_budget({**cells, ("fedbiot-b0.2", "dirichlet"): dirs[:1]}, wall)
    assert budget == {"runs": 2, "wall_seconds": 240.0, "eval_seconds": 70.0}
    document = {"model": "m", "command": "c", "seeds": [0, 1], "clients": 3,
                "table": list(table.values()), "claims": [], "budget": budget}  # fmt: skip
    text = write_report(document, tmp_path / "claims.md").read_text()
    assert "| fedbiot-b0.2 | iid | adapfu | 1.167 [" in text
    assert "| 0.250 | 0.0 | 0 | 35 | 120 |" in text
    assert (
        "Cost: 2 runs, 240 wall seconds summed over the runs (0.1 h), of which the "
        "server's evaluation 70 s (29 %)." in text
    )


@pytest.mark.parametrize("value", ["12", -1.0, True, float("inf")])
def test_a_bad_evaluation_time_is_refused_naming_file_and_round(
    tmp_path: Path, value: object
) -> None:
    rows = [{"round": 0}, {"round": 1, "time_eval_s": 5.0}, {"round": 2, "time_eval_s": value}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    path = tmp_path / "metrics.jsonl"
    with pytest.raises(SystemExit, match=f"{path}: round 2: time_eval_s is"):
        run_budget({("fedit", "iid"): [tmp_path]}, {})


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"round": 1, "variant": "adapfu", "nll": [1.0]', "not JSON"),
        ('["adapfu"]', "not a scored model \\(not a JSON object\\)"),
        ('{"round": 1, "variant": "adapfu", "nll": [1.0]}', "no \\['tokens', 'predicted'"),
        (
            '{"round": "1", "variant": "adapfu", "nll": [], "tokens": [], "predicted": [],'
            ' "gold": []}',
            "round must be an integer",
        ),
        (
            '{"round": 1, "variant": "adapfu", "nll": [true], "tokens": [1], "predicted": [],'
            ' "gold": []}',
            "must hold numbers",
        ),
        (
            '{"round": 1, "variant": "adapfu", "nll": [1.0, 2.0], "tokens": [1], "predicted": [],'
            ' "gold": []}',
            "one entry per text",
        ),
        (
            '{"round": 1, "variant": "adapfu", "nll": [1.0], "tokens": [1],'
            ' "predicted": ["a", "b"], "gold": ["a", "b"]}',
            "more ranked texts",
        ),
    ],
)
def test_a_bad_scores_line_is_refused_naming_file_and_line(
    tmp_path: Path, line: str, problem: str
) -> None:
    """A run folder's heldout.jsonl is read back by every report: a bad row stops it with the
    file and line named instead of a bare JSON or key error (or a silently wrong sum)."""
    good = {"round": 1, "variant": "base", "nll": [1.0], "tokens": [1], "predicted": ["a"],
            "gold": ["a"]}  # fmt: skip
    path = tmp_path / "heldout.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + line + "\n")
    with pytest.raises(SystemExit, match=rf"{path}, line 3: .*{problem}"):
        pooled([tmp_path], "base")
