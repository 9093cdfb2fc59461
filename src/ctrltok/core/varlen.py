"""Attention run per document: the kernels behind ctrltok's two packed-row implementations.

Both are transformers attention implementations registered by name (``AttentionInterface``), so a
model's own layers call them; their "mask" is structure, built by
:func:`ctrltok.core.attention.build_mask` from a batch's document ids and blocked spans:

* :data:`VARLEN` (``"ctrltok_varlen"``, what ``model.attn: auto`` trains with on CPU): one SDPA call
  per document, causal for documents without a hole and with an ``L x L`` mask of that document
  only for documents with one. The mask is a ``[B, 1, 2, T]`` long tensor (doc ids; reflection
  region ids, -1 outside), which transformers passes through untouched as a 4D mask.
* :data:`CUDA` (``"ctrltok_cuda"``, what ``model.attn: auto`` trains with on CUDA): one call of
  torch's flash varlen kernel (``torch.nn.attention.varlen.varlen_attn``) over all documents of
  the batch laid end to end, delimited by ``cu_seqlens``, for batches without holes; batches with
  EPE holes get a FlexAttention ``BlockMask`` from ``build_mask`` instead, and this function hands
  it to transformers' compiled ``flex_attention_forward``. The choice is made per batch by
  ``build_mask``: the model keeps one implementation name.

(The name has no "flash" in it on purpose: transformers 5 takes any implementation name containing
"flash" for a flash-attn kernel to import, and refuses to build the model without one.)

``cu_seqlens`` of a batch: every row's runs of equal doc id, rows laid end to end (a row's padding,
doc id -1, is one more causal run, so padding attends to earlier padding and never to a document).
Two rows of 6 tokens (``_`` = padding)::

    row 0      a0 a1 a2 b0 b1  _        doc_ids  0  0  0  1  1 -1
    row 1      c0 c1 c2 c3 d0 d1        doc_ids  0  0  0  0  1  1

    flattened  a0 a1 a2 | b0 b1 | _ | c0 c1 c2 c3 | d0 d1
    cu_seqlens  [0, 3, 5, 6, 10, 12]    max_seqlen 4

Positions restart per document in ``position_ids`` (the batch's, untouched), so RoPE sees each
document as if alone; the kernel runs causal attention inside each run and nothing across runs.

The flash kernel needs CUDA and fp16/bf16. Under autocast (``train.precision: bf16``) queries,
keys and values are cast to the autocast dtype first (RoPE leaves queries and keys in float32
when the weights are float32). A float32 forward without autocast, a CPU tensor, or a structure
with holes falls back to the per-document SDPA path (same result, slower), with a warning once.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask
from torch.nn.attention.varlen import varlen_attn
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward

VARLEN = "ctrltok_varlen"
CUDA = "ctrltok_cuda"
HALF = (torch.float16, torch.bfloat16)

# Per-structure plans, computed once per structure tensor and reused by every layer of one forward.
# Keyed by id() and checked through a weak reference (tensors compare element-wise, so they cannot
# be dictionary keys); a few recent entries are enough.
_PLANS: dict[int, tuple[weakref.ref, Any]] = {}


def _cached(structure: torch.Tensor, kind: str) -> Any:
    hit = _PLANS.get(id(structure))
    if hit is not None and hit[0]() is structure and kind in hit[1]:
        return hit[1][kind]
    return None


def _store(structure: torch.Tensor, kind: str, plan: Any) -> Any:
    hit = _PLANS.get(id(structure))
    if hit is None or hit[0]() is not structure:
        if len(_PLANS) >= 8:
            _PLANS.clear()
        hit = (weakref.ref(structure), {})
        _PLANS[id(structure)] = hit
    hit[1][kind] = plan
    return plan


# -- per-document SDPA (VARLEN) ----------------------------------------------------------------
def _plan(structure: torch.Tensor) -> list[list[tuple[int, int, torch.Tensor | None]]]:
    plan = _cached(structure, "segments")
    if plan is not None:
        return plan
    doc = structure[:, 0, 0].tolist()
    region = structure[:, 0, 1].cpu()
    plan = []
    for b, row in enumerate(doc):
        segments, s, T = [], 0, len(row)
        while s < T:
            e = s + 1
            while e < T and row[e] == row[s]:
                e += 1
            r = region[b, s:e]
            mask = None
            if bool((r >= 0).any()):
                idx = torch.arange(e - s)
                mask = (idx[:, None] >= idx[None, :]) & ((r[None, :] < 0) | (r[:, None] == r[None, :]))
                mask = mask.to(structure.device)
            segments.append((s, e, mask))
            s = e
        plan.append(segments)
    return _store(structure, "segments", plan)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for :data:`VARLEN`: SDPA per document (module docstring)."""
    T = query.shape[2]
    gqa = query.shape[1] != key.shape[1]  # query head h reads key/value head h // (H / KVH), as repeat_kv
    p = dropout if module.training else 0.0
    if attention_mask is None:  # a single unpacked document
        out = F.scaled_dot_product_attention(query, key, value, is_causal=T > 1, dropout_p=p, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    if attention_mask.dim() != 4 or attention_mask.shape[2] != 2 or attention_mask.shape[-1] != T:
        raise ValueError(f"{VARLEN} expects the [B, 1, 2, T] structure from build_mask, got {tuple(attention_mask.shape)}")
    # split() rather than slicing: its backward is one concatenation, where each slice's backward
    # would fill and add a full-size gradient (measured: most of the time on this CPU).
    rows = []
    for segments, q_row, k_row, v_row in zip(_plan(attention_mask), query.split(1), key.split(1), value.split(1)):
        lengths = [e - s for s, e, _ in segments]
        parts = []
        for (s, e, mask), q, k, v in zip(segments, q_row.split(lengths, 2), k_row.split(lengths, 2), v_row.split(lengths, 2)):
            if mask is None:
                parts.append(F.scaled_dot_product_attention(q, k, v, is_causal=e - s > 1, dropout_p=p, scale=scaling, enable_gqa=gqa))
            else:
                parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scaling, enable_gqa=gqa))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


