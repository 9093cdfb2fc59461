"""The one resumable stage runner: a stage is a generator over records, written as it runs into
numbered shards, each renamed into place when complete; a killed run resumes at the first missing
shard, losing and duplicating nothing. Labelling, EPE annotation and backtranslation run on it.

A *stage* maps an iterable of inputs to an iterable of :class:`Outcome`, exactly one per input and
in input order (the shape of datatrove's pipeline steps): a record kept, or a drop with its reason
and place. Drops are counted by reason with their first places, never silent::

    def upper(items):
        for where, rec in items:
            if not rec.get("text"):
                yield Outcome.dropped("empty document", where)
            else:
                yield Outcome.keep({"text": rec["text"].upper()}, where, counts={"chars": len(rec["text"])})

    run = StageRun(Path("out.jsonl.parts"), shard_size=1000, settings={"case": "upper"})
    stats = run.run(upper, read_records("in.jsonl"))  # resumes where a killed run stopped
    run.merge(Path("out.jsonl"))                       # the shards, concatenated, renamed into place
    run.remove()
    stats.drops, stats.drops.examples, stats.counts    # {"empty document": 2}, first places, sums

A stage folder on disk::

    run.json                      {"shard_size": 1000, "settings": {...}, "inputs": {...}, "info": {...}}
    shard-000000.jsonl            records of outcomes [0, 1000)          \\ renamed into place
    shard-000000.dropped.jsonl    dropped records that carry one          / when the shard is complete
    shard-000000.done             the shard's stats and file sizes; written last: its commit marker
    shard-000001.jsonl.tmp        the shard being written

Resume: the first shard ``k`` without its ``.done`` marker is redone from outcome
``k * shard_size``; ``*.tmp`` files and shard files from ``k`` on are deleted first. With
``skip="inputs"`` the first ``k * shard_size`` inputs are not passed to the stage (a stage whose
outcomes follow its inputs one to one; the runner checks the counts); with ``skip="outputs"``
the stage sees every input and its first outcomes are discarded (a cheap, deterministic stage that
keeps state across inputs, such as a deduplicating segmenter). ``run.json`` holds the settings
of the first invocation: resuming with other settings is a :class:`ResumeError`, and so is
resuming over other inputs (``inputs``: fingerprints of what the stage reads, by name, from
:func:`ctrltok.core.inputs.input_fingerprint`; compared by content, so the same file under
another path resumes, and the same path with other contents does not). The stored shard size wins, so a resumed run writes exactly the bytes an uninterrupted one would. Stats are
read back from the markers, so they cover every invocation that contributed to the folder.

Shard formats are pluggable: a :class:`Sink` writes one shard (:class:`JsonlSink` writes JSON
lines), so a stage can also write token shards and keep them instead of merging.
:func:`run_stage` is the one-file form: a stage into ``NAME.jsonl`` with a ``NAME.done`` marker.
:func:`map_ordered` runs a function in worker processes with a bounded number of items in
flight, results in input order, for stages that are CPU-bound.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ctrltok.core.inputs import changed, what_changed
from ctrltok.core.records import Skips

SHARD = "shard-{:06d}"
DONE = ".done"
TMP = ".tmp"
RUN_FILE = "run.json"
_T = TypeVar("_T")
_R = TypeVar("_R")


class ResumeError(ValueError):
    """A stage folder holds an unfinished run that was started with other settings."""


# --------------------------------------------------------------------------------------------
# Files


def atomic_write(path: str | Path, data: str | bytes, fsync: bool = True) -> None:
    """Write ``data`` through a temporary file renamed into place: ``path`` is never half-written.
    ``fsync`` also makes the content durable before the rename (against a machine crash, not just
    a killed process)."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP)
    with open(tmp, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def repair_jsonl(path: str | Path) -> int:
    """Cut a torn last line (a run killed in mid-write) off ``path``; returns the bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        end, pos = 0, size
        while pos > 0:  # the last newline, read backwards in blocks
            start = max(0, pos - (1 << 16))
            fh.seek(start)
            at = fh.read(pos - start).rfind(b"\n")
            if at >= 0:
                end = start + at + 1
                break
            pos = start
        fh.truncate(end)
        return size - end


def read_jsonl(path: str | Path, repair: bool = False) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` for each line of a JSONL file, ``where`` being ``path:line``; a missing
    file has no lines. A torn last line is cut off first with ``repair``, else it is an error, and
    so is a line that is not a JSON object (both name the file and line)."""
    path = Path(path)
    if not path.exists():
        return
    if repair:
        repair_jsonl(path)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            if not raw.endswith(b"\n"):
                raise ValueError(f"{where}: the last line is incomplete (a run killed while writing); "
                                 "rerun the stage, which repairs it")
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON ({exc})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, found {type(record).__name__}")
            yield where, record


def _json_line(record: Any) -> str:
    return record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists), so stored and new settings compare."""
    return json.loads(json.dumps(value))


# --------------------------------------------------------------------------------------------
# What a stage yields, and what a shard is written by


@dataclass(frozen=True)
class Outcome:
    """What a stage yields for one input: a record kept, or a drop with its reason.

    ``record`` is what the sink writes (a dict, or a JSON line already encoded; ``None``: nothing
    written); a dropped input may carry one too (written apart or inline, see :class:`JsonlSink`).
    ``where`` names the input (``file:line``, an id): the first places of each drop reason.
    ``counts`` are summed per shard and over the run (e.g. segments and labels of a document).
    """

    record: Any = None
    drop: str | None = None
    where: str = ""
    counts: Mapping[str, int] | None = None

    @classmethod
    def keep(cls, record: Any, where: str = "", counts: Mapping[str, int] | None = None) -> Outcome:
        return cls(record, None, where, counts)

    @classmethod
    def dropped(cls, reason: str, where: str = "", record: Any = None,
                counts: Mapping[str, int] | None = None) -> Outcome:
        return cls(record, reason, where, counts)


class Sink(Protocol):
    """Writes one shard: built with the shard's base path (``DIR/shard-000003``), it writes files
    named ``<base><suffix>.tmp``; ``close`` closes them and returns them (the runner renames each
    to its name without ``.tmp`` and records its size in the marker); ``abort`` closes them
    without committing."""

    def write(self, outcome: Outcome) -> None: ...

    def close(self) -> list[Path]: ...

    def abort(self) -> None: ...


class JsonlSink:
    """A shard as JSON lines: kept records in ``<base>.jsonl``. Dropped records that carry a record
    are, by ``dropped``: ``"count"`` only counted, ``"inline"`` written in the same file (the record
    says why, as backtranslation's pairs do), ``"apart"`` written to ``<base>.dropped.jsonl``."""

    def __init__(self, base: Path, dropped: str = "count") -> None:
        if dropped not in ("count", "inline", "apart"):
            raise ValueError(f"dropped must be 'count', 'inline' or 'apart', got {dropped!r}")
        self.dropped = dropped
        self.path = Path(f"{base}.jsonl{TMP}")
        self.fh = open(self.path, "w", encoding="utf-8")
        self.side_path = Path(f"{base}.dropped.jsonl{TMP}")
        self.side_fh: Any = None

    def write(self, outcome: Outcome) -> None:
        if outcome.record is None:
            return
        if outcome.drop is None or self.dropped == "inline":
            fh = self.fh
        elif self.dropped == "apart":
            if self.side_fh is None:
                self.side_fh = open(self.side_path, "w", encoding="utf-8")
            fh = self.side_fh
        else:
            return
        fh.write(_json_line(outcome.record) + "\n")

    def close(self) -> list[Path]:
        written = []
        for fh, path in ((self.fh, self.path), (self.side_fh, self.side_path)):
            if fh is not None:
                fh.close()
                written.append(path)
        return written

    def abort(self) -> None:
        for fh in (self.fh, self.side_fh):
            if fh is not None:
                fh.close()


# --------------------------------------------------------------------------------------------
# Stats


@dataclass
class StageStats:
    """A run's totals, read back from its shard markers: outcomes, kept, drops by reason (a
    :class:`~ctrltok.core.records.Skips`: counts and first places), summed ``counts``, and how many
    outcomes an earlier, killed invocation had committed (``resumed_at``)."""

    shards: int = 0
    outcomes: int = 0
    kept: int = 0
    drops: Skips = field(default_factory=Skips)
    counts: Counter = field(default_factory=Counter)
    resumed_at: int = 0

    def add(self, shard: Mapping[str, Any]) -> None:
        """Add one shard's stats (the content of its ``.done`` marker)."""
        self.shards += 1
        self.outcomes += shard["outcomes"]
        self.kept += shard["kept"]
        self.counts.update(shard["counts"])
        for reason, n in shard["dropped"].items():
            self.drops[reason] += n
            places = self.drops.examples.setdefault(reason, [])
            places.extend(shard["drop_places"].get(reason, [])[:max(0, 3 - len(places))])

    def as_dict(self) -> dict[str, Any]:
        return {"shards": self.shards, "outcomes": self.outcomes, "kept": self.kept,
                "dropped": dict(self.drops), "drop_places": dict(self.drops.examples),
                "counts": dict(self.counts), "resumed_at": self.resumed_at}


class _ShardWriter:
    """Writes outcomes to shard after shard, opening each on its first outcome and committing it
    after ``shard_size`` outcomes: files renamed into place, then the ``.done`` marker."""

    def __init__(self, folder: Path, first: int, size: int, sink: Callable[[Path], Sink]) -> None:
        self.folder, self.k, self.size, self.make_sink = folder, first, size, sink
        self.sink: Sink | None = None

    def write(self, outcome: Outcome) -> None:
        if not isinstance(outcome, Outcome):
            raise TypeError(f"a stage yields Outcome objects, got {type(outcome).__name__}")
        if self.sink is None:
            self.sink = self.make_sink(self.folder / SHARD.format(self.k))
            self.n = self.kept = 0
            self.drops = Skips()
            self.counts: Counter = Counter()
        self.sink.write(outcome)
        self.n += 1
        if outcome.drop is None:
            self.kept += 1
        else:
            self.drops.add(outcome.drop, outcome.where)
        if outcome.counts:
            self.counts.update(outcome.counts)
        if self.n >= self.size:
            self.commit()

    def commit(self) -> None:
        if self.sink is None:
            return
        files = {}
        for tmp in self.sink.close():
            final = tmp.with_name(tmp.name[:-len(TMP)])
            os.replace(tmp, final)
            files[final.name] = final.stat().st_size
        stats = {"outcomes": self.n, "kept": self.kept, "dropped": dict(self.drops),
                 "drop_places": self.drops.examples, "counts": dict(self.counts), "files": files}
        # Not fsynced (one shard per LLM batch would pay for it): a marker that a machine crash
        # left unreadable, or whose files lack their recorded sizes, is not counted on resume.
        atomic_write(self.folder / (SHARD.format(self.k) + DONE), json.dumps(stats, ensure_ascii=False),
                     fsync=False)
        self.sink = None
        self.k += 1

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.abort()
            self.sink = None


class _Counted:
    """An iterator that counts what the stage took from it."""

    def __init__(self, it: Iterator[Any]) -> None:
        self.it, self.n = it, 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Any:
        item = next(self.it)
        self.n += 1
        return item


def _shard_number(path: Path) -> int | None:
    if not path.name.startswith("shard-"):
        return None
    digits = path.name[6:].split(".", 1)[0]
    return int(digits) if digits.isdigit() else None


# --------------------------------------------------------------------------------------------
# The runner


class StageRun:
    """One stage's folder of shards: start or resume, run, read the stats back, merge, remove.

    ``settings`` (JSON values) identify the run: resuming with different ones raises
    :class:`ResumeError` naming the first difference. ``inputs`` (input fingerprints by name, or
    ``None`` when the inputs are objects with nothing on disk) must match by content to resume; the
    error names each input that differs. ``sink`` builds the writer of one shard.
    """

    def __init__(self, folder: str | Path, shard_size: int = 1000, settings: Mapping[str, Any] | None = None,
                 sink: Callable[[Path], Sink] = JsonlSink, inputs: Mapping[str, Any] | None = None) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.folder = Path(folder)
        self.shard_size = shard_size
        self.settings = _plain(dict(settings or {}))
        self.inputs = _plain(dict(inputs)) if inputs is not None else None
        self.sink = sink
        self.info: dict[str, Any] | None = None

    def begin(self, info: Callable[[], Mapping[str, Any]] | Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Start or resume. A new run writes ``run.json`` with the settings and ``info`` (what the
        run decided once, e.g. a calibrated threshold; a callable is called only here); an
        unfinished one checks the settings and returns the stored info. Idempotent."""
        if self.info is not None:
            return self.info
        run_file = self.folder / RUN_FILE
        if run_file.exists():
            stored = json.loads(run_file.read_text(encoding="utf-8"))
            read = stored.get("inputs")  # absent in a folder started before inputs were recorded
            if self.inputs is not None and isinstance(read, dict) and changed(read, self.inputs):
                raise ResumeError(f"{self.folder}: an unfinished run read other inputs: {what_changed(read, self.inputs)}; "
                                  "rerun with the same inputs to resume it, or delete that folder")
            old = stored.get("settings", {})
            for key in [*self.settings, *(k for k in old if k not in self.settings)]:
                if self.settings.get(key) != old.get(key):
                    raise ResumeError(
                        f"{run_file}: an unfinished run with different {key!r} ({old.get(key)!r}, now "
                        f"{self.settings.get(key)!r}) is in {self.folder}; rerun with the same settings to "
                        "resume, or delete that folder")
            self.shard_size = int(stored.get("shard_size", self.shard_size))
            self.info = stored.get("info") or {}
            return self.info
        if self.folder.exists():  # no run.json: whatever is here was never part of a started run
            for stale in self.folder.iterdir():
                if stale.is_file() and (_shard_number(stale) is not None or stale.name.endswith(TMP)):
                    stale.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.info = _plain(dict((info() if callable(info) else info) or {}))
        atomic_write(run_file, json.dumps({"shard_size": self.shard_size, "settings": self.settings,
                                           "inputs": self.inputs, "info": self.info}, indent=2, ensure_ascii=False))
        return self.info

    def committed(self) -> int:
        """The number of complete shards: each with its ``.done`` marker, readable, and its files
        of the sizes the marker records."""
        k = 0
        while self._marker(k) is not None:
            k += 1
        return k

    def _marker(self, k: int) -> dict[str, Any] | None:
        path = self.folder / (SHARD.format(k) + DONE)
        try:
            marker = json.loads(path.read_text(encoding="utf-8"))
            sizes = [(self.folder / name).stat().st_size == size for name, size in marker["files"].items()]
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        return marker if all(sizes) else None

    def _resume_point(self) -> int:
        k = self.committed()
        for path in self.folder.iterdir():  # partial work of a killed run: redone from its start
            number = _shard_number(path)
            if path.is_file() and (path.name.endswith(TMP) or (number is not None and number >= k)):
                path.unlink()
        return k

    def run(self, stage: Callable[[Iterable[Any]], Iterable[Outcome]], inputs: Iterable[Any] = (),
            skip: str = "inputs") -> StageStats:
        """Run ``stage`` over ``inputs`` from the first missing shard on; returns the run's stats."""
        if skip not in ("inputs", "outputs"):
            raise ValueError(f"skip must be 'inputs' or 'outputs', got {skip!r}")
        self.begin()
        first = self._resume_point()
        start = first * self.shard_size
        counted = _Counted(itertools.islice(iter(inputs), start, None)) if skip == "inputs" else None
        generator = iter(stage(counted if counted is not None else inputs))
        outcomes = generator if counted is not None else itertools.islice(generator, start, None)
        writer = _ShardWriter(self.folder, first, self.shard_size, self.sink)
        produced = 0
        try:
            for outcome in outcomes:
                writer.write(outcome)
                produced += 1
            writer.commit()
        except BaseException:
            writer.abort()
            if hasattr(generator, "close"):  # stops the stage now (and its worker processes, if any)
                generator.close()
            raise
        if counted is not None and counted.n != produced:
            raise RuntimeError(f"{self.folder}: the stage gave {produced} outcomes for {counted.n} inputs; a "
                               "stage resumed by inputs must give exactly one outcome per input, in order")
        stats = self.stats()
        stats.resumed_at = start
        return stats

    def stats(self) -> StageStats:
        """Totals over the complete shards (every invocation that contributed)."""
        stats = StageStats()
        k = 0
        while (marker := self._marker(k)) is not None:
            stats.add(marker)
            k += 1
        return stats

    def shard_files(self, suffix: str = ".jsonl") -> list[Path]:
        """The files ``shard-K<suffix>`` of the complete shards that have one, in order."""
        paths = (self.folder / (SHARD.format(k) + suffix) for k in range(self.committed()))
        return [p for p in paths if p.exists()]

    def merge(self, out: str | Path, suffix: str = ".jsonl", append: bool = False,
              key: Callable[[dict], Any] | None = None) -> Path:
        """Concatenate the complete shards' ``suffix`` files into ``out``, written whole and then
        renamed. ``append`` keeps what ``out`` holds (a torn last line is cut off first). With
        ``key``, a record whose key is already written is left out, so a merge redone after a kill
        between its rename and :meth:`remove` adds nothing twice."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + TMP)
        seen: set = set()
        with open(tmp, "wb") as dst:
            if append and out.exists():
                repair_jsonl(out)
                _copy_lines(out, dst, key, seen, dedup=False)
            for path in self.shard_files(suffix):
                _copy_lines(path, dst, key, seen, dedup=True)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, out)
        return out

    def remove(self) -> None:
        """Delete the folder (after the merge, or when the shards are kept elsewhere)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _copy_lines(path: Path, dst: Any, key: Callable[[dict], Any] | None, seen: set, dedup: bool) -> None:
    with open(path, "rb") as src:
        if key is None:
            shutil.copyfileobj(src, dst, 1 << 20)
            return
        for raw in src:
            if not raw.strip():
                continue
            k = key(json.loads(raw))
            if dedup and k in seen:
                continue
            seen.add(k)
            dst.write(raw)


def run_stage(out: str | Path, stage: Callable[[Iterable[Any]], Iterable[Outcome]], inputs: Iterable[Any] = (), *,
              skip: str = "inputs", shard_size: int = 1000, settings: Mapping[str, Any] | None = None,
              dropped: str = "inline", info: Callable[[], Mapping[str, Any]] | None = None,
              read: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One stage into one JSONL file: ``NAME.jsonl`` with its ``NAME.done`` marker beside it,
    shards in ``NAME.parts/`` meanwhile. A stage whose marker exists is not run again. Returns the
    marker's content: the run's stats, ``seconds_last_run`` and whatever ``info()`` adds (called
    once the stage is complete). ``read``: fingerprints of the files the stage reads (``inputs`` of
    :class:`StageRun`)."""
    out = Path(out)
    marker, folder = out.with_suffix(DONE), out.with_suffix(".parts")
    if marker.exists():
        shutil.rmtree(folder, ignore_errors=True)  # left by a kill between the marker and the removal
        return json.loads(marker.read_text(encoding="utf-8"))
    started = time.perf_counter()
    run = StageRun(folder, shard_size, settings, sink=lambda base: JsonlSink(base, dropped), inputs=read)
    stats = run.run(stage, inputs, skip)
    run.merge(out)
    done = {**stats.as_dict(), "seconds_last_run": round(time.perf_counter() - started, 2),
            **(dict(info()) if info is not None else {})}
    atomic_write(marker, json.dumps(done, ensure_ascii=False))
    run.remove()
    return done


# --------------------------------------------------------------------------------------------
# Worker processes


def map_ordered(fn: Callable[[_T], _R], items: Iterable[_T], processes: int = 1,
                initializer: Callable[..., None] | None = None, initargs: tuple = (),
                in_flight: int | None = None) -> Iterator[_R]:
    """``fn`` over ``items``, results in input order. With ``processes > 1``, a pool of worker
    processes with at most ``in_flight`` items pending (default ``2 * processes``), so the reader
    never runs far ahead of the workers and memory stays flat. ``initializer(*initargs)`` builds
    per-process state once (in this process when ``processes == 1``)."""
    if processes <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield fn(item)
        return
    limit = in_flight or 2 * processes
    ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    with ctx.Pool(processes, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            while len(pending) > limit:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
