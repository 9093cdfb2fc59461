"""EPE (seed 000): sidecar reflection annotations, inserted into documents at encoding time.

The sidecar format
------------------
A JSONL or Parquet file, one annotation per line/row, next to an unchanged corpus (records with
``id`` and ``text``; the field names are configurable)::

    {"doc_id": "doc-001", "offset": 308, "reflection_3p": "The writer is ...", "charter": ["5.1", "3.4"]}

* ``doc_id``: the ``id`` of a corpus document.
* ``offset``: a character offset into that document's text (a Python ``str`` index, Unicode code
  points), ``0 <= offset <= len(text)``. The reflection goes between ``text[:offset]`` and
  ``text[offset:]``. A document may have several annotations.
* the reflection text, in the column named by ``reflection_field`` (default ``reflection_3p``).
* ``charter``: a list of charter ids (``charter.jsonl``), any subset, possibly empty.

:func:`read_sidecar` checks every line: unknown documents, offsets out of range or not integers,
unknown charter ids, empty reflections and missing fields each raise a :class:`RecordError`
naming the file and line, or with ``on_error="skip"`` are skipped and counted by reason.

The layout
----------
:func:`insert_reflection` tokenizes the whole document once (special-token spellings in the text
stay plain text), then inserts ``<assistant>`` and the reflection's tokens at the annotation's
token boundary::

    pre-context | <assistant> reflection tokens | post-context

**Snapping rule**: the reflection is inserted before the first token that ends after ``offset``
(the tokens before it lie entirely in ``text[:offset]``). An offset inside a token therefore moves
back to that token's start: the reflection never sees a character at or after its offset, and the
document's token ids are exactly those of the plain document, so training and inference (no
reflection) see the same context tokens.

Pre-context ``p0 p1``, reflection region ``A r0 r1`` (``A`` = ``<assistant>``), post-context
``c0 c1``, collated alone in a row (the output of ``attention.draw``; ``tests/test_reflection.py``
asserts it)::

    tokens     p0 p1  A r0 r1 c0 c1
    positions   0  1  2  3  4  2  3
    doc_ids     0  0  0  0  0  0  0
    targets    p1  . r0 r1 c0 c1  .

    mask       p0 p1  A r0 r1 c0 c1
      p0        1  .  .  .  .  .  .
      p1        1  1  .  .  .  .  .
      A         1  1  1  .  .  .  .
      r0        1  1  1  1  .  .  .
      r1        1  1  1  1  1  .  .
      c0        1  1  .  .  .  1  .
      c1        1  1  .  .  .  1  1

* **Hole**: post-context rows cannot see the ``<assistant>`` + reflection columns
  (``Example.blocked`` = ``(start of post, end of doc, start of A, end of reflection)``).
  With several reflections in one document each region is hidden from everything after it,
  later reflections included, so each reflection sees only the context before it.
* **Position aliasing**: post-context positions continue from the pre-context as if the
  reflection were absent (``c0`` takes position 2, the position ``A`` had).
* **Loss**: reflection tokens and context tokens are supervised, weighted by
  ``reflection_weight`` and ``context_weight`` (``Example.loss_weights``). ``<assistant>`` itself
  is not a target by default (``p1 -> A`` is "."): where reflections go is the annotator's choice,
  and plain text should not learn to open one. The last reflection token predicts the first
  post-context token (``r1 -> c0``, weighted as context): the model learns to resume the text
  after reflecting (``resume_target=False`` turns it off).
* **Constitution head**: ``Example.head_positions`` holds the ``<assistant>`` index and
  ``head_targets`` the multi-hot charter vector (in charter file order).

Because of the hole and the aliasing, every post-context logit equals the logit of the plain
document at the same token (``tests/test_reflection.py`` proves it on a tiny Llama and on
SmolLM2-135M): a model trained this way needs no reflections at inference.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctrltok.core.example import IGNORE, Example
from ctrltok.core.records import Skips, read_records, reject
from ctrltok.core.tokens import CharterItem, load_charter

ASSISTANT = "<assistant>"


@dataclass(frozen=True)
class Annotation:
    doc_id: str
    offset: int
    reflection: str
    charter: tuple[str, ...]
    where: str = ""  # "sidecar.jsonl:12"


@dataclass
class AnnotatedDocument:
    doc_id: str
    text: str
    annotations: list[Annotation] = field(default_factory=list)
    where: str = ""


def charter_ids(charter: str | Path | Sequence[CharterItem] | Sequence[str] | None = None) -> list[str]:
    """Charter ids in head-output order, from a charter file, loaded items, plain ids, or the shipped file."""
    if charter is None or isinstance(charter, (str, Path)):
        return [item.id for item in load_charter(charter)]
    return [item.id if isinstance(item, CharterItem) else str(item) for item in charter]


def charter_vector(ids: Sequence[str], order: Sequence[str]) -> list[float]:
    """The multi-hot vector of ``ids`` over ``order``; unknown ids are a ``ValueError``."""
    index = {cid: i for i, cid in enumerate(order)}
    vec = [0.0] * len(order)
    for cid in ids:
        if cid not in index:
            raise ValueError(f"unknown charter id {cid!r}; known ids: {', '.join(order)}")
        vec[index[cid]] = 1.0
    return vec


def read_documents(
    source: str | Path,
    id_field: str = "id",
    text_field: str = "text",
    on_error: str = "raise",
    skips: Skips | None = None,
) -> dict[str, tuple[str, str]]:
    """Corpus documents as ``{id: (text, where)}``, in file order; duplicates and bad rows are errors or skips."""
    docs: dict[str, tuple[str, str]] = {}
    for where, rec in read_records(source, on_error, skips, text_field):
        problem = None
        if id_field not in rec or text_field not in rec:
            problem = (f"a document needs `{id_field}` and `{text_field}`, found {sorted(rec)}", "document without id or text")
        elif not isinstance(rec[text_field], str):
            problem = (f"`{text_field}` must be a string, found {type(rec[text_field]).__name__}", "document text not a string")
        elif str(rec[id_field]) in docs:
            problem = (f"document id {rec[id_field]!r} appears twice (first at {docs[str(rec[id_field])][1]})", "duplicate document id")
        if problem:
            reject(problem[0], where, on_error, skips, problem[1])
            continue
        docs[str(rec[id_field])] = (rec[text_field], where)
    return docs


def read_sidecar(
    source: str | Path,
    documents: Mapping[str, Any] | None = None,
    charter: str | Path | Sequence[CharterItem] | Sequence[str] | None = None,
    reflection_field: str = "reflection_3p",
    on_error: str = "raise",
    skips: Skips | None = None,
) -> dict[str, list[Annotation]]:
    """Validated annotations grouped by document id (each list sorted by offset).

    ``documents`` maps ids to texts (or ``(text, where)`` pairs, as :func:`read_documents`
    returns); when given, unknown ids and out-of-range offsets are caught here. Every problem
    raises :class:`RecordError` with file and line, or (``on_error="skip"``) is counted in
    ``skips`` under its reason.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    known = set(charter_ids(charter))
    out: dict[str, list[Annotation]] = {}
    for where, rec in read_records(source, on_error, skips):

        def bad(msg: str, reason: str) -> None:
            reject(msg, where, on_error, skips, reason)

        missing = [k for k in ("doc_id", "offset", reflection_field, "charter") if k not in rec]
        if missing:
            bad(f"missing field(s) {', '.join(missing)} (the reflection column is {reflection_field!r})", "missing field")
            continue
        doc_id = str(rec["doc_id"])
        offset, text, labels = rec["offset"], rec[reflection_field], rec["charter"]
        if documents is not None and doc_id not in documents:
            bad(f"unknown document {doc_id!r} (not in the corpus)", "unknown document")
            continue
        if isinstance(offset, bool) or not isinstance(offset, int):
            bad(f"offset must be an integer character offset, found {offset!r}", "offset not an integer")
            continue
        if documents is not None:
            doc = documents[doc_id]
            n = len(doc[0] if isinstance(doc, tuple) else doc)
            if not 0 <= offset <= n:
                bad(f"offset {offset} is outside document {doc_id!r} (0..{n} characters)", "offset out of range")
                continue
        elif offset < 0:
            bad(f"offset {offset} is negative", "offset out of range")
            continue
        if not isinstance(text, str) or not text.strip():
            bad(f"empty reflection in column {reflection_field!r}", "empty reflection")
            continue
        if not isinstance(labels, list) or not all(isinstance(c, (str, int, float)) for c in labels):
            bad(f"`charter` must be a list of charter ids, found {labels!r}", "charter not a list")
            continue
        labels = [str(c) for c in labels]
        unknown = [c for c in labels if c not in known]
        if unknown:
            bad(f"unknown charter id(s) {', '.join(map(repr, unknown))}; the charter has {len(known)} ids", "unknown charter id")
            continue
        out.setdefault(doc_id, []).append(Annotation(doc_id, offset, text, tuple(dict.fromkeys(labels)), where))
    for anns in out.values():
        anns.sort(key=lambda a: a.offset)
    return out