# -- flash varlen (CUDA) ----------------------------------------------------------------------
def cu_seqlens(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens, max_seqlen)`` of ``doc_ids`` ``[B, T]``: int32 boundaries of every run of equal
    doc id, rows laid end to end (module docstring), on ``doc_ids``' device; computed on the host."""
    doc = doc_ids.detach().cpu()
    B, T = doc.shape
    start = torch.ones_like(doc, dtype=torch.bool)
    start[:, 1:] = doc[:, 1:] != doc[:, :-1]
    starts = start.reshape(-1).nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([B * T])]).to(torch.int32)
    return cu.to(doc_ids.device, non_blocking=True), int(cu.diff().max()) if B * T else 0


def varlen_plan(structure: torch.Tensor, doc_ids: torch.Tensor | None = None,
               has_holes: bool | None = None) -> tuple[torch.Tensor, int, bool]:
    """``(cu_seqlens, max_seqlen, has_holes)`` of a ``[B, 1, 2, T]`` structure, computed once and
    cached for the structure object (``build_mask`` passes the batch's host-side ``doc_ids`` so no
    layer waits on the device)."""
    plan = _cached(structure, "flash")
    if plan is not None:
        return plan
    cu, longest = cu_seqlens(structure[:, 0, 0] if doc_ids is None else doc_ids)
    if has_holes is None:
        has_holes = bool((structure[:, 0, 1] >= 0).any())
    return _store(structure, "flash", (cu.to(structure.device), longest, has_holes))


