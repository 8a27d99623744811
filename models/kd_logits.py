"""Soft labels for federated knowledge distillation (KD-FedLLM): pack, aggregate, distil.

Clients upload predictions on a shared public set instead of parameters. Two payloads:

* classification: label log-probabilities, ``(N, C)`` (``dense_pack``);
* generation: per valid position the top-k token log-probabilities and their token ids,
  ``values (N, k)`` and ``indices (N, k) int32`` (``topk_pack``), so an upload costs
  ``N * k * (value bytes + 4)`` whatever the vocabulary.

Temperature is applied where the payload is made (``log_softmax(logits / T)``) and again to
the student in ``kd_loss`` (which scales by ``T**2``), i.e. Hinton's soft targets.

Mass outside the top k: it goes to an explicit "other" bucket, never renormalised over the
k kept tokens. ``kd_loss`` compares teacher and student on the k tokens plus that bucket,
the student's bucket being its total probability outside the k tokens. That is the exact KL
between both distributions coarsened to the same k + 1 categories: a lower bound of the full
KL (it equals it for k = V) that never asks the student to be more confident than the
teacher. Renormalising would tell the student that the unlisted tokens have probability 0
and make it over-confident, all the more as k is small.

Aggregation averages *probabilities*, weighted by client example counts. The weighted mean
``sum_c w_c p_c`` is the distribution minimising ``sum_c w_c KL(p_c || q)``, the divergence
the student is trained with, so it is the teacher closest to every client in the loss's own
terms; it is normalised as it stands and gives a token a client did not list a well-defined
contribution (none). A mean of log-probabilities (a geometric mean) would need
renormalising, is dominated by the most pessimistic client, and is undefined for a token
missing from one client's top k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

VALUE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
# One client's upload: dense label log-probs (N, C), or top-k ``(values, indices)``.
Payload = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _log_probs(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities at ``temperature`` (idempotent on log-probs at T = 1)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return F.log_softmax(scores.float() / temperature, dim=-1)


def _cast(log_probs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast log-probs, keeping them finite (a zero probability becomes the lowest value)."""
    return log_probs.clamp(min=torch.finfo(dtype).min).to(dtype)


def dense_pack(logits: torch.Tensor, temperature: float = 1.0, dtype: str = "fp32") -> torch.Tensor:
    """Classification payload: label log-probabilities (N, C) at ``temperature``."""
    return _cast(_log_probs(logits, temperature), VALUE_DTYPES[dtype])


