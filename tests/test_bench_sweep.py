"""bench.fedbiot_sweep's quick mode: a real ``flwr run`` per point on the tiny model, its
held-out metrics with intervals in sweep.json, and the committed sweep's points kept when the
sweep is extended."""

import argparse
import json
import shutil
from pathlib import Path

import pytest

from bench.fedbiot_sweep import (
    AGAINST,
    COMMON,
    GSM8K_POINTS,
    POINTS,
    QUICK,
    SEED_GROUPS,
    keep_scores,
    main,
    point_config,
    pooled_groups,
)
from bench.heldout_eval import main as heldout_eval
from bench.sweep_tables import base_metrics, pooled_table
from federation.run_config import RunConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.usefixtures("shared_ray")  # its federations join one Ray head
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
    # The run's per-text scores are kept beside the sweep, for pooling over seeds.
    kept = tmp_path / "heldout" / "b0.5-p20" / "heldout.jsonl"
    assert kept.read_text() == (tmp_path / "runs" / "b0.5-p20" / "heldout.jsonl").read_text()
    rows = [line.split(" | ")[0:2] for line in report.read_text().splitlines()]
    _rescored_like_the_server(tmp_path / "runs" / "b0.5-p20", tmp_path / "rescored")
    assert ["| b0.5-p20", "adapfu"] in rows and ["| fedit", "adapfu"] in rows


def test_seed_group_pools_per_text_scores_over_seeds(tmp_path: Path) -> None:
    """A setting run with three seeds: each text's scores are summed over the seeds, and
    AdapFu is compared with the base on the same texts."""
    group, names = next(iter(SEED_GROUPS.items()))
    base = {"variant": "base", "nll": [2.0, 4.0], "tokens": [1, 2],
            "predicted": ["a", "x"], "gold": ["a", "b"]}  # fmt: skip
    predicted = [["a", "b"], ["a", "x"], ["a", "b"]]  # AdapFu: 2, 1 and 2 of 2 right
    for name, guess in zip(names, predicted, strict=True):
        adapfu = {**base, "variant": "adapfu", "nll": [1.0, 1.0], "predicted": guess}
        lines = [json.dumps({**row, "round": 4, "task": "banking77"}) for row in (base, adapfu)]
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "heldout.jsonl").write_text("\n".join(lines))
    keep_scores(tmp_path / "runs", tmp_path / "heldout", list(names))
    entry = pooled_groups(tmp_path / "heldout")[group]
    assert entry["points"] == list(names) and (entry["texts"], entry["ranked_texts"]) == (2, 2)
    assert entry["base_accuracy"] == pytest.approx(3 / 6)
    assert entry["adapfu_accuracy"] == pytest.approx(5 / 6)
    assert entry["adapfu_accuracy_vs_base"] == pytest.approx(2 / 6)
    assert entry["base_loss"] == pytest.approx(18 / 9) and entry["adapfu_loss"] == 6 / 9
    assert entry["adapfu_loss_vs_base"] == pytest.approx(6 / 9 - 2.0)
    assert entry["adapfu_loss_vs_base_ci_high"] < 0  # every resample favours AdapFu's loss
    assert "adapemu_loss" not in entry
    assert f"| {group} | 3 | adapfu | 0.667 [" in pooled_table({group: entry})
    # A group with a seed's scores missing is not pooled.
    (tmp_path / "heldout" / names[-1] / "heldout.jsonl").unlink()
    assert pooled_groups(tmp_path / "heldout") == {}