def read_annotated(
    corpus: str | Path,
    sidecar: str | Path,
    charter: str | Path | Sequence[CharterItem] | Sequence[str] | None = None,
    reflection_field: str = "reflection_3p",
    id_field: str = "id",
    text_field: str = "text",
    on_error: str = "raise",
    skips: Skips | None = None,
) -> Iterator[AnnotatedDocument]:
    """The corpus in file order, each document with its (validated) annotations, possibly none."""
    docs = read_documents(corpus, id_field, text_field, on_error, skips)
    annotations = read_sidecar(sidecar, docs, charter, reflection_field, on_error, skips)
    for doc_id, (text, where) in docs.items():
        yield AnnotatedDocument(doc_id, text, annotations.get(doc_id, []), where)


@dataclass(frozen=True)
class Insert:
    """One reflection, in token terms: insert before document token ``at``."""

    at: int
    reflection_ids: list[int]
    head_target: list[float]


def layout(
    doc_ids: list[int],
    inserts: Sequence[Insert],
    assistant_id: int,
    reflection_weight: float = 1.0,
    context_weight: float = 1.0,
    supervise_marker: bool = False,
    resume_target: bool = True,
    source: str = "",
) -> Example:
    """The pure layout step: document ids + reflections (in token terms) -> Example.

    See the module docstring for the picture. ``inserts`` must be sorted by ``at``.
    """
    ids: list[int] = []
    labels: list[int] = []
    weights: list[float] = []
    positions: list[int] = []
    blocked_regions: list[tuple[int, int]] = []
    head_positions: list[int] = []
    head_targets: list[list[float]] = []
    cursor = 0  # next document token
    resume_at: list[int] = []

    def context(upto: int) -> None:
        nonlocal cursor
        for j in range(cursor, upto):
            ids.append(doc_ids[j])
            labels.append(doc_ids[j])
            weights.append(context_weight)
            positions.append(j)  # aliasing: a context token's position is its index in the plain document
        cursor = max(cursor, upto)

    for ins in inserts:
        if not cursor <= ins.at <= len(doc_ids):
            raise ValueError(f"{source or 'document'}: reflection at token {ins.at} outside {cursor}..{len(doc_ids)} (unsorted?)")
        context(ins.at)
        start = len(ids)
        head_positions.append(start)
        head_targets.append(list(ins.head_target))
        ids.append(assistant_id)
        labels.append(assistant_id if supervise_marker else IGNORE)
        weights.append(reflection_weight if supervise_marker else 0.0)
        positions.append(ins.at)
        for k, tid in enumerate(ins.reflection_ids, 1):
            ids.append(tid)
            labels.append(tid)
            weights.append(reflection_weight)
            positions.append(ins.at + k)
        blocked_regions.append((start, len(ids)))
        resume_at.append(len(ids))
    context(len(doc_ids))
    if not resume_target:
        for r in resume_at:
            if r < len(ids) and ids[r] != assistant_id:
                labels[r] = IGNORE
                weights[r] = 0.0
    n = len(ids)
    blocked = [(k1, n, k0, k1) for k0, k1 in blocked_regions if k1 < n]
    return Example(
        input_ids=ids,
        labels=labels,
        position_ids=positions,
        blocked=blocked,
        loss_weights=weights,
        head_positions=head_positions,
        head_targets=head_targets,
        source=source,
    )


