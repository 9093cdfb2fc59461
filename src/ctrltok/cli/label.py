"""`ctrltok label`: score and label sentences for conditional training.

The command layer of :mod:`ctrltok.conditional.label`: it resolves the scorer's name, calls
:func:`~ctrltok.conditional.label.label_records` with the scorer object, and prints the summary
to stderr (the summary is also written to ``OUT.summary.json``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ctrltok.cli.checks import UsageError, same_file
from ctrltok.conditional.label import SEED_DROP_FRACTION, label_records
from ctrltok.conditional.scorers import DEFAULT_SCORER, Scorer, get_scorer


def label_file(input: Any, out: str | Path, scorer: str | Scorer = DEFAULT_SCORER, threshold: float | None = None,
               misaligned_fraction: float | None = None, drop_fraction: float = SEED_DROP_FRACTION, seed: int = 0,
               text_field: str = "text", processes: int = 1, on_error: str = "raise", splitter: str = "regex",
               shard_size: int = 1000, chunk_size: int = 32, calibration_segments: int = 20000,
               quiet: bool = False) -> dict[str, Any]:
    """Label ``input`` (a path, a ``datasets`` name or a ``datasets.Dataset``) into ``out`` with
    the scorer named ``scorer``; print the summary unless ``quiet``; return it.

    An unfinished run in ``OUT.parts`` resumes only over the same input (``label_records`` compares
    its fingerprint); ``out`` may not be ``input``."""
    check_not_input(input, out)
    summary = label_records(input, out, get_scorer(scorer), threshold=threshold,
                            misaligned_fraction=misaligned_fraction, drop_fraction=drop_fraction, seed=seed,
                            text_field=text_field, processes=processes, on_error=on_error, splitter=splitter,
                            shard_size=shard_size, chunk_size=chunk_size, calibration_segments=calibration_segments)
    if not quiet:
        print(format_summary(summary), file=sys.stderr)
    return summary


def check_not_input(input: Any, out: str | Path) -> None:
    """Refuse an ``--out`` that is the ``--input`` file: the merge would replace the input."""
    if not isinstance(input, (str, os.PathLike)):
        return  # a datasets.Dataset object: nothing on disk
    if Path(out).expanduser().exists() and same_file(out, input):
        raise UsageError(f"--out {out} is the --input file: writing it would destroy the input; choose another --out")


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


def label(a):
    label_file(a.input, a.out, scorer=a.scorer, threshold=a.threshold, misaligned_fraction=a.misaligned_fraction,
               drop_fraction=a.drop_fraction, seed=a.seed, processes=a.processes, text_field=a.text_field,
               on_error=a.on_error)
