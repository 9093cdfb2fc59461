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

Joining at scale
----------------
:func:`read_annotated` (what ``ctrltok prepare``, ``ctrltok train`` and the evaluation read)
streams the corpus in file order and joins each document to its annotations as it comes; the
corpus is never held. Seed 000 is 100B tokens (about 2e8 documents) with reflections for a
fraction of them: at 10%, 2e7 annotations of a few hundred characters, gigabytes of sidecar, too
much to hold in every prepare. So the join holds the sidecar only up to ``max_held`` annotations
(:data:`MAX_HELD`, a few hundred MB):

* **The sidecar fits** (it ends within the budget): a hash join. The annotations are held grouped
  by document id, in any order; each corpus document takes its own. Annotations never taken
  name unknown documents, reported when the corpus ends (an error, or counted skips).
* **It does not fit**: a sorted merge, both sides in corpus order, memory bounded by a read-ahead
  window (:data:`MERGE_WINDOW` annotations). That is the order a sidecar is written in:
  ``ctrltok annotate`` annotates the corpus in order, one line per document, and a grown corpus
  appends its new documents; a sidecar built per corpus shard, concatenated in shard order, is in
  order too. When a document takes its annotations, the sidecar groups listed before it belong to
  documents that have passed: they are reported as unknown (not in the corpus, or out of corpus
  order) right then, and the merge goes on from the matched group, so one misplaced row costs its
  own annotations, not the rest of the run. A hash partition by document id was the other
  choice; it joins any order but, to give documents back in corpus order, must also partition
  the corpus (an extra pass and copy of the 100B tokens) or keep an id index that grows with it.

What is checked, and when: every sidecar row's own fields as it is read; an offset past its
document's end when the document comes (the annotation is reported and dropped, the document
kept); unknown documents as above. Duplicate corpus ids are checked where they make the join
ambiguous: the hash join keeps the ids of the documents that took annotations and reports a
second document with one of them (an error or a "duplicate document id" skip). Duplicates among
documents without annotations are not looked for (they do not touch the join, and finding them
needs memory that grows with the corpus), nor in the merge, where corpus order decides: the
annotations go to the first document with the id.

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

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctrltok.core.example import IGNORE, Example
from ctrltok.core.records import Skips, read_records, reject
from ctrltok.core.tokens import EPE_ASSISTANT, CharterItem, load_charter

ASSISTANT = EPE_ASSISTANT.text  # declared once, in the epe preset


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


MAX_HELD = 500_000  # sidecar annotations the join holds whole; a larger sidecar is merged in corpus order
MERGE_WINDOW = 4096  # annotations read ahead by the merge


def _document_problem(rec: dict, id_field: str, text_field: str) -> tuple[str, str] | None:
    """``(message, reason)`` when a corpus record is not a document, else ``None``."""
    if id_field not in rec or text_field not in rec:
        return f"a document needs `{id_field}` and `{text_field}`, found {sorted(rec)}", "document without id or text"
    if not isinstance(rec[text_field], str):
        return f"`{text_field}` must be a string, found {type(rec[text_field]).__name__}", "document text not a string"
    return None


def read_documents(
    source: str | Path,
    id_field: str = "id",
    text_field: str = "text",
    on_error: str = "raise",
    skips: Skips | None = None,
) -> dict[str, tuple[str, str]]:
    """Corpus documents as ``{id: (text, where)}``, in file order; duplicates and bad rows are errors
    or skips. Holds the whole corpus: for small tools and tests (:func:`read_annotated` streams)."""
    docs: dict[str, tuple[str, str]] = {}
    for where, rec in read_records(source, on_error, skips, text_field):
        problem = _document_problem(rec, id_field, text_field)
        if problem is None and str(rec[id_field]) in docs:
            problem = (f"document id {rec[id_field]!r} appears twice (first at {docs[str(rec[id_field])][1]})", "duplicate document id")
        if problem:
            reject(problem[0], where, on_error, skips, problem[1])
            continue
        docs[str(rec[id_field])] = (rec[text_field], where)
    return docs


def _annotation(rec: dict, where: str, known: set[str], reflection_field: str,
                documents: Mapping[str, Any] | None) -> Annotation | tuple[str, str]:
    """One sidecar row -> its :class:`Annotation`, or ``(message, reason)``. Without ``documents``
    the checks that need the corpus (unknown id, offset past the end) are left to the join."""
    missing = [k for k in ("doc_id", "offset", reflection_field, "charter") if k not in rec]
    if missing:
        return f"missing field(s) {', '.join(missing)} (the reflection column is {reflection_field!r})", "missing field"
    doc_id = str(rec["doc_id"])
    offset, text, labels = rec["offset"], rec[reflection_field], rec["charter"]
    if documents is not None and doc_id not in documents:
        return f"unknown document {doc_id!r} (not in the corpus)", "unknown document"
    if isinstance(offset, bool) or not isinstance(offset, int):
        return f"offset must be an integer character offset, found {offset!r}", "offset not an integer"
    if documents is not None:
        doc = documents[doc_id]
        n = len(doc[0] if isinstance(doc, tuple) else doc)
        if not 0 <= offset <= n:
            return f"offset {offset} is outside document {doc_id!r} (0..{n} characters)", "offset out of range"
    elif offset < 0:
        return f"offset {offset} is negative", "offset out of range"
    if not isinstance(text, str) or not text.strip():
        return f"empty reflection in column {reflection_field!r}", "empty reflection"
    if not isinstance(labels, list) or not all(isinstance(c, (str, int, float)) for c in labels):
        return f"`charter` must be a list of charter ids, found {labels!r}", "charter not a list"
    labels = [str(c) for c in labels]
    unknown = [c for c in labels if c not in known]
    if unknown:
        return f"unknown charter id(s) {', '.join(map(repr, unknown))}; the charter has {len(known)} ids", "unknown charter id"
    return Annotation(doc_id, offset, text, tuple(dict.fromkeys(labels)), where)


