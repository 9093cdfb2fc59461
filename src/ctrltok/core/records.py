"""Reading records from JSONL, Parquet, folders of text, shipped resources or `datasets` names.

Every record comes with where it came from (``file.jsonl:12``), so any later error can name the
file and line. Malformed input is an error naming file, line and the problem, or, with
``on_error="skip"``, a skip counted under its reason in a :class:`Skips` counter. Never silent::

    skips = Skips()
    for where, record in read_records("chats.jsonl", on_error="skip", skips=skips):
        ...
    skips.summary()   # {"malformed JSON": 2, ...}
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from importlib import resources
from pathlib import Path


class RecordError(ValueError):
    """Bad input; the message names the file, the line and what was wrong."""


class Skips(Counter):
    """Counts of skipped records by reason, with the first few places for each reason."""

    def __init__(self) -> None:
        super().__init__()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, where: str) -> None:
        self[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(where)

    def summary(self) -> dict[str, int]:
        return dict(self)


def resource_path(name: str) -> Path:
    """`ctrltok:instructions` -> the shipped `resources/instructions.jsonl`."""
    base = resources.files("ctrltok") / "resources"
    for candidate in (name, f"{name}.jsonl"):
        path = Path(str(base / candidate))
        if path.exists():
            return path
    raise RecordError(f"ctrltok:{name}: no such shipped resource (see ctrltok/resources/README.md)")


def reject(msg: str, where: str, on_error: str, skips: Skips | None, reason: str) -> None:
    """A bad record: raise :class:`RecordError` naming ``where`` (``on_error="raise"``), or count it
    in ``skips`` under ``reason`` and go on (``on_error="skip"``)."""
    if on_error == "skip":
        if skips is not None:
            skips.add(reason, where)
        return
    raise RecordError(f"{where}: {msg}")


def _read_jsonl(path: Path, on_error: str, skips: Skips | None) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                reject(f"invalid UTF-8 at byte {exc.start}", where, on_error, skips, "invalid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                reject(f"malformed JSON ({exc.msg} at column {exc.colno})", where, on_error, skips, "malformed JSON")
                continue
            if not isinstance(rec, dict):
                reject(f"expected a JSON object, found {type(rec).__name__}", where, on_error, skips, "not an object")
                continue
            yield where, rec


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", rec


def read_records(source: str | Path, on_error: str = "raise", skips: Skips | None = None,
                 text_field: str = "text") -> Iterator[tuple[str, dict]]:
    """Yield ``(where, record)`` from a file, folder, `ctrltok:<resource>` or a `datasets` name.

    A folder yields one record per ``.txt`` file (``{"id": name, text_field: contents}``) and every
    ``.jsonl`` / ``.parquet`` inside it. A `datasets` name may carry a split: ``name:split``.
    """
    source = str(source)
    if source.startswith("ctrltok:"):
        yield from _read_jsonl(resource_path(source.split(":", 1)[1]), on_error, skips)
        return
    path = Path(source)
    if path.is_dir():
        for child in sorted(path.iterdir()):
            if child.suffix == ".txt":
                try:
                    yield str(child), {"id": child.stem, text_field: child.read_text(encoding="utf-8")}
                except UnicodeDecodeError:
                    reject("invalid UTF-8", str(child), on_error, skips, "invalid UTF-8")
            elif child.suffix in (".jsonl", ".parquet"):
                yield from read_records(child, on_error, skips, text_field)
        return
    if path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
        if not path.exists():
            raise RecordError(f"{path}: no such file")
        yield from _read_jsonl(path, on_error, skips)
        return
    if path.suffix == ".parquet":
        if not path.exists():
            raise RecordError(f"{path}: no such file")
        yield from _read_parquet(path)
        return
    if path.exists():
        raise RecordError(f"{path}: unsupported file type {path.suffix!r}; expected .jsonl, .parquet or a folder")
    # A datasets name (needs the network or a local datasets cache).
    import datasets

    name, _, split = source.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as exc:  # noqa: BLE001 - the datasets library raises many kinds
        raise RecordError(f"{source}: not a file, folder or ctrltok resource, and `datasets` could not load it "
                          f"({type(exc).__name__}: {exc})") from exc
    for i, rec in enumerate(ds):
        yield f"{source}[{i}]", dict(rec)
