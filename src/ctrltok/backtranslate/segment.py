"""Backtranslation's first stage: unlabelled documents -> candidate responses.

Each document is cut at its headings (a line underlined by ``*****``, ``=====``, ...), split into
paragraphs (``paragraphs: blank_line``: at blank lines, an indented block staying with the paragraph
introducing it; ``line``: every line, the web-text convention of C4, CCNet and Dolma, where a line
over ``max_chars`` is cut at sentence ends), and the paragraphs of a section are packed greedily up
to ``max_chars``. Each chunk is a candidate :class:`Pair`; the
ones failing a quality heuristic (:func:`quality_issue`: too short or long, mostly symbols,
shouting, not self-contained, repetitive), duplicates (by normalised hash) and those over the
per-document cap are yielded with ``drop`` set to the reason, so every drop is counted.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pydoc_data.topics import topics as pydoc_topics

from ctrltok.backtranslate.pairs import Pair
from ctrltok.core.config import BacktranslateConfig
from ctrltok.core.records import read_records
from ctrltok.core.segment import split_sentences

PYDOC = "python:pydoc_topics"


def read_documents(source: str, text_field: str = "text", limit: int | None = None) -> Iterator[tuple[str, str]]:
    """``(document id, text)`` from ``python:pydoc_topics`` (the interpreter's bundled docs, on
    every machine) or anything :func:`ctrltok.core.records.read_records` reads: JSONL, Parquet, a
    folder of ``.txt`` files, a ``datasets`` name."""
    def docs() -> Iterator[tuple[str, str]]:
        if source == PYDOC:
            for key in sorted(pydoc_topics):
                yield f"pydoc:{key}", pydoc_topics[key]
            return
        for where, rec in read_records(source, text_field=text_field):
            text = rec.get(text_field)
            if not isinstance(text, str):
                raise ValueError(f"{where}: no text field {text_field!r} (fields {sorted(rec)}); "
                                 "set backtranslate.corpus_field")
            yield str(rec.get("id", where)), text

    for n, doc in enumerate(docs()):
        if limit is not None and n >= limit:
            return
        yield doc


_RULE = re.compile(r"^\s*([*=~^\-#])\1{2,}\s*$")  # a heading underline: *****, =====, -----
_CONNECTIVE = re.compile(r"^(and|but|or|so|also|however|moreover|furthermore|therefore|thus|hence|"
                         r"in addition|as a result|otherwise|then|see also)\b", re.I)


def _sections(text: str) -> list[str]:
    """Split at headings (a line underlined by a rule); the headings themselves are dropped."""
    lines = text.replace("\r\n", "\n").split("\n")
    sections, current = [], []
    i = 0
    while i < len(lines):
        if i + 1 < len(lines) and lines[i].strip() and _RULE.match(lines[i + 1]):
            sections.append("\n".join(current))
            current = []
            i += 2
            continue
        current.append(lines[i])
        i += 1
    sections.append("\n".join(current))
    return [s.strip("\n") for s in sections if s.strip()]


def _units(section: str, cfg: BacktranslateConfig) -> list[str]:
    """The section's paragraphs. ``blank_line``: an indented block (code, a grammar) is glued to the
    paragraph introducing it, so no segment ends on "is equivalent to:" with the example cut away.
    ``line``: each non-empty line, one over ``max_chars`` cut into runs of whole sentences."""
    if cfg.paragraphs == "line":
        units = []
        for line in section.split("\n"):
            if len(line) > cfg.max_chars:
                units.extend(_sentence_runs(line.strip(), cfg.max_chars))
            elif line.strip():
                units.append(line.strip())
        return units
    units: list[str] = []
    for block in re.split(r"\n\s*\n", section):
        if not block.strip():
            continue
        indented = block[:1].isspace()
        if units and (indented or units[-1].rstrip().endswith(":")):
            units[-1] = units[-1] + "\n\n" + block
        else:
            units.append(block.strip("\n"))
    return units


def _sentence_runs(text: str, max_chars: int) -> list[str]:
    """Whole sentences (:func:`ctrltok.core.segment.split_sentences`) packed greedily up to
    ``max_chars``; a sentence longer than that stays whole and is dropped later as too long."""
    runs: list[str] = []
    for sentence in split_sentences(text):
        if runs and len(runs[-1]) + len(sentence.rstrip()) <= max_chars:
            runs[-1] += sentence
        else:
            runs.append(sentence)
    return [run.strip() for run in runs]


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def quality_issue(text: str, cfg: BacktranslateConfig) -> str | None:
    """The first heuristic a candidate fails, or None. The paper filters by length, dedups, and
    drops low-quality segments by simple heuristics; these are ours."""
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    visible = [c for c in text if not c.isspace()]
    letters = [c for c in visible if c.isalpha()]
    if len(letters) < 0.55 * len(visible):
        return "mostly_symbols"  # tables, code dumps, link lists
    if sum(c.isupper() for c in letters) > 0.3 * len(letters):
        return "shouting"
    first = text.lstrip()
    if first[:1].islower() or _CONNECTIVE.match(first) or first[:1] in ",;:)]}":
        return "not_self_contained"  # continues a sentence or paragraph we do not have
    last_line = text.rstrip().rsplit("\n", 1)[-1]
    if not last_line[:1].isspace() and text.rstrip()[-1:] in ",:;(-":
        return "not_self_contained"  # stops mid-thought (an indented example may end anyhow)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) >= 4 and len(set(lines)) < 0.5 * len(lines):
        return "repetitive"
    return None


def segment(documents: Iterable[tuple[str, str]], cfg: BacktranslateConfig,
            stats: Counter | None = None) -> Iterator[Pair]:
    """Documents -> candidate responses: whole paragraphs packed greedily up to ``max_chars``
    within one section, filtered by :func:`quality_issue`, deduplicated by normalised hash, at
    most ``max_per_document`` kept per document and ``max_candidates`` in all.
    Ids are ``<document id>#<k>``, stable for the same corpus and settings."""
    stats = stats if stats is not None else Counter()
    seen: set[str] = set()
    kept = 0
    for doc_id, text in documents:
        stats["documents"] += 1
        k = kept_here = 0
        for section in _sections(text):
            chunks: list[str] = []
            sep = "\n" if cfg.paragraphs == "line" else "\n\n"
            for unit in _units(section, cfg):
                if chunks and len(chunks[-1]) + len(sep) + len(unit) <= cfg.max_chars:
                    chunks[-1] += sep + unit
                else:
                    chunks.append(unit)
            for chunk in chunks:
                pair = Pair(id=f"{doc_id}#{k}", source=doc_id, response=chunk)
                k += 1
                pair.drop = quality_issue(chunk, cfg)
                if pair.drop is None and cfg.max_per_document is not None and kept_here >= cfg.max_per_document:
                    pair.drop = "document_cap"  # spread a small budget over more documents
                if pair.drop is None:
                    digest = hashlib.sha1(normalise(chunk).encode()).hexdigest()
                    if digest in seen:
                        pair.drop = "duplicate"
                    seen.add(digest)
                yield pair
                if pair.drop is None:
                    kept += 1
                    kept_here += 1
                    if cfg.max_candidates is not None and kept >= cfg.max_candidates:
                        return
