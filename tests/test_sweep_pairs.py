"""bench.sweep_pairs: a knob's effect as the paired difference between two sweep points."""

import json
from pathlib import Path

import pytest

from bench.sweep_pairs import GROUPS_HEADING, main, paired_groups, paired_points, paired_table

GOLD = ["a", "b", "c", "d"]


def _scores(folder: Path, models: dict[str, tuple[list[float], list[str]]]) -> None:
    folder.mkdir(parents=True)
    rows = [{"variant": "base", "nll": [9.0] * 4, "tokens": [1] * 4, "predicted": ["x"] * 4,
             "gold": GOLD, "round": 4}]  # fmt: skip
    rows += [{"variant": model, "nll": nll, "tokens": [1, 1, 2, 2], "predicted": predicted,
              "gold": GOLD, "round": 4} for model, (nll, predicted) in models.items()]  # fmt: skip
    (folder / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_point_against_its_reference_is_paired_per_text(tmp_path: Path) -> None:
    """Reference: AdapFu right on 2 of 4 texts at 2 nats per token; the point: right on all 4
    at 1 nat per token, AdapEmu unchanged. Differences: −1.0 nats, +50 points with both
    discordant texts in one direction (McNemar's exact p = 0.5); AdapEmu 0 with p = 1."""
    same = ([1.0, 1.0, 2.0, 2.0], ["a", "x", "c", "x"])
    _scores(tmp_path / "ref", {"adapfu": ([2.0, 2.0, 4.0, 4.0], ["a", "b", "x", "x"]),
                               "adapemu": same})  # fmt: skip
    _scores(tmp_path / "knob", {"adapfu": ([1.0, 1.0, 2.0, 2.0], GOLD), "adapemu": same})
    entries = paired_points(tmp_path, {"knob": "ref", "orphan": "ref", "lost": "gone"})
    assert list(entries) == ["knob"]  # points without scores, or whose reference has none
    knob = entries["knob"]
    assert knob["reference"] == "ref"
    assert knob["adapfu_loss_vs_reference"] == pytest.approx(-1.0)
    assert knob["adapfu_accuracy_vs_reference"] == pytest.approx(0.5)
    assert knob["adapfu_accuracy_vs_reference_p"] == pytest.approx(0.5)
    assert knob["adapemu_loss_vs_reference"] == pytest.approx(0.0)
    assert knob["adapemu_accuracy_vs_reference"] == 0.0
    assert knob["adapemu_accuracy_vs_reference_p"] == 1.0
    assert "| knob | ref | adapfu | -1.000 [" in paired_table(entries)
    assert paired_table({}) == ""


def test_a_point_missing_a_model_is_named(tmp_path: Path) -> None:
    _scores(tmp_path / "ref", {"adapfu": ([1.0] * 4, GOLD), "adapemu": ([1.0] * 4, GOLD)})
    _scores(tmp_path / "knob", {"adapfu": ([1.0] * 4, GOLD)})
    with pytest.raises(
        SystemExit, match=rf"{tmp_path / 'knob'}/heldout.jsonl: no scores of adapemu"
    ):
        paired_points(tmp_path, {"knob": "ref"})
    # The reference's file is named when the reference is the one missing the model.
    with pytest.raises(
        SystemExit, match=rf"{tmp_path / 'knob'}/heldout.jsonl: no scores of adapemu"
    ):
        paired_points(tmp_path, {"ref": "knob"})


def test_seed_groups_are_paired_per_text_over_their_seeds(tmp_path: Path) -> None:
    """Two seeds each. Reference: AdapFu 2 nats per token, right on texts a and b in both
    seeds (4 of 8); the knob: 1 nat per token, right on all 4 texts in seed 0 and on a and c
    in seed 1 (6 of 8). Summed per text over the seeds: −1.0 nats, +25 points; AdapEmu the
    same on both sides, 0. A group with a seed's scores missing is left out."""
    same = ([1.0, 1.0, 2.0, 2.0], ["a", "x", "c", "x"])
    for seed in ("0", "1"):
        _scores(tmp_path / f"ref{seed}", {"adapfu": ([2.0, 2.0, 4.0, 4.0], ["a", "b", "x", "x"]),
                                          "adapemu": same})  # fmt: skip
    _scores(tmp_path / "knob0", {"adapfu": ([1.0, 1.0, 2.0, 2.0], GOLD), "adapemu": same})
    _scores(tmp_path / "knob1", {"adapfu": same, "adapemu": same})
    groups = {"ref": ("ref0", "ref1"), "knob": ("knob0", "knob1"), "lost": ("knob0", "gone")}
    entries = paired_groups(tmp_path, {"knob": "ref", "lost": "ref"}, groups)
    assert list(entries) == ["knob"]
    knob = entries["knob"]
    assert (knob["reference"], knob["seeds"]) == ("ref", 2)
    assert knob["adapfu_loss_vs_reference"] == pytest.approx(-1.0)
    assert knob["adapfu_accuracy_vs_reference"] == pytest.approx(0.25)
    assert knob["adapemu_loss_vs_reference"] == pytest.approx(0.0)
    assert knob["adapemu_accuracy_vs_reference"] == pytest.approx(0.0)
    assert "adapfu_accuracy_vs_reference_p" not in knob
    table = paired_table(entries, GROUPS_HEADING)
    assert "summed over the seeds" in table
    assert "| knob | ref | adapfu | -1.000 [" in table and table.rstrip().endswith("| – |")


def test_runs_scored_on_different_texts_are_refused_naming_both(tmp_path: Path) -> None:
    """Pairing is per text: two runs whose texts differ (same count, other gold labels; or
    fewer texts) are refused with both files named, for points and for seed groups."""
    models = {"adapfu": ([1.0] * 4, GOLD), "adapemu": ([1.0] * 4, GOLD)}
    _scores(tmp_path / "ref", models)
    rows = [json.loads(line) for line in (tmp_path / "ref" / "heldout.jsonl").open()]
    other = tmp_path / "other"
    other.mkdir()
    other_rows = [{**row, "gold": row["gold"][::-1]} for row in rows]
    (other / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in other_rows))
    short = tmp_path / "short"
    short.mkdir()
    short_rows = [{**row, **{k: row[k][:3] for k in ("nll", "tokens", "predicted", "gold")}}
                  for row in rows]  # fmt: skip
    (short / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short_rows))
    for name in ("other", "short"):
        both = rf"{tmp_path / name}/heldout.jsonl and {tmp_path / 'ref'}/heldout.jsonl: base"
        with pytest.raises(SystemExit, match=both):
            paired_points(tmp_path, {name: "ref"})
    _scores(tmp_path / "ref1", models)
    groups = {"ref": ("ref", "ref1"), "mixed": ("ref1", "short")}
    named = rf"{tmp_path / 'ref1'}/heldout.jsonl and {tmp_path / 'short'}/heldout.jsonl: base"
    with pytest.raises(SystemExit, match=named):
        paired_groups(tmp_path, {"mixed": "ref"}, groups)


