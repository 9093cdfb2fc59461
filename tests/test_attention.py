"""The training attention paths on CPU: dispatch per device and batch, cu_seqlens, the BlockMask, the
same loss as the dense mask on every path, chunked cross-entropy, autocast, checkpointing, Liger.

The flash varlen kernel (``torch.nn.attention.varlen.varlen_attn``) runs on CUDA only. Here its
Python side is tested: what the ``ctrltok_cuda`` attention function hands it (cu_seqlens,
max_seqlen, shapes, dtype, causal window), with the kernel replaced by
``varlen.varlen_reference``, a plain-PyTorch implementation of the same cu_seqlens semantics
that is itself checked against the dense mask. The kernel itself is checked by
``bench/gpu_check.sh`` on a GPU.

Tolerances: float32 paths agree with the dense mask to 1e-5 (loss) and 1e-5 / 1e-4 (gradients,
atol / rtol): only summation order differs. bf16 autocast against float32: 2e-2 relative on the
loss.
"""

from __future__ import annotations

import sys
import textwrap
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from transformers import AttentionInterface

from ctrltok.core import attention, varlen
from ctrltok.core.attention import (
    CUDA,
    VARLEN,
    build_mask,
    cuda_path,
    dense_mask,
    loading_attention,
    training_attention,
)
from ctrltok.core.config import recipe_from_mapping
from ctrltok.core.example import IGNORE, Example
from ctrltok.core.loss import (
    LossModel,
    apply_liger,
    ce_chunk_rows,
    chunked_ce_sum,
    run_batch,
)
from ctrltok.core.packing import collate, pack
from ctrltok.epe.reflection import Insert, layout

VOCAB = 128


# -- batches --------------------------------------------------------------------------------------
def _docs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB - 8, (n,), generator=g).tolist() for n in lengths]


def _plain_batch(pad_to=26):
    """Documents packed several to a row, padded, loss on all but the first two tokens of each."""
    examples = [Example(input_ids=d, labels=[IGNORE] * 2 + d[2:], source=f"d{i}")
                for i, d in enumerate(_docs([9, 4, 13, 7, 3, 11]))]
    result = pack(examples, max_length=24)
    assert any(len(row) > 1 for row in result.rows)
    return collate(result.rows, pad_id=0, pad_to=pad_to)


