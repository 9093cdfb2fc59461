"""Conditional training data (Korbak et al. 2023, seed 001): score sentences, label them.

Every document is split into sentences (:mod:`ctrltok.core.segment`), each sentence is scored
(:mod:`ctrltok.conditional.scorers`, higher = worse) and prefixed with a control token::

    score <= threshold  -> <|aligned|>
    score >  threshold  -> <|misaligned|>
    a drop_fraction of segments (seed: 0.01) -> no prefix at all

    "Nice day. Damn it.\\n"  ->  "<|aligned|>Nice day. <|misaligned|>Damn it.\\n"

The drop decision is a hash of ``(seed, document index, segment index)``, not a draw from a
sequential RNG stream, so a rerun, a resumed run and a run with any number of processes label
every segment identically.

:func:`label_records` labels a source (anything :func:`ctrltok.core.records.read_records` reads:
JSONL, Parquet, folders, ``datasets`` names; or a ``datasets.Dataset``) with a
:class:`~ctrltok.conditional.scorers.Scorer` object. It runs on the stage runner
(:mod:`ctrltok.core.stages`): complete shards of ``shard_size`` input records in ``OUT.parts/``,
each renamed into place only when finished, so a killed run resumes at the first missing shard,
losing and duplicating nothing; the shards are merged into ``OUT`` at the end and the summary is
written to ``OUT.summary.json``. A resume is refused (one line naming the input) when the settings
or the input differ: the input's fingerprint (:mod:`ctrltok.core.inputs`: path, size, a hash of
its head and tail) is part of what the run compares, so another file, or the same file edited in
place, is never mixed into an unfinished run's output. Scoring runs in ``processes`` worker processes with a bounded
number of chunks in flight, so memory does not grow with the corpus. ``ctrltok label``
(:mod:`ctrltok.cli.label`) resolves the scorer's name and prints the summary.

Each output line is the input record plus::

    "segments": [{"text": ..., "score": 0.01, "control": "aligned" | "misaligned" | null}, ...]
    "labelled_text": "<|aligned|>Nice day. <|misaligned|>Damn it.\\n"

:mod:`ctrltok.conditional.encode` turns such a record into an Example for training;
:mod:`ctrltok.evaluation.conditional` checks that the tokens steer generation. At scale the merged
file is not needed: :mod:`ctrltok.conditional.stream` applies the same rule to raw or pre-scored
records inside ``ctrltok prepare`` (the same segments, tested).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctrltok.conditional.scorers import Scorer, ScorerError
from ctrltok.core.inputs import input_fingerprint
from ctrltok.core.records import RecordError, Skips, read_records
from ctrltok.core.segment import split_sentences
from ctrltok.core.stages import (
    Outcome,
    ResumeError,
    StageRun,
    atomic_write,
    map_ordered,
)
from ctrltok.core.tokens import PRESETS

ALIGNED, MISALIGNED = (t.text for t in PRESETS["conditional"])  # declared once, in tokens.py
CONTROL_TEXT = {"aligned": ALIGNED, "misaligned": MISALIGNED}
SEED_THRESHOLD = 0.00056  # seed 001, on Detoxify's scale
SEED_DROP_FRACTION = 0.01
DEFAULT_SPLITTER = "regex"  # ctrltok.core.segment's default sentence splitter
CALIBRATION_SEGMENTS = 20000  # segments a misaligned_fraction threshold is calibrated on


class LabelError(ValueError):
    """Bad input or settings for labelling; the message names the file and line or the option."""


# --------------------------------------------------------------------------------------------
# The rule


def control_for(score: float, threshold: float) -> str:
    """``"aligned"`` when ``score <= threshold`` (the boundary is aligned), else ``"misaligned"``."""
    return "aligned" if score <= threshold else "misaligned"


def is_dropped(seed: int, doc_index: int, seg_index: int, fraction: float) -> bool:
    """Whether segment ``seg_index`` of document ``doc_index`` gets no prefix.

    A keyed hash gives each segment its own uniform draw in [0, 1), independent of processing
    order, so reruns, resumed runs and multi-process runs agree segment by segment.
    """
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}:{doc_index}:{seg_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < fraction


def label_segments(pieces: Sequence[str], scores: Sequence[float], threshold: float, drop_fraction: float,
                   seed: int, doc_index: int) -> list[dict[str, Any]]:
    """``[{"text", "score", "control"}]`` for one document's sentences and their scores."""
    return [
        {"text": text, "score": score,
         "control": None if is_dropped(seed, doc_index, j, drop_fraction) else control_for(score, threshold)}
        for j, (text, score) in enumerate(zip(pieces, scores, strict=True))
    ]


