"""Rows and their order at any corpus size: a row plan on disk, and a permutation computed per index.

A *row plan* says which pieces of which documents make each training row::

    rows.bin      int64 [n_rows + 1]    row r is segments[rows[r]:rows[r + 1]]
    segments.bin  int64 [n_segments, 3] (document, start, end): tokens [start, end) of a document

It is built in one streaming pass over the document lengths (never the documents), written next
to the prepared data and memory-mapped by every rank, so memory does not grow with the corpus. The
placement is :func:`ctrltok.core.packing.plan_rows`', the one :func:`ctrltok.core.packing.pack`
slices in-memory rows from:

* ``overlong: chunk``: documents end to end, cut into rows of exactly ``max_length``;
* ``packing: true``: best-fit decreasing within windows of ``window`` documents (pieces after the
  over-long rule), so for a corpus of at most ``window`` documents the plan's rows are exactly the
  in-memory rows (tested);
* ``packing: false``: one document per row (truncated, split into rows, or refused, past ``max_length``).

The *order* of rows is a pure function of ``(seed, epoch, position)``: :func:`permute` maps a row
index through a keyed Feistel network (a bijection on the next power of four, cycle-walked into
``[0, n)``), so no permutation array is ever held, and optimizer step ``s`` of any run with the same
plan, seed and global batch reads the same rows. Each rank takes its own slice of a step's rows
(:func:`step_positions`), so a rank reads only its share.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ctrltok.core.packing import Segment, plan_rows
from ctrltok.core.stages import atomic_write
from ctrltok.data.documents import mix64

PLAN_FILE = "plan.json"
WINDOW = 8192  # documents per best-fit window: rows are as full as in-memory packing, memory stays bounded
_M64 = np.uint64((1 << 64) - 1)


# --------------------------------------------------------------------------------------------
# Building


@dataclass
class RowPlan:
    """A built plan, memory-mapped (or held, for a small in-memory corpus)."""

    offsets: np.ndarray  # int64 [n_rows + 1]
    segments: np.ndarray  # int64 [n_segments, 3]
    stats: dict

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, r: int) -> list[Segment]:
        a, b = int(self.offsets[r]), int(self.offsets[r + 1])
        return [tuple(int(x) for x in seg) for seg in self.segments[a:b]]

    @classmethod
    def build(cls, lengths: Iterable[int], max_length: int, overlong: str, packing: bool,
              window: int = WINDOW) -> RowPlan:
        """A plan in memory (small corpora, tests)."""
        rows, stats = plan_rows(lengths, max_length, overlong, packing, window)
        offsets, segments = [0], []
        for row in rows:
            segments.extend(row)
            offsets.append(len(segments))
        tokens = sum(e - s for _, s, e in segments)
        return cls(np.asarray(offsets, dtype=np.int64), np.asarray(segments, dtype=np.int64).reshape(-1, 3),
                   asdict(stats.finish(len(offsets) - 1, tokens, max_length)))

    @classmethod
    def write(cls, folder: Path, lengths: Iterable[int], max_length: int, overlong: str, packing: bool,
              window: int = WINDOW) -> RowPlan:
        """Build into ``folder`` (streamed to disk, renamed into place when complete) and open it. A
        folder that already holds the plan is opened as it is."""
        folder = Path(folder)
        if (folder / PLAN_FILE).is_file():
            return cls.open(folder)
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        rows, stats = plan_rows(lengths, max_length, overlong, packing, window)
        n_rows = n_segments = tokens = 0
        with open(tmp / "rows.bin", "wb") as fr, open(tmp / "segments.bin", "wb") as fs:
            fr.write(np.int64(0).tobytes())
            buffer: list[Segment] = []
            ends: list[int] = []
            for row in rows:
                buffer.extend(row)
                tokens += sum(e - s for _, s, e in row)
                n_segments += len(row)
                n_rows += 1
                ends.append(n_segments)
                if len(buffer) >= 1 << 16:
                    fs.write(np.asarray(buffer, dtype=np.int64).tobytes())
                    fr.write(np.asarray(ends, dtype=np.int64).tobytes())
                    buffer, ends = [], []
            fs.write(np.asarray(buffer, dtype=np.int64).reshape(-1, 3).tobytes())
            fr.write(np.asarray(ends, dtype=np.int64).tobytes())
        atomic_write(tmp / PLAN_FILE, json.dumps({"rows": n_rows, "segments": n_segments,
                                                   "stats": asdict(stats.finish(n_rows, tokens, max_length))}))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process (a rank on another node, same filesystem) finished first
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(folder)

    @classmethod
    def open(cls, folder: Path) -> RowPlan:
        meta = json.loads((Path(folder) / PLAN_FILE).read_text(encoding="utf-8"))
        offsets = np.memmap(Path(folder) / "rows.bin", dtype=np.int64, mode="r", shape=(meta["rows"] + 1,))
        segments = np.memmap(Path(folder) / "segments.bin", dtype=np.int64, mode="r",
                             shape=(meta["segments"], 3)) if meta["segments"] else np.zeros((0, 3), np.int64)
        return cls(offsets, segments, meta["stats"])


# --------------------------------------------------------------------------------------------
# Order


def _round(x: np.ndarray, key: np.uint64, mask: np.uint64) -> np.ndarray:
    z = (x * np.uint64(0x9E3779B97F4A7C15) + key) & _M64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
    return (z ^ (z >> np.uint64(31))) & mask


def permute(index: np.ndarray | int, n: int, seed: int, epoch: int) -> np.ndarray:
    """The row at position ``index`` of epoch ``epoch``'s order: a bijection of ``[0, n)`` keyed by
    ``(seed, epoch)``, computed per index in O(1) memory."""
    idx = np.atleast_1d(np.asarray(index, dtype=np.uint64))
    if n <= 1:
        return np.zeros_like(idx, dtype=np.int64)
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = [np.uint64(mix64(seed, epoch * 4 + r)) for r in range(4)]
    with np.errstate(over="ignore"):
        def once(x: np.ndarray) -> np.ndarray:
            left, right = x >> half, x & mask
            for key in keys:
                left, right = right, left ^ _round(right, key, mask)
            return (left << half) | right

        out = once(idx)
        while True:  # cycle-walk: the domain is < 4n, so few indices need more than one more round
            over = out >= np.uint64(n)
            if not over.any():
                break
            out[over] = once(out[over])
    return out.astype(np.int64)


def step_positions(step: int, per_step: int, rank: int, per_rank: int) -> np.ndarray:
    """Global positions (over all epochs) of rank ``rank``'s rows in optimizer step ``step``."""
    first = step * per_step + rank * per_rank
    return np.arange(first, first + per_rank, dtype=np.int64)


def rows_at(positions: np.ndarray, n_rows: int, seed: int) -> np.ndarray:
    """Row indices at global ``positions``: epoch ``p // n_rows``, permuted position ``p % n_rows``."""
    out = np.empty(len(positions), dtype=np.int64)
    epochs = positions // n_rows
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = permute(positions[sel] % n_rows, n_rows, seed, int(epoch))
    return out