def _rescored_like_the_server(run: Path, out: Path) -> None:
    """bench.heldout_eval scores a run's exported models again: on the run's own held-out
    texts it reproduces the server's in-run scores text by text, also with its models scored
    in two worker processes, and two runs pool per text."""
    twin = run.with_name(run.name + "-twin")
    shutil.copytree(run, twin)
    options = ["--split", "validation", "--examples", str(QUICK["eval-examples"]),
               "--ranked", str(QUICK["eval-generation-examples"]),
               "--variants", "adapfu", "adapemu", "--workers", "2", "--out", str(out)]  # fmt: skip
    document = heldout_eval(["--runs", str(run), str(twin), *options])
    in_run = {r["variant"]: r for r in map(json.loads, (run / "heldout.jsonl").open())}
    again = {r["variant"]: r for r in map(json.loads, (out / run.name / "heldout.jsonl").open())}
    for variant in ("base", "adapemu", "adapfu"):
        assert again[variant]["nll"] == pytest.approx(in_run[variant]["nll"], rel=1e-4)
        assert again[variant]["tokens"] == in_run[variant]["tokens"]
        assert again[variant]["predicted"] == in_run[variant]["predicted"]
    adapfu = document["runs"][run.name]["adapfu"]
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert adapfu["loss"] == pytest.approx(metrics["eval_adapfu_banking77_loss"], rel=1e-4)
    assert adapfu["accuracy"] == metrics["eval_adapfu_banking77_accuracy"]
    # Two identical runs pooled per text: the same ratios as one.
    assert document["pooled"]["adapfu"]["loss"] == pytest.approx(adapfu["loss"])
    assert document["pooled"]["adapfu"]["accuracy"] == pytest.approx(adapfu["accuracy"])
    # Pooling is per text, so the texts are those of one run (each scored twice), not twice
    # as many; the pooled rows of the report say so.
    texts = (len(in_run["adapfu"]["nll"]), QUICK["eval-generation-examples"])
    pooled = document["pooled"]["adapfu"]
    assert (pooled["loss_examples"], pooled["accuracy_examples"]) == texts
    assert (
        f"| pooled over 2 runs | adapfu | {texts[0]}/{texts[1]} | "
        in (out / "heldout_eval.md").read_text()
    )
    # A third run whose two models trade places, scored in this process (one worker) with the
    # first two already in --out: those are read back, not scored again, and each of its
    # scores lands under its own name.
    swapped = run.with_name(run.name + "-swapped")
    shutil.copytree(run, swapped)
    (swapped / "adapfu").rename(swapped / "tmp")
    (swapped / "adapemu").rename(swapped / "adapfu")
    (swapped / "tmp").rename(swapped / "adapemu")
    written = (out / run.name / "heldout.jsonl").stat().st_mtime_ns
    heldout_eval(["--runs", str(run), str(twin), str(swapped), *options, "--workers", "1"])
    assert (out / run.name / "heldout.jsonl").stat().st_mtime_ns == written
    traded = {
        r["variant"]: r for r in map(json.loads, (out / swapped.name / "heldout.jsonl").open())
    }
    assert in_run["adapfu"]["nll"] != pytest.approx(in_run["adapemu"]["nll"], rel=1e-4)
    assert traded["adapfu"]["nll"] == pytest.approx(in_run["adapemu"]["nll"], rel=1e-4)
    assert traded["adapemu"]["nll"] == pytest.approx(in_run["adapfu"]["nll"], rel=1e-4)
    assert traded["base"]["nll"] == pytest.approx(in_run["base"]["nll"], rel=1e-4)


def test_heldout_eval_refuses_bad_run_files_naming_them(tmp_path: Path) -> None:
    """A run folder's config.json and a scored heldout.jsonl cross a boundary: a broken one
    stops the bench with the file (and line) named, before any model loads."""
    run = tmp_path / "runs" / "b0.2"
    run.mkdir(parents=True)
    out = tmp_path / "out"
    args = ["--runs", str(run), "--out", str(out)]
    with pytest.raises(SystemExit, match=rf"{run}: no config.json"):
        heldout_eval(args)
    (run / "config.json").write_text('{"run_config": {"seq-length": ')
    with pytest.raises(SystemExit, match=rf"{run / 'config.json'}: not a run's config.json"):
        heldout_eval(args)
    (run / "config.json").write_text(json.dumps({"run_config": {"seq-length": -3}}))
    with pytest.raises(SystemExit, match=rf"{run / 'config.json'}: .*seq-length"):
        heldout_eval(args)
    # Scores already in --out are read back, not recomputed: a bad line is named.
    (run / "config.json").write_text(json.dumps({"run_config": {"task": "banking77"}}))
    scores = out / "b0.2" / "heldout.jsonl"
    scores.parent.mkdir(parents=True)
    good = {"round": 0, "variant": "base", "nll": [1.0], "tokens": [2], "predicted": [3],
            "gold": [3]}  # fmt: skip
    scores.write_text(json.dumps(good) + "\n" + '{"variant": "adapfu", "nll": [1.0]}\n')
    with pytest.raises(SystemExit, match=rf"{scores}, line 2: not a scored model"):
        heldout_eval(args)
    scores.write_text(json.dumps(good) + "\n")
    with pytest.raises(SystemExit, match=rf"{scores}: no scores of \['adapfu'\]"):
        heldout_eval(args)