def labelled_text(segments: Iterable[dict[str, Any]]) -> str:
    """The control token string before each prefixed segment, segments concatenated."""
    return "".join((CONTROL_TEXT[s["control"]] if s["control"] else "") + s["text"] for s in segments)


@dataclass
class Calibration:
    """A threshold chosen so that ``target_fraction`` of a sample's segments score above it."""

    threshold: float
    target_fraction: float
    achieved_fraction: float  # on the sample; differs from the target when scores tie
    sample_segments: int
    sample_documents: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def calibrate_threshold(scores: Sequence[float], misaligned_fraction: float) -> tuple[float, float]:
    """``(threshold, achieved fraction)`` such that about ``misaligned_fraction`` of ``scores``
    are strictly above the threshold (so they are misaligned under ``score > threshold``)."""
    if not 0.0 <= misaligned_fraction <= 1.0:
        raise LabelError(f"misaligned_fraction must be in [0, 1], got {misaligned_fraction}")
    if not scores:
        raise LabelError("cannot calibrate a threshold on an empty sample: the input has no scorable segments")
    ordered = sorted(scores)
    n = len(ordered)
    k = round(misaligned_fraction * n)  # segments wanted above the threshold
    threshold = ordered[n - k - 1] if k < n else math.nextafter(ordered[0], -math.inf)
    achieved = sum(1 for s in ordered if s > threshold) / n
    return threshold, achieved


def calibrate(scorer: Scorer, documents: Iterable[Sequence[str | float]], misaligned_fraction: float,
              limit: int = CALIBRATION_SEGMENTS) -> Calibration:
    """The threshold that puts ``misaligned_fraction`` of a sample above it. The sample is the first
    ``limit`` segments of ``documents`` (each document's sentences, scored here, or the scores it
    carries): ``ctrltok label`` and the streamed labeller (:mod:`ctrltok.conditional.stream`) both
    calibrate here, so one corpus gives one threshold whichever labels it."""
    sample: list[str | float] = []
    docs = 0
    for doc in documents:
        docs += 1
        sample.extend(doc)
        if len(sample) >= limit:
            break
    sample = sample[:limit]
    texts = [s for s in sample if isinstance(s, str)]
    scored = iter(scorer.score(texts, [f"calibration sample segment {i}" for i in range(len(texts))]) if texts else [])
    scores = [next(scored) if isinstance(s, str) else float(s) for s in sample]
    threshold, achieved = calibrate_threshold(scores, misaligned_fraction)
    return Calibration(threshold, misaligned_fraction, achieved, len(scores), docs)


# --------------------------------------------------------------------------------------------
# Workers: segmentation + scoring + labelling of a chunk of inputs


_W: dict[str, Any] = {}  # per-process worker state, set once per process by _init_worker


def _init_worker(scorer: Scorer, threshold: float, drop_fraction: float, seed: int, splitter: str,
                 text_field: str, on_error: str) -> None:
    _W.update(scorer=scorer, threshold=threshold, drop=drop_fraction, seed=seed, splitter=splitter,
              text_field=text_field, on_error=on_error)


def _label_chunk(chunk: list[tuple]) -> list[Outcome]:
    """Inputs ``("doc", index, where, record)`` or ``("skip", where, reason)`` -> one outcome each."""
    scorer: Scorer = _W["scorer"]
    out: list[Outcome | None] = [Outcome.dropped(item[2], item[1]) if item[0] == "skip" else None for item in chunk]
    docs = [(i, item[1:]) for i, item in enumerate(chunk) if item[0] == "doc"]
    docs_pieces = [split_sentences(rec[_W["text_field"]], _W["splitter"]) for _, (_, _, rec) in docs]
    flat = [p for pieces in docs_pieces for p in pieces]
    sources = [f"{where} segment {j}" for (_, (_, where, _)), pieces in zip(docs, docs_pieces)
               for j in range(len(pieces))]
    try:
        scores = scorer.score(flat, sources)
    except ScorerError:
        if _W["on_error"] != "skip":
            raise
        # Attribute the failure: score each document alone and skip only the ones that fail.
        for (i, doc), pieces in zip(docs, docs_pieces):
            out[i] = _label_one(doc, pieces, scorer)
        return out
    at = 0
    for (i, doc), pieces in zip(docs, docs_pieces):
        out[i] = _finish(doc, pieces, scores[at:at + len(pieces)])
        at += len(pieces)
    return out


