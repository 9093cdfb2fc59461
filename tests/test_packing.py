"""Packing and masks: the docstring picture, packed == unpacked on a tiny Llama, over-long policies."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ctrltok.core.packing
from ctrltok.core.attention import (
    VARLEN,
    build_mask,
    dense_mask,
    draw,
    reflection_regions,
    register_varlen,
)
from ctrltok.core.example import IGNORE, Example
from ctrltok.core.loss import logits as forward_logits
from ctrltok.core.packing import collate, pack, pad_batch, plan_rows, slice_example

register_varlen()  # the per-document SDPA path is set on test models by name

VOCAB = 128

PICTURE = """\
tokens     a0 a1 a2 b0 b1  _
positions   0  1  2  0  1  0
doc_ids     0  0  0  1  1 -1
targets    a1 a2  . b1  .  .

mask       a0 a1 a2 b0 b1  _
  a0        1  .  .  .  .  .
  a1        1  1  .  .  .  .
  a2        1  1  1  .  .  .
  b0        .  .  .  1  .  .
  b1        .  .  .  1  1  .
  _         .  .  .  .  .  1"""


def test_picture_matches_docstring():
    a = Example(input_ids=[10, 11, 12], labels=[10, 11, 12])
    b = Example(input_ids=[20, 21], labels=[20, 21])
    result = pack([a, b], max_length=6)
    assert [[len(ex) for ex in row] for row in result.rows] == [[3, 2]]
    batch = collate(result.rows, pad_id=0, pad_to=6)
    names = {10: "a0", 11: "a1", 12: "a2", 20: "b0", 21: "b1"}
    assert draw(batch, 0, names) == PICTURE
    assert textwrap.indent(PICTURE, "    ") in ctrltok.core.packing.__doc__


def _examples(lengths, seed=0, supervised_from=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        labels = [IGNORE] * min(supervised_from, n) + ids[supervised_from:]
        out.append(Example(input_ids=ids, labels=labels, source=f"ex{i}"))
    return out


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    if weights is not None:
        ce = ce * weights.reshape(-1)
    return ce.sum()


@pytest.mark.parametrize("impl", ["sdpa", "eager", VARLEN])
def test_packed_logits_and_loss_equal_unpacked(tiny_llama, impl):
    model = tiny_llama(VOCAB, attn=impl)
    examples = _examples([9, 4, 13, 7, 3, 11], supervised_from=2)
    result = pack(examples, max_length=24)
    assert result.stats.rows < len(examples)  # really packed: rows hold several documents
    batch = collate(result.rows, pad_id=0, pad_to=26)
    with torch.no_grad():
        logits = forward_logits(model, batch)
        packed_loss = _ce_sum(logits, batch.targets)
        unpacked_loss = torch.zeros(())
        for b, row in enumerate(result.rows):
            offset = 0
            for ex in row:
                alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False)
                torch.testing.assert_close(logits[b, offset : offset + len(ex)], alone.logits[0], atol=1e-5, rtol=1e-5)
                # transformers' own shifted mean loss, times the number of targets = this document's sum
                lab = model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels]), use_cache=False)
                unpacked_loss += lab.loss * ex.n_supervised
                offset += len(ex)
    assert batch.n_targets == sum(ex.n_supervised for ex in examples)
    torch.testing.assert_close(packed_loss, unpacked_loss, atol=1e-4, rtol=1e-5)
    assert not torch.isnan(logits).any()  # padding columns included


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padded_batch_mode_matches_packed(tiny_llama, impl):
    model = tiny_llama(VOCAB, attn=impl)
    examples = _examples([5, 12, 8])
    padded = pad_batch(examples, pad_id=0)
    packed = collate(pack(examples, max_length=32).rows, pad_id=0)
    assert padded.input_ids.shape == (3, 12)
    with torch.no_grad():
        lp = forward_logits(model, padded)
        lk = forward_logits(model, packed)
    assert not torch.isnan(lp).any()
    torch.testing.assert_close(_ce_sum(lp, padded.targets), _ce_sum(lk, packed.targets), atol=1e-4, rtol=1e-5)
    assert padded.n_targets == packed.n_targets


@pytest.mark.slow
def test_flex_attention_packed_equals_unpacked(tiny_llama):
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = tiny_llama(VOCAB, attn="flex_attention", layers=1)
    examples = _examples([9, 4, 13, 7])
    result = pack(examples, max_length=20)
    # Rows padded to the 128-token block: torch 2.13's CPU FlexAttention kernel gave wrong logits
    # (sometimes NaN) on a 24-token row (see build_mask).
    batch = collate(result.rows, pad_id=0, pad_to=128)
    with torch.no_grad():  # FlexAttention has no CPU backward in torch 2.13
        logits = forward_logits(model, batch)
        # The reference is each document alone under SDPA (same weights), for the same reason: a lone
        # 9-token document under transformers' own flex mask is not padded to the block.
        model.set_attn_implementation("sdpa")
        for b, row in enumerate(result.rows):
            offset = 0
            for ex in row:
                alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
                torch.testing.assert_close(logits[b, offset : offset + len(ex)], alone, atol=1e-5, rtol=1e-5)
                offset += len(ex)


def test_flex_block_mask_equals_dense_mask():
    """The BlockMask's mask_mod (region ids and general rectangles) agrees with the dense mask."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    epe = Example(input_ids=list(range(3, 13)), labels=list(range(3, 13)), blocked=[(6, 10, 3, 6)])
    odd = Example(input_ids=list(range(3, 11)), labels=list(range(3, 11)), blocked=[(5, 7, 1, 3), (6, 8, 0, 2)])
    plain = Example(input_ids=[5, 6, 7], labels=[5, 6, 7])
    for rows, region_form in [([[epe, plain], [plain]], True), ([[odd, plain], [epe]], False)]:
        batch = collate(rows, pad_id=0, pad_to=16)
        assert (reflection_regions(batch) is not None) == region_form
        block = build_mask(batch, "flex_attention", block_size=4, compile_mask=False)
        dense = block.to_dense()  # block-level: full blocks where any element is allowed
        allowed = dense_mask(batch)
        # Evaluate the mask_mod element-wise and compare with the dense construction.
        B, T = batch.doc_ids.shape
        q = torch.arange(T)[:, None].expand(T, T)
        k = torch.arange(T)[None, :].expand(T, T)
        for b in range(B):
            got = block.mask_mod(torch.tensor(b), torch.tensor(0), q, k)
            assert torch.equal(got, allowed[b, 0]), (b, region_form)
        assert dense.shape[-1] == T // 4