def test_points_without_ranked_texts_pair_their_loss_only(tmp_path: Path) -> None:
    """The generation sweep ranks nothing: its pairs carry the loss difference and no
    accuracy, and the table shows a dash there instead of failing."""
    for name, nll in (("ref", [2.0, 4.0]), ("knob", [1.0, 3.0])):
        rows = [{"round": 4, "variant": v, "nll": [9.0, 9.0] if v == "base" else nll,
                 "tokens": [1, 1], "predicted": [], "gold": []}
                for v in ("base", "adapemu", "adapfu")]  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    knob = paired_points(tmp_path, {"knob": "ref"})["knob"]
    assert knob["adapfu_loss_vs_reference"] == pytest.approx(-1.0)
    assert not [key for key in knob if "accuracy" in key]
    row = "| knob | ref | adapfu | -1.000 [-1.000, -1.000] | – | – |"
    assert row in paired_table({"knob": knob})


def test_the_script_pairs_scored_runs_seed_by_seed_and_refuses_bad_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m bench.sweep_pairs``: two scored runs against two reference runs, each text's
    scores summed over the seeds (the same numbers as the seed-group test above), written
    to JSON with its command and to a table; unequal run counts, a folder without scores
    and a model nobody scored are refused naming what is wrong."""
    same = ([1.0, 1.0, 2.0, 2.0], ["a", "x", "c", "x"])
    for seed in ("0", "1"):
        _scores(tmp_path / f"ref{seed}", {"adapfu": ([2.0, 2.0, 4.0, 4.0], ["a", "b", "x", "x"]),
                                          "adapemu": same})  # fmt: skip
    _scores(tmp_path / "knob0", {"adapfu": ([1.0, 1.0, 2.0, 2.0], GOLD), "adapemu": same})
    _scores(tmp_path / "knob1", {"adapfu": same})
    runs = [str(tmp_path / "knob0"), str(tmp_path / "knob1")]
    against = [str(tmp_path / "ref0"), str(tmp_path / "ref1")]
    out = tmp_path / "out" / "pairs.json"
    argv = ["--runs", *runs, "--against", *against, "--models", "adapfu", "--out", str(out)]
    main(argv)
    document = json.loads(out.read_text())
    assert document["command"] == "python -m bench.sweep_pairs " + " ".join(argv)
    knob = document["paired"]["knob0"]
    assert (knob["reference"], knob["seeds"]) == ("ref0", 2)
    assert knob["adapfu_loss_vs_reference"] == pytest.approx(-1.0)
    assert knob["adapfu_accuracy_vs_reference"] == pytest.approx(0.25)
    table = out.with_suffix(".md").read_text()
    assert "| knob0 | ref0 | adapfu | -1.000 [" in table and "adapemu" not in table
    assert "run k beside run k" in table and "knob" not in table.split("|")[0]
    with pytest.raises(SystemExit, match=rf"{tmp_path / 'knob1'}/heldout.jsonl: no scores of"):
        main(["--runs", *runs, "--against", *against, "--out", str(out)])  # AdapEmu: knob1 lacks
    with pytest.raises(SystemExit):
        main(["--runs", runs[0], "--against", *against, "--out", str(out)])
    assert "1 --runs against 2 --against" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--runs", str(tmp_path / "gone"), "--against", against[0], "--out", str(out)])
    assert f"{tmp_path / 'gone'}: no heldout.jsonl" in capsys.readouterr().err