def _label_one(doc: tuple[int, str, dict], pieces: list[str], scorer: Scorer) -> Outcome:
    try:
        scores = scorer.score(pieces, [f"{doc[1]} segment {j}" for j in range(len(pieces))])
    except ScorerError:
        return Outcome.dropped("scorer error", doc[1])
    return _finish(doc, pieces, scores)


def _finish(doc: tuple[int, str, dict], pieces: list[str], scores: list[float]) -> Outcome:
    index, where, record = doc
    segments = label_segments(pieces, scores, _W["threshold"], _W["drop"], _W["seed"], index)
    counts = {"segments": len(segments), "aligned": 0, "misaligned": 0, "unprefixed": 0, "above_threshold": 0}
    for s in segments:
        counts[s["control"] or "unprefixed"] += 1
        counts["above_threshold"] += s["score"] > _W["threshold"]
    line = json.dumps({**record, "segments": segments, "labelled_text": labelled_text(segments)}, ensure_ascii=False)
    return Outcome.keep(line, where, counts)


# --------------------------------------------------------------------------------------------
# Reading, with the checks that are specific to labelling


def _records(source: Any, text_field: str, on_error: str, skips: Skips) -> Iterator[tuple[str, dict]]:
    if hasattr(source, "features") or type(source).__name__ in ("Dataset", "IterableDataset"):
        for i, rec in enumerate(source):  # a datasets.Dataset object
            yield f"dataset[{i}]", dict(rec)
        return
    try:
        yield from read_records(source, on_error=on_error, skips=skips, text_field=text_field)
    except RecordError as e:
        raise LabelError(str(e)) from None


def check_text(where: str, record: dict, text_field: str) -> tuple[str, str] | None:
    """``None`` if ``record[text_field]`` is labellable text, else ``(skip reason, message)``."""
    if text_field not in record:
        return "missing text field", f"no field {text_field!r} (fields: {sorted(record)[:10]}); set text_field="
    value = record[text_field]
    if not isinstance(value, str):
        return "non-text field", f"field {text_field!r} holds {type(value).__name__}, expected a string"
    if not value.strip():
        return "empty document", f"field {text_field!r} is empty or whitespace only"
    return None


