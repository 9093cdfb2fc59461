"""The loss model: the one forward pass that training and every held-out loss share.

A forward here is always the same four steps, so every number ctrltok reports (the training loss,
``eval_loss`` in ``metrics.jsonl``, ``ctrltok eval``, the EPE reflection loss) is computed the
same way:

1. the attention mask for the batch's implementation, built from its document ids and blocked
   spans by :func:`ctrltok.core.attention.build_mask` (never inferred from positions);
2. the decoder on the packed rows (``use_cache=False``), giving hidden states ``[B, T, H]``;
3. the LM head on the supervised positions only (``targets != -100``), so memory is
   ``targets x vocab``, not ``rows x T x vocab``; cross-entropy summed there;
4. the optional auxiliary head (EPE's constitution head) at ``batch.head_index`` through
   :func:`ctrltok.core.heads.constitution_loss`.

:class:`LossModel` wraps the model and head as one ``nn.Module``, so DDP / FSDP / DeepSpeed see a
single forward. :func:`run_batch` feeds it a :class:`~ctrltok.core.packing.Batch`;
:func:`heldout_loss` averages over batches; :func:`hidden_states` and :func:`logits` give the
raw outputs for checks (packed == unpacked, the EPE equivalence).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

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


class LossModel(torch.nn.Module):
    """Body + LM head on supervised positions only (+ optional constitution head): one forward for DDP."""

    def __init__(self, model: torch.nn.Module, head: torch.nn.Module | None = None, head_weight: float = 1.0):
        super().__init__()
        self.model = model
        self.head = head
        self.head_weight = head_weight

    def forward(self, input_ids, position_ids, attention_mask, targets, weights=None, head_index=None,
                head_targets=None, n_targets: float = 1.0, n_head: float = 1.0):
        """``(loss, CE sum, head BCE sum)``; the loss is ``CE sum / n_targets + w * BCE sum / n_head``
        so that dividing by the whole step's counts makes accumulation and processes add up."""
        hidden = decoder_hidden(self.model, input_ids, position_ids, attention_mask)
        sel = targets != IGNORE
        out = base_model(self.model).get_output_embeddings()(hidden[sel]).float()
        ce = F.cross_entropy(out, targets[sel], reduction="none")
        if weights is not None:
            ce = ce * weights[sel]
        ce_sum = ce.sum()
        loss = ce_sum / n_targets
        head_sum = torch.zeros((), device=hidden.device)
        if self.head is not None:
            index = head_index if head_index is not None else torch.zeros((0, 2), dtype=torch.long)
            # with no head position this is a zero that still depends on the head: DDP's graph stays complete
            head_sum = constitution_loss(self.head, hidden, index, head_targets, reduction="sum")
            loss = loss + self.head_weight * head_sum / n_head
        return loss, ce_sum.detach(), head_sum.detach()


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
