"""Best-fit packing of encoded Examples into rows, and the one place where labels are shifted.

Use::

    result = pack(examples, max_length=2048, overlong="truncate")
    print(result.stats)                       # nothing is dropped without being counted here
    batch = collate(result.rows[:8], pad_id=tokenizer.pad_token_id)
    mask = attention.build_mask(batch, "sdpa")  # the mask is built from structure, at the last moment

A packed row holds several documents side by side. Each document restarts its positions at 0 and
sees only itself (``doc_ids`` + ``blocked`` describe this; ``attention.build_mask`` turns it into
the backend's mask). Two documents ``a`` (3 tokens) and ``b`` (2 tokens) packed into a row of 6,
one pad token ``_`` (``1`` = the query row may attend to the key column)::

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
      _         .  .  .  .  .  1

Targets are already shifted ("." = -100: document ends and padding). The picture is the output of
``attention.draw``; ``tests/test_packing.py`` builds this row and asserts it.

The pad token attends to itself so that no softmax row is empty (no NaN); its target is -100.

Over-long examples (longer than ``max_length``) follow the ``overlong`` policy:

* ``"truncate"``: keep the first ``max_length`` tokens; the cut tokens are counted in
  ``stats.truncated_tokens`` and the example in ``stats.truncated_examples``.
* ``"split"``: cut into consecutive pieces of at most ``max_length`` tokens, each packed as its own
  document. Pieces after the first keep their labels but **cannot see the earlier pieces** (they
  are separate documents in the mask), and the first token of each piece is never a target (the
  shift never crosses a document boundary), so one target per cut is lost; ``stats.split_pieces``
  counts the pieces.
* ``"error"``: raise ``ValueError`` naming the example's source and length.
* ``"chunk"`` (pretraining text; the default for ``text`` and ``labelled`` data): no best fit. The
  documents are laid end to end in input order and the stream is cut into rows of exactly
  ``max_length`` tokens (the last row may be shorter), as GPT-2-style pretraining does, so no token
  is dropped and no row is padded. A document cut by a row boundary continues as a new document in
  the next row (positions restart, it does not see its first part), and one target is lost per
  cut; ``stats.split_pieces`` counts the cuts.

    docs a(5) b(4) c(3), max_length 6:   row 0: a0..a4 b0   row 1: b1 b2 b3 c0 c1 c2

Slicing an example clips its ``blocked`` spans to the slice (dropping spans that become empty),
keeps only the head positions that fall inside it, and re-bases its positions to start at 0.

The placement is planned on lengths alone (:func:`plan_rows`: rows of ``(document, start, end)``
segments, streamed); :func:`pack` slices its Examples from those segments, and
:mod:`ctrltok.data.plan` writes the same plan to disk for a corpus of any size, so in-memory rows
and training rows are one placement, not two copies of it.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from ctrltok.core.example import IGNORE, Example

Overlong = Literal["truncate", "split", "error", "chunk"]
OVERLONG = ("truncate", "split", "error", "chunk")
Segment = tuple[int, int, int]  # (document, start, end): tokens [start, end) of a document


@dataclass
class PackStats:
    """Counts that account for every input token: ``tokens + truncated_tokens`` == tokens given."""

    examples: int = 0  # examples (documents) planned
    rows: int = 0
    tokens: int = 0  # tokens placed in rows
    padding: int = 0  # rows * max_length - tokens
    truncated_examples: int = 0
    truncated_tokens: int = 0
    split_examples: int = 0  # over-long examples that were split
    split_pieces: int = 0  # pieces those examples became

    @property
    def fill(self) -> float:
        """Share of row capacity holding real tokens."""
        total = self.tokens + self.padding
        return self.tokens / total if total else 0.0

    def finish(self, rows: int, tokens: int, max_length: int) -> PackStats:
        """The totals, once the planned rows are all consumed: ``rows``, ``tokens``, ``padding``."""
        self.rows, self.tokens = rows, tokens
        self.padding = rows * max_length - tokens
        return self


@dataclass
class PackResult:
    rows: list[list[Example]]
    stats: PackStats


@dataclass
class Batch:
    """Tensors for one step; see ARCHITECTURE.md ("The batch") and the picture in this module."""

    input_ids: torch.Tensor  # [B, T] long
    position_ids: torch.Tensor  # [B, T] long
    targets: torch.Tensor  # [B, T] long, already shifted
    weights: torch.Tensor | None  # [B, T] float (weight of each target) or None
    doc_ids: torch.Tensor  # [B, T] long, -1 on padding
    blocked: list[list[tuple[int, int, int, int]]]  # per row, in row coordinates
    head_index: torch.Tensor  # [K, 2] long: (row, col)
    head_targets: torch.Tensor  # [K, C] float
    n_targets: int
    examples: list[list[Example]] = field(default_factory=list, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "Batch":
        """A copy with every tensor on ``device`` (the structure lists stay on the host)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Batch(
            input_ids=move(self.input_ids),
            position_ids=move(self.position_ids),
            targets=move(self.targets),
            weights=move(self.weights),
            doc_ids=move(self.doc_ids),
            blocked=self.blocked,
            head_index=move(self.head_index),
            head_targets=move(self.head_targets),
            n_targets=self.n_targets,
            examples=self.examples,
        )