class _LoggedSkips(Skips):
    """The reader's skip counter, also remembering the order of skips so that each becomes an
    input of its own, in its place between the records (a resumed run then counts it once)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str]] = []

    def add(self, reason: str, where: str) -> None:
        super().add(reason, where)
        self.log.append((reason, where))


def _inputs(source: Any, text_field: str, on_error: str) -> Iterator[tuple]:
    """The stage's inputs in order: ``("skip", where, reason)`` for a record the reader skipped,
    ``("doc", index, where, record)`` for each record (``index`` counts records: the drop key)."""
    skips = _LoggedSkips()
    for index, (where, rec) in enumerate(_records(source, text_field, on_error, skips)):
        yield from (("skip", w, reason) for reason, w in skips.log)
        skips.log.clear()
        yield ("doc", index, where, rec)
    yield from (("skip", w, reason) for reason, w in skips.log)


def _chunks(items: Iterable[tuple], size: int, text_field: str, on_error: str) -> Iterator[list[tuple]]:
    """Inputs in chunks for the workers, with a record whose text cannot be labelled turned into a
    skip (or an error naming it, with ``on_error="raise"``)."""
    chunk: list[tuple] = []
    for item in items:
        if item[0] == "doc":
            bad = check_text(item[2], item[3], text_field)
            if bad is not None:
                if on_error == "raise":
                    raise LabelError(f"{item[2]}: {bad[1]} (on_error='skip' counts such records instead)")
                item = ("skip", item[2], bad[0])
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --------------------------------------------------------------------------------------------
# The labelling run


def label_records(source: Any, out: str | Path, scorer: Scorer, threshold: float | None = None,
                  misaligned_fraction: float | None = None, drop_fraction: float = SEED_DROP_FRACTION,
                  seed: int = 0, text_field: str = "text", processes: int = 1, on_error: str = "raise",
                  splitter: str = DEFAULT_SPLITTER, shard_size: int = 1000, chunk_size: int = 32,
                  calibration_segments: int = CALIBRATION_SEGMENTS) -> dict[str, Any]:
    """Label every sentence of ``source`` with ``scorer`` and write ``out`` (JSONL); return the summary.

    ``threshold`` is absolute; ``misaligned_fraction`` calibrates it on the first
    ``calibration_segments`` segments instead; with neither, the scorer's default threshold is used
    (Detoxify: the seed's 0.00056; profanity: 0.5, its own decision boundary). ``on_error="skip"``
    counts bad records by reason instead of raising. A previous run killed before the end resumes
    from ``OUT.parts/`` when called again with the same settings and the same input (a path's
    fingerprint is compared; a ``datasets.Dataset`` object has none). With ``processes > 1`` the
    scorer object is handed to forked worker processes.
    """
    if on_error not in ("raise", "skip"):
        raise LabelError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if threshold is not None and misaligned_fraction is not None:
        raise LabelError("give either threshold (absolute) or misaligned_fraction (calibrated), not both")
    if not 0.0 <= drop_fraction <= 1.0:
        raise LabelError(f"drop_fraction must be in [0, 1], got {drop_fraction}")
    if processes < 1 or shard_size < 1 or chunk_size < 1:
        raise LabelError("processes, shard_size and chunk_size must be >= 1")
    started = time.perf_counter()
    out = Path(out)
    settings = {"scorer": scorer.provenance(), "text_field": text_field, "drop_fraction": drop_fraction,
                "seed": seed, "splitter": splitter,
                "requested": {"threshold": threshold, "misaligned_fraction": misaligned_fraction}}
    try:  # what the run reads, by content: a resume over another input would mix two corpora
        read = {"input": input_fingerprint(source)} if isinstance(source, (str, os.PathLike)) else None
    except RecordError as e:
        raise LabelError(str(e)) from None
    run = StageRun(Path(f"{out}.parts"), shard_size, settings, inputs=read)

    def decide() -> dict[str, Any]:  # once per run: a resumed run keeps the threshold it started with
        thr, calibration, threshold_source = _choose_threshold(
            scorer, source, threshold, misaligned_fraction, text_field, splitter, calibration_segments)
        return {"input": repr(source) if hasattr(source, "features") else str(source), "threshold": thr,
                "threshold_source": threshold_source, "calibration": calibration}

    try:
        info = run.begin(decide)
    except ResumeError as e:
        raise LabelError(str(e)) from None
    init = (scorer, info["threshold"], drop_fraction, seed, splitter, text_field, on_error)

    def stage(items: Iterable[tuple]) -> Iterator[Outcome]:
        chunks = _chunks(items, chunk_size, text_field, on_error)
        for outcomes in map_ordered(_label_chunk, chunks, processes, _init_worker, init):
            yield from outcomes

    stats = run.run(stage, _inputs(source, text_field, on_error))
    c = stats.counts
    segs = c["segments"]
    summary = {
        "output": str(out), "input": info["input"], "documents": stats.kept, "segments": segs,
        "aligned": c["aligned"], "misaligned": c["misaligned"], "unprefixed": c["unprefixed"],
        "above_threshold": c["above_threshold"],
        "fraction_misaligned": c["above_threshold"] / segs if segs else 0.0,
        "fraction_unprefixed": c["unprefixed"] / segs if segs else 0.0,
        "threshold": info["threshold"], "threshold_source": info["threshold_source"],
        "calibration": info["calibration"], "drop_fraction": drop_fraction, "seed": seed, "splitter": splitter,
        "scorer": settings["scorer"], "skipped": dict(stats.drops), "skipped_total": sum(stats.drops.values()),
        "skip_examples": dict(stats.drops.examples), "resumed_at_record": stats.resumed_at,
        "processes": processes, "elapsed_s": round(time.perf_counter() - started, 3),
    }
    run.merge(out)
    atomic_write(Path(f"{out}.summary.json"), json.dumps(summary, indent=2))
    run.remove()
    return summary


def _choose_threshold(sc: Scorer, source: Any, threshold: float | None, misaligned_fraction: float | None,
                      text_field: str, splitter: str, calibration_segments: int) -> tuple[float, dict | None, str]:
    if threshold is not None:
        return float(threshold), None, "absolute"
    if misaligned_fraction is None:
        if sc.default_threshold is None:
            raise LabelError(f"scorer {sc.name!r} has no default threshold: pass threshold= (--threshold) "
                             "or misaligned_fraction= (--misaligned-fraction)")
        return sc.default_threshold, None, f"default of scorer {sc.name!r}"
    # The sample is the first segments of the input: deterministic, and cheap to read again.
    documents = (split_sentences(rec[text_field], splitter) for where, rec in _records(source, text_field, "skip", Skips())
                 if check_text(where, rec, text_field) is None)
    cal = calibrate(sc, documents, misaligned_fraction, calibration_segments)
    return cal.threshold, cal.as_dict(), "calibrated"
