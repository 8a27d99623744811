"""Task data from where users keep it: JSON, JSONL, CSV, Parquet, save_to_disk folders,
folders of data files and hub ids, with column mapping and a split; bad data is named."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from client_app.client_data import client_data
from federation.run_config import ConfigError, RunConfig
from server_app.server_eval import task_key
from task_data import Columns, DataError, load_preferences, load_records

ROWS = [
    {
        "instruction": f"q{i}",
        "input": "ctx" if i % 2 else "",
        "output": str(7 * i),
        "label": "xy"[i % 2],
    }
    for i in range(6)
]
# What the records are: an empty input is "", the label is kept.
EXPECTED = [dict(r) for r in ROWS]


def _write_all(root: Path) -> dict[str, Path]:
    """The same rows in every format the task accepts."""
    root.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(ROWS)
    paths = {
        "json": root / "rows.json",
        "jsonl": root / "rows.jsonl",
        "csv": root / "rows.csv",
        "parquet": root / "rows.parquet",
        "dataset": root / "saved-dataset",
        "dataset-dict": root / "saved-dict",
        "folder": root / "folder",
    }
    paths["json"].write_text(json.dumps(ROWS))
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    frame.to_csv(paths["csv"], index=False)
    frame.to_parquet(paths["parquet"])
    Dataset.from_list(ROWS).save_to_disk(str(paths["dataset"]))
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(paths["dataset-dict"]))
    paths["folder"].mkdir()
    frame.to_parquet(paths["folder"] / "train.parquet")
    frame.iloc[:2].to_parquet(paths["folder"] / "test.parquet")
    return paths


def test_every_format_loads_to_the_same_records(tmp_path: Path) -> None:
    for kind, path in _write_all(tmp_path).items():
        assert load_records(str(path)) == EXPECTED, kind
    assert load_records(str(tmp_path / "folder"), "test") == EXPECTED[:2]


def test_a_saved_dataset_dict_gives_its_split_and_names_the_others(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    splits = {"train": ROWS[:4], "validation": ROWS[4:]}
    DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(saved))
    config = RunConfig(task=str(saved), split="validation")
    assert config.task_records() == EXPECTED[4:]
    with pytest.raises(DataError) as refused:
        RunConfig(task=str(saved), split="dev").task_records()
    message = str(refused.value)
    assert f"run-config task={str(saved)!r}" in message
    assert "no split 'dev'; its splits are ['train', 'validation']" in message
    with pytest.raises(DataError, match=r"no split 'dev'.*\['train', 'test'\]"):
        load_records(str(_write_all(tmp_path / "all")["folder"]), "dev")
    with pytest.raises(DataError, match=r"rows.csv: no split 'dev'; its splits are \['train'\]"):
        load_records(str(tmp_path / "all" / "rows.csv"), "dev")


def test_columns_map_onto_the_record_fields(tmp_path: Path) -> None:
    """A Hub-style classification set (text, class label): the label's names are the output."""
    features = Features({"text": Value("string"), "label": ClassLabel(names=["card", "loan"])})
    data = Dataset.from_dict(
        {"text": ["lost my card", "rate?"], "label": [0, 1]}, features=features
    )
    data.save_to_disk(str(tmp_path / "banking"))
    config = RunConfig(
        task=str(tmp_path / "banking"),
        instruction_column="text",
        output_column="label",
        label_column="label",
    )
    assert config.task_records() == [
        {"instruction": "lost my card", "input": "", "output": "card", "label": "card"},
        {"instruction": "rate?", "input": "", "output": "loan", "label": "loan"},
    ]
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    mapped = Columns(instruction="question", output="answer")
    assert load_records(str(gsm), columns=mapped) == [
        {"instruction": "1+1?", "input": "", "output": "#### 2"}
    ]


def test_a_missing_column_is_refused_naming_it_and_the_columns_there(tmp_path: Path) -> None:
    paths = _write_all(tmp_path)
    config = RunConfig(task=str(paths["parquet"]), instruction_column="question")
    with pytest.raises(DataError) as refused:
        config.task_records()
    assert str(refused.value) == (
        f"run-config task={str(paths['parquet'])!r}: {paths['parquet']}: "
        "instruction-column='question' names no column; its columns are "
        "['instruction', 'input', 'output', 'label'] (set instruction-column)"
    )
    pd.DataFrame({"instruction": ["a"], "text": ["b"]}).to_csv(tmp_path / "t.csv", index=False)
    unnamed = r"t.csv: no 'output' column; its columns are \['instruction', 'text'\] \(set output-"
    with pytest.raises(DataError, match=unnamed):
        load_records(str(tmp_path / "t.csv"), columns=Columns(input="text"))
    with pytest.raises(DataError) as refused:
        load_records(str(paths["jsonl"]), columns=Columns(input="context"))
    assert "rows.jsonl line 1: missing field 'context' (input-column='context')" in str(
        refused.value
    )