def _epe_batch(pad_to=25):
    """EPE rows: reflections (holes + aliased positions + loss weights) packed with plain documents."""
    docs = _docs([14, 6, 11], seed=3)
    examples = [layout(d, [Insert(len(d) // 2, [120, 121, 122], [])] if len(d) > 8 else [], 127) for d in docs]
    batch = collate(pack(examples, max_length=24).rows, pad_id=0, pad_to=pad_to)
    assert any(batch.blocked) and batch.weights is not None
    return batch


# -- a stand-in for the CUDA kernel ---------------------------------------------------------------
class FakeKernel:
    """Records what the attention function hands ``varlen_attn`` and answers with the reference."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        self.calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "dtype": q.dtype, "cu_q": cu_q.tolist(),
                           "cu_k": cu_k.tolist(), "max_q": max_q, "max_k": max_k, **kw})
        return varlen.varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


@pytest.fixture
def kernel(monkeypatch):
    """The flash path as on CUDA, with the kernel replaced by the reference and the device check passed."""
    fake = FakeKernel()
    monkeypatch.setattr(varlen, "varlen_attn", fake)
    monkeypatch.setattr(varlen, "kernel_runs", lambda q: True)
    return fake


def _loss_and_grads(model, batch, impl, ce_chunk=None, backward=True):
    loss_model = LossModel(model, ce_chunk=ce_chunk)
    loss, _, _ = run_batch(loss_model, batch, impl, "cpu", float(batch.n_targets), 1.0)
    if not backward:
        return loss.detach(), None
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _assert_same(a, b, what):
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5, msg=lambda m: f"{what} loss: {m}")
    if a[1] is not None and b[1] is not None:
        for x, y in zip(a[1], b[1]):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=lambda m: f"{what} gradients: {m}")


# -- dispatch -------------------------------------------------------------------------------------
def test_dispatch_per_device():
    assert training_attention("auto", "cpu") == VARLEN
    assert training_attention("auto", torch.device("cpu")) == VARLEN
    assert training_attention("auto", "cuda") == CUDA  # a device *name*: no GPU needed to decide
    assert training_attention("auto", torch.device("cuda", 3)) == CUDA
    for asked in ("sdpa", "eager", "flex_attention", VARLEN, CUDA):  # anything named is used as given
        assert training_attention(asked, "cuda") == asked
        assert training_attention(asked, "cpu") == asked
    # registered with transformers, so a model's layers call them by name
    assert AttentionInterface._global_mapping[CUDA] is varlen.cuda_attention_forward
    assert AttentionInterface._global_mapping[VARLEN] is varlen.varlen_attention_forward
    # models are loaded and saved with a standard implementation
    assert loading_attention("auto") == loading_attention(CUDA) == loading_attention(VARLEN) == "sdpa"
    assert loading_attention("flex_attention") == "flex_attention"


def test_dispatch_per_batch_and_no_dense_mask_by_default():
    plain, epe = _plain_batch(), _epe_batch()
    assert cuda_path(plain) == "varlen" and cuda_path(epe) == "flex"
    mask = build_mask(plain, CUDA)
    assert isinstance(mask, torch.Tensor) and mask.shape == (plain.shape[0], 1, 2, plain.shape[1])
    assert torch.equal(mask[:, 0, 0], plain.doc_ids) and bool((mask[:, 0, 1] == -1).all())
    assert isinstance(build_mask(epe, CUDA, compile_mask=False, block_size=8), BlockMask)
    # a dense [T, T] mask only when asked for
    assert build_mask(plain, "sdpa").shape == (plain.shape[0], 1, plain.shape[1], plain.shape[1])
    assert training_attention("auto", "cuda") not in ("sdpa", "eager")


def test_dispatch_inside_the_model(tiny_llama, kernel, monkeypatch):
    """One implementation name on the model; each batch's mask picks the kernel."""
    flex_calls = []

    def fake_flex(module, q, k, v, block_mask, scaling=None, **kw):
        flex_calls.append(block_mask)
        # the BlockMask's own mask_mod, evaluated densely, as an SDPA mask
        B, T = q.shape[0], q.shape[2]
        idx = torch.arange(T)
        allowed = torch.stack([block_mask.mask_mod(torch.tensor(b), torch.tensor(0), idx[:, None], idx[None, :])
                               for b in range(B)])[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    monkeypatch.setattr(varlen, "flex_attention_forward", fake_flex)
    monkeypatch.setattr(attention, "_compiled_create_block_mask", lambda: create_block_mask)  # no compile on CPU
    training_attention(CUDA, "cuda")
    model = tiny_llama(VOCAB, attn=CUDA)
    plain, epe = _plain_batch(), _epe_batch()
    with torch.no_grad():
        _loss_and_grads(model, plain, CUDA, backward=False)
        assert len(kernel.calls) == 2 and not flex_calls  # one varlen call per layer
        loss, _ = _loss_and_grads(model, epe, CUDA, backward=False)
        assert len(kernel.calls) == 2 and len(flex_calls) == 2  # the batch with holes: FlexAttention
        model.set_attn_implementation("sdpa")
        dense, _ = _loss_and_grads(model, epe, "sdpa", backward=False)
    torch.testing.assert_close(loss, dense, atol=1e-5, rtol=1e-5)


# -- cu_seqlens -----------------------------------------------------------------------------------
PICTURE = """\
row 0      a0 a1 a2 b0 b1  _        doc_ids  0  0  0  1  1 -1
row 1      c0 c1 c2 c3 d0 d1        doc_ids  0  0  0  0  1  1

flattened  a0 a1 a2 | b0 b1 | _ | c0 c1 c2 c3 | d0 d1
cu_seqlens  [0, 3, 5, 6, 10, 12]    max_seqlen 4"""


def _picture_batch():
    a, b, c, d = (Example(input_ids=list(range(10 * i, 10 * i + n)), labels=list(range(10 * i, 10 * i + n)))
                  for i, n in ((1, 3), (2, 2), (3, 4), (4, 2)))
    return collate([[a, b], [c, d]], pad_id=0, pad_to=6)


def test_cu_seqlens_from_a_batch_as_drawn():
    assert textwrap.indent(PICTURE, "    ") in varlen.__doc__
    batch = _picture_batch()
    assert batch.doc_ids.tolist() == [[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]  # restart per document
    cu, longest = varlen.cu_seqlens(batch.doc_ids)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 10, 12] and longest == 4
    # rows never merge, even when a row ends and the next starts with the same doc id
    same = collate([[Example(input_ids=[1, 2], labels=[1, 2])]] * 2, pad_id=0)
    assert varlen.cu_seqlens(same.doc_ids)[0].tolist() == [0, 2, 4]


def test_kernel_is_given_the_batch_cu_seqlens(tiny_llama, kernel):
    training_attention(CUDA, "cuda")
    model = tiny_llama(VOCAB, attn=CUDA, layers=1)  # 4 query heads, 2 key/value heads, head_dim 16
    batch = _picture_batch()
    with torch.no_grad():
        _loss_and_grads(model, batch, CUDA, backward=False)
    (call,) = kernel.calls
    assert call["cu_q"] == call["cu_k"] == [0, 3, 5, 6, 10, 12]
    assert call["max_q"] == call["max_k"] == 4
    assert call["q"] == (12, 4, 16) and call["k"] == (12, 2, 16)  # [B*T, heads, head_dim], rows end to end
    assert call["window_size"] == (-1, 0) and call["enable_gqa"] is True  # causal; grouped-query heads
    assert call["scale"] == pytest.approx(16 ** -0.5)


def test_varlen_reference_equals_the_dense_mask():
    """The reference's cu_seqlens semantics (what the CUDA kernel computes) is the dense mask's."""
    for batch in (_picture_batch(), _plain_batch()):
        B, T = batch.shape
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(B, h, T, 8, generator=g) for h in (4, 2, 2))
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(batch), enable_gqa=True)
        cu, longest = varlen.cu_seqlens(batch.doc_ids)
        flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], 8) for t in (q, k, v)]
        out = varlen.varlen_reference(*flat, cu, cu, longest, longest, window_size=(-1, 0), enable_gqa=True)
        torch.testing.assert_close(out.view(B, T, 4, 8).transpose(1, 2), dense, atol=1e-6, rtol=1e-5)