def test_varlen_gradients_equal_dense_mask_gradients(tiny_llama):
    """The per-document path is a training path: same loss and gradients as the dense SDPA mask."""
    from ctrltok.epe.reflection import Insert, layout

    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (14, 6, 11)]
    examples = [layout(d, [Insert(len(d) // 2, [120, 121, 122], [])] if len(d) > 8 else [], 127) for d in docs]
    batch = collate(pack(examples, max_length=24).rows, pad_id=0, pad_to=25)
    grads = {}
    for impl in ("sdpa", VARLEN):
        model = tiny_llama(VOCAB, attn=impl).train()
        loss = _ce_sum(forward_logits(model, batch), batch.targets, batch.weights)
        loss.backward()
        grads[impl] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(grads["sdpa"][0], grads[VARLEN][0], atol=1e-4, rtol=1e-5)
    for a, b in zip(grads["sdpa"][1], grads[VARLEN][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    odd = collate([[Example(input_ids=[1, 2, 3], labels=[1, 2, 3], blocked=[(2, 3, 0, 1)])]], pad_id=0)
    with pytest.raises(ValueError, match="EPE-shaped"):
        build_mask(odd, VARLEN)


def test_eager_mask_is_additive_and_sdpa_mask_is_bool():
    batch = collate([[Example(input_ids=[5, 6], labels=[5, 6])]], pad_id=0, pad_to=3)
    sdpa = build_mask(batch, "sdpa")
    eager = build_mask(batch, "eager", dtype=torch.float32)
    assert sdpa.dtype == torch.bool and sdpa.shape == (1, 1, 3, 3)
    assert eager.dtype == torch.float32
    assert torch.equal(eager == 0, sdpa)
    assert eager.min() == torch.finfo(torch.float32).min
    with pytest.raises(ValueError, match="not supported"):
        build_mask(batch, "flash_attention_9")


def test_forward_refuses_a_mask_for_another_implementation(tiny_llama):
    model = tiny_llama(VOCAB, attn="eager")
    batch = pad_batch(_examples([4]), pad_id=0)
    with pytest.raises(ValueError, match="attn_implementation"):
        forward_logits(model, batch, impl="sdpa")


def test_best_fit_decreasing_layout_is_deterministic():
    examples = _examples([3, 6, 2, 5, 4])
    first = pack(examples, max_length=10)
    assert [[len(ex) for ex in row] for row in first.rows] == [[6, 4], [5, 3, 2]]
    second = pack(examples, max_length=10)
    assert [[ex.source for ex in row] for row in first.rows] == [[ex.source for ex in row] for row in second.rows]
    assert first.stats.padding == 0 and first.stats.fill == 1.0


def test_overlong_truncate_counts():
    examples = _examples([5, 12, 3])
    result = pack(examples, max_length=8, overlong="truncate")
    s = result.stats
    assert (s.truncated_examples, s.truncated_tokens, s.tokens) == (1, 4, 16)
    assert max(sum(len(ex) for ex in row) for row in result.rows) <= 8
    kept = [ex for row in result.rows for ex in row if ex.source.startswith("ex1")][0]
    assert kept.input_ids == examples[1].input_ids[:8]


def test_overlong_split_keeps_every_token_and_isolates_pieces(tiny_llama):
    examples = _examples([20])
    result = pack(examples, max_length=8, overlong="split")
    assert (result.stats.split_examples, result.stats.split_pieces, result.stats.tokens) == (1, 3, 20)
    pieces = sorted((ex for row in result.rows for ex in row), key=lambda ex: int(ex.source.split("[")[1].split(":")[0]))
    assert sum((p.input_ids for p in pieces), []) == examples[0].input_ids
    assert all(p.positions[0] == 0 for p in pieces)
    # A later piece sees nothing of the earlier one: its logits equal the piece run alone.
    model = tiny_llama(VOCAB)
    batch = collate(result.rows, pad_id=0)
    with torch.no_grad():
        logits = forward_logits(model, batch)
    b, col = next((b, sum(len(e) for e in row[:i])) for b, row in enumerate(result.rows) for i, e in enumerate(row) if e is pieces[1])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([pieces[1].input_ids]), use_cache=False).logits[0]
    torch.testing.assert_close(logits[b, col : col + 8], alone, atol=1e-5, rtol=1e-5)


def test_overlong_error_names_the_example():
    with pytest.raises(ValueError, match=r"ex1: 12 tokens > max_length 8"):
        pack(_examples([5, 12]), max_length=8, overlong="error")
    with pytest.raises(ValueError, match="overlong must be"):
        pack(_examples([5]), max_length=8, overlong="drop")  # type: ignore[arg-type]


def test_split_without_packing_gives_each_piece_a_row():
    examples = _examples([5, 20, 8])
    result = pack(examples, max_length=8, overlong="split", packing=False)
    assert [[len(e) for e in row] for row in result.rows] == [[5], [8], [8], [4], [8]]
    assert result.stats.truncated_tokens == 0 and result.stats.split_pieces == 3
    assert [t for row in result.rows[1:4] for t in row[0].input_ids] == examples[1].input_ids
    with pytest.raises(ValueError, match="overlong must be"):
        plan_rows([5], 8, "drop", packing=False)


def test_slice_clips_blocked_spans_heads_and_positions():
    ex = Example(
        input_ids=list(range(10, 22)),
        labels=list(range(10, 22)),
        position_ids=[0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 7],  # aliased after a reflection at 3..6
        blocked=[(7, 12, 3, 7)],
        head_positions=[3],
        head_targets=[[1.0, 0.0]],
    )
    first, second = slice_example(ex, 0, 8), slice_example(ex, 8, 12)
    assert first.blocked == [(7, 8, 3, 7)] and first.head_positions == [3]
    assert second.blocked == [] and second.head_positions == [] and second.positions == [0, 1, 2, 3]
    mid = slice_example(ex, 5, 12)
    assert mid.blocked == [(2, 7, 0, 2)]
    assert min(mid.positions) == 0 and mid.positions == [2, 3, 0, 1, 2, 3, 4]
    result = pack([ex], max_length=8, overlong="truncate")
    assert result.rows[0][0].blocked == [(7, 8, 3, 7)]


def test_collate_shift_weights_heads_and_blocked_in_row_coordinates():
    a = Example(input_ids=[5, 6, 7], labels=[IGNORE, 6, 7], loss_weights=[0.0, 2.0, 3.0])
    b = Example(
        input_ids=[8, 9, 10, 11], labels=[8, 9, 10, 11], blocked=[(3, 4, 1, 3)], head_positions=[1], head_targets=[[0.0, 1.0]]
    )
    batch = collate([[a, b]], pad_id=0, pad_to=8)
    assert batch.targets[0].tolist() == [6, 7, IGNORE, 9, 10, 11, IGNORE, IGNORE]
    assert batch.weights[0].tolist() == [2.0, 3.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert batch.doc_ids[0].tolist() == [0, 0, 0, 1, 1, 1, 1, -1]
    assert batch.blocked == [[(6, 7, 4, 6)]]
    assert batch.head_index.tolist() == [[0, 4]] and batch.head_targets.tolist() == [[0.0, 1.0]]
    assert batch.n_targets == 5
    with pytest.raises(ValueError, match="shorter than the longest row"):
        collate([[a, b]], pad_id=0, pad_to=5)
    with pytest.raises(ValueError, match="blocks tokens from themselves"):
        collate([[Example(input_ids=[1, 2], labels=[1, 2], blocked=[(0, 2, 1, 2)])]], pad_id=0)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=25),
    max_length=st.integers(min_value=1, max_value=32),
    overlong=st.sampled_from(["truncate", "split"]),
)
def test_every_token_is_placed_once_or_counted(lengths, max_length, overlong):
    # Token ids are unique across the whole input, so "appears exactly once" is checkable.
    examples, next_id = [], 0
    for i, n in enumerate(lengths):
        ids = list(range(next_id, next_id + n))
        next_id += n
        examples.append(Example(input_ids=ids, labels=ids, source=f"ex{i}"))
    result = pack(examples, max_length=max_length, overlong=overlong)
    placed = [t for row in result.rows for ex in row for t in ex.input_ids]
    assert len(placed) == len(set(placed)) == result.stats.tokens
    assert all(sum(len(ex) for ex in row) <= max_length for row in result.rows)
    assert result.stats.tokens + result.stats.truncated_tokens == sum(lengths)
    assert result.stats.padding == result.stats.rows * max_length - result.stats.tokens
    if overlong == "split":
        assert set(placed) == set(range(next_id))
        assert result.stats.split_pieces == sum(-(-n // max_length) for n in lengths if n > max_length)
    else:
        expected = {t for ex in examples for t in ex.input_ids[:max_length]}
        assert set(placed) == expected
        assert result.stats.truncated_examples == sum(1 for n in lengths if n > max_length)
    batch = collate(result.rows, pad_id=0, pad_to=max_length)
    assert batch.n_targets == sum(len(ex) - 1 for row in result.rows for ex in row)


def test_chunk_lays_documents_end_to_end_and_drops_nothing():
    """``overlong="chunk"``: the picture in the packing docstring (a(5) b(4) c(3), rows of 6)."""
    examples = _examples([5, 4, 3])
    result = pack(examples, max_length=6, overlong="chunk")
    assert [[len(p) for p in row] for row in result.rows] == [[5, 1], [3, 3]]
    flat = [t for row in result.rows for p in row for t in p.input_ids]
    assert flat == [t for ex in examples for t in ex.input_ids]  # every token, in order
    assert (result.stats.tokens, result.stats.padding, result.stats.split_pieces, result.stats.split_examples) == \
        (12, 0, 2, 1)
    second = result.rows[1][0]  # b's continuation is a document of its own: positions restart
    assert second.positions == [0, 1, 2]


def test_pack_is_the_length_plan_sliced():
    """pack() places what plan_rows plans on the lengths alone: whole examples as they are, cut ones
    sliced; one example per row without packing, its stats the same shape."""
    examples = _examples([5, 12, 3, 9])
    for overlong, packing in (("truncate", True), ("split", True), ("chunk", True), ("truncate", False)):
        result = pack(examples, max_length=8, overlong=overlong, packing=packing)
        planned, stats = plan_rows([len(ex) for ex in examples], 8, overlong, packing)
        segments = [[(int(ex.source[2]), *_span(ex)) for ex in row] for row in result.rows]
        assert segments == list(planned)
        assert result.stats == stats.finish(result.stats.rows, result.stats.tokens, 8)
    single = pack(examples, max_length=8, packing=False)
    assert [len(row) for row in single.rows] == [1, 1, 1, 1] and single.rows[0][0] is examples[0]
    assert (single.stats.truncated_examples, single.stats.truncated_tokens, single.stats.padding) == (2, 5, 32 - 24)


def test_plan_windows_pack_each_window_alone():
    rows, stats = plan_rows([3, 6, 2, 5], 10, "truncate", window=2)
    assert list(rows) == [[(1, 0, 6), (0, 0, 3)], [(3, 0, 5), (2, 0, 2)]]
    assert stats.examples == 4


def _span(ex: Example) -> tuple[int, int]:
    """(start, end) of a piece, read back from the source pack() gives a slice (``ex1[8:12]``)."""
    if "[" not in ex.source:
        return 0, len(ex)
    start, end = ex.source.split("[", 1)[1].rstrip("]").split(":")
    return int(start), int(end)