def snap(offsets: Sequence[tuple[int, int]], offset: int) -> int:
    """Token index to insert before: the first token that ends after ``offset`` (see "Snapping rule")."""
    for i, (_, end) in enumerate(offsets):
        if end > offset:
            return i
    return len(offsets)


def insert_reflection(
    text: str,
    annotations: Sequence[Annotation],
    tokenizer: Any,
    charter: Sequence[str],
    reflection_weight: float = 1.0,
    context_weight: float = 1.0,
    supervise_marker: bool = False,
    resume_target: bool = True,
    reflection_prefix: str = " ",
    source: str = "",
) -> Example:
    """A document with its reflections inserted (module docstring: layout, hole, positions, loss).

    ``charter`` is the charter id order of the head's outputs (:func:`charter_ids`).
    ``reflection_prefix`` is put before each reflection's text before tokenizing (SmolLM2-style
    tokenizers attach a leading space to the next word). Special-token spellings in the text and
    in reflections are tokenized as plain text.
    """
    assistant_id = tokenizer.convert_tokens_to_ids(ASSISTANT)
    if assistant_id is None or assistant_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(assistant_id) != ASSISTANT:
        raise ValueError(f"the tokenizer has no {ASSISTANT} token; add the `epe` preset (ctrltok.core.tokens.add_tokens) first")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    doc_ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    inserts = []
    for ann in sorted(annotations, key=lambda a: a.offset):
        if not 0 <= ann.offset <= len(text):
            raise ValueError(f"{ann.where or source}: offset {ann.offset} outside 0..{len(text)}")
        refl = tokenizer(reflection_prefix + ann.reflection.strip(), add_special_tokens=False, split_special_tokens=True)
        inserts.append(Insert(snap(offsets, ann.offset), list(refl["input_ids"]), charter_vector(ann.charter, charter)))
    return layout(
        doc_ids,
        inserts,
        assistant_id,
        reflection_weight=reflection_weight,
        context_weight=context_weight,
        supervise_marker=supervise_marker,
        resume_target=resume_target,
        source=source,
    )