def slice_example(example: Example, start: int, end: int) -> Example:
    """Tokens ``[start, end)`` of ``example`` as an Example of their own.

    Blocked spans are clipped to the slice (a span whose query or key range becomes empty is
    dropped), head positions outside the slice are dropped, and positions are re-based so the
    smallest one is 0 (RoPE only sees differences, and aliased positions may not start the slice).
    """
    n = len(example)
    if not 0 <= start < end <= n:
        raise ValueError(f"{example.source or 'example'}: slice [{start}, {end}) outside 0..{n}")
    positions = example.positions[start:end]
    base = min(positions)
    blocked = []
    for q0, q1, k0, k1 in example.blocked:
        nq0, nq1 = max(q0, start) - start, min(q1, end) - start
        nk0, nk1 = max(k0, start) - start, min(k1, end) - start
        if nq0 < nq1 and nk0 < nk1:
            blocked.append((nq0, nq1, nk0, nk1))
    heads = [(p - start, t) for p, t in zip(example.head_positions, example.head_targets) if start <= p < end]
    return Example(
        input_ids=example.input_ids[start:end],
        labels=example.labels[start:end],
        position_ids=[p - base for p in positions],
        blocked=blocked,
        loss_weights=None if example.loss_weights is None else example.loss_weights[start:end],
        head_positions=[p for p, _ in heads],
        head_targets=[t for _, t in heads],
        source=f"{example.source}[{start}:{end}]" if example.source else f"[{start}:{end}]",
    )


def _pieces(length: int, max_length: int, overlong: str, stats: PackStats) -> list[tuple[int, int]]:
    """The over-long rule on a length: the ``(start, end)`` pieces to place; cuts counted in ``stats``."""
    if length <= max_length:
        return [(0, length)]
    if overlong == "error":
        raise ValueError(f"a document of {length} tokens > data.max_length = {max_length} (data.overlong = error)")
    if overlong == "truncate":
        stats.truncated_examples += 1
        stats.truncated_tokens += length - max_length
        return [(0, max_length)]
    pieces = [(s, min(s + max_length, length)) for s in range(0, length, max_length)]
    stats.split_examples += 1
    stats.split_pieces += len(pieces)
    return pieces


def _chunk_rows(lengths: Iterable[int], max_length: int, stats: PackStats) -> Iterator[list[Segment]]:
    row: list[Segment] = []
    room = max_length
    for doc, n in enumerate(lengths):
        stats.examples += 1
        start = 0
        while start < n:
            end = min(n, start + room)
            row.append((doc, start, end))
            if (start, end) != (0, n):
                stats.split_pieces += 1
                stats.split_examples += start == 0
            room -= end - start
            start = end
            if room == 0:
                yield row
                row, room = [], max_length
    if row:
        yield row


