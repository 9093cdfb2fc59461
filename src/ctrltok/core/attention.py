"""Turn a batch's attention structure (document ids + blocked spans) into the backend's mask.

A :class:`~ctrltok.core.packing.Batch` describes attention as structure: ``doc_ids`` (documents never
see each other; causal inside a document) and ``blocked`` spans ``(q0, q1, k0, k1)`` (queries in
``[q0, q1)`` must not see keys in ``[k0, k1)``, e.g. EPE's post-reflection tokens and the
reflection). :func:`build_mask` turns that into what the model's attention implementation uses,
at the last moment:

* ``"sdpa"``: a 4D bool mask ``[B, 1, T, T]``, True = attend. transformers 5 passes a 4D mask
  through untouched (``masking_utils._preprocess_mask_arguments``) and its SDPA integration hands
  it to ``torch.nn.functional.scaled_dot_product_attention`` as ``attn_mask``.
* ``"eager"``: the same pattern as an additive float mask, 0 where attended and
  ``finfo(dtype).min`` elsewhere (Llama's ``eager_attention_forward`` adds the mask to the
  scores).
* ``"flex_attention"``: a FlexAttention ``BlockMask`` from ``create_block_mask`` over a
  ``mask_mod`` that reads per-token tensors only (no dense ``T x T`` tensor). EPE-shaped holes
  (each span blocks the rest of its document from a key range ending where the queries start) are
  expressed as a per-token *reflection region id*: a key inside a region is visible only to
  queries of the same region. Any other spans go through a general rectangle test.

* ``"ctrltok_varlen"`` (registered with transformers' ``AttentionInterface`` when this module is
  imported): attention run per document, like varlen flash attention. The "mask" is the structure
  itself, a small ``[B, 1, 2, T]`` long tensor (doc ids; reflection region ids) that transformers
  passes through untouched as a 4D mask; the attention function cuts each row into documents and
  runs SDPA on each, causal (``is_causal``, no mask) for documents without a hole and with a
  ``L x L`` mask of that document only for documents with one. No ``T x T`` tensor, no cross-
  document work, and it has a backward on CPU (FlexAttention has none in torch 2.13). It supports
  EPE-shaped holes; other blocked spans are an error naming the other implementations.

Never pass a packed batch without this mask: transformers infers documents from restarting
``position_ids`` only when no KV cache is in use, and reads EPE's aliased positions as a new
document (a transformers behaviour checked when this was written). Padding tokens (doc id -1) attend to themselves (and earlier padding),
so no softmax row is empty.

Use ``build_mask(batch, impl)`` as the ``attention_mask`` of a forward, or the forwards of
:mod:`ctrltok.core.loss`, which build it.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask
from transformers import AttentionInterface

from ctrltok.core.packing import Batch

VARLEN = "ctrltok_varlen"
AUTO = "auto"
IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", VARLEN)


def loading_attention(requested: str) -> str:
    """The implementation a model is *loaded* with: ``auto`` and :data:`VARLEN` (a training-time
    path with no KV cache) load as ``sdpa``, so evaluation, generation and the saved checkpoint use
    a standard implementation."""
    return "sdpa" if requested in (AUTO, VARLEN) else requested


def training_attention(requested: str, device: torch.device | str) -> str:
    """The implementation packed *training* forwards run with.

    ``auto`` picks per-document SDPA (:data:`VARLEN`) on CPU: one causal SDPA call per document,
    which skips the blocks a dense ``[T, T]`` mask would compute and discard (faster on the same
    rows: bench/README.md, sft_throughput; the same weights after training: tests/test_train.py).
    Elsewhere ``auto`` keeps ``sdpa`` with the dense mask. Any other value is used as given.
    """
    impl = requested if requested != AUTO else (VARLEN if torch.device(device).type == "cpu" else "sdpa")
    if impl == VARLEN:
        register_varlen()
    return impl


def dense_mask(batch: Batch) -> torch.Tensor:
    """The bool mask ``[B, 1, T, T]`` (True = the query row may attend to the key column)."""
    doc = batch.doc_ids
    T = doc.shape[1]
    idx = torch.arange(T, device=doc.device)
    allowed = (doc[:, :, None] == doc[:, None, :]) & (idx[:, None] >= idx[None, :])
    for b, spans in enumerate(batch.blocked):
        for q0, q1, k0, k1 in spans:
            allowed[b, q0:q1, k0:k1] = False
    return allowed[:, None]


def reflection_regions(batch: Batch) -> torch.Tensor | None:
    """Per-token region ids ``[B, T]`` (-1 outside) if every blocked span is EPE-shaped, else None.

    A span is EPE-shaped when its queries start where its keys end and run to the end of the
    document, and the key ranges do not overlap. Then "key k in region r is visible only to
    queries in region r" blocks exactly the spans (causality and documents do the rest).
    """
    doc = batch.doc_ids.cpu()
    B, T = doc.shape
    region = torch.full((B, T), -1, dtype=torch.long)
    for b, spans in enumerate(batch.blocked):
        row = doc[b].tolist()
        for r, (q0, q1, k0, k1) in enumerate(spans):
            if k0 >= k1 or q0 != k1 or q0 >= q1:
                return None
            d = row[k0]
            if any(x != d for x in row[k0:q1]) or (q1 < T and row[q1] == d):
                return None  # not a single document, or the queries stop before its end
            if bool((region[b, k0:k1] >= 0).any()):
                return None
            region[b, k0:k1] = r
    return region.to(batch.doc_ids.device)


def _flex_block_mask(batch: Batch, block_size: int, compile_mask: bool) -> Any:
    doc = batch.doc_ids
    B, T = doc.shape
    region = reflection_regions(batch)
    if region is not None:

        def mask_mod(b, h, q, kv):
            r = region[b, kv]
            return (doc[b, q] == doc[b, kv]) & (kv <= q) & ((r < 0) | (region[b, q] == r))

    else:
        # General holes: rectangles padded to a power-of-two count so a compiled kernel sees few shapes.
        n = max(len(s) for s in batch.blocked)
        S = 1 << max(0, (n - 1).bit_length())
        spans = torch.zeros((B, S, 4), dtype=torch.long)
        for b, row in enumerate(batch.blocked):
            if row:
                spans[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        spans = spans.to(doc.device)

        def mask_mod(b, h, q, kv):
            ok = (doc[b, q] == doc[b, kv]) & (kv <= q)
            for s in range(S):
                inside = (q >= spans[b, s, 0]) & (q < spans[b, s, 1]) & (kv >= spans[b, s, 2]) & (kv < spans[b, s, 3])
                ok = ok & ~inside
            return ok

    make = _compiled_create_block_mask() if compile_mask else create_block_mask
    return make(mask_mod, B=B, H=None, Q_LEN=T, KV_LEN=T, device=doc.device, BLOCK_SIZE=block_size)


_COMPILED: dict[str, Any] = {}


def _compiled_create_block_mask() -> Any:
    """``torch.compile(create_block_mask)``, made once: it evaluates the mask_mod block by block."""
    if "create_block_mask" not in _COMPILED:
            _COMPILED["create_block_mask"] = torch.compile(create_block_mask)
    return _COMPILED["create_block_mask"]


def build_mask(
    batch: Batch,
    impl: str,
    dtype: torch.dtype = torch.float32,
    *,
    block_size: int = 128,
    compile_mask: bool = True,
) -> Any:
    """The attention mask for ``impl`` ("sdpa", "eager" or "flex_attention"); see the module docstring.

    ``dtype`` is the eager mask's float type (the model's dtype). ``block_size`` and
    ``compile_mask`` only concern FlexAttention (``compile_mask=False`` evaluates the mask_mod
    eagerly, which materialises it densely: fine for small tests, slow for long rows). On CPU,
    torch 2.13's FlexAttention kernel was exact only on rows padded to a multiple of the block size
    (``collate(..., pad_to=128)``); on a 24-token row it returned wrong logits, sometimes NaN.
    """
    if impl == "sdpa":
        return dense_mask(batch)
    if impl == "eager":
        allowed = dense_mask(batch)
        return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    if impl == "flex_attention":
        return _flex_block_mask(batch, block_size, compile_mask)
    if impl == VARLEN:
        return varlen_structure(batch)
    raise ValueError(f"attention implementation {impl!r} is not supported; expected one of {IMPLEMENTATIONS}")


def varlen_structure(batch: Batch) -> torch.Tensor:
    """``[B, 1, 2, T]`` long: row 0 the doc ids, row 1 the reflection region ids (-1 outside)."""
    region = reflection_regions(batch)
    if region is None:
        raise ValueError(
            f"{VARLEN} supports EPE-shaped holes only (each span blocks the rest of its document from a key "
            "range that ends where its queries start); use 'sdpa', 'eager' or 'flex_attention' for other spans"
        )
    return torch.stack([batch.doc_ids, region], dim=1)[:, None]


# Segment plans, computed once per structure tensor and reused by every layer of one forward.
# Keyed by id() and checked through a weak reference (tensors compare element-wise, so they cannot
# be dictionary keys); a few recent entries are enough.
_PLANS: dict[int, tuple[weakref.ref, list]] = {}


def _plan(structure: torch.Tensor) -> list[list[tuple[int, int, torch.Tensor | None]]]:
    hit = _PLANS.get(id(structure))
    if hit is not None and hit[0]() is structure:
        return hit[1]
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
    if len(_PLANS) >= 8:
        _PLANS.clear()
    _PLANS[id(structure)] = (weakref.ref(structure), plan)
    return plan


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


def register_varlen() -> None:
    """Make :data:`VARLEN` a transformers attention implementation (idempotent). Called by
    :func:`training_attention` when it picks it; call it before setting it on a model by hand."""
    AttentionInterface.register(VARLEN, varlen_attention_forward)




def draw(batch: Batch, row: int = 0, names: dict[int, str] | None = None) -> str:
    """Row ``row`` of a batch as text: tokens, positions, doc ids, targets and the mask.

    ``names`` maps token ids to short names (default: the ids). In the mask ``1`` means the query
    (line) may attend to the key (column). The docstring pictures in ``packing`` and
    ``reflection`` are this function's output, and tests assert them.
    """
    names = names or {}
    ids = batch.input_ids[row].tolist()
    docs = batch.doc_ids[row].tolist()

    def name(i: int, t: int) -> str:
        return "_" if docs[t] < 0 else names.get(i, str(i))

    def name_target(t: int) -> str:
        v = int(batch.targets[row, t])
        return "." if v < 0 else names.get(v, str(v))

    tokens = [name(i, t) for t, i in enumerate(ids)]
    width = max(2, max(len(s) for s in tokens)) + 1
    lines = []

    def line(label: str, cells: list[str]) -> None:
        lines.append((label.ljust(10) + "".join(c.rjust(width) for c in cells)).rstrip())

    line("tokens", tokens)
    line("positions", [str(p) for p in batch.position_ids[row].tolist()])
    line("doc_ids", [str(d) for d in docs])
    line("targets", [name_target(t) for t in range(len(ids))])
    lines.append("")
    allowed = dense_mask(batch)[row, 0]
    line("mask", tokens)
    for q, tok in enumerate(tokens):
        line("  " + tok, ["1" if a else "." for a in allowed[q].tolist()])
    return "\n".join(lines)
