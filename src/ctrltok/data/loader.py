"""Rows for a step: a row plan over documents (prepared and memory-mapped, or in memory), read
per rank.

:class:`RowSource` turns row indices into rows of :class:`~ctrltok.core.example.Example` (a
segment that covers part of a document becomes :func:`~ctrltok.core.packing.slice_example` of it,
exactly as in-memory packing cuts it). :func:`rank_rows` gives rank ``r``'s rows of optimizer
step ``s``: a pure function of ``(seed, step)`` and the plan, so a resumed run reads the same
batches as an uninterrupted one, and ``N`` ranks together read exactly the rows one process would.
The loader's position that a checkpoint records is therefore the step itself, plus the plan's
identity (:func:`plan_key`), checked on resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ctrltok.core.config import DataConfig
from ctrltok.core.example import Example
from ctrltok.core.packing import slice_example
from ctrltok.data.plan import WINDOW, RowPlan, rows_at, step_positions
from ctrltok.data.store import PreparedData, Split, fingerprint


def plan_key(data: DataConfig, split: str, window: int = WINDOW) -> str:
    """The row settings a plan depends on (with the prepared data it is built over)."""
    return f"{split}-{fingerprint([data.max_length, data.overlong, data.packing, window])}"


class RowSource:
    """Rows by index over ``documents`` (a prepared split, or Examples in memory) and a plan."""

    def __init__(self, documents: Split | Sequence[Example], plan: RowPlan, key: str = ""):
        self.documents = documents
        self.plan = plan
        self.key = key

    def __len__(self) -> int:
        return len(self.plan)

    def _fetch(self, doc_ids: list[int]) -> dict[int, Example]:
        if isinstance(self.documents, Split):
            return dict(zip(doc_ids, self.documents.documents(doc_ids)))
        return {d: self.documents[d] for d in doc_ids}

    def rows(self, row_ids: Sequence[int]) -> list[list[Example]]:
        segments = [self.plan.row(int(r)) for r in row_ids]
        docs = self._fetch(sorted({d for row in segments for d, _, _ in row}))
        out = []
        for row in segments:
            pieces = []
            for d, start, end in row:
                ex = docs[d]
                pieces.append(ex if (start, end) == (0, len(ex)) else slice_example(ex, start, end))
            out.append(pieces)
        return out

    def all_rows(self, batch: int = 64):
        """Every row in plan order, ``batch`` rows at a time (held-out evaluation)."""
        for first in range(0, len(self), batch):
            yield self.rows(range(first, min(first + batch, len(self))))


def in_memory(examples: Sequence[Example], data: DataConfig) -> RowSource:
    """A plan over Examples already in memory (the same rows the prepared path builds)."""
    return RowSource(list(examples), RowPlan.build([len(ex) for ex in examples], data.max_length, data.overlong,
                                                   data.packing), plan_key(data, "memory"))


def prepared_rows(prepared: PreparedData, split: str, data: DataConfig, build: bool = True) -> RowSource:
    """The rows of a prepared split; ``build`` writes the plan if missing (one process per filesystem
    should build, the others open it after a barrier)."""
    documents = prepared.train if split == "train" else prepared.eval
    key = plan_key(data, split)
    folder = Path(prepared.path) / "plans" / key
    if build:
        plan = RowPlan.write(folder, documents.lengths(), data.max_length, data.overlong, data.packing)
    else:
        plan = RowPlan.open(folder)
    return RowSource(documents, plan, key)


def rank_rows(source: RowSource, step: int, per_step: int, rank: int, per_rank: int, seed: int) -> list[list[Example]]:
    """Rank ``rank``'s rows of optimizer step ``step`` (``per_rank`` of the step's ``per_step``)."""
    positions = step_positions(step, per_step, rank, per_rank)
    return source.rows(rows_at(positions, len(source), seed).tolist())
