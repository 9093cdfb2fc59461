"""A recipe's `data` section -> encoded Examples in memory, the held-out split, rows as trained.

The reading and the encoding per ``data.kind`` are :mod:`ctrltok.data.documents`' (``read_inputs``
and ``DocumentEncoder``, what ``ctrltok prepare`` runs); this module splits the inputs, encodes
them in memory, and counts every skip.
Examples with no supervised token (for instance a reply cut off by truncation) are reported and
left out, never silently trained on. Training streams prepared data (:mod:`ctrltok.data.prepare`);
this in-memory path serves evaluation, small tools and the equality tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence, TypeVar

from ctrltok.core.config import DataConfig, Recipe
from ctrltok.core.example import Example
from ctrltok.core.packing import Batch, collate, pack, pad_batch
from ctrltok.core.records import RecordError, Skips
from ctrltok.core.tokens import CharterItem, load_charter
from ctrltok.data.documents import DocumentEncoder, is_held_out, read_inputs

T = TypeVar("T")


@dataclass
class Encoded:
    train: list[Example]
    eval: list[Example]
    skips: Skips = field(default_factory=Skips)
    records: int = 0


def heldout_indices(n: int, fraction: float, seed: int) -> set[int]:
    """The held-out split, the one draw every command uses: which of ``n`` inputs (as read, after
    ``data.limit``) are held out, by the keyed per-input draw of :func:`ctrltok.data.documents.is_held_out`
    (what ``ctrltok prepare`` routes by, so prepared and in-memory splits are the same)."""
    return {i for i in range(n) if is_held_out(i, fraction, seed)}


def split_heldout(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """``(train, held out)`` by :func:`heldout_indices`, each in the original order."""
    held = heldout_indices(len(items), fraction, seed)
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _encode(items: list, encoder: DocumentEncoder, skips: Skips) -> list[Example]:
    """Encode ``(index, input)`` pairs with the one :class:`DocumentEncoder`; drops are counted in ``skips``."""
    out: list[Example] = []
    for i in range(0, len(items), 256):
        for result in encoder.encode(items[i:i + 256]):
            if isinstance(result, tuple):
                skips.add(*result)
            else:
                out.extend(result)
    return out


def build_examples(recipe: Recipe, tokenizer, charter: list[CharterItem] | None = None) -> Encoded:
    """Read and encode the train (and eval) data of a recipe in memory; hold out ``eval_fraction``
    (the keyed draw) when there is no eval set. The same encoding and split ``ctrltok prepare``
    streams to disk (tested equal), for small data, evaluation and tests.

    ``charter``: the EPE charter the run already loaded (read from ``tokens.charter`` if not given).
    """
    data = recipe.data
    if data.kind == "epe":
        charter = charter if charter is not None else load_charter(recipe.tokens.charter)
    encoder = DocumentEncoder(recipe, tokenizer, charter)
    order = [c.id for c in charter] if charter is not None else None
    skips = Skips()
    train_items = list(enumerate(read_inputs(recipe, "train", skips, order)))  # (index as read, input)
    n_records = len(train_items)
    if data.eval:
        eval_items = list(enumerate(read_inputs(recipe, "eval", skips, order)))
    else:
        train_items, eval_items = split_heldout(train_items, data.eval_fraction, recipe.train.seed)
    train = _encode(train_items, encoder, skips)
    evals = _encode(eval_items, encoder, skips)
    if not train:
        raise RecordError(f"{data.train}: no usable training examples (skips: {skips.summary()})")
    return Encoded(train, evals, skips, n_records)


def make_rows(examples: list[Example], data: DataConfig) -> tuple[list[list[Example]], dict]:
    """Rows as the run trains on them: packed (``data.packing``) or one example per row, over-long
    examples handled by ``data.overlong`` and counted (:func:`ctrltok.core.packing.pack`'s stats,
    whichever the mode). Every in-memory held-out loss uses this; the training plan on disk
    (:mod:`ctrltok.data.plan`) is the same placement for a corpus of at most one packing window
    (``data.plan.WINDOW`` documents), windowed beyond."""
    result = pack(examples, data.max_length, data.overlong, packing=data.packing)
    return result.rows, asdict(result.stats)


def to_batch(rows: list[list[Example]], pad_id: int, packed: bool) -> Batch:
    if packed:
        return collate(rows, pad_id)
    return pad_batch([r[0] for r in rows], pad_id)