def _sidecar_rows(source: str | Path, charter: Any, reflection_field: str, on_error: str, skips: Skips | None,
                  documents: Mapping[str, Any] | None = None) -> Iterator[Annotation]:
    """The valid annotations of a sidecar in file order; bad rows raise or are counted (``on_error``)."""
    known = set(charter_ids(charter))
    for where, rec in read_records(source, on_error, skips):
        got = _annotation(rec, where, known, reflection_field, documents)
        if isinstance(got, tuple):
            reject(got[0], where, on_error, skips, got[1])
            continue
        yield got


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
    out: dict[str, list[Annotation]] = {}
    for ann in _sidecar_rows(source, charter, reflection_field, on_error, skips, documents):
        out.setdefault(ann.doc_id, []).append(ann)
    for anns in out.values():
        anns.sort(key=lambda a: a.offset)
    return out


def _groups(rows: Iterator[Annotation]) -> Iterator[list[Annotation]]:
    """Consecutive annotations of one document, as one group."""
    group: list[Annotation] = []
    for ann in rows:
        if group and ann.doc_id != group[0].doc_id:
            yield group
            group = []
        group.append(ann)
    if group:
        yield group


class _SidecarSide:
    """The sidecar's side of :func:`read_annotated`'s join (module docstring, "Joining at scale")."""

    def __init__(self, groups: Iterator[list[Annotation]], max_held: int, on_error: str, skips: Skips | None):
        self.groups, self.on_error, self.skips = groups, on_error, skips
        self.held: dict[str, list[Annotation]] = {}  # by document id, in sidecar order
        self.n_held = 0
        self.exhausted = False
        self._fill(max_held)
        if not self.exhausted:  # a group more than the budget? then the sidecar does not fit
            nxt = next(self.groups, None)
            self.exhausted = nxt is None
            self.groups = itertools.chain([nxt] if nxt else [], self.groups)
        self.merge = not self.exhausted
        self.joined: dict[str, str] = {}  # hash join: annotated id -> where its document was

    def _fill(self, limit: int) -> None:
        while not self.exhausted and self.n_held < limit:
            group = next(self.groups, None)
            if group is None:
                self.exhausted = True
                return
            self.held.setdefault(group[0].doc_id, []).extend(group)
            self.n_held += len(group)

    def _unknown(self, anns: list[Annotation]) -> None:
        note = ("; the sidecar is larger than the join holds, so it must list documents in corpus order "
                "(ctrltok.epe.reflection, 'Joining at scale')") if self.merge else ""
        for ann in anns:
            reject(f"unknown document {ann.doc_id!r} (not in the corpus{note})", ann.where, self.on_error, self.skips,
                   "unknown document")

    def take(self, doc_id: str) -> list[Annotation]:
        """The annotations of the corpus document ``doc_id``, sorted by offset (none: ``[]``)."""
        if self.merge:
            self._fill(MERGE_WINDOW)
        if doc_id not in self.held:
            return []
        if self.merge:  # documents listed before this one have passed in the corpus: unknown (or out of order)
            for stale in list(itertools.takewhile(lambda k: k != doc_id, self.held)):
                anns = self.held.pop(stale)
                self.n_held -= len(anns)
                self._unknown(anns)
        anns = self.held.pop(doc_id)
        self.n_held -= len(anns)
        return sorted(anns, key=lambda a: a.offset)

    def finish(self) -> None:
        """The corpus has ended: every annotation not joined names an unknown document."""
        for anns in self.held.values():
            self._unknown(anns)
        self.held.clear()
        for group in self.groups:
            self._unknown(group)


def read_annotated(
    corpus: str | Path | Iterable[tuple[str, dict]],
    sidecar: str | Path,
    charter: str | Path | Sequence[CharterItem] | Sequence[str] | None = None,
    reflection_field: str = "reflection_3p",
    id_field: str = "id",
    text_field: str = "text",
    on_error: str = "raise",
    skips: Skips | None = None,
    max_held: int = MAX_HELD,
) -> Iterator[AnnotatedDocument]:
    """The corpus in file order, each document with its (validated) annotations, possibly none,
    joined as it is read: the corpus is never held (module docstring, "Joining at scale").

    ``corpus``: any source :func:`~ctrltok.core.records.read_records` reads, or an iterator of
    ``(where, record)`` pairs. ``max_held``: the sidecar annotations held for a hash join; a larger
    sidecar is merged, and must then list its documents in corpus order.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    rows = _sidecar_rows(sidecar, charter, reflection_field, on_error, skips)
    side = _SidecarSide(_groups(rows), max_held, on_error, skips)
    records = corpus if isinstance(corpus, Iterator) else read_records(corpus, on_error, skips, text_field)
    for where, rec in records:
        problem = _document_problem(rec, id_field, text_field)
        doc_id = None if problem else str(rec[id_field])
        if doc_id is not None and doc_id in side.joined:
            problem = (f"document id {rec[id_field]!r} appears twice (first at {side.joined[doc_id]})", "duplicate document id")
        if problem:
            reject(problem[0], where, on_error, skips, problem[1])
            continue
        text = rec[text_field]
        anns = side.take(doc_id)
        if anns and not side.merge:
            side.joined[doc_id] = where
        kept = []
        for ann in anns:
            if ann.offset > len(text):
                reject(f"offset {ann.offset} is outside document {doc_id!r} (0..{len(text)} characters)", ann.where,
                       on_error, skips, "offset out of range")
                continue
            kept.append(ann)
        yield AnnotatedDocument(doc_id, text, kept, where)
    side.finish()


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