# -- the BlockMask --------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [4, 8])
def test_block_mask_from_a_batch_equals_the_dense_mask(block_size):
    odd = Example(input_ids=list(range(3, 11)), labels=list(range(3, 11)), blocked=[(5, 7, 1, 3), (6, 8, 0, 2)])
    for batch in (_epe_batch(pad_to=32), collate([[odd, Example(input_ids=[5, 6, 7], labels=[5, 6, 7])]], 0, 16)):
        block = build_mask(batch, CUDA, block_size=block_size, compile_mask=False)
        allowed = dense_mask(batch)[:, 0]
        B, T = batch.shape
        q, k = torch.arange(T)[:, None].expand(T, T), torch.arange(T)[None, :].expand(T, T)
        for b in range(B):  # element level: the mask_mod is the dense mask
            assert torch.equal(block.mask_mod(torch.tensor(b), torch.tensor(0), q, k), allowed[b])
        # block level: a block is computed iff it holds an allowed pair (none dropped, none extra)
        n = T // block_size
        blocks = allowed.reshape(B, n, block_size, n, block_size).any(dim=4).any(dim=2)
        assert torch.equal(block.to_dense()[:, 0].bool(), blocks)


# -- every path, the same loss as the dense mask --------------------------------------------------
@pytest.mark.parametrize("impl", ["eager", VARLEN, CUDA])
def test_every_path_gives_the_dense_loss_and_gradients(tiny_llama, kernel, impl):
    training_attention(impl, "cpu")
    for batch in (_plain_batch(), _epe_batch()):
        if impl == CUDA and cuda_path(batch) == "flex":
            continue  # FlexAttention has no CPU backward in torch 2.13: the forward is checked below
        ref = _loss_and_grads(tiny_llama(VOCAB, attn="sdpa").train(), batch, "sdpa")
        got = _loss_and_grads(tiny_llama(VOCAB, attn=impl).train(), batch, impl, ce_chunk=7)
        _assert_same(got, ref, f"{impl} on {cuda_path(batch)} rows")
    assert kernel.calls or impl != CUDA


