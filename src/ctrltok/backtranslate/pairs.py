"""The record of backtranslation's stages: one candidate (instruction, response) pair, the stage
files (``<stage>.jsonl``, one pair per line, kept or with ``drop`` set) that hold them, and the files
that make a folder a backtranslation folder (no torch: ``ctrltok eval`` asks before loading anything)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ctrltok.core.config import CURATION_SCORES
from ctrltok.core.stages import Outcome, read_jsonl

SCORES = CURATION_SCORES
# The pipeline writes SETTINGS_FILE when it first starts in a folder (its model and backtranslate
# settings), REPORT_FILE at the end of every run.
REPORT_FILE = "report.json"
SETTINGS_FILE = "backtranslate.settings.json"


def backtranslation_folder(path: str | os.PathLike) -> Path | None:
    """``path`` as a folder the pipeline has written to (it holds :data:`REPORT_FILE` or
    :data:`SETTINGS_FILE`), or ``None``; the models trained there are folders of their own."""
    folder = Path(str(path)).expanduser()
    return folder if folder.is_dir() and any((folder / f).is_file() for f in (REPORT_FILE, SETTINGS_FILE)) else None


def on_scale(score: float | None) -> bool:
    """A parsed score within the curator's scale: a whole point or one between (4.5)."""
    return score is not None and SCORES[0] <= score <= SCORES[-1]


@dataclass
class Pair:
    """One candidate (instruction, response) pair as it moves through the stages."""

    id: str  # stable: "<document id>#<segment index>"
    source: str  # the document it came from
    response: str
    instruction: str = ""
    original_response: str | None = None  # the segment as found, once rewritten
    curator_outputs: list[str] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)  # per sample; None = did not parse
    score: float | None = None  # aggregate of the samples in 1..5 (curation_scoring: expected: sum of k * p(k))
    score_probs: list[float] | None = None  # curation_scoring: expected: p(1) .. p(5) as the next token
    drop: str | None = None  # reason, or None when kept

    @classmethod
    def from_json(cls, data: dict, where: str) -> Pair:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown or "id" not in data or "response" not in data:
            raise ValueError(f"{where}: not a backtranslation record (keys {sorted(data)})")
        return cls(**data)

    def outcome(self) -> Outcome:
        """The pair as a stage outcome: written whole (drops inline), counted under its drop reason."""
        return Outcome(dataclasses.asdict(self), self.drop, self.id)


def read_pairs(path: Path) -> Iterator[Pair]:
    """The pairs of a stage file, kept and dropped."""
    for where, record in read_jsonl(path):
        yield Pair.from_json(record, where)


def kept(path: Path) -> Iterator[Pair]:
    """The pairs of a stage file that the stage kept: the next stage's inputs."""
    return (p for p in read_pairs(path) if p.drop is None)