def varlen_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                     cu_seq_k: torch.Tensor | None, max_q: int, max_k: int, *, scale: float | None = None,
                     window_size: tuple[int, int] = (-1, -1), enable_gqa: bool = False, **_: Any) -> torch.Tensor:
    """What ``varlen_attn`` computes, in plain PyTorch (any device and dtype): one SDPA call per run
    of ``cu_seq_q``, causal when ``window_size == (-1, 0)``. Inputs ``[total, H, D]``. The CPU tests
    and ``bench/gpu_check.py --dry-run`` stand it in for the CUDA kernel."""
    if window_size not in ((-1, -1), (-1, 0)):
        raise ValueError(f"varlen_reference covers full and causal attention only, not window {window_size}")
    causal = window_size == (-1, 0)
    cu = cu_seq_q.tolist()
    if cu_seq_k is not None and cu_seq_k.tolist() != cu:
        raise ValueError("varlen_reference covers cu_seq_q == cu_seq_k only (self-attention)")
    lengths = [e - s for s, e in zip(cu[:-1], cu[1:])]
    if max(lengths, default=0) > max_q:
        raise ValueError(f"a run of {max(lengths)} tokens is longer than max_q={max_q}")
    parts = []
    for q, k, v in zip(query.split(lengths), key.split(lengths), value.split(lengths)):
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           is_causal=causal and len(q) > 1, scale=scale, enable_gqa=enable_gqa)
        parts.append(o.transpose(0, 1))
    return torch.cat(parts, dim=0)


def kernel_runs(query: torch.Tensor) -> bool:
    """Whether the flash kernel takes these queries: CUDA, fp16 or bf16 (after the autocast cast)."""
    return query.device.type == "cuda" and query.dtype in HALF


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast to the autocast dtype when autocast is on (SDPA does this itself; the flash and flex
    kernels do not, and RoPE leaves queries and keys in float32 under float32 weights)."""
    device = tensors[0].device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return tuple(t.to(dtype) for t in tensors)
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:  # mixed without autocast: the widest
        dtype = torch.float32 if torch.float32 in dtypes else tensors[0].dtype
        return tuple(t.to(dtype) for t in tensors)
    return tensors


_WARNED: set[str] = set()


def _fallback(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"{CUDA}: {reason}; running per-document SDPA ({VARLEN}) instead (same result, slower)",
                      RuntimeWarning, stacklevel=3)


def cuda_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | BlockMask | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention function for :data:`CUDA` (module docstring): a BlockMask goes to
    FlexAttention, a ``[B, 1, 2, T]`` structure to one flash varlen call over the whole batch."""
    if isinstance(attention_mask, BlockMask):
        query, key, value = _autocast(query, key, value)
        return flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout and module.training:
        raise ValueError(f"{CUDA}: the flash varlen kernel has no dropout; set the model's attention_dropout to 0")
    if attention_mask is None:  # not a packed training forward (e.g. generation with a cache)
        return varlen_attention_forward(module, query, key, value, None, scaling, dropout, **kwargs)
    B, H, T, D = query.shape
    if attention_mask.dim() != 4 or attention_mask.shape[2] != 2 or attention_mask.shape[-1] != T:
        raise ValueError(f"{CUDA} expects the [B, 1, 2, T] structure or a BlockMask from build_mask, "
                         f"got {tuple(attention_mask.shape)}")
    cu, longest, holes = varlen_plan(attention_mask)
    q, k, v = _autocast(query, key, value)
    if holes or not kernel_runs(q):
        _fallback("a structure with holes (build_mask gives those a BlockMask)" if holes else
                  f"the flash kernel needs CUDA and fp16/bf16, got {q.device.type} {q.dtype} (train.precision: bf16?)")
        return varlen_attention_forward(module, q, k, v, attention_mask, scaling, dropout, **kwargs)
    KVH = k.shape[1]
    out = varlen_attn(q.transpose(1, 2).reshape(B * T, H, D), k.transpose(1, 2).reshape(B * T, KVH, D),
                      v.transpose(1, 2).reshape(B * T, KVH, v.shape[-1]), cu, cu, longest, longest,
                      scale=scaling, window_size=(-1, 0), enable_gqa=H != KVH)
    return out.view(B, T, H, v.shape[-1]), None


def register_varlen() -> None:
    """Make :data:`VARLEN` a transformers attention implementation (idempotent)."""
    AttentionInterface.register(VARLEN, varlen_attention_forward)


def register_cuda() -> None:
    """Make :data:`CUDA` a transformers attention implementation (idempotent)."""
    AttentionInterface.register(CUDA, cuda_attention_forward)