@pytest.mark.slow
def test_flex_paths_give_the_dense_loss(tiny_llama):
    """FlexAttention's real kernel, forward only (no CPU backward in torch 2.13), rows padded to the
    128-token block (torch 2.13's CPU kernel is wrong on shorter rows: ``build_mask``)."""
    training_attention(CUDA, "cuda")
    cases = [(CUDA, _epe_batch(pad_to=128)), ("flex_attention", _plain_batch(pad_to=128))]
    with torch.no_grad():
        for impl, batch in cases:
            ref = _loss_and_grads(tiny_llama(VOCAB, attn="sdpa", layers=1), batch, "sdpa", backward=False)
            got = _loss_and_grads(tiny_llama(VOCAB, attn=impl, layers=1), batch, impl, backward=False)
            _assert_same(got, ref, impl)


def test_fallback_without_the_kernel_is_per_document_sdpa(tiny_llama):
    """On CPU (or float32 without autocast) the CUDA path runs per-document SDPA, with a warning."""
    training_attention(CUDA, "cuda")
    batch = _plain_batch()
    ref = _loss_and_grads(tiny_llama(VOCAB, attn="sdpa").train(), batch, "sdpa")
    varlen._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="needs CUDA and fp16/bf16"):
        got = _loss_and_grads(tiny_llama(VOCAB, attn=CUDA).train(), batch, CUDA)
    _assert_same(got, ref, "fallback")


def test_gradient_checkpointing_with_the_training_paths(tiny_llama, kernel):
    """``train.gradient_checkpointing`` (transformers' checkpointing of the decoder layers) recomputes
    each layer's attention from the same structure: the same loss and gradients."""
    batch = _plain_batch()
    for impl in (VARLEN, CUDA):
        training_attention(impl, "cuda")
        plain = _loss_and_grads(tiny_llama(VOCAB, attn=impl).train(), batch, impl)
        calls = len(kernel.calls)
        model = tiny_llama(VOCAB, attn=impl).train()
        with warnings.catch_warnings():  # transformers 5.23 renamed it; train.py calls this name
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable()
        _assert_same(_loss_and_grads(model, batch, impl, ce_chunk=5), plain, f"{impl} checkpointed")
        if impl == CUDA:
            assert len(kernel.calls) - calls == 4  # 2 layers: forward, then each recomputed in the backward


