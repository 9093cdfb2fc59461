"""Conditional training data (Korbak et al. 2023, seed 001): score sentences, label them, encode.

Every document is split into sentences (:mod:`ctrltok.conditional.segment`), each sentence is scored
(:mod:`ctrltok.conditional.scorers`, higher = worse) and prefixed with a control token::

    score <= threshold  -> <|aligned|>
    score >  threshold  -> <|misaligned|>
    a drop_fraction of segments (seed: 0.01) -> no prefix at all

    "Nice day. Damn it.\\n"  ->  "<|aligned|>Nice day. <|misaligned|>Damn it.\\n"

The drop decision is a hash of ``(seed, document index, segment index)``, not a draw from a
sequential RNG stream, so a rerun, a resumed run and a run with any number of processes label
every segment identically.

:func:`label_file` streams any input :func:`ctrltok.core.records.read_records` reads (JSONL, Parquet,
folders, ``datasets`` names) or a ``datasets.Dataset``; it writes complete shards of ``shard_size``
input records into ``OUT.parts/`` (each renamed into place only when finished, so a killed run
resumes at the first missing shard, losing and duplicating nothing), merges them into ``OUT``
at the end, and writes the summary to stderr and ``OUT.summary.json``. Scoring runs in
``processes`` worker processes with a bounded number of chunks in flight, so memory does not
grow with the corpus.

Each output line is the input record plus::

    "segments": [{"text": ..., "score": 0.01, "control": "aligned" | "misaligned" | null}, ...]
    "labelled_text": "<|aligned|>Nice day. <|misaligned|>Damn it.\\n"

:mod:`ctrltok.conditional.encode` turns such a record into an Example for training;
:mod:`ctrltok.evaluation.conditional` checks that the tokens steer generation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctrltok.conditional.scorers import DEFAULT_SCORER, Scorer, ScorerError, get_scorer
from ctrltok.conditional.segment import split_sentences
from ctrltok.core.records import RecordError, Skips, read_records
from ctrltok.core.tokens import PRESETS

ALIGNED, MISALIGNED = (t.text for t in PRESETS["conditional"])  # declared once, in tokens.py
CONTROL_TEXT = {"aligned": ALIGNED, "misaligned": MISALIGNED}
SEED_THRESHOLD = 0.00056  # seed 001, on Detoxify's scale
SEED_DROP_FRACTION = 0.01


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


# --------------------------------------------------------------------------------------------
# Workers: segmentation + scoring + labelling of a chunk of documents


_W: dict[str, Any] = {}  # per-process worker state (the scorer is built once per process)


def _init_worker(scorer: str | Scorer, threshold: float, drop_fraction: float, seed: int, splitter: str,
                 text_field: str, on_error: str) -> None:
    _W.update(scorer=get_scorer(scorer), threshold=threshold, drop=drop_fraction, seed=seed,
              splitter=splitter, text_field=text_field, on_error=on_error)


def _process_chunk(chunk: list[tuple[int, str, dict]]) -> list[tuple]:
    """``(index, where, record)`` -> ``(index, json line, counts)`` or ``(index, None, skip reason)``."""
    scorer: Scorer = _W["scorer"]
    docs_pieces = [split_sentences(rec[_W["text_field"]], _W["splitter"]) for _, _, rec in chunk]
    flat = [p for pieces in docs_pieces for p in pieces]
    sources = [f"{where} segment {j}" for (_, where, _), pieces in zip(chunk, docs_pieces) for j in range(len(pieces))]
    try:
        scores = scorer.score(flat, sources)
    except ScorerError:
        if _W["on_error"] != "skip":
            raise
        # Attribute the failure: score each document alone and skip only the ones that fail.
        return [_process_one(item, pieces, scorer) for item, pieces in zip(chunk, docs_pieces)]
    out, at = [], 0
    for item, pieces in zip(chunk, docs_pieces):
        out.append(_finish(item, pieces, scores[at:at + len(pieces)]))
        at += len(pieces)
    return out


def _process_one(item: tuple[int, str, dict], pieces: list[str], scorer: Scorer) -> tuple:
    try:
        scores = scorer.score(pieces, [f"{item[1]} segment {j}" for j in range(len(pieces))])
    except ScorerError:
        return (item[0], item[1], None, "scorer error")
    return _finish(item, pieces, scores)


def _finish(item: tuple[int, str, dict], pieces: list[str], scores: list[float]) -> tuple:
    index, where, record = item
    segments = label_segments(pieces, scores, _W["threshold"], _W["drop"], _W["seed"], index)
    counts = [len(segments), 0, 0, 0, 0]  # segments, aligned, misaligned, unprefixed, above threshold
    for s in segments:
        counts[{"aligned": 1, "misaligned": 2, None: 3}[s["control"]]] += 1
        counts[4] += s["score"] > _W["threshold"]
    line = json.dumps({**record, "segments": segments, "labelled_text": labelled_text(segments)}, ensure_ascii=False)
    return (index, where, line, counts)


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


def _check_text(where: str, record: dict, text_field: str) -> tuple[str, str] | None:
    """``None`` if ``record[text_field]`` is labellable text, else ``(skip reason, message)``."""
    if text_field not in record:
        return "missing text field", f"no field {text_field!r} (fields: {sorted(record)[:10]}); set text_field="
    value = record[text_field]
    if not isinstance(value, str):
        return "non-text field", f"field {text_field!r} holds {type(value).__name__}, expected a string"
    if not value.strip():
        return "empty document", f"field {text_field!r} is empty or whitespace only"
    return None


# --------------------------------------------------------------------------------------------
# The labelling run: shards, resume, processes


def label_file(input: Any, out: str | Path, scorer: str | Scorer = DEFAULT_SCORER, threshold: float | None = None,
               misaligned_fraction: float | None = None, drop_fraction: float = SEED_DROP_FRACTION, seed: int = 0,
               text_field: str = "text", processes: int = 1, on_error: str = "raise", splitter: str = "regex",
               shard_size: int = 1000, chunk_size: int = 32, calibration_segments: int = 20000,
               quiet: bool = False) -> dict[str, Any]:
    """Label every sentence of ``input`` and write ``out`` (JSONL); return the summary.

    ``threshold`` is absolute; ``misaligned_fraction`` calibrates it on the first
    ``calibration_segments`` segments instead; with neither, the scorer's default threshold is used
    (Detoxify: the seed's 0.00056; profanity: 0.5, its own decision boundary). ``on_error="skip"``
    counts bad records by reason instead of raising. A previous run killed before the end resumes
    from ``OUT.parts/`` when called again with the same settings.
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
    parts = Path(f"{out}.parts")
    sc = get_scorer(scorer)

    run_path = parts / "run.json"
    if run_path.exists():
        run = json.loads(run_path.read_text())
        _check_same_run(run, sc, scorer, input, text_field, drop_fraction, seed, splitter, shard_size,
                        threshold, misaligned_fraction, run_path)
    else:
        thr, calibration, source_of_threshold = _choose_threshold(
            sc, input, threshold, misaligned_fraction, text_field, splitter, calibration_segments)
        run = {"input": str(input) if not hasattr(input, "features") else repr(input), "text_field": text_field,
               "scorer": sc.provenance(), "threshold": thr, "threshold_source": source_of_threshold,
               "calibration": calibration, "drop_fraction": drop_fraction, "seed": seed, "splitter": splitter,
               "shard_size": shard_size, "requested": {"threshold": threshold, "misaligned_fraction": misaligned_fraction}}
        parts.mkdir(parents=True, exist_ok=True)
        _atomic_write(run_path, json.dumps(run, indent=2))

    start_shard = _first_missing_shard(parts)
    start = start_shard * shard_size
    # Workers rebuild a named scorer themselves (cheap, and nothing large is pickled).
    init = (scorer, run["threshold"], drop_fraction, seed, splitter, text_field, on_error)
    _write_shards(input, parts, start, shard_size, chunk_size, processes, init, sc, text_field, on_error)

    summary = _summarise(parts, run, out)
    summary["resumed_at_record"] = start
    summary["processes"] = processes
    summary["elapsed_s"] = round(time.perf_counter() - started, 3)
    _merge(parts, out)
    _atomic_write(Path(f"{out}.summary.json"), json.dumps(summary, indent=2))
    shutil.rmtree(parts)
    if not quiet:
        print(format_summary(summary), file=sys.stderr)
    return summary


def _choose_threshold(sc: Scorer, input: Any, threshold: float | None, misaligned_fraction: float | None,
                      text_field: str, splitter: str, calibration_segments: int) -> tuple[float, dict | None, str]:
    if threshold is not None:
        return float(threshold), None, "absolute"
    if misaligned_fraction is None:
        if sc.default_threshold is None:
            raise LabelError(f"scorer {sc.name!r} has no default threshold: pass threshold= (--threshold) "
                             "or misaligned_fraction= (--misaligned-fraction)")
        return sc.default_threshold, None, f"default of scorer {sc.name!r}"
    # The sample is the first segments of the input: deterministic, and cheap to read again.
    texts, docs = [], 0
    for where, rec in _records(input, text_field, "skip", Skips()):
        if _check_text(where, rec, text_field) is not None:
            continue
        docs += 1
        texts.extend(split_sentences(rec[text_field], splitter))
        if len(texts) >= calibration_segments:
            break
    texts = texts[:calibration_segments]
    scores = sc.score(texts, [f"calibration sample segment {i}" for i in range(len(texts))])
    thr, achieved = calibrate_threshold(scores, misaligned_fraction)
    cal = Calibration(thr, misaligned_fraction, achieved, len(texts), docs)
    return thr, cal.as_dict(), "calibrated"


def _check_same_run(run: dict, sc: Scorer, scorer: Any, input: Any, text_field: str, drop_fraction: float, seed: int,
                    splitter: str, shard_size: int, threshold: float | None, misaligned_fraction: float | None,
                    run_path: Path) -> None:
    now = {"scorer": sc.provenance(), "text_field": text_field, "drop_fraction": drop_fraction, "seed": seed,
           "splitter": splitter, "shard_size": shard_size,
           "requested": {"threshold": threshold, "misaligned_fraction": misaligned_fraction}}
    for key, value in now.items():
        if json.loads(json.dumps(value)) != run.get(key):
            raise LabelError(f"{run_path}: an unfinished run with different {key!r} ({run.get(key)!r}, now {value!r}) "
                             f"is in {run_path.parent}; rerun with the same settings to resume, or delete that folder")


def _shard_name(k: int) -> str:
    return f"shard-{k:06d}"


def _first_missing_shard(parts: Path) -> int:
    k = 0
    while (parts / f"{_shard_name(k)}.json").exists() and (parts / f"{_shard_name(k)}.jsonl").exists():
        k += 1
    for stale in set(parts.glob("*.tmp")) | {p for p in parts.glob("shard-*") if _shard_no(p) >= k}:
        stale.unlink(missing_ok=True)  # partial work of a killed run: redone from the shard's first record
    return k


def _shard_no(p: Path) -> int:
    try:
        return int(p.name.split("-")[1].split(".")[0])
    except (IndexError, ValueError):
        return -1


class _ShardWriter:
    """Writes records ``[k*size, (k+1)*size)`` to shard ``k``; a shard appears only when complete."""

    def __init__(self, parts: Path, first: int, size: int) -> None:
        self.parts, self.size, self.k = parts, size, first
        self.fh = None
        self._open()

    def _open(self) -> None:
        self.tmp = self.parts / f"{_shard_name(self.k)}.jsonl.tmp"
        self.fh = open(self.tmp, "w", encoding="utf-8")
        self.counts = [0, 0, 0, 0, 0, 0]  # documents, segments, aligned, misaligned, unprefixed, above
        self.skips = Skips()

    def advance_to(self, index: int) -> None:
        while index >= (self.k + 1) * self.size:
            self.close_shard()
            self.k += 1
            self._open()

    def write(self, index: int, line: str, counts: list[int]) -> None:
        self.advance_to(index)
        self.fh.write(line + "\n")
        self.counts[0] += 1
        for i, c in enumerate(counts):
            self.counts[i + 1] += c

    def skip(self, index: int, reason: str, where: str) -> None:
        self.advance_to(index)
        self.skips.add(reason, where)

    def close_shard(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        final = self.parts / f"{_shard_name(self.k)}.jsonl"
        os.replace(self.tmp, final)
        stats = {"counts": self.counts, "skips": dict(self.skips), "skip_examples": self.skips.examples}
        # The stats file is the commit marker: a shard without it is redone on resume.
        _atomic_write(self.parts / f"{_shard_name(self.k)}.json", json.dumps(stats))


class _LoggedSkips(Skips):
    """The reader's skip counter, also remembering the order of skips so each can be filed under
    the shard of the record that follows it (a resumed run then counts each skip exactly once)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str]] = []

    def add(self, reason: str, where: str) -> None:
        super().add(reason, where)
        self.log.append((reason, where))


def _write_shards(input: Any, parts: Path, start: int, shard_size: int, chunk_size: int, processes: int,
                  init: tuple, sc: Scorer, text_field: str, on_error: str) -> None:
    writer = _ShardWriter(parts, start // shard_size, shard_size)
    reader_skips = _LoggedSkips()

    # A chunk holds ("doc", index, where, record) and ("skip", index, where, reason) items in input
    # order; skips travel with the documents so the writer sees everything in order.
    def chunks() -> Iterator[list[tuple]]:
        chunk: list[tuple] = []
        index = -1
        for index, (where, rec) in enumerate(_records(input, text_field, on_error, reader_skips)):
            if index >= start:
                chunk += [("skip", index, w, reason) for reason, w in reader_skips.log]
            reader_skips.log.clear()
            if index < start:
                continue
            bad = _check_text(where, rec, text_field)
            if bad is not None:
                if on_error == "raise":
                    raise LabelError(f"{where}: {bad[1]} (on_error='skip' counts such records instead)")
                chunk.append(("skip", index, where, bad[0]))
            else:
                chunk.append(("doc", index, where, rec))
            if len(chunk) >= chunk_size:
                yield chunk
                chunk = []
        # Skips after the last record belong to its shard, unless that shard is already complete.
        if index >= start or index == -1:
            chunk += [("skip", max(index, start), w, reason) for reason, w in reader_skips.log]
        if chunk:
            yield chunk

    def docs(chunk: list[tuple]) -> list[tuple[int, str, dict]]:
        return [item[1:] for item in chunk if item[0] == "doc"]

    def handle(chunk: list[tuple], processed: list[tuple]) -> None:
        done = iter(processed)
        for kind, index, where, payload in chunk:
            if kind == "skip":
                writer.skip(index, payload, where)
                continue
            _, where, line, info = next(done)
            if line is None:
                writer.skip(index, info, where)
            else:
                writer.write(index, line, info)

    if processes == 1:
        _init_worker(sc, *init[1:])
        for chunk in chunks():
            handle(chunk, _process_chunk(docs(chunk)))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
        with ctx.Pool(processes, initializer=_init_worker, initargs=init) as pool:
            pending: deque = deque()
            for chunk in chunks():
                pending.append((chunk, pool.apply_async(_process_chunk, (docs(chunk),))))
                # Bounded in flight: the reader never runs far ahead of the scorers (flat memory).
                while len(pending) > 2 * processes:
                    done_chunk, res = pending.popleft()
                    handle(done_chunk, res.get())
            while pending:
                done_chunk, res = pending.popleft()
                handle(done_chunk, res.get())
    writer.close_shard()


def _summarise(parts: Path, run: dict, out: Path) -> dict[str, Any]:
    totals = [0] * 6
    skips: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for stats_path in sorted(parts.glob("shard-*.json")):
        stats = json.loads(stats_path.read_text())
        totals = [a + b for a, b in zip(totals, stats["counts"])]
        for reason, n in stats["skips"].items():
            skips[reason] = skips.get(reason, 0) + n
        for reason, places in stats["skip_examples"].items():
            examples.setdefault(reason, places)
    docs, segs, al, mis, unp, above = totals
    return {
        "output": str(out), "input": run["input"], "documents": docs, "segments": segs,
        "aligned": al, "misaligned": mis, "unprefixed": unp, "above_threshold": above,
        "fraction_misaligned": above / segs if segs else 0.0,
        "fraction_unprefixed": unp / segs if segs else 0.0,
        "threshold": run["threshold"], "threshold_source": run["threshold_source"],
        "calibration": run["calibration"], "drop_fraction": run["drop_fraction"], "seed": run["seed"],
        "splitter": run["splitter"], "scorer": run["scorer"],
        "skipped": skips, "skipped_total": sum(skips.values()), "skip_examples": examples,
    }


def _merge(parts: Path, out: Path) -> None:
    tmp = Path(f"{out}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as dst:
        for shard in sorted(parts.glob("shard-*.jsonl")):
            with open(shard, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, out)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"labelled {s['documents']} documents, {s['segments']} segments -> {s['output']}",
        f"  aligned {s['aligned']}  misaligned {s['misaligned']}  unprefixed {s['unprefixed']}  "
        f"(fraction above threshold {s['fraction_misaligned']:.4f})",
        f"  threshold {s['threshold']:.6g} ({s['threshold_source']})  scorer {s['scorer']['name']} {s['scorer']['version']}",
    ]
    if s.get("calibration"):
        c = s["calibration"]
        lines.append(f"  calibration: target {c['target_fraction']:.4f}, achieved {c['achieved_fraction']:.4f} "
                     f"on {c['sample_segments']} segments of {c['sample_documents']} documents")
    if s["skipped"]:
        lines.append("  skipped: " + ", ".join(f"{r}: {n}" for r, n in sorted(s["skipped"].items())))
    return "\n".join(lines)
