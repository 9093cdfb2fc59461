"""The loss model: the one forward pass that training and every held-out loss share.

A forward here is always the same four steps, so every number ctrltok reports (the training loss,
``eval_loss`` in ``metrics.jsonl``, ``ctrltok eval``, the EPE reflection loss) is computed the
same way:

1. the attention mask for the batch's implementation, built from its document ids and blocked
   spans by :func:`ctrltok.core.attention.build_mask` (never inferred from positions);
2. the decoder on the packed rows (``use_cache=False``), giving hidden states ``[B, T, H]``;
3. the LM head on the supervised positions only (``targets != -100``), in chunks of at most
   ``ce_chunk`` positions whose logits are recomputed in the backward (:func:`chunked_ce_sum`), so
   memory holds ``ce_chunk x vocab`` logits at a time, never ``T x vocab`` (pretraining supervises
   nearly every position); cross-entropy summed there;
4. the optional auxiliary head (EPE's constitution head) at ``batch.head_index`` through
   :func:`ctrltok.core.heads.constitution_loss`.

:class:`LossModel` wraps the model and head as one ``nn.Module``, so DDP / FSDP / DeepSpeed see a
single forward. :func:`run_batch` feeds it a :class:`~ctrltok.core.packing.Batch`;
:func:`heldout_loss` averages over batches; :func:`hidden_states` and :func:`logits` give the
raw outputs for checks (packed == unpacked, the EPE equivalence). :func:`apply_liger` is
``model.liger``: liger-kernel's Triton kernels in the decoder (an optional dependency).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ctrltok.core.attention import build_mask
from ctrltok.core.example import IGNORE
from ctrltok.core.heads import constitution_loss
from ctrltok.core.packing import Batch


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _mask(model: torch.nn.Module, batch: Batch, impl: str | None) -> Any:
    configured = getattr(base_model(model).config, "_attn_implementation", None)
    impl = impl or configured
    if configured is not None and impl != configured:
        raise ValueError(f"mask for {impl!r} requested but the model runs {configured!r} attention; "
                         f"load the model with attn_implementation={impl!r} or pass impl={configured!r}")
    return build_mask(batch, impl, dtype=next(model.parameters()).dtype)


def decoder_hidden(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask: Any) -> torch.Tensor:
    """Last hidden states ``[B, T, H]`` of the decoder (no LM head, no cache)."""
    decoder = base_model(model).get_decoder()
    return decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                   use_cache=False).last_hidden_state


def hidden_states(model: torch.nn.Module, batch: Batch, impl: str | None = None) -> torch.Tensor:
    """Hidden states ``[B, T, H]`` of a packed batch under its explicit mask."""
    batch = batch.to(next(model.parameters()).device)
    return decoder_hidden(model, batch.input_ids, batch.position_ids, _mask(model, batch, impl))


def logits(model: torch.nn.Module, batch: Batch, impl: str | None = None) -> torch.Tensor:
    """Full logits ``[B, T, V]`` (float32) of a packed batch: for checks, never for training."""
    hidden = hidden_states(model, batch, impl)
    return base_model(model).get_output_embeddings()(hidden).float()


# Logits held at once by the chunked cross-entropy: 2**28 float32 values (1 GiB), i.e. 5,461
# positions of a 49,152-token vocabulary, 2,092 of a 128,256 one.
CE_CHUNK_ELEMENTS = 2**28


def ce_chunk_rows(vocab_size: int) -> int:
    """The default chunk of :func:`chunked_ce_sum`: :data:`CE_CHUNK_ELEMENTS` logits, >= 128 positions."""
    return max(128, CE_CHUNK_ELEMENTS // max(int(vocab_size), 1))


def _ce_chunk(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
              weights: torch.Tensor | None) -> torch.Tensor:
    ce = F.cross_entropy(head(hidden).float(), targets, reduction="none")
    return (ce if weights is None else ce * weights).sum()


def chunked_ce_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                   weights: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Summed (weighted) cross-entropy of ``head(hidden)`` (``[N, H]`` -> logits ``[N, V]``, float32)
    against ``targets`` ``[N]``, never holding more than ``chunk`` positions' logits.

    Up to ``chunk`` positions: one plain computation. More: each chunk runs under a non-reentrant
    ``torch.utils.checkpoint``, which keeps only the chunk's hidden states and recomputes its
    logits in the backward (the head's forward runs twice: about a third more LM-head work, for
    memory flat in the number of targets). Same value and gradients as unchunked up to float
    summation order (tested). ``chunk=None``: :func:`ce_chunk_rows` of the head's output size.
    """
    n = hidden.shape[0]
    if chunk is None:
        chunk = ce_chunk_rows(getattr(head, "out_features", None) or getattr(head, "num_embeddings", 0) or 1)
    if chunk < 1:
        raise ValueError(f"ce_chunk must be >= 1 (positions per chunk), got {chunk}")
    if n <= chunk:
        return _ce_chunk(head, hidden, targets, weights)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk):
        w = None if weights is None else weights[s:s + chunk]
        total = total + checkpoint(_ce_chunk, head, hidden[s:s + chunk], targets[s:s + chunk], w,
                                   use_reentrant=False, preserve_rng_state=False)
    return total