def test_bf16_autocast_reaches_the_kernel(tiny_llama, kernel):
    """``train.precision: bf16`` is accelerate's autocast; the kernel gets bf16 queries, keys and
    values (RoPE alone would leave queries and keys in float32 under float32 weights)."""
    training_attention(CUDA, "cuda")
    batch = _plain_batch()
    ref, _ = _loss_and_grads(tiny_llama(VOCAB, attn=CUDA).train(), batch, CUDA, backward=False)
    AcceleratorState._reset_state(True)
    try:
        accelerator = Accelerator(mixed_precision="bf16", cpu=True)
        loss_model = accelerator.prepare(LossModel(tiny_llama(VOCAB, attn=CUDA).train(), ce_chunk=7))
        kernel.calls.clear()
        with accelerator.autocast():
            loss, _, _ = run_batch(loss_model, batch, CUDA, accelerator.device, float(batch.n_targets), 1.0)
        accelerator.backward(loss)
    finally:
        AcceleratorState._reset_state(True)
    assert kernel.calls and all(c["dtype"] == torch.bfloat16 for c in kernel.calls)
    assert loss.dtype == torch.float32  # the cross-entropy itself runs on float32 logits
    torch.testing.assert_close(loss.detach(), ref, rtol=2e-2, atol=0.0)


# -- chunked cross-entropy ------------------------------------------------------------------------
class CountingHead(torch.nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list[int] = []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return super().forward(x)


def test_chunked_cross_entropy_equals_unchunked():
    torch.manual_seed(0)
    N, H, V = 50, 16, 97
    head = CountingHead(H, V, bias=False)
    hidden = torch.randn(N, H, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    weights = torch.rand(N)
    results = {}
    for chunk in (7, N, 1000):
        head.zero_grad()
        hidden.grad = None
        head.rows.clear()
        loss = chunked_ce_sum(head, hidden, targets, weights, chunk)
        loss.backward()
        results[chunk] = (loss.detach(), hidden.grad.clone(), head.weight.grad.clone(), list(head.rows))
    expected = (F.cross_entropy(head(hidden).float(), targets, reduction="none") * weights).sum()
    torch.testing.assert_close(results[N][0], expected.detach())
    for chunk in (7, 1000):
        for a, b in zip(results[chunk][:3], results[N][:3]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # never more than a chunk of logits; each chunk's recomputed once in the backward
    assert max(results[7][3]) == 7 and sum(results[7][3]) == 2 * N
    assert results[N][3] == [N]  # one chunk: computed once, no recomputation
    assert ce_chunk_rows(49_152) == 5461 and ce_chunk_rows(10**9) == 128
    with pytest.raises(ValueError, match="ce_chunk"):
        chunked_ce_sum(head, hidden, targets, None, 0)


def test_loss_model_chunks_give_the_same_loss_and_gradients(tiny_llama):
    batch = _epe_batch()  # loss weights included
    training_attention(VARLEN, "cpu")
    whole = _loss_and_grads(tiny_llama(VOCAB, attn=VARLEN).train(), batch, VARLEN, ce_chunk=10**6)
    for chunk in (3, batch.n_targets - 1):
        _assert_same(_loss_and_grads(tiny_llama(VOCAB, attn=VARLEN).train(), batch, VARLEN, ce_chunk=chunk), whole,
                     f"ce_chunk={chunk}")


# -- Liger ----------------------------------------------------------------------------------------
def test_liger_is_optional_with_a_clear_error(tiny_llama, monkeypatch):
    assert recipe_from_mapping({"data": {"train": "ctrltok:instructions"}, "model": {"liger": True}}).model.liger
    assert recipe_from_mapping({"data": {"train": "ctrltok:instructions"}}).model.liger is False
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(RuntimeError, match="liger-kernel package"):
        apply_liger(tiny_llama(VOCAB))


def test_liger_patches_the_decoder_kernels_only(tiny_llama, monkeypatch):
    seen = {}
    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = lambda model, **kw: seen.update(model=model, **kw)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    model = tiny_llama(VOCAB)
    assert apply_liger(model) is model
    assert seen["model"] is model and seen["rms_norm"] and seen["rope"] and seen["swiglu"]
    assert not seen["cross_entropy"] and not seen["fused_linear_cross_entropy"]  # the loss stays LossModel's
