"""Data sets, response-only labels, partitioning and clear errors for bad files."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from task_data import (
    IGNORE_INDEX,
    DataError,
    batch_iterator,
    collate,
    load_records,
    partition_records,
    tokenize_record,
    train_test_split,
)
from task_data.formatting import lazy_tokenized_records


def test_shipped_sets_load_in_alpaca_form() -> None:
    gsm = load_records("gsm8k", "test")
    assert len(gsm) == 1319 and gsm[0]["output"].split("####")[-1].strip().isdigit()
    banking = load_records("banking77")
    assert len(banking) == 10003 and banking[0]["label"] == banking[0]["output"]
    assert len({r["label"] for r in banking}) == 77
    for name, count in [("gpteacher", 3146), ("code-alpaca", 2017), ("alpaca-seed", 175)]:
        records = load_records(name)
        assert len(records) >= count if name == "alpaca-seed" else len(records) == count
        assert all(set(r) == {"instruction", "input", "output"} for r in records)
    with pytest.raises(ValueError, match="no 'test' split"):
        load_records("gpteacher", "test")
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        load_records("mnist")


def test_labels_mask_the_prompt_and_decode_to_the_response(smollm_tokenizer) -> None:
    record = load_records("gsm8k")[0]
    example = tokenize_record(smollm_tokenizer, record, 512)
    labels, ids = example["labels"], example["input_ids"]
    prompt_len = labels.index(next(t for t in labels if t != IGNORE_INDEX))
    assert all(t == IGNORE_INDEX for t in labels[:prompt_len])
    assert labels[prompt_len:] == ids[prompt_len:]
    response = smollm_tokenizer.decode(labels[prompt_len:], skip_special_tokens=True)
    assert response == record["output"]
    assert "<|im_start|>assistant" in smollm_tokenizer.decode(ids[:prompt_len])
    assert record["instruction"] in smollm_tokenizer.decode(ids[:prompt_len])


def test_truncation_keeps_response_tokens(smollm_tokenizer) -> None:
    record = {"instruction": "word " * 400, "input": "", "output": "The answer is 4."}
    example = tokenize_record(smollm_tokenizer, record, 64)
    assert len(example["input_ids"]) == 64
    assert sum(t != IGNORE_INDEX for t in example["labels"]) >= 5
    long_answer = {"instruction": "Count.", "input": "", "output": "one two " * 200}
    example = tokenize_record(smollm_tokenizer, long_answer, 64)
    assert len(example["input_ids"]) == 64 and example["labels"][-1] != IGNORE_INDEX


def test_a_clients_examples_are_tokenized_when_used_and_as_tokenize_record_does(
    smollm_tokenizer,
) -> None:
    """A client's partition is tokenized one example at a time, on first use: a record that
    cannot be tokenized (no output) fails only when it is reached."""
    records = load_records("gsm8k", "test")[:6]
    examples = lazy_tokenized_records(smollm_tokenizer, [*records, {"instruction": "Hi."}], 64)
    assert len(examples) == 7
    expected = [tokenize_record(smollm_tokenizer, r, 64) for r in records]
    assert examples[2] == expected[2] and examples[-2] == expected[5]
    assert examples[1:4] == expected[1:4]
    with pytest.raises(KeyError, match="output"):
        examples[6]
    with pytest.raises(IndexError, match="index 7 out of 7"):
        examples[7]
    # The batches a client draws are those it drew from the eagerly tokenized list.
    lazy = lazy_tokenized_records(smollm_tokenizer, records, 64)
    drawn, again = batch_iterator(lazy, 4, 0, 2), batch_iterator(expected, 4, 0, 2)
    for a, b in ((next(drawn), next(again)) for _ in range(3)):
        assert all(torch.equal(a[key], b[key]) for key in ("input_ids", "labels"))


def test_collate_pads_right_with_ignored_labels(smollm_tokenizer) -> None:
    records = load_records("gsm8k")[:3]
    examples = [tokenize_record(smollm_tokenizer, r, 256) for r in records]
    batch = collate(examples, pad_token_id=0)
    width = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == (3, width)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    batches = batch_iterator(examples, 2, seed=0, pad_token_id=0)
    assert all(next(batches)["input_ids"].shape[0] == 2 for _ in range(5))


def test_iid_partitions_are_disjoint_and_cover_everything() -> None:
    records = [{"instruction": str(i), "input": "", "output": "x"} for i in range(100)]
    parts = [partition_records(records, 3, i, "iid", seed=1) for i in range(3)]
    seen = [r["instruction"] for p in parts for r in p]
    assert sorted(seen) == sorted(r["instruction"] for r in records)
    assert [len(p) for p in parts] == [34, 33, 33]
    assert parts[0] != records[:34]  # shuffled, not contiguous
    assert parts == [partition_records(records, 3, i, "iid", seed=1) for i in range(3)]


def test_dirichlet_partitions_skew_labels_and_natural_follows_ids() -> None:
    banking = load_records("banking77")
    parts = [partition_records(banking, 3, i, "dirichlet", seed=0, alpha=0.1) for i in range(3)]
    assert sum(len(p) for p in parts) == len(banking)
    tops = [Counter(r["label"] for r in p).most_common(1)[0] for p in parts]
    shares = [count / len(p) for (_, count), p in zip(tops, parts, strict=True)]
    assert max(shares) > 3 / 77  # far from the uniform share of one label in 77
    records = [{"instruction": "q", "input": "", "output": "a", "label": c} for c in "aabbbc"]
    natural = [partition_records(records, 3, i, "natural") for i in range(3)]
    assert sorted(len(p) for p in natural) == [1, 2, 3]
    with pytest.raises(ValueError, match="one partition per distinct"):
        partition_records(records, 2, 0, "natural")


def test_partition_errors_are_clear() -> None:
    records = [{"instruction": "q", "input": "", "output": "a"}] * 5
    with pytest.raises(ValueError, match="num-partitions=6 must be between 1 and the 5"):
        partition_records(records, 6, 0)
    with pytest.raises(ValueError, match="needs the field 'label'"):
        partition_records(records, 2, 0, "dirichlet")
    train, test = train_test_split(list(range(20)), 0.1, seed=0)
    assert len(test) == 2 and sorted(train + test) == list(range(20))


def test_malformed_files_name_the_file_and_line(tmp_path: Path) -> None:
    good = {"instruction": "a", "input": "", "output": "b"}
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{broken\n")
    with pytest.raises(DataError, match=r"mine.jsonl line 3: invalid JSON"):
        load_records(str(path))
    path.write_text(json.dumps(good) + "\n" + json.dumps({"instruction": "a"}) + "\n")
    with pytest.raises(DataError, match=r"mine.jsonl line 2: missing field 'output'"):
        load_records(str(path))
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "absent.json"))
    listed = tmp_path / "mine.json"
    listed.write_text(json.dumps([good, good]))
    assert len(load_records(str(listed))) == 2
    with pytest.raises(DataError, match="no such file"):
        load_records("gsm8k", data_dir=tmp_path)
