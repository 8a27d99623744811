"""Split learning's replies are untrusted: each is checked before the server's part runs it.

A step reply must carry one batch the server's blocks can take (the round's wire dtype and
a sane scale, hidden states of the model's width, labels that are token ids or -100, a 0/1
attention mask, all of one batch and length, finite after decoding); a final reply exactly
the client LoRA that was sent, of the same shapes and dtype, finite and within the norm
screens the other methods use. Without these a missing record, a wrong width or a label id
past the vocabulary ended the run in the server's forward pass, and an incomplete LoRA was
averaged with weights that no longer sum to one.
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log

from federation.messages import ACTIVATIONS
from models.split_model import unpack_activations
from strategies.update_checks import Rejection, bound_norms, screen_replies

IGNORE_INDEX = -100  # labels of prompt and padding positions
MAX_SCALE_EXP = 1000  # a float64 power of two stays finite and nonzero within it


def forward_problem(reply: Message, hidden_size: int, vocab: int, wire_dtype: str) -> str | None:
    """Why a step reply is not one batch for the server's part, or None."""
    record = reply.content.array_records.get(ACTIVATIONS)
    meta_record = reply.content.config_records.get(f"{ACTIVATIONS}-meta")
    if record is None or meta_record is None:
        return f"no {ACTIVATIONS!r} record and its meta"
    names = set(record)
    if not {"hidden", "labels"} <= names or names - {"hidden", "labels", "attention_mask"}:
        return f"{ACTIVATIONS} arrays {sorted(names)}"
    meta = dict(meta_record)
    scale = meta.get("scale_exp")
    if meta.get("dtype") != wire_dtype:
        return f"activation dtype {meta.get('dtype')!r}, the run's split-dtype is {wire_dtype!r}"
    if isinstance(scale, bool) or not isinstance(scale, int) or abs(scale) > MAX_SCALE_EXP:
        return f"scale_exp={scale!r} is not an integer within ±{MAX_SCALE_EXP}"
    arrays = {name: array.numpy() for name, array in record.items()}
    hidden, labels = arrays["hidden"], arrays["labels"]
    if hidden.ndim != 3 or hidden.shape[2] != hidden_size:
        return (
            f"hidden states of shape {list(hidden.shape)}, expected [batch, tokens, {hidden_size}]"
        )
    batch = tuple(hidden.shape[:2])
    for name in ("labels", "attention_mask"):
        value = arrays.get(name)
        if value is not None and (
            value.shape != batch or not np.issubdtype(value.dtype, np.integer)
        ):
            return (
                f"{name} {value.dtype}{list(value.shape)}, expected integers of shape {list(batch)}"
            )
    if ((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))).any():
        return f"labels outside [0, {vocab}) other than {IGNORE_INDEX}"
    if "attention_mask" in arrays and not np.isin(arrays["attention_mask"], (0, 1)).all():
        return "attention_mask holds values other than 0 and 1"
    try:
        unpack_activations(hidden, meta)
    except ValueError as error:
        return str(error)
    return None


def screen_finals(
    finals: list[Message], sent: ArrayRecord, max_norm_ratio: float, max_update_norm: float
) -> tuple[list[Message], list[Rejection]]:
    """The final replies whose only ArrayRecord is the client LoRA as sent (same keys,
    shapes and dtype, finite) and whose update passes the norm screens, and the rejected."""
    only_lora = [r for r in finals if set(r.content.array_records) == {"arrays"}]
    rejected = [
        Rejection(r.metadata.src_node_id, f"ArrayRecords {sorted(r.content.array_records)}")
        for r in finals
        if all(r is not kept for kept in only_lora)
    ]
    for rejection in rejected:
        log(WARNING, "Rejected the update of node %d: %s", rejection.node, rejection.reason)
    kept, more = screen_replies(only_lora, sent, max_norm_ratio)
    kept, bounded = bound_norms(kept, sent, max_update_norm)
    return kept, rejected + more + bounded