@pytest.mark.parametrize("option", [["--examples", "0"], ["--workers", "0"], ["--ranked", "-1"]])
def test_heldout_eval_refuses_counts_that_score_nothing(
    tmp_path: Path, option: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--examples 0`` once wrote a table of NaNs for a run that scored no text: a count
    that scores nothing is a usage error (exit 2) naming the option, before any run is read."""
    with pytest.raises(SystemExit) as stopped:
        heldout_eval(["--runs", str(tmp_path / "missing"), "--out", str(tmp_path), *option])
    assert stopped.value.code == 2
    assert f"{option[0]}={option[1]}: must be at least" in capsys.readouterr().err
    assert not (tmp_path / "heldout_eval.json").exists()


@pytest.mark.parametrize(
    ("task", "name"),
    [("banking77", name) for name in sorted(POINTS)] + [("gsm8k", name) for name in GSM8K_POINTS],
)
def test_every_point_is_a_valid_run_config(task: str, name: str, tmp_path: Path) -> None:
    """A point is a 20-60 minute run: a misspelt key or a bad value must fail here, not when
    its flwr run starts. The config the sweep launches parses, with the point's keys in it."""
    args = argparse.Namespace(model="smollm2-135m", quick=False, task=task)
    config = RunConfig.from_flower(point_config(name, args, tmp_path, 1)).to_dict()
    assert {key: config[key] for key in POINTS[name]} == POINTS[name]
    assert config["task"] == task


@pytest.mark.parametrize("task", sorted(AGAINST))
def test_every_pair_is_between_points_the_task_sweeps(task: str) -> None:
    """A pair is reported only when both of its points ran for the task: one naming a point
    the task's sweep never runs would silently never appear."""
    swept = set(GSM8K_POINTS) if task == "gsm8k" else set(POINTS)
    assert set(AGAINST[task]) | set(AGAINST[task].values()) <= swept


@pytest.mark.usefixtures("shared_ray")  # its federations join one Ray head
def test_gsm8k_sweep_scores_held_out_response_loss(tmp_path: Path) -> None:
    """The generation task's sweep: a real run per point on GSM8K's validation texts, each
    model's loss the per-token ratio of its per-text scores, the base recovered in the table
    from AdapFu's paired difference, no accuracy where nothing is ranked; a Banking77 sweep
    into the same folder is refused (its points would not compare)."""
    report = main(["--task", "gsm8k", "--model", "tiny-llama", "--quick", "--points", "b0.5-p20",
                   "--jobs", "1", "--out", str(tmp_path)])  # fmt: skip
    document = json.loads((tmp_path / "sweep.json").read_text())
    assert (document["common"]["task"], document["common"]["seq-length"]) == ("gsm8k", 256)
    metrics = document["points"]["b0.5-p20"]["metrics"]
    kept = tmp_path / "heldout" / "b0.5-p20" / "heldout.jsonl"
    rows = {row["variant"]: row for row in map(json.loads, kept.open())}
    assert {row["task"] for row in rows.values()} == {"gsm8k"}
    assert len(rows["base"]["nll"]) == QUICK["eval-examples"] and rows["base"]["predicted"] == []
    for variant in ("adapemu", "adapfu"):
        row = rows[variant]
        loss = sum(row["nll"]) / sum(row["tokens"])
        assert metrics[f"eval_{variant}_gsm8k_loss"] == pytest.approx(loss)
        assert not [key for key in metrics if "accuracy" in key]
    base = sum(rows["base"]["nll"]) / sum(rows["base"]["tokens"])
    assert f"| – | base | {base:.3f} [" in report.read_text()
    # A run whose last row lacks the base's keys: the base is recovered from AdapFu's paired
    # difference, and has no accuracy.
    without = {k: v for k, v in metrics.items() if not k.startswith("eval_base_")}
    recovered = base_metrics({"b0.5-p20": {"metrics": without}}, "gsm8k")
    assert recovered == {"loss": pytest.approx(base)}
    assert "| b0.5-p20 | adapfu | " in report.read_text()
    with pytest.raises(SystemExit, match=r"other settings \(.*task"):
        main(["--model", "tiny-llama", "--quick", "--points", "b0.5-p20", "--out", str(tmp_path)])
