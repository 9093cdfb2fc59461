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
* ``"ctrltok_varlen"`` (:mod:`ctrltok.core.varlen`): attention run per document, one SDPA call
  each. The "mask" is the structure itself, a small ``[B, 1, 2, T]`` long tensor (doc ids;
  reflection region ids) that transformers passes through untouched as a 4D mask. No ``T x T``
  tensor, no cross-document work, and a backward on CPU (FlexAttention has none in torch 2.13).
  It supports EPE-shaped holes; other blocked spans are an error naming the other implementations.
* ``"ctrltok_cuda"`` (:mod:`ctrltok.core.varlen`), chosen *per batch*: a batch without holes gets
  the same ``[B, 1, 2, T]`` structure, which the attention function turns into ``cu_seqlens`` for
  one call of torch's flash varlen kernel; a batch with holes (EPE) gets the FlexAttention
  ``BlockMask`` above, which the same attention function runs through FlexAttention.
  :func:`cuda_path` says which one a batch takes.

Which implementation trains (:func:`training_attention`, ``model.attn``): ``auto`` is
``ctrltok_cuda`` on CUDA and ``ctrltok_varlen`` elsewhere (CPU); a dense ``[T, T]`` mask
(``sdpa``, ``eager``) only when the recipe asks for it. Models are *loaded* with a standard
implementation (:func:`loading_attention`), so evaluation, generation and checkpoints never
depend on ctrltok's registrations.

Never pass a packed batch without this mask: transformers infers documents from restarting
``position_ids`` only when no KV cache is in use, and reads EPE's aliased positions as a new
document (a transformers behaviour checked when this was written). Padding tokens (doc id -1) attend to themselves (and earlier padding),
so no softmax row is empty.

Use ``build_mask(batch, impl)`` as the ``attention_mask`` of a forward, or the forwards of
:mod:`ctrltok.core.loss`, which build it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.attention.flex_attention import create_block_mask

from ctrltok.core.packing import Batch
from ctrltok.core.varlen import (
    CUDA,
    VARLEN,
    register_cuda,
    register_varlen,
    varlen_plan,
)

AUTO = "auto"
IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", VARLEN, CUDA)
TRAINING_ONLY = (VARLEN, CUDA)  # no KV-cache path: never what a model is loaded or saved with


def loading_attention(requested: str) -> str:
    """The implementation a model is *loaded* with: ``auto`` and the training-only paths
    (:data:`TRAINING_ONLY`, no KV cache) load as ``sdpa``, so evaluation, generation and the saved
    checkpoint use a standard implementation."""
    return "sdpa" if requested == AUTO or requested in TRAINING_ONLY else requested


def training_attention(requested: str, device: torch.device | str) -> str:
    """The implementation packed *training* forwards run with (registered here when it is ctrltok's).

    ``auto`` picks :data:`CUDA` on CUDA (flash varlen for batches without holes, FlexAttention for
    batches with EPE holes, chosen per batch by :func:`build_mask`) and per-document SDPA
    (:data:`VARLEN`) elsewhere: one causal SDPA call per document, which skips the blocks a dense
    ``[T, T]`` mask would compute and discard (faster on CPU: bench/README.md, sft_throughput; the
    same weights after training: tests/test_train.py). Any other value is used as given, so a dense
    mask trains only when asked for (``sdpa``, ``eager``).
    """
    if requested == AUTO:
        requested = CUDA if torch.device(device).type == "cuda" else VARLEN
    if requested == VARLEN:
        register_varlen()
    elif requested == CUDA:
        register_cuda()
    return requested


def cuda_path(batch: Batch) -> str:
    """Which kernel :data:`CUDA` runs for ``batch``: ``"flex"`` when any row has a blocked span
    (EPE holes: a BlockMask), ``"varlen"`` otherwise (cu_seqlens for the flash kernel)."""
    return "flex" if any(batch.blocked) else "varlen"


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
    """The attention mask for ``impl`` (one of :data:`IMPLEMENTATIONS`); see the module docstring.

    ``dtype`` is the eager mask's float type (the model's dtype). ``block_size`` and
    ``compile_mask`` only concern the BlockMask (``flex_attention``, and :data:`CUDA` on a batch
    with holes); ``compile_mask=False`` evaluates the mask_mod eagerly, which materialises it
    densely: fine for small tests, slow for long rows. On CPU,
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
    if impl == CUDA:
        if cuda_path(batch) == "flex":
            return _flex_block_mask(batch, block_size, compile_mask)
        doc = batch.doc_ids
        structure = torch.stack([doc, torch.full_like(doc, -1)], dim=1)[:, None]  # no holes: no region
        varlen_plan(structure, doc.cpu(), has_holes=False)  # cu_seqlens once per batch, on the host
        return structure
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
