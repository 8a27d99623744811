"""KD-FedLLM's server checks each client's soft labels before averaging them: a payload
that is not one over the run's public set (shape, kind, token ids, probabilities) is
refused with the reason, where it used to end the round's aggregation or distillation.

The payloads are what a real ClientApp computes with the tiny model on the real public set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from federation.kd_public import (
    PublicSet,
    payload_problem,
    payload_record,
    public_set,
    soft_labels,
)
from federation.run_config import RunConfig
from models.wire import from_record, to_record
from tests.flower_runtime import tiny_run_config
from tests.tiny import tiny

K = 3


def _setting(task: str, tmp_path: Path) -> tuple[ArrayRecord, PublicSet, int]:
    """A real client's soft labels on the run's public set, the set, the vocabulary size."""
    model, tokenizer = tiny("tiny-llama")
    overrides = {"method": "kdfed", "task": task, "kd_public_examples": 4, "kd_topk": K}
    config = RunConfig.from_flower(tiny_run_config(tmp_path, "kd", **overrides))
    public = public_set(config, tokenizer)
    record = payload_record(soft_labels(model, public, config.kd_temperature, K))
    return record, public, int(model.config.vocab_size)


def _changed(record: ArrayRecord, **changes: Callable[[torch.Tensor], torch.Tensor]) -> ArrayRecord:
    arrays = from_record(record)
    return to_record({name: changes.get(name, _same)(value) for name, value in arrays.items()})


def _same(value: torch.Tensor) -> torch.Tensor:
    return value


TOPK_CASES = {
    "no record": (lambda r: None, "no 'soft-labels' record"),
    "dense payload in a top-k round": (
        lambda r: ArrayRecord({"values": r["values"]}),
        "soft-labels arrays ['values']",
    ),
    "one row short": (lambda r: _changed(r, values=lambda v: v[1:]), "values of shape ["),
    "float64 values": (lambda r: _changed(r, values=lambda v: v.double()), "dtype float64"),
    "text values": (
        lambda r: ArrayRecord({"values": Array(np.array([["a"]])), "indices": r["indices"]}),
        "values of dtype <U1",
    ),
    "a token id listed k times": (
        lambda r: _changed(
            r,
            indices=lambda i: i[:, :1].expand(i.shape).contiguous(),
            values=lambda v: torch.full_like(v, math.log(0.2)),
        ),
        "a position lists a token id twice",
    ),
    "a token id past the vocabulary": (
        lambda r: _changed(r, indices=lambda i: i.clone().fill_(10**6)),
        "token ids outside [0, ",
    ),
    "int indices of another width": (
        lambda r: _changed(r, indices=lambda i: i.to(torch.int16)),
        "indices of dtype int16",
    ),
    "probabilities above 1": (
        lambda r: _changed(r, values=torch.zeros_like),  # log 1 for each of the k tokens
        "a row's kept probability exceeds 1",
    ),
    "positive log-probabilities": (
        lambda r: _changed(r, values=lambda v: v.abs() + 1),
        "not finite log-probabilities",
    ),
    "NaN": (lambda r: _changed(r, values=lambda v: v * float("nan")), "holds NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(TOPK_CASES))
def test_a_bad_topk_payload_is_refused_with_its_reason(case: str, tmp_path: Path) -> None:
    record, public, vocab = _setting("gsm8k", tmp_path)
    assert payload_problem(record, public, K, vocab) is None  # what a client sends passes
    corrupt, reason = TOPK_CASES[case]
    problem = payload_problem(corrupt(record), public, K, vocab)
    assert problem is not None and reason in problem


def test_a_dense_payload_must_cover_every_public_text_and_label(tmp_path: Path) -> None:
    record, public, vocab = _setting("banking77", tmp_path)
    assert payload_problem(record, public, K, vocab) is None
    labels = len(public.labels)
    short = _changed(record, values=lambda v: v[:, :-1])
    assert f"expected [4, {labels}]" in str(payload_problem(short, public, K, vocab))
    topk = ArrayRecord({**dict(record.items()), "indices": record["values"]})
    assert "arrays ['indices', 'values']" in str(payload_problem(topk, public, K, vocab))
