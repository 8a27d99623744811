"""Split learning of a causal LM: the client runs the bottom of the model, the server the top.

``split_model(model, k)`` cuts a (LoRA-wrapped) Llama- or GPT-2-style model at block ``k``:
the :class:`ClientPart` holds the token (and, for GPT-2, position) embeddings and blocks
``[0, k)``, the :class:`ServerPart` blocks ``[k, n)``, the final norm and the LM head. Both
parts reference the modules of the one model (no copies), so peft's LoRA layers inside the
blocks train in place and ``LoraModel.state(range(k))`` is the client-side LoRA.

Only the hidden states at the cut, the attention mask and the labels cross the wire. Each
part rebuilds the rest itself from those: position ids are ``0..T-1`` (as in the unsplit
forward, right padding), the causal + padding mask comes from transformers'
``create_causal_mask``, and Llama's rotary embeddings are recomputed from the position ids.

Activation recomputation: a ClientApp may run in a fresh process for every message, so the
client cannot keep the autograd graph of step t until the server's gradient arrives.
Instead it re-runs its forward on the same batch when the gradient comes back
(:meth:`ClientPart.recompute_backward`). With dropout active the forward is seeded, so the
recomputation draws the same masks and its gradients equal those of the kept graph.

Wire codec: activations and their gradients travel as NumPy arrays (NumPy has no
bfloat16; frozen weights use ``models.wire``'s raw bf16 arrays instead). ``fp16`` scales
each tensor by a power of two so its largest entry sits just below 2^15: fp16 overflows
above 65504, loses precision under 6e-5 and flushes values under 3e-8 to zero, and
gradients of a mean loss are routinely that small (the reason mixed precision uses loss
scaling). The scale is exact and costs one integer of metadata.
``bf16-as-fp16`` rounds to bfloat16 (the range of fp32) and ships its bits unchanged in a
float16 array; the receiver reinterprets them, so the round trip is bit exact to bf16. Read
as fp16 those bits are Inf/NaN only for |x| >= 2^121, so a finiteness check on the raw array
(``models.wire.from_record``) is harmless in practice; ``unpack_activations`` checks the
decoded values.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask

from models.blocks import get_blocks
from models.lora import LoraModel
from models.response_logits import response_positions

WIRE_DTYPES = ("fp32", "fp16", "bf16-as-fp16")
SUPPORTED_MODEL_TYPES = ("llama", "gpt2")
# The fp16 scale puts the largest magnitude in [2^14, 2^15): headroom below fp16's 65504.
_FP16_TOP_EXPONENT = 15


def unwrap(model: nn.Module | LoraModel) -> PreTrainedModel:
    """The HF causal LM inside a ``LoraModel`` or ``PeftModel`` (LoRA layers in place)."""
    if isinstance(model, LoraModel):
        model = model.peft
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers model, got {type(model).__name__}")
    kind = model.config.model_type
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"split learning supports {SUPPORTED_MODEL_TYPES}, not {kind!r}")
    return model


class _Part:
    """What both halves need: the model, its blocks, and the per-block inputs."""

    def __init__(self, model: PreTrainedModel, blocks: range, others: list[nn.Module]) -> None:
        self.model = model
        self.block_range = blocks
        self.blocks = [get_blocks(model)[i] for i in blocks]
        self.owned = [*others, *self.blocks]  # the modules this side would hold on its own
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype

    def _run_blocks(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Run this part's blocks with the mask and position inputs the unsplit model builds."""
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kwargs = {
            "attention_mask": create_causal_mask(
                config=self.model.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                past_key_values=None,
                position_ids=positions,
            ),
            "position_ids": positions,
        }
        if self.model.config.model_type == "llama":
            kwargs["position_embeddings"] = self.model.model.rotary_emb(hidden, positions)
        for block in self.blocks:
            hidden = block(hidden, **kwargs)
        return hidden

    def trainable(self) -> list[nn.Parameter]:
        """Parameters of this part that take gradients (its LoRA), for its optimizer."""
        seen: dict[int, nn.Parameter] = {}
        for module in self.owned:
            for p in module.parameters():
                if p.requires_grad:
                    seen.setdefault(id(p), p)
        return list(seen.values())


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Fix the RNG (dropout masks) inside the block, leaving the caller's RNG untouched."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class ClientPart(_Part):
    """Embeddings and blocks ``[0, k)``: produces the activations the client sends."""

    def __init__(self, model: PreTrainedModel, blocks: range) -> None:
        super().__init__(model, blocks, [model.get_input_embeddings()])

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.model.config.model_type == "gpt2":
            body = self.model.transformer
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            return body.drop(body.wte(input_ids) + body.wpe(positions))
        return self.model.model.embed_tokens(input_ids)

    def forward(self, batch: dict[str, torch.Tensor], seed: int | None = None) -> torch.Tensor:
        """Hidden states at the cut (B, T, H), with the graph kept for ``backward``.

        ``seed`` fixes the dropout masks so that ``recompute_backward`` can reproduce them.
        """
        input_ids = batch["input_ids"].to(self.device)
        mask = batch.get("attention_mask")
        mask = None if mask is None else mask.to(self.device)
        with _seeded(seed, self.device):
            return self._run_blocks(self._embed(input_ids), mask)

    def backward(self, hidden: torch.Tensor, grad_hidden: torch.Tensor) -> None:
        """Finish the backward pass: gradients accumulate on the client LoRA."""
        hidden.backward(grad_hidden.to(device=hidden.device, dtype=hidden.dtype))

    def recompute_backward(
        self, batch: dict[str, torch.Tensor], grad_hidden: torch.Tensor, seed: int | None
    ) -> None:
        """Activation recomputation: re-run the seeded forward, then backward (no kept graph)."""
        self.backward(self.forward(batch, seed), grad_hidden)


