"""The validation part: fixed whatever the run's seed, and never in any client's data."""

import pytest

from client_app.client_data import _client_data
from federation.run_config import ConfigError, RunConfig
from server_app.server_eval import heldout_records, task_key
from task_data import load_records, tokenize_records
from task_data.validation import validation_split
from tests.tiny import tiny


def _config(**overrides) -> RunConfig:
    values = {"model": "tiny-llama", "task": "banking77", "num-partitions": 2,
              "eval-examples": 300, "client-eval-examples": 10_000} | overrides  # fmt: skip
    return RunConfig.from_flower(values)


def _seen(config: RunConfig, tokenizer) -> set[tuple[int, ...]]:
    """Every example (token ids) the two clients train or evaluate on."""
    seen: set[tuple[int, ...]] = set()
    for partition in (0, 1):
        data = _client_data(config, partition, tokenizer, "")
        seen |= {tuple(e["input_ids"]) for e in (*data.train, *data.test)}
    return seen


def test_no_client_trains_or_evaluates_on_the_servers_validation_texts() -> None:
    _, tokenizer = tiny("tiny-llama")
    config = _config(**{"eval-split": "validation", "seed": 7})
    held = heldout_records(config)
    assert len(held) == 300
    assert held == heldout_records(_config(**{"eval-split": "validation"}))  # seed-free
    rest, _ = validation_split(load_records("banking77", "train"), 300)

    def ids(records) -> set[tuple[int, ...]]:
        return {
            tuple(e["input_ids"]) for e in tokenize_records(tokenizer, records, config.seq_length)
        }

    only_held = ids(held) - ids(rest)  # Banking77 repeats a few texts across records
    assert len(only_held) > 250
    assert not _seen(config, tokenizer) & only_held
    # With the test split the clients partition the whole training split, these texts too.
    assert only_held <= _seen(_config(**{"eval-split": "test", "seed": 7}), tokenizer)


def test_validation_split_is_disjoint_and_refuses_to_take_everything() -> None:
    records = [{"i": i} for i in range(50)]
    rest, held = validation_split(records, 10)
    assert len(held) == 10 and len(rest) == 40
    assert not {r["i"] for r in rest} & {r["i"] for r in held}
    with pytest.raises(ValueError, match="none of the 50"):
        validation_split(records, 50)


def test_eval_split_keys() -> None:
    assert _config().resolved_eval_split == "test"
    assert _config(task="alpaca_seed").resolved_eval_split == "validation"
    with pytest.raises(ConfigError, match="needs a task with a test split"):
        _config(task="alpaca_seed", **{"eval-split": "test"})
    assert task_key("/data/site/two-part.jsonl") == "two_part"
