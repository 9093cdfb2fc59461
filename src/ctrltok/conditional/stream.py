"""Labelling inside the data pass: conditional training data straight into prepared shards.

``ctrltok label`` writes a merged JSONL (each input record plus its segments and labelled text,
about 3.5x the input). At pretraining scale that copy is not needed: a ``data.kind: labelled``
recipe may point ``data.train`` at raw or pre-scored records, and ``ctrltok prepare`` /
``ctrltok train`` label them in the prepare pass, in its worker processes, as they are encoded
(:class:`ctrltok.data.documents.DocumentEncoder` calls :class:`StreamLabeller`).

Record layouts, the first that applies:

1. ``segments``: already labelled (``ctrltok label`` output), used as given.
2. ``texts`` + ``scores``: sentences with one score each, labelled as given, never rescored (the
   scorer is not even built). This is the layout of the ``tomekkorbak/detoxify-pile-chunk3-*``
   shards seed 001 trained on: ``texts`` are the sentences with their trailing whitespace
   (``"".join(texts)`` is the document), ``scores`` Detoxify's toxicity per sentence; the shards'
   other fields (``avg_score``, ``num_sents``, ``meta``) are not used.
3. ``texts`` alone: sentences, scored with ``conditional.scorer``.
4. ``data.text_field`` (default ``text``): raw text, split by
   :func:`ctrltok.core.segment.split_sentences` (``regex``), scored with ``conditional.scorer``.

The scorer is built once per process (one :class:`StreamLabeller` per worker), on the first
record that needs it; the records of one encode call are scored in one batch. The rule is
:mod:`ctrltok.conditional.label`'s: ``score <= threshold`` -> ``<|aligned|>``, else
``<|misaligned|>``, ``conditional.drop_token_fraction`` of the segments unprefixed by the keyed
draw :func:`~ctrltok.conditional.label.is_dropped` of ``(train.seed, input index, segment
index)``. The input index is the record's place in ``data.train`` as read (after the reader's
skips, before the held-out split), the index ``ctrltok label`` keys by: labelling in the prepare
pass gives the segments ``ctrltok label --seed <train.seed>`` writes, whatever the number of
workers, the chunking or the resume point (tested). Scores are equal when the scorer's output does
not depend on the batch (profanity, callables; Detoxify's batched forward may differ in the last
bits of a float).

The threshold: ``conditional.threshold`` (seed 001: 0.00056 on Detoxify's scale). With
``misaligned_fraction`` (and ``threshold: null``) it is calibrated as ``ctrltok label`` does, on
the first :data:`~ctrltok.conditional.label.CALIBRATION_SEGMENTS` segments of ``data.train``
(pre-scored records give their scores, raw text is split and scored, labelled records give
none), so the streamed pass needs no full pass over the scores first. Each process computes it
once, when a record first needs it: the same sample in every worker and every resumed run, so
every process draws the same threshold; the cost is scoring that sample once per worker.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ctrltok.conditional.label import (
    DEFAULT_SPLITTER,
    LabelError,
    calibrate,
    check_text,
    label_segments,
)
from ctrltok.conditional.scorers import Scorer, ScorerError, get_scorer
from ctrltok.core.config import ConditionalConfig, ConfigError, DataConfig
from ctrltok.core.records import Skips, read_records
from ctrltok.core.segment import split_sentences

# One input's result: its segments ([{"text", "score", "control"}]) or a drop (reason, where).
Labelled = list[dict[str, Any]] | tuple[str, str]


@dataclass
class _Problem:
    reason: str  # the skip reason
    message: str  # what is wrong, for the error


def sentences(record: dict[str, Any], text_field: str, where: str = "") -> tuple[list[str], list[float] | None] | _Problem:
    """``(sentences, scores or None)`` of a record without ``segments`` (layouts 2-4 of the module
    docstring), or the problem that keeps it from being labelled."""
    texts = record.get("texts")
    if texts is None:
        bad = check_text(where, record, text_field)
        if bad is not None:
            return _Problem(*bad)
        return split_sentences(record[text_field], DEFAULT_SPLITTER), None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return _Problem("bad texts", "field 'texts' must be a list of strings (the sentences)")
    if not "".join(texts).strip():
        return _Problem("empty document", "field 'texts' is empty or whitespace only")
    if "scores" not in record:
        return texts, None
    scores = record["scores"]
    if not isinstance(scores, list) or len(scores) != len(texts):
        found = f"{len(scores)} scores" if isinstance(scores, list) else type(scores).__name__
        return _Problem("scores do not match texts",
                        f"field 'scores' must be a list of one score per sentence ({len(texts)}), found {found}")
    for j, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
            return _Problem("bad score", f"scores[{j}] = {s!r} is not a finite number")
    return texts, [float(s) for s in scores]


class StreamLabeller:
    """Labels the inputs of one ``data.kind: labelled`` recipe, in one process (module docstring).

    ``label(items)`` takes ``(index, (where, record))`` pairs and returns, in order, each input's
    segments or a drop ``(reason, where)``; with ``data.on_error: raise`` a record that cannot be
    labelled raises :class:`LabelError` naming its place. ``scorer``: a scorer object to use
    instead of building ``conditional.scorer`` (tests, notebooks).
    """

    def __init__(self, conditional: ConditionalConfig | None, data: DataConfig, seed: int,
                 scorer: Scorer | None = None):
        self.cfg = conditional
        self.data = data
        self.seed = seed
        self._scorer = scorer
        self._threshold: float | None = None
        self.calibration: dict[str, Any] | None = None  # set when the threshold was calibrated

    # ---------------------------------------------------------------- settings, resolved lazily

    def _config(self, where: str) -> ConditionalConfig:
        if self.cfg is None:
            raise ConfigError(f"{where}: a record without `segments` is labelled in the data pass, which needs "
                              "a `conditional` section (threshold or misaligned_fraction, scorer)")
        return self.cfg

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            self._scorer = get_scorer(self._config("data.train").scorer)
        return self._scorer

    def threshold(self, where: str = "data.train") -> float:
        """``conditional.threshold``, or the one calibrated on the sample (module docstring)."""
        if self._threshold is None:
            cfg = self._config(where)
            if cfg.misaligned_fraction is None:
                self._threshold = float(cfg.threshold)
            elif cfg.threshold is not None:
                raise ConfigError("conditional: give either threshold (absolute) or misaligned_fraction "
                                  "(calibrated), not both; set `threshold: null` to calibrate")
            else:
                self._threshold = self._calibrate(cfg.misaligned_fraction)
        return self._threshold

    def _calibrate(self, fraction: float) -> float:
        data = self.data

        def documents():  # each document's sentences to score, or the scores it carries
            for where, rec in read_records(data.sources("train"), "skip", Skips(), data.text_field, self.seed):
                got = sentences(rec, data.text_field, where) if "segments" not in rec else None
                if got is not None and not isinstance(got, _Problem):
                    yield got[0] if got[1] is None else got[1]

        calibration = calibrate(self.scorer, documents(), fraction)
        self.calibration = calibration.as_dict()
        return calibration.threshold

    # ---------------------------------------------------------------- labelling

    def _bad(self, problem: _Problem, where: str) -> tuple[str, str]:
        if self.data.on_error != "skip":
            raise LabelError(f"{where}: {problem.message} (data.on_error: skip counts such records instead)")
        return problem.reason, where

    def label(self, items: Sequence[tuple[int, tuple[str, dict[str, Any]]]]) -> list[Labelled]:
        out: list[Labelled | None] = [None] * len(items)
        todo: list[tuple[int, int, str, list[str], list[float] | None]] = []  # slot, index, where, sentences, scores
        for slot, (index, (where, rec)) in enumerate(items):
            if "segments" in rec:
                out[slot] = rec["segments"]
                continue
            got = sentences(rec, self.data.text_field, where)
            if isinstance(got, _Problem):
                out[slot] = self._bad(got, where)
                continue
            todo.append((slot, index, where, *got))
        if not todo:
            return out
        cfg = self._config(todo[0][2])
        if not 0.0 <= cfg.drop_token_fraction <= 1.0:
            raise ConfigError(f"conditional.drop_token_fraction must be in [0, 1], got {cfg.drop_token_fraction}")
        threshold = self.threshold(todo[0][2])
        unscored = [t for t in todo if t[4] is None]
        scores = self._score(unscored)
        for slot, index, where, pieces, given in todo:
            got = given if given is not None else scores.get(slot)
            if got is None:
                out[slot] = ("scorer error", where)
                continue
            out[slot] = label_segments(pieces, got, threshold, cfg.drop_token_fraction, self.seed, index)
        return out

    def _score(self, docs: list[tuple[int, int, str, list[str], Any]]) -> dict[int, list[float]]:
        """Scores of the documents' sentences by slot, one scorer call for all of them; with
        ``on_error: skip`` a failing batch is scored document by document and the documents that
        fail are left out (dropped as "scorer error")."""
        if not docs:
            return {}
        flat = [p for d in docs for p in d[3]]
        sources = [f"{d[2]} segment {j}" for d in docs for j in range(len(d[3]))]
        try:
            scores = self.scorer.score(flat, sources)
        except ScorerError:
            if self.data.on_error != "skip":
                raise
            out = {}
            for slot, _, where, pieces, _ in docs:
                try:
                    out[slot] = self.scorer.score(pieces, [f"{where} segment {j}" for j in range(len(pieces))])
                except ScorerError:
                    continue
            return out
        out, at = {}, 0
        for slot, _, _, pieces, _ in docs:
            out[slot] = scores[at:at + len(pieces)]
            at += len(pieces)
        return out


def scorer_provenance(conditional: ConditionalConfig | None) -> dict[str, Any] | None:
    """The provenance (:meth:`Scorer.provenance`) of the scorer a recipe names, for the prepared
    manifest: the scorer that labels records without scores. One that cannot be built here (e.g.
    ``detoxify`` without its weights, for records that all carry scores) is recorded by name with
    the reason."""
    if conditional is None:
        return None
    try:
        return get_scorer(conditional.scorer).provenance()
    except ScorerError as exc:
        return {"name": conditional.scorer, "unavailable": str(exc)}