class LossModel(torch.nn.Module):
    """Body + LM head on supervised positions only (+ optional constitution head): one forward for DDP.

    ``ce_chunk``: positions per chunk of the LM head and cross-entropy (:func:`chunked_ce_sum`;
    None: 1 GiB of float32 logits at a time).
    """

    def __init__(self, model: torch.nn.Module, head: torch.nn.Module | None = None, head_weight: float = 1.0,
                 ce_chunk: int | None = None):
        super().__init__()
        self.model = model
        self.head = head
        self.head_weight = head_weight
        self.ce_chunk = ce_chunk

    def forward(self, input_ids, position_ids, attention_mask, targets, weights=None, head_index=None,
                head_targets=None, n_targets: float = 1.0, n_head: float = 1.0):
        """``(loss, CE sum, head BCE sum)``; the loss is ``CE sum / n_targets + w * BCE sum / n_head``
        so that dividing by the whole step's counts makes accumulation and processes add up."""
        hidden = decoder_hidden(self.model, input_ids, position_ids, attention_mask)
        sel = targets != IGNORE
        lm_head = base_model(self.model).get_output_embeddings()
        chunk = self.ce_chunk if self.ce_chunk is not None else ce_chunk_rows(base_model(self.model).config.vocab_size)
        ce_sum = chunked_ce_sum(lm_head, hidden[sel], targets[sel], None if weights is None else weights[sel], chunk)
        loss = ce_sum / n_targets
        head_sum = torch.zeros((), device=hidden.device)
        if self.head is not None:
            index = head_index if head_index is not None else torch.zeros((0, 2), dtype=torch.long)
            # with no head position this is a zero that still depends on the head: DDP's graph stays complete
            head_sum = constitution_loss(self.head, hidden, index, head_targets, reduction="sum")
            loss = loss + self.head_weight * head_sum / n_head
        return loss, ce_sum.detach(), head_sum.detach()


def apply_liger(model: torch.nn.Module) -> torch.nn.Module:
    """``model.liger: true``: liger-kernel's Triton kernels in the decoder (RMSNorm, RoPE, SwiGLU),
    patched into this model instance. Its cross-entropy patches stay off: the loss is
    :class:`LossModel`'s (LM head on supervised positions, chunked). Call it on the transformers
    model before LoRA wraps it. Needs the optional ``liger-kernel`` package (and a GPU for its
    kernels); a clear error without it."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as exc:
        raise RuntimeError("model.liger: true needs the liger-kernel package (pip install liger-kernel, on a CUDA "
                           f"machine); it could not be imported: {exc}. Set model.liger: false to train without it") from exc
    _apply_liger_kernel_to_instance(model=base_model(model), rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)
    return model


def run_batch(loss_model: torch.nn.Module, batch: Batch, impl: str, device: Any, n_targets: float,
              n_head: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward of ``loss_model`` (a :class:`LossModel`, possibly wrapped by DDP) on ``batch``."""
    batch = batch.to(device)
    mask = build_mask(batch, impl, dtype=next(loss_model.parameters()).dtype)
    return loss_model(batch.input_ids, batch.position_ids, mask, batch.targets, batch.weights,
                      batch.head_index, batch.head_targets, n_targets, n_head)


@torch.no_grad()
def heldout_loss(loss_model: torch.nn.Module, batches: list[Batch], impl: str, device: Any) -> dict:
    """Mean CE per supervised target (and mean head BCE per head position) over ``batches``.

    Call it with the *unwrapped* module on one process: a DDP forward on one rank alone would wait
    forever for the others at its buffer broadcast.
    """
    was = loss_model.training
    loss_model.eval()
    ce_total, n_total, head_total, n_head = 0.0, 0, 0.0, 0
    try:
        for batch in batches:
            if batch.n_targets == 0 and batch.head_index.shape[0] == 0:
                continue
            _, ce_sum, head_sum = run_batch(loss_model, batch, impl, device, 1.0, 1.0)
            ce_total += float(ce_sum)
            n_total += batch.n_targets
            head_total += float(head_sum)
            n_head += int(batch.head_index.shape[0])
    finally:
        loss_model.train(was)
    out = {"eval_loss": ce_total / n_total if n_total else None, "eval_targets": n_total, "ce_sum": ce_total}
    if n_head:
        out["eval_head_bce"] = head_total / n_head
    return out