def _best_fit(pieces: list[Segment], max_length: int) -> list[list[Segment]]:
    """Best-fit decreasing: longest first (ties keep input order), each into the open row with the
    least room that still fits it, or a new row."""
    order = sorted(range(len(pieces)), key=lambda i: (-(pieces[i][2] - pieces[i][1]), i))
    rows: list[list[Segment]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), kept sorted: best fit = first with room >= n
    for i in order:
        n = pieces[i][2] - pieces[i][1]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = max_length, len(rows)
            rows.append([])
        rows[r].append(pieces[i])
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def _packed_rows(lengths: Iterable[int], max_length: int, overlong: str, window: int | None,
                 stats: PackStats) -> Iterator[list[Segment]]:
    pending: list[Segment] = []
    docs_in_window = 0
    for doc, n in enumerate(lengths):
        stats.examples += 1
        pending.extend((doc, s, e) for s, e in _pieces(n, max_length, overlong, stats))
        docs_in_window += 1
        if docs_in_window == window:
            yield from _best_fit(pending, max_length)
            pending, docs_in_window = [], 0
    if pending:
        yield from _best_fit(pending, max_length)


def _single_rows(lengths: Iterable[int], max_length: int, overlong: str, stats: PackStats) -> Iterator[list[Segment]]:
    for doc, n in enumerate(lengths):
        stats.examples += 1
        for start, end in _pieces(n, max_length, overlong, stats):  # "split": each piece a row of its own
            yield [(doc, start, end)]


def plan_rows(lengths: Iterable[int], max_length: int, overlong: str, packing: bool = True,
              window: int | None = None) -> tuple[Iterator[list[Segment]], PackStats]:
    """The rows (lists of ``(doc, start, end)`` segments) for documents of ``lengths``, streamed;
    the stats fill in as the iterator is consumed (:meth:`PackStats.finish` adds the totals).

    ``overlong="chunk"``: end to end (see the module docstring); ``packing``: best-fit decreasing
    over the pieces the over-long rule leaves, within windows of ``window`` documents (None: all of
    them at once); otherwise one document (or, under ``"split"``, one piece) per row, truncated
    (``"error"``: refused) past ``max_length``.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {list(OVERLONG)}, got {overlong!r}")
    stats = PackStats()
    if overlong == "chunk":
        return _chunk_rows(lengths, max_length, stats), stats
    if packing:
        return _packed_rows(lengths, max_length, overlong, window, stats), stats
    return _single_rows(lengths, max_length, overlong, stats), stats


def _check(examples: list[Example], max_length: int, overlong: Overlong) -> None:
    """Refuse, naming the example, what the planners cannot place: empty examples, and over-long
    ones under ``overlong="error"``."""
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be 'chunk', 'truncate', 'split' or 'error', got {overlong!r}")
    for i, ex in enumerate(examples):
        n = len(ex)
        if n == 0:
            raise ValueError(f"{ex.source or f'example {i}'}: empty example (0 tokens) cannot be packed")
        if n > max_length and overlong == "error":
            raise ValueError(
                f"{ex.source or f'example {i}'}: {n} tokens > max_length {max_length}; "
                "raise max_length or use overlong='truncate' or 'split'"
            )


def pack(examples: list[Example], max_length: int, overlong: Overlong = "truncate",
         packing: bool = True) -> PackResult:
    """Pack examples into rows of at most ``max_length`` tokens by best-fit decreasing
    (``overlong="chunk"``: end to end instead; ``packing=False``: one example, or piece, per row).

    The placement is :func:`plan_rows`' on the examples' lengths with one window for all of them;
    the training plan on disk uses windows, so it is the same placement up to one window's worth of
    documents; each planned segment is the example itself when whole, else its slice. Deterministic for a
    given input order; rows keep their examples in placement order. Over-long examples follow
    ``overlong`` (see the module docstring).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    _check(examples, max_length, overlong)
    planned, stats = plan_rows([len(ex) for ex in examples], max_length, overlong, packing)
    rows = [[examples[d] if (s, e) == (0, len(examples[d])) else slice_example(examples[d], s, e)
             for d, s, e in row] for row in planned]
    return PackResult(rows=rows, stats=stats.finish(len(rows), sum(len(ex) for row in rows for ex in row), max_length))