class ServerPart(_Part):
    """Blocks ``[k, n)``, final norm and LM head: takes the loss and returns its gradient."""

    def __init__(self, model: PreTrainedModel, blocks: range) -> None:
        gpt2 = model.config.model_type == "gpt2"
        self.norm: nn.Module = model.transformer.ln_f if gpt2 else model.model.norm
        self.head: nn.Module = model.get_output_embeddings()
        super().__init__(model, blocks, [self.norm, self.head])

    def loss(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Mean cross-entropy over response tokens, as ``response_lm_loss`` on the full model.

        The norm and head run on the response positions only (both act per token).
        """
        mask = None if attention_mask is None else attention_mask.to(self.device)
        labels = labels.to(self.device)
        hidden = self._run_blocks(hidden, mask)
        keep = response_positions(labels)
        targets = labels[:, 1:][keep[:, :-1]]
        logits = self.head(self.norm(hidden[keep]))
        if targets.numel() == 0:  # no response token: a zero loss that still has a graph
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), targets)

    def step(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward through the server part: ``(loss, grad of hidden)``.

        Gradients accumulate on the server LoRA; the caller steps and zeroes its optimizer.
        """
        leaf = hidden.detach().to(device=self.device, dtype=self.dtype).requires_grad_(True)
        loss = self.loss(leaf, attention_mask, labels)
        loss.backward()
        assert leaf.grad is not None
        return loss.detach(), leaf.grad


def split_model(model: nn.Module | LoraModel, k: int) -> tuple[ClientPart, ServerPart]:
    """Cut ``model`` before block ``k`` (1 <= k < n): both parts keep LoRA blocks."""
    base = unwrap(model)
    n = len(get_blocks(base))
    if not 1 <= k < n:
        raise ValueError(f"split point {k} must be in [1, {n - 1}] for a {n}-block model")
    return ClientPart(base, range(k)), ServerPart(base, range(k, n))


def pack_activations(
    tensor: torch.Tensor, dtype: str = "fp16"
) -> tuple[np.ndarray, dict[str, str | int]]:
    """``(array, metadata)`` for the wire: activations or their gradients in ``dtype``."""
    t = tensor.detach().cpu()
    if dtype == "fp32":
        return np.ascontiguousarray(t.float().numpy()), {"dtype": dtype, "scale_exp": 0}
    if dtype == "fp16":
        peak = t.abs().max().double() if t.numel() else torch.tensor(0.0, dtype=torch.float64)
        exp = 0 if peak == 0 else _FP16_TOP_EXPONENT - int(torch.frexp(peak).exponent)
        scaled = (t.double() * 2.0**exp).half()
        return np.ascontiguousarray(scaled.numpy()), {"dtype": dtype, "scale_exp": exp}
    if dtype == "bf16-as-fp16":
        bits = t.to(torch.bfloat16).view(torch.float16)
        return np.ascontiguousarray(bits.numpy()), {"dtype": dtype, "scale_exp": 0}
    raise ValueError(f"activation dtype {dtype!r} is not one of {WIRE_DTYPES}")


def unpack_activations(
    array: np.ndarray,
    meta: dict[str, str | int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The tensor ``pack_activations`` encoded, as ``dtype`` on ``device``; must be finite."""
    kind = meta["dtype"]
    wire = {"fp32": np.float32, "fp16": np.float16, "bf16-as-fp16": np.float16}.get(str(kind))
    if wire is None or array.dtype != wire:
        raise ValueError(f"array of {array.dtype} does not match activation dtype {kind!r}")
    value = torch.from_numpy(np.array(array))
    if kind == "bf16-as-fp16":
        value = value.view(torch.bfloat16)
    elif kind == "fp16":
        value = value.double() * 2.0 ** -int(meta["scale_exp"])
    value = value.to(device=device, dtype=dtype)
    if not torch.isfinite(value).all():
        raise ValueError("activations hold NaN or Inf")
    return value


def activation_bytes(array: np.ndarray) -> int:
    """Payload bytes of one packed tensor (elements x bytes per element)."""
    return int(array.nbytes)


def pack_forward(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    dtype: str = "fp16",
) -> tuple[dict[str, np.ndarray], dict[str, str | int]]:
    """What the client sends each step: activations, attention mask (uint8), labels (int32)."""
    activations, meta = pack_activations(hidden, dtype)
    arrays = {"hidden": activations, "labels": labels.detach().cpu().to(torch.int32).numpy()}
    if attention_mask is not None:
        arrays["attention_mask"] = attention_mask.detach().cpu().to(torch.uint8).numpy()
    return arrays, meta


def unpack_forward(
    arrays: dict[str, np.ndarray],
    meta: dict[str, str | int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(hidden, attention_mask, labels)`` as ``ServerPart.step`` takes them."""
    hidden = unpack_activations(arrays["hidden"], meta, device, dtype)
    mask = arrays.get("attention_mask")
    labels = torch.from_numpy(np.array(arrays["labels"])).long().to(device)
    return hidden, None if mask is None else torch.from_numpy(np.array(mask)).to(device), labels


def payload_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Payload bytes of one message's arrays (Flower adds a small header per array)."""
    return sum(activation_bytes(a) for a in arrays.values())