def test_a_hub_id_without_a_hub_says_so(tmp_path: Path) -> None:
    """Tests run with HF_HUB_OFFLINE=1 (conftest): the hub path fails clearly, naming the key."""
    with pytest.raises(DataError) as refused:
        RunConfig(task="openai/gsm8k").task_records()
    message = str(refused.value)
    assert message.startswith("run-config task='openai/gsm8k': openai/gsm8k: no such local file")
    assert "HF_HUB_OFFLINE=1, or no network" in message
    with pytest.raises(DataError, match=r"unknown data set 'mnist'.*hub id owner/name"):
        load_records("mnist")
    with pytest.raises(DataError, match=r"absent\.csv: no such file or folder"):
        load_records(str(tmp_path / "absent.csv"))


def test_bytes_that_are_not_utf8_are_named_by_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"instruction": "a", "output": "b"}) + "\n"
    jsonl = tmp_path / "latin.jsonl"
    jsonl.write_bytes(good.encode() + b'{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl line 2: not UTF-8 \(byte 0xe9\)"):
        load_records(str(jsonl))
    table = tmp_path / "latin.csv"
    table.write_bytes(b"instruction,output\na,b\ncaf\xe9,b\n")
    with pytest.raises(DataError, match=r"latin.csv line 3: not UTF-8"):
        load_records(str(table))
    table.write_text("instruction,output\na,b\na,b,c,d\n")
    with pytest.raises(DataError, match=r"latin.csv: cannot be read .*Expected 2 fields in line 3"):
        load_records(str(table))
    lone = tmp_path / "lone.jsonl"
    lone.write_text(good + '{"instruction": "a", "output": "\\ud800"}\n')
    with pytest.raises(DataError, match=r"lone.jsonl line 2: field 'output' holds a lone"):
        load_records(str(lone))


def test_a_node_trains_on_its_own_csv(tmp_path: Path, smollm_tokenizer) -> None:
    paths = _write_all(tmp_path)
    data = client_data(RunConfig(test_fraction=0.5), 0, smollm_tokenizer, str(paths["csv"]))
    assert len(data.train) == len(data.test) == 3
    with pytest.raises(DataError, match=r"node config data-file=.*rows.csv.*no split 'dev'"):
        client_data(RunConfig(split="dev"), 0, smollm_tokenizer, str(paths["csv"]))


def test_preference_pairs_load_from_parquet_as_from_jsonl(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(3)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "pairs.parquet")
    pairs = load_preferences(str(tmp_path / "pairs.parquet"))
    assert pairs == load_preferences(str(tmp_path / "pairs.jsonl")) and len(pairs) == 3
    pd.DataFrame([{"prompt": "p", "chosen": "yes"}]).to_csv(tmp_path / "half.csv", index=False)
    with pytest.raises(DataError, match=r"preference-data=.*half.csv row 1: missing field 'rej"):
        load_preferences(str(tmp_path / "half.csv"), key="run-config preference-data")


def test_split_keys_are_checked() -> None:
    with pytest.raises(ConfigError, match="split must name a split"):
        RunConfig.from_flower({"split": " "})
    with pytest.raises(ConfigError, match="split='test' would train on the texts the server"):
        RunConfig.from_flower({"task": "gsm8k", "split": "test"})
    RunConfig.from_flower({"task": "gsm8k", "split": "test", "eval-split": "validation"})


def test_metric_keys_name_the_data_set_not_its_path() -> None:
    assert task_key("openai/gsm8k") == "gsm8k"
    assert task_key("/data/site/notes.csv") == "notes"
    assert task_key("/data/site/my-set.jsonl.gz") == "my_set"
    assert task_key("/data/saved-folder/") == "saved_folder"
    assert task_key("code-alpaca") == "code_alpaca"


def test_subset_picks_a_configuration_as_on_the_hub(tmp_path: Path) -> None:
    """A folder laid out like openai/gsm8k (configurations main and socratic, declared in its
    README): ``subset`` picks one; without it the error says to set it."""
    repo = tmp_path / "gsm8k-like"
    for config, rows in (("main", ROWS[:3]), ("socratic", ROWS[3:])):
        (repo / config).mkdir(parents=True)
        pd.DataFrame(rows).to_parquet(repo / config / "train.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        + "".join(
            f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.parquet\n"
            for c in ("main", "socratic")
        )
        + "---\n"
    )
    assert RunConfig(task=str(repo), subset="socratic").task_records() == EXPECTED[3:]
    with pytest.raises(DataError, match=r"Config name is missing.*'main', 'socratic'.*set subset"):
        RunConfig(task=str(repo)).task_records()
    with pytest.raises(DataError, match=r"rows.csv: subset='main' names a configuration"):
        load_records(str(_write_all(tmp_path / "all")["csv"]), subset="main")