def _check_blocked(ex: Example) -> None:
    n = len(ex)
    for q0, q1, k0, k1 in ex.blocked:
        if not (0 <= q0 <= q1 <= n and 0 <= k0 <= k1 <= n):
            raise ValueError(f"{ex.source or 'example'}: blocked span {(q0, q1, k0, k1)} outside 0..{n}")
        if max(q0, k0) < min(q1, k1):
            # A token blocked from itself could end with nothing to attend to (NaN).
            raise ValueError(f"{ex.source or 'example'}: blocked span {(q0, q1, k0, k1)} blocks tokens from themselves")


def collate(rows: list[list[Example]], pad_id: int, pad_to: int | None = None) -> Batch:
    """Turn packed rows into a right-padded :class:`Batch`; the label shift happens here, once.

    ``targets[b, t]`` is the label of the next token of the same document, ``-100`` at each
    document's last token, on padding and where that next token is unsupervised. ``weights`` (when
    any example has ``loss_weights``) is the weight of each target's token, 0 where there is no
    target. ``pad_to`` fixes ``T`` (it must fit the longest row); by default ``T`` is that length.
    """
    if not rows:
        raise ValueError("collate: no rows")
    longest = max(sum(len(ex) for ex in row) for row in rows)
    T = longest if pad_to is None else pad_to
    if T < longest:
        raise ValueError(f"collate: pad_to={pad_to} is shorter than the longest row ({longest} tokens)")
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    any_weights = any(ex.loss_weights is not None for row in rows for ex in row)
    weights = torch.zeros((B, T), dtype=torch.float32) if any_weights else None
    blocked: list[list[tuple[int, int, int, int]]] = []
    head_index: list[tuple[int, int]] = []
    head_targets: list[list[float]] = []
    for b, row in enumerate(rows):
        offset = 0
        row_blocked = []
        for d, ex in enumerate(row):
            _check_blocked(ex)
            n = len(ex)
            sl = slice(offset, offset + n)
            input_ids[b, sl] = torch.tensor(ex.input_ids, dtype=torch.long)
            position_ids[b, sl] = torch.tensor(ex.positions, dtype=torch.long)
            doc_ids[b, sl] = d
            if n > 1:
                targets[b, offset : offset + n - 1] = torch.tensor(ex.labels[1:], dtype=torch.long)
                if weights is not None:
                    w = ex.loss_weights[1:] if ex.loss_weights is not None else [1.0] * (n - 1)
                    weights[b, offset : offset + n - 1] = torch.tensor(w, dtype=torch.float32)
            row_blocked.extend((q0 + offset, q1 + offset, k0 + offset, k1 + offset) for q0, q1, k0, k1 in ex.blocked)
            for p, t in zip(ex.head_positions, ex.head_targets):
                head_index.append((b, offset + p))
                head_targets.append(list(t))
            offset += n
        blocked.append(row_blocked)
    if weights is not None:
        weights = torch.where(targets == IGNORE, torch.zeros_like(weights), weights)
    widths = {len(t) for t in head_targets}
    if len(widths) > 1:
        raise ValueError(f"collate: head targets of different widths {sorted(widths)} in one batch")
    C = widths.pop() if widths else 0
    return Batch(
        input_ids=input_ids,
        position_ids=position_ids,
        targets=targets,
        weights=weights,
        doc_ids=doc_ids,
        blocked=blocked,
        head_index=torch.tensor(head_index, dtype=torch.long).reshape(len(head_index), 2),
        head_targets=torch.tensor(head_targets, dtype=torch.float32).reshape(len(head_targets), C),
        n_targets=int((targets != IGNORE).sum()),
        examples=rows,
    )


def pad_batch(examples: list[Example], pad_id: int, pad_to: int | None = None) -> Batch:
    """One example per row, right-padded: the padded-batch mode, for comparison and benchmarks."""
    return collate([[ex] for ex in examples], pad_id, pad_to=pad_to)