def topk_pack(
    logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    k: int,
    temperature: float = 1.0,
    dtype: str = "fp16",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generation payload: top-k log-probs (N, k) and token ids (N, k, int32).

    ``logprobs`` is (B, T, V) (raw logits work too: log-softmax is re-applied); the N rows
    are the positions where ``mask`` (B, T) is true, in row-major order, or all of them.
    """
    log_probs = _log_probs(logprobs, temperature)
    rows = log_probs[mask.bool()] if mask is not None else log_probs.reshape(-1, logprobs.shape[-1])
    if not 1 <= k <= rows.shape[-1]:
        raise ValueError(f"k={k} must be in [1, {rows.shape[-1]}]")
    values, indices = rows.topk(k, dim=-1)
    return _cast(values, VALUE_DTYPES[dtype]), indices.to(torch.int32)


@dataclass
class TopKTargets:
    """Unpacked top-k soft labels: kept probabilities, their token ids, the other bucket."""

    probs: torch.Tensor  # (N, k) float32
    indices: torch.Tensor  # (N, k) int64

    @property
    def rest(self) -> torch.Tensor:
        """Probability outside the k tokens (N,), the explicit "other" bucket."""
        return (1.0 - self.probs.sum(-1)).clamp(min=0.0)

    def dense(self, vocab: int) -> torch.Tensor:
        """(N, V) probabilities: the kept ones in place, zero elsewhere (``rest`` aside)."""
        out = torch.zeros(self.probs.shape[0], vocab, device=self.probs.device)
        return out.scatter(1, self.indices, self.probs)


def topk_unpack(values: torch.Tensor, indices: torch.Tensor) -> TopKTargets:
    """The soft labels a top-k payload carries."""
    if values.shape != indices.shape or values.ndim != 2:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)}")
    return TopKTargets(values.float().exp(), indices.long())


def _weights(counts: list[int]) -> list[float]:
    total = sum(counts)
    if total <= 0 or any(n < 0 for n in counts):
        raise ValueError(f"example counts {counts} must be non-negative with a positive sum")
    return [n / total for n in counts]


def _aggregate_topk(
    payloads: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float], k: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean over the union of listed tokens per row, cut back to the top k.

    A token that a client did not list counts as 0 for it: its true probability lies below
    that client's k-th, and its share stays in the other bucket. Cutting the union back to
    ``k`` (by default the largest client k) keeps the download as bounded as the upload.
    """
    rows, device = payloads[0][0].shape[0], payloads[0][0].device
    if any(v.shape[0] != rows for v, _ in payloads):
        raise ValueError("clients' payloads cover different numbers of positions")
    k_out = max(v.shape[1] for v, _ in payloads) if k is None else k
    if k_out < 1:
        raise ValueError(f"k={k_out} must be at least 1")
    probs = torch.cat([w * v.float().exp() for (v, _), w in zip(payloads, weights, strict=True)], 1)
    tokens = torch.cat([i.long() for _, i in payloads], dim=1)
    vocab = int(tokens.max()) + 1 if tokens.numel() else 1
    # One key per (row, token): equal keys are the same token listed by several clients.
    keys = (torch.arange(rows, device=device).unsqueeze(1) * vocab + tokens).flatten()
    unique, inverse = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(unique.shape[0], device=device).index_add_(0, inverse, probs.flatten())
    row = unique // vocab
    counts = torch.bincount(row, minlength=rows)
    if rows and int(counts.min()) < k_out:
        raise ValueError(f"a position lists fewer than k={k_out} distinct tokens")
    col = torch.arange(unique.shape[0], device=device) - (counts.cumsum(0) - counts)[row]
    width = int(counts.max()) if rows else k_out
    table = torch.full((rows, width), -1.0, device=device)  # below any probability
    table[row, col] = summed
    token_table = torch.zeros(rows, width, dtype=torch.long, device=device)
    token_table[row, col] = unique % vocab
    top, where = table.topk(k_out, dim=1)
    dtype = payloads[0][0].dtype
    return _cast(top.log(), dtype), token_table.gather(1, where).to(torch.int32)


def aggregate_soft_labels(
    client_payloads: list[tuple[Payload, int]], k: int | None = None
) -> Payload:
    """Example-weighted mean of the clients' probabilities, as a payload of the same kind.

    Every client must cover the same public examples / positions in the same order. The
    result has the payloads' value dtype, so it goes back to the clients as compact as it
    came; ``k`` (top-k payloads only) bounds its width, by default the largest client k.
    """
    if not client_payloads:
        raise ValueError("no payloads to aggregate")
    weights = _weights([n for _, n in client_payloads])
    payloads = [p for p, _ in client_payloads]
    if all(isinstance(p, torch.Tensor) for p in payloads):
        shapes = {tuple(p.shape) for p in payloads}
        if len(shapes) != 1:
            raise ValueError(f"dense payloads of different shapes: {sorted(shapes)}")
        mean = sum(w * p.float().softmax(-1) for p, w in zip(payloads, weights, strict=True))
        return _cast(mean.log(), payloads[0].dtype)
    if any(isinstance(p, torch.Tensor) for p in payloads):
        raise ValueError("cannot mix dense and top-k payloads")
    return _aggregate_topk(payloads, weights, k)


def kd_loss(
    student_logits: torch.Tensor,
    soft_targets: torch.Tensor | TopKTargets,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher || student) averaged over the valid positions, times ``T**2``.

    ``student_logits`` is (B, T, V) with ``mask`` (B, T) choosing the rows the targets were
    packed from, or already (N, V). Dense targets are teacher log-probs (N, C); top-k
    targets are compared on their k tokens plus the other bucket (see the module notes).
    """
    logits = student_logits[mask.bool()] if mask is not None else student_logits
    student = _log_probs(logits, temperature)
    if isinstance(soft_targets, TopKTargets):
        probs = soft_targets.probs.to(student.device)
        indices = soft_targets.indices.to(student.device)
        if indices.shape[0] != student.shape[0]:
            raise ValueError(f"{indices.shape[0]} target rows for {student.shape[0]} positions")
        kl = (torch.special.xlogy(probs, probs) - probs * student.gather(1, indices)).sum(-1)
        if indices.shape[1] < student.shape[1]:  # the other bucket is not empty
            rest = soft_targets.rest.to(student.device)
            outside = student.scatter(1, indices, float("-inf")).logsumexp(-1)
            kl = kl + torch.special.xlogy(rest, rest) - rest * outside
    else:
        teacher = F.log_softmax(soft_targets.to(student.device).float(), dim=-1)
        if teacher.shape != student.shape:
            raise ValueError(f"targets {tuple(teacher.shape)} for student {tuple(student.shape)}")
        kl = (teacher.exp() * (teacher - student)).sum(-1)
    if kl.numel() == 0:
        return student.sum() * 0.0
    return kl.mean() * temperature**2


def payload_bytes(payload: Payload) -> int:
    """Bytes a payload puts on the wire (values plus, for top-k, the int32 token ids)."""
    tensors = [payload] if isinstance(payload, torch.Tensor) else list(payload)
    return sum(t.numel() * t.element_size() for t in tensors)
